"""Step 1: supervised fine-tuning of the actor on demonstrations (prompt + answer), loss on the answer only.

    python -m rlhf.steps.sft --model-name-or-path PATH --data demos.jsonl --output-dir out/actor

The checkpoint loads with ``AutoModelForCausalLM.from_pretrained(output_dir)``. Evaluation: token-mean
cross-entropy and perplexity on a held-out share of the data, before and after training.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from rlhf.data import build_sft_dataset
from rlhf.models import create_actor
from rlhf.runtime.checkpoint import save_actor_checkpoint
from rlhf.runtime.config import POSITIVE, StepConfig, add_config_args, config_from_args, opt, step_main
from rlhf.runtime.distributed import all_reduce_sum, to_device
from rlhf.runtime.loop import initial_eval, prepare_step, skipped_updates, train_loop
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.process import run_cli
from rlhf.runtime.resume import RunControl


@dataclass
class SFTConfig(StepConfig):
    """Step-1 options; DeepSpeed-Chat's step-1 defaults (lr 1e-3, batch 16, 1 epoch, cosine, no warmup)."""

    output_dir: str = opt("outputs/actor", "where the actor checkpoint is written")
    learning_rate: float = opt(1e-3, "initial learning rate (after warmup)", bounds=POSITIVE)


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


def run_sft(cfg: SFTConfig, model_config=None, tokenizer=None, metrics: MetricsLogger | None = None,
            control: RunControl | None = None) -> dict:
    """Train the actor on ``cfg.data``, evaluate, save to ``cfg.output_dir``; return a summary dict.

    ``model_config`` builds a randomly initialised model when ``cfg.model_name_or_path`` is None (the tiny
    preset); ``tokenizer`` defaults to the model's.
    """
    start = time.time()
    s = prepare_step(cfg, 1, "sft", "SFT", build_sft_dataset, create_actor, model_config, tokenizer, metrics,
                     control)
    initial = initial_eval(s, "sft_eval", lambda: evaluate_sft(s.engine, s.eval_loader, s.dist.device))

    def lm_loss(engine, batch):
        return engine(**batch, use_cache=False).loss, {}

    step, last_loss = train_loop(s, cfg, "step 1 SFT", lm_loss, saved={"initial": initial})
    final = evaluate_sft(s.engine, s.eval_loader, s.dist.device) if len(s.eval_set) else {}
    if final:
        s.metrics.log("sft_eval", step, **final)
        if s.dist.is_main:
            warn_if_eval_loss_rose(initial.get("eval_loss"), final["eval_loss"], step, cfg.learning_rate)
    save_actor_checkpoint(s.engine.module, s.tokenizer, cfg.output_dir)
    return {
        "output_dir": cfg.output_dir,
        "train_examples": len(s.train_set),
        "eval_examples": len(s.eval_set),
        "steps": step,
        "final_train_loss": last_loss,
        "initial_eval_loss": initial.get("eval_loss", float("nan")),
        "final_eval_loss": final.get("eval_loss", float("nan")),
        "perplexity": final.get("perplexity", float("nan")),
        **skipped_updates(s),
        "seconds": time.time() - start,
    }


def warn_if_eval_loss_rose(initial: float | None, final: float, steps: int, learning_rate: float) -> bool:
    """Warn (and return True) when training made the held-out loss worse: on a pretrained model that is most
    often DeepSpeed-Chat's step-1 default learning rate, 1e-3, meant for small models (its own scripts fine-tune
    OPT at 9.65e-6). Seen on SmolLM2-135M-Instruct: 3.07 -> 4.85 in 3 steps at 1e-3."""
    if initial is None or not final > initial:
        return False
    warnings.warn(f"step 1 SFT: the held-out loss rose {initial:.3f} -> {final:.3f} in {steps} steps at learning rate "
                  f"{learning_rate:g}; for a pretrained model try a smaller one, e.g. 1e-5 (--sft-learning-rate in "
                  "rlhf train, --learning-rate in python -m rlhf.steps.sft)", RuntimeWarning, stacklevel=2)
    return True


def add_sft_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "",
                 skip: tuple[str, ...] = ()) -> None:
    """Add every SFTConfig option as ``--{prefix}name`` (e.g. ``--learning-rate`` or ``--sft-learning-rate``)."""
    add_config_args(parser, SFTConfig, prefix, skip)


def sft_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> SFTConfig:
    return config_from_args(SFTConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    return step_main(SFTConfig, run_sft, "Step 1: supervised fine-tuning of the actor", argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m rlhf.steps.sft"))
