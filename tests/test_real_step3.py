"""Step 3 on a real pretrained model: two PPO rounds and two GRPO rounds of SmolLM2-135M-Instruct
(tests/real_model.py) on the committed Anthropic hh-rlhf sample (tests/data/README.md), through
`python -m rlhf.steps.rl`.

Small on purpose (CI runs them on 2 CPU cores): 2 prompts per round (GRPO: 2 samples of each), prompts of at
most 48 tokens, 8 new tokens, no held-out evaluation, a reward function instead of a trained reward model (PPO's
critic starts from the model's backbone with a new value head). What they check is what only a real model shows:
a 49k vocabulary and a real EOS through the whole round, the engine's reused rollout logprobs audited on round 1
against the training forward within the real-model tolerance, and checkpoints that load back.
"""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.runtime.metrics import read_metrics
from rlhf.steps.rl import main as ppo_main
from tests.real_model import real_model_dir
from tests.test_real_model import FP32_LOGPROB_ATOL

DATA = Path(__file__).parent / "data" / "hh_rlhf_harmless_test_64.jsonl"


def length_reward(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """An answer's length in characters, over 10: it differs between samples, so GRPO's group advantages are not
    all zero (a rule that scores every 8-token answer alike would leave the actor where it was)."""
    return [len(r) / 10 for r in responses]


@pytest.mark.parametrize("algorithm, extra", [
    ("ppo", []),
    ("grpo", ["--n-samples-per-prompt", "2"]),
])
def test_two_rounds_on_smollm2_with_hh_rlhf(algorithm, extra, tmp_path):
    model_dir = real_model_dir()
    out = tmp_path / algorithm
    summary = ppo_main([
        "--algorithm", algorithm, "--actor-model-name-or-path", str(model_dir),
        "--critic-model-name-or-path", str(model_dir), "--reward-fn", f"{__file__}:length_reward",
        "--data", str(DATA), "--data-split", "0,0,1", "--max-prompt-seq-len", "48", "--max-answer-seq-len", "8",
        "--per-device-generation-batch-size", "2", "--per-device-training-batch-size", "4", "--max-steps", "2",
        "--eval-prompts", "0", "--actor-learning-rate", "1e-5", "--num-warmup-steps", "0", "--output-dir", str(out),
        "--disable-tqdm", *extra])
    assert summary["algorithm"] == algorithm and summary["steps"] == 2, summary
    assert summary["prompts"] == 64, summary
    # round 1 audits the reused rollout logprobs against the actor's training forward; round 2 does not
    records = [r for r in read_metrics(out) if r["step_name"] == algorithm]
    assert [("logprob_gap" in r) for r in records] == [True, False], records
    assert 0 < summary["max_logprob_gap"] < FP32_LOGPROB_ATOL, summary
    assert all(0 < r["answer_len"] <= 8 and abs(r["actor_loss"]) < 10 for r in records), records
    actor = AutoModelForCausalLM.from_pretrained(out / "actor")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(actor.parameters(), base.parameters())), "actor did not step"
    assert (out / "critic").exists() == (algorithm == "ppo")
