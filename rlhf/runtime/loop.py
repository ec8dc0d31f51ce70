"""The training loop of every step (SFT, reward model, DPO, step-3 RL), run_loop: batches with a position that
resume replays, the progress bar, windowed metrics, an optional mid-run evaluation, non-finite counts, signals and
checkpoints. And what steps 1-2 and DPO share around it: set-up (data for the step, loaders, the model in a
DeepSpeed engine) and the update of a loss with gradient accumulation (train_loop)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.data import load_examples, load_step_examples, parse_data_spec, train_eval_split
from rlhf.models import load_tokenizer
from rlhf.runtime.config import StepConfig, num_update_steps
from rlhf.runtime.distributed import DistInfo, init_distributed, make_dataloader, to_device
from rlhf.runtime.engines import ds_config, initialize, warmup_steps
from rlhf.runtime.guards import NonFiniteGuard, guarded_update
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.resume import RunControl, capture_rng, restore_rng


@dataclass
class Step:
    """One training step's pieces, ready to loop over."""
    name: str                # "sft" or "reward": the metrics' step_name
    dist: DistInfo
    tokenizer: object
    metrics: MetricsLogger
    train_set: object
    eval_set: object
    train_loader: object
    eval_loader: object
    engine: object           # DeepSpeed engine of the model being trained
    total_steps: int         # optimizer steps the run will take
    control: RunControl      # checkpoints, signals, the non-finite limit
    resumed: dict | None     # the state of the checkpoint resumed from (engine already loaded), else None
    skipped: int = 0         # updates skipped for a non-finite loss (set by train_loop)


def prepare_step(cfg: StepConfig, step: int, name: str, what: str, build_dataset: Callable, create_model: Callable,
                 model_config=None, tokenizer=None, metrics: MetricsLogger | None = None,
                 control: RunControl | None = None) -> Step:
    """Load step `step`'s share of cfg.data, hold out the eval share, build loaders and the DeepSpeed engine; with
    `control` resuming, load its newest checkpoint into the engine.

    `what` names the step in error messages; `build_dataset(tokenizer, examples, max_seq_len)` and
    `create_model(source, options)` are the step's own.
    """
    dist = init_distributed()
    torch.manual_seed(cfg.seed)
    if cfg.model_name_or_path is None and model_config is None:
        raise ValueError(f"{what} needs --model-name-or-path (or a preset's model config)")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    metrics = metrics or MetricsLogger(cfg.metrics_path(), enabled=dist.is_main)
    if not cfg.data:
        raise ValueError(f"{what} needs --data (prompt/response, prompt/chosen/rejected or hh-rlhf files)")

    examples = load_step_examples(cfg.data, step=step, split=cfg.data_split, seed=cfg.seed)
    train_examples, eval_examples = train_eval_split(examples, cfg.eval_fraction, cfg.seed)
    train_set = build_dataset(tokenizer, train_examples, cfg.max_seq_len)
    eval_set = build_dataset(tokenizer, eval_examples, cfg.max_seq_len)
    if len(train_set) == 0:
        only_prompts = all(e.is_prompt for source in cfg.data for e in load_examples(parse_data_spec(source).path))
        raise ValueError(f"{what}: no training examples for step {step} in {cfg.data} with --data-split "
                         f"{cfg.data_split}" + (" (prompts without answers are step 3's data alone: run --step 3)"
                                                if only_prompts else ""))
    train_loader = make_dataloader(train_set, cfg.per_device_train_batch_size, shuffle=True, seed=cfg.seed)
    eval_loader = make_dataloader(eval_set, cfg.per_device_eval_batch_size, shuffle=False)

    model = create_model(cfg.model_name_or_path or model_config, cfg.model_options())
    total_steps = num_update_steps(len(train_loader), cfg)
    config = ds_config(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.zero_stage,
                       cfg.offload, cfg.dtype, world_size=dist.world_size)
    warmup = warmup_steps(total_steps, cfg.num_warmup_steps, cfg.warmup_ratio)
    engine = initialize(model, config, cfg.learning_rate, cfg.weight_decay, total_steps, warmup,
                        cfg.lr_scheduler_type, lora_lr=cfg.lora_learning_rate if cfg.lora_dim else None)
    control = control or RunControl()
    resumed = control.load({"model": engine})
    return Step(name, dist, tokenizer, metrics, train_set, eval_set, train_loader, eval_loader, engine, total_steps,
                control, resumed)


def window_means(window: list[dict]) -> dict:
    """Each metric's mean over a window of records (the metrics of its first)."""
    return {k: sum(w[k] for w in window) / len(window) for k in window[0]}


class Batches:
    """`epochs` passes over a DataLoader that know where they are: `position()` goes into a checkpoint, and
    `seek(position)` draws the data order up to it again, so a resumed run gets the batches the killed one would
    have had next."""

    def __init__(self, loader, epochs: int):
        self.loader, self.epochs = loader, epochs
        self.epoch, self.taken = 0, 0  # the epoch being drawn, and the batches drawn from it
        self.current = None            # that epoch's iterator

    def _order(self, epoch: int) -> None:
        if hasattr(self.loader.sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            self.loader.sampler.set_epoch(epoch)

    def __iter__(self):
        while self.epoch < self.epochs:
            if self.current is None:
                self._order(self.epoch)
                self.current, self.taken = iter(self.loader), 0
            for batch in self.current:
                self.taken += 1
                yield batch
            self.epoch, self.current = self.epoch + 1, None

    def position(self) -> dict:
        return {"epoch": self.epoch, "batches": self.taken}

    def seek(self, position: dict) -> None:
        for epoch in range(position["epoch"]):  # the finished epochs: their orders drawn, no batch loaded
            self._order(epoch)
            list(self.loader.sampler)
        self.epoch = position["epoch"]
        self._order(self.epoch)
        self.current = iter(self.loader)
        for _ in range(position["batches"]):  # the batches of this epoch already trained on
            next(self.current)
        self.taken = position["batches"]


def run_loop(update: Callable[[object, int], list[dict] | None], batches: Batches, total: int, *, name: str,
             desc: str, metrics: MetricsLogger, control: RunControl, engines: dict, guard: NonFiniteGuard,
             resumed: dict | None, log_interval: int, show_bar: bool, saved: Callable[[], dict] = dict,
             generators: dict[str, torch.Generator] | None = None,
             summarize: Callable[[list[dict]], dict] = window_means, log_last: bool = True,
             postfix: Callable[[dict], dict] = lambda r: {"loss": f"{r['loss']:.3f}"},
             evaluate: Callable[[], dict] | None = None, eval_interval: int = 0,
             print_lines: bool = False) -> tuple[int, dict]:
    """The training loop of every step: `total` optimizer updates (steps 1-2 and DPO) or rounds (step 3) from
    `batches`; returns (updates made, the record of the last window).

    `update(batch, n)` trains on one batch while update n is in progress; it gives the records of update n when
    that batch completed it, None when not (gradient accumulation, a rollout buffer still filling, a skipped
    batch). The window of records since the last one logged goes to metrics.jsonl as `summarize(window)` under
    `name` every `log_interval` updates (and at the last with `log_last`); `evaluate()` is logged as "<name>_eval"
    every `eval_interval` updates. After every update `control` checkpoints `engines` when due or asked (a signal)
    and at the end. A checkpoint holds the loop's position, `guard`'s counts, the RNG streams (torch, numpy,
    python and `generators`) and `saved()`, the step's own state (back as resumed["saved"]); from `resumed`, such
    a checkpoint's state, the loop replays the data order to it, restores the streams and continues bit for bit.
    With `print_lines` (no bar: --disable-tqdm, on the main rank) every update logged, and the last, prints one
    line instead, "`desc` step/total: " and `postfix`'s values, so a long run without a bar still shows it moves.
    """
    step, window, last = 0, [], {}
    if resumed is not None:
        step, window, last = resumed["step"], resumed["window"], resumed["last"]
        guard.load_state(resumed["guard"])
        batches.seek(resumed["data"])
        restore_rng(resumed["rng"], generators)  # after the data is placed: creating an iterator draws from torch
    bar = tqdm(total=total, initial=step, desc=desc, disable=not show_bar)

    def checkpoint_state() -> dict:  # what a checkpoint holds besides the engines: read when one is written
        return {"step": step, "data": batches.position(), "window": window, "last": last, "guard": guard.state(),
                "rng": capture_rng(generators), "saved": saved()}

    for batch in batches if step < total else ():
        records = update(batch, step + 1)
        if records is None:
            continue
        step += 1
        window += records
        bar.update(1)
        bar.set_postfix(**postfix(records[-1]))
        if step % log_interval == 0 or (log_last and step == total):
            last, window = summarize(window), []
            metrics.log(name, step, **last)
        if print_lines and (step % log_interval == 0 or step == total):
            shown = " ".join(f"{key} {value}" for key, value in postfix(records[-1]).items())
            print(f"{desc} {step}/{total}: {shown}", flush=True)
        if evaluate is not None and eval_interval and step % eval_interval == 0:
            metrics.log(f"{name}_eval", step, **evaluate())
        control.after_update(step, engines, checkpoint_state, guard)
        if step >= total:
            break
    bar.close()
    control.after_update(step, engines, checkpoint_state, guard, last=True)
    return step, summarize(window) if window else last


def train_loop(s: Step, cfg: StepConfig, desc: str, loss_fn: Callable, evaluate: Callable | None = None,
               eval_interval: int = 0, saved: dict | None = None) -> tuple[int, float]:
    """run_loop over cfg.num_train_epochs of s.train_loader, each micro-batch backpropagating `loss_fn`;
    returns (optimizer steps taken, mean loss of the last window).

    `loss_fn(engine, batch)` gives (loss, {metric: float}) for a batch on the device; a window's record is the
    mean of its micro-batches' with the learning rate. `evaluate(engine)` (a dict) is logged as "<name>_eval"
    every `eval_interval` steps when both are given. A micro-batch with a non-finite loss is skipped (no
    backward), a non-finite gradient dropped (guarded_update). `saved` comes back as s.resumed["saved"].
    """
    engine = s.engine
    engine.train()
    guard = NonFiniteGuard(s.control.max_nonfinite_steps, f"{s.name} step")
    batches = Batches(s.train_loader, cfg.num_train_epochs)
    micro = []  # the records of the micro-batches of the optimizer step in progress

    def update(batch, step: int) -> list[dict] | None:
        loss, extra = loss_fn(engine, to_device(batch, s.dist.device))
        if not guarded_update(engine, loss, guard, step):
            return None
        micro.append({"loss": loss.item(), **extra})
        if not engine.is_gradient_accumulation_boundary():
            return None
        if cfg.print_loss and s.dist.is_main:
            print(f"{s.name} epoch {batches.epoch} step {step} loss {loss.item():.4f}")
        records = micro.copy()
        micro.clear()
        return records

    step, last = run_loop(update, batches, s.total_steps, name=s.name, desc=desc, metrics=s.metrics,
                          control=s.control, engines={"model": engine}, guard=guard, resumed=s.resumed,
                          log_interval=cfg.log_interval, show_bar=not cfg.disable_tqdm and s.dist.is_main,
                          print_lines=cfg.disable_tqdm and s.dist.is_main,
                          saved=lambda: saved, summarize=lambda w: {**window_means(w), "lr": engine.get_lr()[0]},
                          evaluate=(lambda: evaluate(engine)) if evaluate is not None else None,
                          eval_interval=eval_interval)
    s.skipped = guard.skipped
    return step, last.get("loss", float("nan"))


def initial_eval(s: Step, record: str, evaluate: Callable[[], dict]) -> dict:
    """The evaluation before training, logged as `record` at step 0; a resumed step has it from its checkpoint."""
    if s.resumed is not None:
        return s.resumed["saved"]["initial"]
    initial = evaluate() if len(s.eval_set) else {}
    if initial:
        s.metrics.log(record, 0, **initial)
    return initial


def skipped_updates(s: Step) -> dict:
    """The summary's counts of skipped updates: ours (a non-finite loss, or a ZeRO-0 fp32 gradient), and
    DeepSpeed's own (fp16 overflows, non-finite gradient norms under ZeRO 1-3 or bf16)."""
    return {"nonfinite_skipped": s.skipped, "deepspeed_skipped_steps": s.engine.skipped_steps}
