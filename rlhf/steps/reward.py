"""Step 2: reward-model training on preference pairs, loss ``-log sigmoid(s_chosen - s_rejected)``.

    python -m rlhf.steps.reward --model-name-or-path PATH --data pairs.jsonl --output-dir out/reward

The checkpoint loads with ``RewardModel.from_pretrained(output_dir)``. Evaluation on held-out pairs:
accuracy (share with s_chosen > s_rejected, ties counted half) and the mean chosen and rejected scores.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from rlhf.core.losses import pair_accuracy, pairwise_loss
from rlhf.data import build_pair_dataset
from rlhf.models import create_reward_model, gather_scores
from rlhf.runtime.checkpoint import save_reward_checkpoint
from rlhf.runtime.config import NON_NEGATIVE, POSITIVE, StepConfig, add_config_args, config_from_args, opt, step_main
from rlhf.runtime.distributed import all_reduce_sum, to_device
from rlhf.runtime.loop import initial_eval, prepare_step, skipped_updates, train_loop
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.process import run_cli
from rlhf.runtime.resume import RunControl


@dataclass
class RewardConfig(StepConfig):
    """Step-2 options; DeepSpeed-Chat's step-2 defaults (lr 5e-5, batch 16, 1 epoch, cosine)."""

    output_dir: str = opt("outputs/reward", "where the reward-model checkpoint is written")
    learning_rate: float = opt(5e-5, "initial learning rate (after warmup)", bounds=POSITIVE)
    eval_interval: int = opt(0, "evaluate every this many optimizer steps (0: only before and after training)",
                             bounds=NON_NEGATIVE)


def pair_scores(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores, each (B,), of a (2B, T) pair batch."""
    values = engine(batch["input_ids"], batch["attention_mask"])  # (2B, T)
    scores = gather_scores(values, batch["attention_mask"]).float()  # (2B,)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def evaluate_reward(engine, loader, device: torch.device) -> dict[str, float]:
    """Held-out accuracy and mean chosen / rejected scores."""
    engine.eval()
    correct, count, chosen_sum, rejected_sum = 0.0, 0.0, 0.0, 0.0
    for batch in loader:
        chosen, rejected = pair_scores(engine, to_device(batch, device))
        correct += pair_accuracy(chosen, rejected).sum().item()
        count += chosen.numel()
        chosen_sum += chosen.sum().item()
        rejected_sum += rejected.sum().item()
    engine.train()
    correct, count, chosen_sum, rejected_sum = all_reduce_sum([correct, count, chosen_sum, rejected_sum], device)
    count = max(count, 1.0)
    return {"accuracy": correct / count, "chosen_score": chosen_sum / count,
            "rejected_score": rejected_sum / count}


def run_reward(cfg: RewardConfig, model_config=None, tokenizer=None, metrics: MetricsLogger | None = None,
               control: RunControl | None = None) -> dict:
    """Train on ``cfg.data``'s step-2 pairs, evaluate, save to ``cfg.output_dir``; return a summary.

    ``model_config`` builds a randomly initialised backbone when ``cfg.model_name_or_path`` is None.
    """
    start = time.time()
    s = prepare_step(cfg, 2, "reward", "the reward model", build_pair_dataset, create_reward_model, model_config,
                     tokenizer, metrics, control)
    initial = initial_eval(s, "reward_eval", lambda: evaluate_reward(s.engine, s.eval_loader, s.dist.device))

    def ranking_loss(engine, batch):
        chosen, rejected = pair_scores(engine, batch)
        return pairwise_loss(chosen, rejected), {"train_accuracy": pair_accuracy(chosen, rejected).mean().item()}

    def evaluate(engine):
        return evaluate_reward(engine, s.eval_loader, s.dist.device)

    step, last_loss = train_loop(s, cfg, "step 2 reward model", ranking_loss, evaluate if len(s.eval_set) else None,
                                 cfg.eval_interval, saved={"initial": initial})
    final = evaluate_reward(s.engine, s.eval_loader, s.dist.device) if len(s.eval_set) else {}
    if final:
        s.metrics.log("reward_eval", step, **final)
    save_reward_checkpoint(s.engine.module, s.tokenizer, cfg.output_dir)
    nan = float("nan")
    return {
        "output_dir": cfg.output_dir,
        "train_pairs": len(s.train_set),
        "eval_pairs": len(s.eval_set),
        "steps": step,
        "final_train_loss": last_loss,
        "initial_accuracy": initial.get("accuracy", nan),
        "accuracy": final.get("accuracy", nan),
        "chosen_score": final.get("chosen_score", nan),
        "rejected_score": final.get("rejected_score", nan),
        **skipped_updates(s),
        "seconds": time.time() - start,
    }


def add_reward_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "",
                    skip: tuple[str, ...] = ()) -> None:
    """Add every RewardConfig option as ``--{prefix}name`` (e.g. ``--learning-rate`` or ``--rm-learning-rate``)."""
    add_config_args(parser, RewardConfig, prefix, skip)


def reward_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> RewardConfig:
    return config_from_args(RewardConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    return step_main(RewardConfig, run_reward, "Step 2: reward-model training on preference pairs", argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m rlhf.steps.reward"))
