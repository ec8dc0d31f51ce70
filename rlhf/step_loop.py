"""What steps 1 and 2 share: set-up (data for the step, loaders, model in a DeepSpeed engine) and the training
loop over epochs with a progress bar, windowed metrics and an optional mid-run evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.common import StepConfig, num_update_steps, to_device
from rlhf.data import load_step_examples, make_dataloader, train_eval_split
from rlhf.deepspeed_utils import DistInfo, ds_config, init_distributed, initialize
from rlhf.metrics import MetricsLogger
from rlhf.models import load_tokenizer


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


def prepare_step(cfg: StepConfig, step: int, name: str, what: str, build_dataset: Callable, create_model: Callable,
                 model_config=None, tokenizer=None, metrics: MetricsLogger | None = None) -> Step:
    """Load step `step`'s share of cfg.data, hold out the eval share, build loaders and the DeepSpeed engine.

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
    return Step(name, dist, tokenizer, metrics, train_set, eval_set, train_loader, eval_loader, engine, total_steps)


def train_loop(s: Step, cfg: StepConfig, desc: str, loss_fn: Callable, evaluate: Callable | None = None,
               eval_interval: int = 0) -> tuple[int, float]:
    """Epochs over s.train_loader; returns (optimizer steps taken, mean loss of the last window).

    `loss_fn(engine, batch)` gives (loss, {metric: float}) for a batch on the device; the window of micro-batches
    since the last record is averaged into metrics.jsonl every cfg.log_interval steps, with the learning rate.
    `evaluate(engine)` (a dict) is logged as "<name>_eval" every `eval_interval` steps when both are given.
    """
    engine, metrics = s.engine, s.metrics
    engine.train()
    step, window, last_loss = 0, [], float("nan")
    bar = tqdm(total=s.total_steps, desc=desc, disable=cfg.disable_tqdm or not s.dist.is_main)
    for epoch in range(cfg.num_train_epochs):
        if hasattr(s.train_loader.sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            s.train_loader.sampler.set_epoch(epoch)
        for batch in s.train_loader:
            loss, extra = loss_fn(engine, to_device(batch, s.dist.device))
            engine.backward(loss)
            engine.step()
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
            if step >= s.total_steps:
                break
        if step >= s.total_steps:
            break
    bar.close()
    if window:
        last_loss = sum(w["loss"] for w in window) / len(window)
    return step, last_loss
