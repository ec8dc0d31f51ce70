"""Step 1: supervised fine-tuning of the actor on demonstrations (prompt + answer), loss on the answer only.

    python -m rlhf.sft --model-name-or-path PATH --data demos.jsonl --output-dir out/actor

The checkpoint loads with ``AutoModelForCausalLM.from_pretrained(output_dir)``. Evaluation: token-mean
cross-entropy and perplexity on a held-out share of the data, before and after training.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import save_actor_checkpoint
from rlhf.common import (
    StepConfig,
    add_config_args,
    add_launcher_args,
    all_reduce_sum,
    config_from_args,
    num_update_steps,
    opt,
    to_device,
)
from rlhf.data import build_sft_dataset, load_step_examples, make_dataloader, train_eval_split
from rlhf.deepspeed_utils import ds_config, init_distributed, initialize
from rlhf.metrics import MetricsLogger
from rlhf.models import create_actor, load_tokenizer


@dataclass
class SFTConfig(StepConfig):
    """Step-1 options; DeepSpeed-Chat's step-1 defaults (lr 1e-3, batch 16, 1 epoch, cosine, no warmup)."""

    output_dir: str = opt("outputs/actor", "where the actor checkpoint is written")
    learning_rate: float = opt(1e-3, "initial learning rate (after warmup)")


@torch.no_grad()
def evaluate_sft(engine, loader, device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss over the answer tokens of ``loader``, and its perplexity."""
    engine.eval()
    total_loss, total_tokens = 0.0, 0.0
    for batch in loader:
        batch = to_device(batch, device)
        loss = engine(**batch, use_cache=False).loss
        tokens = (batch["labels"][:, 1:] != -100).sum().item()  # the model shifts labels by one
        total_loss += loss.float().item() * tokens
        total_tokens += tokens
    engine.train()
    total_loss, total_tokens = all_reduce_sum([total_loss, total_tokens], device)
    loss = total_loss / max(total_tokens, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def run_sft(cfg: SFTConfig, model_config=None, tokenizer=None, metrics: MetricsLogger | None = None) -> dict:
    """Train the actor on ``cfg.data``, evaluate, save to ``cfg.output_dir``; return a summary dict.

    ``model_config`` builds a randomly initialised model when ``cfg.model_name_or_path`` is None (the tiny
    preset); ``tokenizer`` defaults to the model's.
    """
    start = time.time()
    dist = init_distributed()
    torch.manual_seed(cfg.seed)
    if cfg.model_name_or_path is None and model_config is None:
        raise ValueError("SFT needs --model-name-or-path (or a preset's model config)")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    metrics = metrics or MetricsLogger(cfg.metrics_path(), enabled=dist.is_main)
    if not cfg.data:
        raise ValueError("SFT needs --data (prompt/response, prompt/chosen/rejected or hh-rlhf files)")

    examples = load_step_examples(cfg.data, step=1, split=cfg.data_split, seed=cfg.seed)
    train_examples, eval_examples = train_eval_split(examples, cfg.eval_fraction, cfg.seed)
    train_set = build_sft_dataset(tokenizer, train_examples, cfg.max_seq_len)
    eval_set = build_sft_dataset(tokenizer, eval_examples, cfg.max_seq_len)
    if len(train_set) == 0:
        raise ValueError(f"SFT: no training examples for step 1 in {cfg.data} with --data-split {cfg.data_split}")
    train_loader = make_dataloader(train_set, cfg.per_device_train_batch_size, shuffle=True, seed=cfg.seed)
    eval_loader = make_dataloader(eval_set, cfg.per_device_eval_batch_size, shuffle=False)

    model = create_actor(cfg.model_name_or_path or model_config, cfg.model_options())
    total_steps = num_update_steps(len(train_loader), cfg)
    config = ds_config(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.zero_stage,
                       cfg.offload, cfg.dtype, world_size=dist.world_size)
    engine = initialize(model, config, cfg.learning_rate, cfg.weight_decay, total_steps, cfg.num_warmup_steps,
                        cfg.lr_scheduler_type, lora_lr=cfg.lora_learning_rate if cfg.lora_dim else None)

    initial = evaluate_sft(engine, eval_loader, dist.device) if len(eval_set) else {}
    if initial:
        metrics.log("sft_eval", 0, **initial)
    engine.train()
    step, window, last_loss = 0, [], float("nan")
    bar = tqdm(total=total_steps, desc="step 1 SFT", disable=cfg.disable_tqdm or not dist.is_main)
    for epoch in range(cfg.num_train_epochs):
        if hasattr(train_loader.sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            loss = engine(**to_device(batch, dist.device), use_cache=False).loss
            engine.backward(loss)
            engine.step()
            window.append(loss.item())
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.print_loss and dist.is_main:
                print(f"sft epoch {epoch} step {step} loss {loss.item():.4f}")
            if step % cfg.log_interval == 0 or step == total_steps:
                last_loss = sum(window) / len(window)
                metrics.log("sft", step, loss=last_loss, lr=engine.get_lr()[0])
                window = []
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    bar.close()
    if window:
        last_loss = sum(window) / len(window)

    final = evaluate_sft(engine, eval_loader, dist.device) if len(eval_set) else {}
    if final:
        metrics.log("sft_eval", step, **final)
    save_actor_checkpoint(engine.module, tokenizer, cfg.output_dir)
    return {
        "output_dir": cfg.output_dir,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "steps": step,
        "final_train_loss": last_loss,
        "initial_eval_loss": initial.get("eval_loss", float("nan")),
        "final_eval_loss": final.get("eval_loss", float("nan")),
        "perplexity": final.get("perplexity", float("nan")),
        "seconds": time.time() - start,
    }


def add_sft_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "",
                 skip: tuple[str, ...] = ()) -> None:
    """Add every SFTConfig option as ``--{prefix}name`` (e.g. ``--learning-rate`` or ``--sft-learning-rate``)."""
    add_config_args(parser, SFTConfig, prefix, skip)


def sft_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> SFTConfig:
    return config_from_args(SFTConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Step 1: supervised fine-tuning of the actor")
    add_launcher_args(parser)
    add_sft_args(parser)
    summary = run_sft(sft_config_from_args(parser.parse_args(argv)))
    print(summary)
    return summary


if __name__ == "__main__":
    main()
