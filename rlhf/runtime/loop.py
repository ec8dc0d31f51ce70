"""What steps 1 and 2 share: set-up (data for the step, loaders, model in a DeepSpeed engine) and the training
loop over epochs with a progress bar, windowed metrics and an optional mid-run evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.data import load_step_examples, train_eval_split
from rlhf.models import load_tokenizer
from rlhf.runtime.config import StepConfig, num_update_steps
from rlhf.runtime.distributed import DistInfo, init_distributed, make_dataloader, to_device
from rlhf.runtime.engines import ds_config, initialize
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
        raise ValueError(f"{what}: no training examples for step {step} in {cfg.data} with --data-split "
                         f"{cfg.data_split}")
    train_loader = make_dataloader(train_set, cfg.per_device_train_batch_size, shuffle=True, seed=cfg.seed)
    eval_loader = make_dataloader(eval_set, cfg.per_device_eval_batch_size, shuffle=False)

    model = create_model(cfg.model_name_or_path or model_config, cfg.model_options())
    total_steps = num_update_steps(len(train_loader), cfg)
    config = ds_config(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.zero_stage,
                       cfg.offload, cfg.dtype, world_size=dist.world_size)
    engine = initialize(model, config, cfg.learning_rate, cfg.weight_decay, total_steps, cfg.num_warmup_steps,
                        cfg.lr_scheduler_type, lora_lr=cfg.lora_learning_rate if cfg.lora_dim else None)
    control = control or RunControl()
    resumed = control.load({"model": engine})
    return Step(name, dist, tokenizer, metrics, train_set, eval_set, train_loader, eval_loader, engine, total_steps,
                control, resumed)


def train_loop(s: Step, cfg: StepConfig, desc: str, loss_fn: Callable, evaluate: Callable | None = None,
               eval_interval: int = 0, saved: dict | None = None) -> tuple[int, float]:
    """Epochs over s.train_loader; returns (optimizer steps taken, mean loss of the last window).

    `loss_fn(engine, batch)` gives (loss, {metric: float}) for a batch on the device; the window of micro-batches
    since the last record is averaged into metrics.jsonl every cfg.log_interval steps, with the learning rate.
    `evaluate(engine)` (a dict) is logged as "<name>_eval" every `eval_interval` steps when both are given.
    A micro-batch with a non-finite loss is skipped (no backward), a non-finite gradient dropped (guarded_update).
    Checkpoints (s.control) carry the loop's position, RNG streams and `saved` (the caller's own state, back as
    s.resumed["saved"]); resuming from one replays the data order up to that position and continues bit for bit.
    """
    engine, metrics, control = s.engine, s.metrics, s.control
    engine.train()
    guard = NonFiniteGuard(control.max_nonfinite_steps, f"{s.name} step")
    step, window, last_loss, start_epoch, done = 0, [], float("nan"), 0, 0
    r = s.resumed
    if r is not None:
        step, window, last_loss, start_epoch, done = r["step"], r["window"], r["last_loss"], r["epoch"], r["batches"]
        guard.load_state(r["guard"])
    bar = tqdm(total=s.total_steps, initial=step, desc=desc, disable=cfg.disable_tqdm or not s.dist.is_main)

    def loop_state() -> dict:  # what a checkpoint holds besides the engine: read when one is written
        return {"step": step, "epoch": epoch, "batches": done, "window": window, "last_loss": last_loss,
                "guard": guard.state(), "rng": capture_rng(), "saved": saved}

    for epoch in range(cfg.num_train_epochs):
        if step >= s.total_steps:
            break
        if hasattr(s.train_loader.sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            s.train_loader.sampler.set_epoch(epoch)
        if epoch < start_epoch:  # resumed: draw the finished epochs' orders, as the run did
            list(s.train_loader.sampler)
            continue
        batches = iter(s.train_loader)
        if r is not None and epoch == start_epoch:
            for _ in range(done):  # the resumed epoch's batches already trained on
                next(batches)
            restore_rng(r["rng"])  # after the data is placed: creating the iterator draws from torch's stream
        else:
            done = 0
        for batch in batches:
            done += 1
            loss, extra = loss_fn(engine, to_device(batch, s.dist.device))
            if not guarded_update(engine, loss, guard, step + 1):
                continue
            window.append({"loss": loss.item(), **extra})
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.print_loss and s.dist.is_main:
                print(f"{s.name} epoch {epoch} step {step} loss {loss.item():.4f}")
            if step % cfg.log_interval == 0 or step == s.total_steps:
                means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                last_loss = means["loss"]
                metrics.log(s.name, step, **means, lr=engine.get_lr()[0])
                window = []
            if evaluate is not None and eval_interval and step % eval_interval == 0:
                metrics.log(f"{s.name}_eval", step, **evaluate(engine))
            control.after_update(step, {"model": engine}, loop_state, guard, last=step >= s.total_steps)
            if step >= s.total_steps:
                break
    bar.close()
    s.skipped = guard.skipped
    if window:
        last_loss = sum(w["loss"] for w in window) / len(window)
    return step, last_loss


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
