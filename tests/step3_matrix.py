"""The step-3 configuration matrix: the ZeRO / offload / LoRA / precision / parallelism combinations
DeepSpeed-Chat's training scripts use, plus ours, each run through the real `rlhf train --step 3` command.

Single-process rows run in the pytest process (tests/test_step3_matrix.py); the two-process rows run in one
`torchrun` job (`python -m tests.step3_matrix OUT ACTOR REWARD DATA`), one configuration after another, so
the processes start once. Each row writes what the test checks to OUT/<row>/rank<r>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# name -> flags added to the common ones. fp32 rows must keep the rollout/training logprob gap under 1e-5.
SINGLE_PROCESS_ROWS = {
    "zero0-0": [],
    "zero1-1": ["--actor-zero-stage", "1", "--critic-zero-stage", "1"],
    "zero2-2": ["--actor-zero-stage", "2", "--critic-zero-stage", "2"],
    "zero3-3": ["--actor-zero-stage", "3", "--critic-zero-stage", "3"],
    "zero2-3": ["--actor-zero-stage", "2", "--critic-zero-stage", "3"],
    "zero3-2": ["--actor-zero-stage", "3", "--critic-zero-stage", "2"],
    "zero3-3-offload": ["--actor-zero-stage", "3", "--critic-zero-stage", "3", "--offload",
                        "--offload-reference-model", "--offload-reward-model"],
    "zero2-2-lora": ["--actor-zero-stage", "2", "--critic-zero-stage", "2", "--actor-lora-dim", "4",
                     "--critic-lora-dim", "4", "--only-optimize-lora"],
    "zero3-3-lora": ["--actor-zero-stage", "3", "--critic-zero-stage", "3", "--actor-lora-dim", "4",
                     "--critic-lora-dim", "4", "--only-optimize-lora"],
    "grad-ckpt": ["--actor-gradient-checkpointing", "--critic-gradient-checkpointing"],
    "ema-ptx": ["--enable-ema", "--unsup-coef", "0.5"],  # --unsupervised-data is added by the caller
    "bf16": ["--dtype", "bf16"],
    "hf-generate": ["--no-enable-hybrid-engine"],
}
# The critic-free path, on GRPO against the built-in rule (no critic, no reward model): the rows that apply.
GRPO = ["--algorithm", "grpo", "--reward-fn", "synthetic", "--n-samples-per-prompt", "2"]
SINGLE_PROCESS_ROWS.update({
    "grpo-zero0": GRPO,
    "grpo-zero1": [*GRPO, "--actor-zero-stage", "1"],
    "grpo-zero2": [*GRPO, "--actor-zero-stage", "2"],
    "grpo-zero3-offload": [*GRPO, "--actor-zero-stage", "3", "--offload", "--offload-reference-model"],
    "grpo-zero3-lora": [*GRPO, "--actor-zero-stage", "3", "--actor-lora-dim", "4", "--only-optimize-lora"],
    "grpo-bf16": [*GRPO, "--dtype", "bf16"],
})
TWO_PROCESS_ROWS = {
    "2proc-zero2-2": ["--actor-zero-stage", "2", "--critic-zero-stage", "2"],
    "2proc-zero3-3": ["--actor-zero-stage", "3", "--critic-zero-stage", "3"],
    "2proc-zero3-3-tp2": ["--actor-zero-stage", "3", "--critic-zero-stage", "3", "--inference-tp-size", "2"],
    "2proc-grpo-zero3-tp2": [*GRPO, "--actor-zero-stage", "3", "--inference-tp-size", "2"],
}
ROUNDS = 2
# Small shapes: each row is about its set-up, not its learning.
COMMON = ["--step", "3", "--max-steps", str(ROUNDS), "--per-device-generation-batch-size", "8",
          "--per-device-training-batch-size", "4", "--max-answer-seq-len", "8", "--eval-prompts", "8",
          "--disable-tqdm", "--data-split", "0,1,1"]


def argv(out: Path, actor: Path, reward: Path, data: Path, flags: list[str]) -> list[str]:
    return [*COMMON, "--output-dir", str(out), "--actor-model", str(actor), "--reward-model", str(reward),
            "--data", str(data), *flags]


def run_row(out: Path, actor: Path, reward: Path, data: Path, flags: list[str], rank: int = 0) -> dict:
    """One `rlhf train --step 3` run; returns (and writes) its PPO summary."""
    from rlhf.cli.train import main

    summary = next(v for k, v in main(argv(out, actor, reward, data, flags)).items() if k.startswith("step 3"))
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    return summary


def main(args: list[str]) -> None:
    """Every two-process row in this (torchrun-launched) process, one after another."""
    from rlhf.runtime.distributed import init_distributed

    out, actor, reward, data = map(Path, args)
    rank = init_distributed().rank
    for name, flags in TWO_PROCESS_ROWS.items():
        run_row(out / name, actor, reward, data, flags, rank)


if __name__ == "__main__":
    from rlhf.runtime.process import end_process

    main(sys.argv[1:])
    end_process(0)
