"""PPO rounds that two processes and one process must agree on.

Both ranks of a two-process run get the same prompts and the same sampling seed, so they generate the same
rollouts and compute the same gradients; DeepSpeed's average of two equal gradients is that gradient, so the
ZeRO-partitioned update must land where one process's unpartitioned update lands, up to the rounding of the
gradient norm (summed over partitions). What differs is the machinery under test: ZeRO-3 gathering for
generation and scoring, the gradient all-reduce and the partitioned optimizer.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.ppo_parity OUT TINY_RUN
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROWS, ROUNDS = 8, 2


def run(out: Path, tiny_run: Path, zero_stage: int) -> list[dict]:
    """ROUNDS rounds of rollout + update on the same ROWS prompts; saves the actor to out/actor and returns
    each round's losses and mean reward."""
    from rlhf.cli.presets import get_preset
    from rlhf.data import build_prompt_dataset, load_step_examples
    from rlhf.runtime.checkpoint import save_actor_checkpoint
    from rlhf.runtime.config import config_from_options
    from rlhf.runtime.distributed import init_distributed
    from rlhf.steps.rl_config import RLConfig
    from rlhf.steps.rl_trainer import RLTrainer, records

    cfg = config_from_options(
        RLConfig, actor_model_name_or_path=str(tiny_run / "actor"),
        critic_model_name_or_path=str(tiny_run / "reward"), data=[str(tiny_run / "data" / "pairs.jsonl")],
        data_split="0,1,1", output_dir=str(out), per_device_generation_batch_size=ROWS,
        per_device_training_batch_size=ROWS, max_prompt_seq_len=16, max_answer_seq_len=8, num_warmup_steps=0,
        actor_learning_rate=1e-3, critic_learning_rate=1e-3, actor_zero_stage=zero_stage,
        critic_zero_stage=zero_stage, disable_tqdm=True)
    tokenizer = get_preset("tiny").tokenizer()
    dist = init_distributed()
    trainer = RLTrainer(cfg, tokenizer, total_steps=ROUNDS, device=dist.device, reward_fn=None)
    dataset = build_prompt_dataset(tokenizer, load_step_examples(cfg.data, step=3, split=cfg.data_split)[:ROWS], 16)
    batch = dataset.collate(list(range(len(dataset))))  # the whole batch on every rank (no distributed sampler)
    history = []
    for r in range(ROUNDS):
        exp, _ = trainer.rollout(batch, *records(dataset, batch), torch.Generator().manual_seed(100 + r))
        losses = trainer.train_on(exp, None)
        history.append({"reward": exp.scores.mean().item(), **losses})
    save_actor_checkpoint(trainer.actor.module, tokenizer, out / "actor")
    return history


if __name__ == "__main__":
    out, tiny_run = map(Path, sys.argv[1:])
    from rlhf.runtime.distributed import init_distributed

    rank = init_distributed().rank
    history = run(out, tiny_run, zero_stage=3)
    (out / f"rank{rank}.json").write_text(json.dumps(history))
    from rlhf.runtime.process import end_process

    end_process(0)
