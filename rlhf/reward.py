"""Step 2: reward-model training on preference pairs, loss ``-log sigmoid(s_chosen - s_rejected)``.

    python -m rlhf.reward --model-name-or-path PATH --data pairs.jsonl --output-dir out/reward

The checkpoint loads with ``RewardModel.from_pretrained(output_dir)``. Evaluation on held-out pairs:
accuracy (share with s_chosen > s_rejected) and the mean chosen and rejected scores.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import save_reward_checkpoint
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
from rlhf.data import build_pair_dataset, load_step_examples, make_dataloader, train_eval_split
from rlhf.deepspeed_utils import ds_config, init_distributed, initialize
from rlhf.losses import pairwise_loss
from rlhf.metrics import MetricsLogger
from rlhf.models import create_reward_model, gather_scores, load_tokenizer


@dataclass
class RewardConfig(StepConfig):
    """Step-2 options; DeepSpeed-Chat's step-2 defaults (lr 5e-5, batch 16, 1 epoch, cosine)."""

    output_dir: str = opt("outputs/reward", "where the reward-model checkpoint is written")
    learning_rate: float = opt(5e-5, "initial learning rate (after warmup)")
    eval_interval: int = opt(0, "evaluate every this many optimizer steps (0: only before and after training)")


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
        correct += (chosen > rejected).sum().item()
        count += chosen.numel()
        chosen_sum += chosen.sum().item()
        rejected_sum += rejected.sum().item()
    engine.train()
    correct, count, chosen_sum, rejected_sum = all_reduce_sum([correct, count, chosen_sum, rejected_sum], device)
    count = max(count, 1.0)
    return {"accuracy": correct / count, "chosen_score": chosen_sum / count,
            "rejected_score": rejected_sum / count}


def run_reward(cfg: RewardConfig, model_config=None, tokenizer=None, metrics: MetricsLogger | None = None) -> dict:
    """Train on ``cfg.data``'s step-2 pairs, evaluate, save to ``cfg.output_dir``; return a summary.

    ``model_config`` builds a randomly initialised backbone when ``cfg.model_name_or_path`` is None.
    """
    start = time.time()
    dist = init_distributed()
    torch.manual_seed(cfg.seed)
    if cfg.model_name_or_path is None and model_config is None:
        raise ValueError("the reward model needs --model-name-or-path (or a preset's model config)")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    metrics = metrics or MetricsLogger(cfg.metrics_path(), enabled=dist.is_main)
    if not cfg.data:
        raise ValueError("the reward model needs --data with prompt/chosen/rejected or hh-rlhf records")

    examples = load_step_examples(cfg.data, step=2, split=cfg.data_split, seed=cfg.seed)
    train_examples, eval_examples = train_eval_split(examples, cfg.eval_fraction, cfg.seed)
    train_set = build_pair_dataset(tokenizer, train_examples, cfg.max_seq_len)
    eval_set = build_pair_dataset(tokenizer, eval_examples, cfg.max_seq_len)
    if len(train_set) == 0:
        raise ValueError(f"reward model: no pairs for step 2 in {cfg.data} (--data-split {cfg.data_split})")
    train_loader = make_dataloader(train_set, cfg.per_device_train_batch_size, shuffle=True, seed=cfg.seed)
    eval_loader = make_dataloader(eval_set, cfg.per_device_eval_batch_size, shuffle=False)

    model = create_reward_model(cfg.model_name_or_path or model_config, cfg.model_options())
    total_steps = num_update_steps(len(train_loader), cfg)
    config = ds_config(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.zero_stage,
                       cfg.offload, cfg.dtype, world_size=dist.world_size)
    engine = initialize(model, config, cfg.learning_rate, cfg.weight_decay, total_steps, cfg.num_warmup_steps,
                        cfg.lr_scheduler_type, lora_lr=cfg.lora_learning_rate if cfg.lora_dim else None)

    initial = evaluate_reward(engine, eval_loader, dist.device) if len(eval_set) else {}
    if initial:
        metrics.log("reward_eval", 0, **initial)
    engine.train()
    step, window, last_loss = 0, [], float("nan")
    bar = tqdm(total=total_steps, desc="step 2 reward model", disable=cfg.disable_tqdm or not dist.is_main)
    for epoch in range(cfg.num_train_epochs):
        if hasattr(train_loader.sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            chosen, rejected = pair_scores(engine, to_device(batch, dist.device))
            loss = pairwise_loss(chosen, rejected)
            engine.backward(loss)
            engine.step()
            window.append((loss.item(), (chosen > rejected).float().mean().item()))
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.print_loss and dist.is_main:
                print(f"reward epoch {epoch} step {step} loss {loss.item():.4f}")
            if step % cfg.log_interval == 0 or step == total_steps:
                last_loss = sum(w[0] for w in window) / len(window)
                train_accuracy = sum(w[1] for w in window) / len(window)
                metrics.log("reward", step, loss=last_loss, train_accuracy=train_accuracy, lr=engine.get_lr()[0])
                window = []
            if cfg.eval_interval and step % cfg.eval_interval == 0 and len(eval_set):
                metrics.log("reward_eval", step, **evaluate_reward(engine, eval_loader, dist.device))
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    bar.close()
    if window:
        last_loss = sum(w[0] for w in window) / len(window)

    final = evaluate_reward(engine, eval_loader, dist.device) if len(eval_set) else {}
    if final:
        metrics.log("reward_eval", step, **final)
    save_reward_checkpoint(engine.module, tokenizer, cfg.output_dir)
    nan = float("nan")
    return {
        "output_dir": cfg.output_dir,
        "train_pairs": len(train_set),
        "eval_pairs": len(eval_set),
        "steps": step,
        "final_train_loss": last_loss,
        "initial_accuracy": initial.get("accuracy", nan),
        "accuracy": final.get("accuracy", nan),
        "chosen_score": final.get("chosen_score", nan),
        "rejected_score": final.get("rejected_score", nan),
        "seconds": time.time() - start,
    }


def add_reward_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "",
                    skip: tuple[str, ...] = ()) -> None:
    """Add every RewardConfig option as ``--{prefix}name`` (e.g. ``--learning-rate`` or ``--rm-learning-rate``)."""
    add_config_args(parser, RewardConfig, prefix, skip)


def reward_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> RewardConfig:
    return config_from_args(RewardConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Step 2: reward-model training on preference pairs")
    add_launcher_args(parser)
    add_reward_args(parser)
    summary = run_reward(reward_config_from_args(parser.parse_args(argv)))
    print(summary)
    return summary


if __name__ == "__main__":
    main()
