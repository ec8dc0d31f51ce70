"""Step 3 on the synthetic task, end to end through `rlhf train`: PPO raises the rule's gold score above the
SFT model's over two seeds, the rollout logprobs agree with the training forward's within 1e-5 (fp32), the
checkpoints load with from_pretrained, and `rlhf chat` answers with the result."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.cli import chat as chat_cli
from rlhf.cli.presets import get_preset
from rlhf.cli.train import main as train_main
from rlhf.models import RewardModel
from rlhf.runtime.metrics import read_metrics
from rlhf.steps.rl import PPOConfig, run_ppo


def ppo_config(out, seed: int, **overrides) -> PPOConfig:
    budget = get_preset("tiny").ppo
    fields = {k: getattr(budget, k) for k in budget.__dataclass_fields__}
    fields.update(max_steps=60, num_train_epochs=3)
    fields.update(overrides)
    return PPOConfig(actor_model_name_or_path=str(out / "actor"), critic_model_name_or_path=str(out / "reward"),
                     data=[str(out / "data" / "pairs.jsonl")], data_split="0,1,1", output_dir=str(out / f"ppo{seed}"),
                     gold_task="synthetic", seed=seed, disable_tqdm=True, **fields)


@pytest.mark.parametrize("seed", [1, 2])
def test_ppo_raises_gold_score_with_exact_rollout_logprobs(tiny_run, seed):
    summary = run_ppo(ppo_config(tiny_run, seed), tokenizer=get_preset("tiny").tokenizer())
    assert summary["steps"] == 60
    assert summary["gold_after"] > summary["gold_before"] + 0.05, summary
    assert summary["reward_after"] > summary["reward_before"], summary
    assert 0 < summary["max_logprob_gap"] < 1e-5, summary
    records = [r for r in read_metrics(tiny_run / f"ppo{seed}") if r["step_name"] == "ppo"]
    # the rollout logprobs are reused as the old ones; rounds 1, 11, ..., 51 audit them against the training forward
    gaps = [r["logprob_gap"] for r in records if "logprob_gap" in r]
    assert len(records) == 60 and len(gaps) == 6 and max(gaps) < 1e-5
    actor = AutoModelForCausalLM.from_pretrained(tiny_run / f"ppo{seed}" / "actor")
    sft = AutoModelForCausalLM.from_pretrained(tiny_run / "actor")
    assert any(not torch.equal(a, b) for a, b in zip(actor.parameters(), sft.parameters()))
    critic = RewardModel.from_pretrained(tiny_run / f"ppo{seed}" / "critic")
    assert critic.value_head.weight.shape[0] == 1


def test_train_cli_step3_and_chat(tiny_run, capsys, monkeypatch):
    summary = train_main(["--step", "3", "--output-dir", str(tiny_run), "--max-steps", "2", "--enable-ema",
                          "--unsupervised-data", str(tiny_run / "data" / "sft.jsonl"), "--unsup-coef", "0.5",
                          "--disable-tqdm"])
    ppo = summary["step 3: PPO"]
    assert ppo["steps"] == 2 and "gold_before" in ppo and ppo["max_logprob_gap"] < 1e-5
    records = [r for r in read_metrics(tiny_run) if r["step_name"] == "ppo"]
    assert len(records) == 2 and all(0 < r["ptx_loss"] < 10 for r in records)  # the PTX loss was mixed in
    assert (tiny_run / "ppo" / "actor_ema" / "config.json").exists()
    screen = capsys.readouterr().out
    assert "RLHF run summary" in screen and "gold_after" in screen
    assert json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])["step_name"] == "ppo_eval"

    chat_cli.main([str(tiny_run / "ppo" / "actor"), "--prompt", "review: pizza hotel", "--max-new-tokens", "12"])
    answer = capsys.readouterr().out.strip()
    assert answer and all(w in get_preset("tiny").tokenizer().get_vocab() for w in answer.split())

    lines = iter(["review: movie book", "clear", "review: coffee park", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat_cli.main([str(tiny_run / "ppo" / "actor"), "--max-new-tokens", "8"]) == 0
    screen = capsys.readouterr().out
    assert screen.count("Assistant:") == 2 and "(conversation cleared)" in screen
