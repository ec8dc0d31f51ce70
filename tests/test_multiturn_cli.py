"""Multi-turn step 3 from the CLI on the engine's turn API: `rlhf train --step 3 --algorithm grpo --environment
calculator` (and `--tools`), on a tiny checkpoint and on SmolLM2 through its chat template: the run trains, the
summary shows turns, tool calls and the held-out reward before and after, the logprob gap stays at the
single-turn figure, and --log-rollouts writes trajectories whose tokens are the trained ones."""
import json

import pytest
import torch

from rlhf.cli import main as cli_main
from rlhf.runtime.metrics import read_metrics
from tests.hf_models import save_word_actor

TOOLS = '''
def lookup(key: str) -> str:
    """Look a word up.

    Args:
        key: the word
    """
    return key.upper()
'''

AGAIN = '''
from rlhf.envs import Environment, StepResult


class Again(Environment):
    """Asks once more, then rewards the second answer's length: every trajectory has two model turns."""

    def reset(self, record):
        self.turn = 0
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.turn += 1
        if self.turn == 1:
            return StepResult([{"role": "user", "content": "Are you sure? Say it again."}], reward=0.1)
        return StepResult(reward=len(text) / 50, done=True)
'''

REWARD = '''
def has_answer(prompts, responses, answer):
    return [float(a in r) for r, a in zip(responses, answer)]
'''


def arithmetic(path, n: int):
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)}) + "\n"
                            for i in range(n)))
    return path


def run(argv: list[str], capsys) -> str:
    assert cli_main(argv) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def word_actor(tmp_path_factory):
    path = tmp_path_factory.mktemp("actor")
    save_word_actor(path)
    return path


COMMON = ["--max-steps", "2", "--per-device-generation-batch-size", "2", "--per-device-training-batch-size", "4",
          "--n-samples-per-prompt", "2", "--max-answer-seq-len", "4", "--max-turns", "3", "--max-total-tokens",
          "40", "--eval-prompts", "2", "--eval-n-samples", "2", "--disable-tqdm"]


def test_grpo_with_the_calculator_environment_on_a_tiny_checkpoint(word_actor, tmp_path, capsys):
    out = tmp_path / "run"
    run(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(word_actor), "--environment",
         "calculator", "--data", str(arithmetic(tmp_path / "a.jsonl", 8)), "--output-dir", str(out),
         "--log-rollouts", *COMMON], capsys)
    records = [r for r in read_metrics(out) if r["step_name"] == "grpo"]
    assert len(records) == 2 and all(1 <= r["turns"] <= 3 for r in records), records
    assert all(k in records[0] for k in ("tool_calls", "well_formed_calls", "tool_errors", "env_errors"))
    lines = [json.loads(line) for line in (out / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4  # 2 rounds of 2 prompts x 2 samples
    assert all(t["role"] in ("model", "env") for line in lines for t in line["turns"])
    assert (out / "grpo" / "eval_after.json").is_file()


def test_tools_need_a_reward_function_and_environment_excludes_tools(word_actor, tmp_path, capsys):
    data = str(arithmetic(tmp_path / "a.jsonl", 4))
    (tmp_path / "tools.py").write_text(TOOLS)
    base = ["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(word_actor), "--data", data,
            "--output-dir", str(tmp_path / "run")]
    assert cli_main([*base, "--tools", f"{tmp_path / 'tools.py'}:lookup"]) == 2
    assert "--tools needs --reward-fn FILE.py:FUNCTION" in capsys.readouterr().err
    assert cli_main([*base, "--tools", f"{tmp_path / 'tools.py'}:lookup", "--environment", "calculator"]) == 2
    assert "give --environment or --tools, not both" in capsys.readouterr().err
    assert cli_main([*base, "--environment", f"{tmp_path / 'tools.py'}:Nope"]) == 2
    assert "has no class 'Nope'" in capsys.readouterr().err


def test_grpo_with_tools_and_a_reward_function(word_actor, tmp_path, capsys):
    (tmp_path / "tools.py").write_text(TOOLS)
    (tmp_path / "reward.py").write_text(REWARD)
    out = tmp_path / "run"
    run(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(word_actor), "--tools",
         f"{tmp_path / 'tools.py'}:lookup", "--reward-fn", f"{tmp_path / 'reward.py'}:has_answer", "--data",
         str(arithmetic(tmp_path / "a.jsonl", 8)), "--output-dir", str(out), *COMMON], capsys)
    assert (out / "grpo" / "actor").is_dir()


def test_two_turn_grpo_on_the_engine_trains_on_whole_trajectories(word_actor, tmp_path, capsys):
    """An environment that always answers: every trajectory is two model turns around a user turn, continued on
    the engine's cache; the round-1 audit compares the rollout's logprobs with the training forward over the
    whole trajectories."""
    (tmp_path / "again.py").write_text(AGAIN)
    out = tmp_path / "run"
    run(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(word_actor), "--environment",
         f"{tmp_path / 'again.py'}:Again", "--data", str(arithmetic(tmp_path / "a.jsonl", 8)), "--output-dir",
         str(out), "--log-rollouts", *COMMON], capsys)
    records = [r for r in read_metrics(out) if r["step_name"] == "grpo"]
    assert [r["turns"] for r in records] == [2.0, 2.0], records
    assert 0 <= records[0]["logprob_gap"] < 1e-5, records[0]
    lines = [json.loads(line) for line in (out / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert all([t["role"] for t in line["turns"]] == ["model", "env", "model"] for line in lines)


def test_two_turns_on_smollm2_through_its_chat_template(tmp_path, capsys):
    """A real chat model: the user turn between the model's is the chat template's suffix (tokenized once), and
    the rollout's logprobs over whole trajectories agree with the training forward at the single-turn figure."""
    from tests.real_model import real_model_dir
    from tests.test_real_model import FP32_LOGPROB_ATOL

    (tmp_path / "again.py").write_text(AGAIN)
    out = tmp_path / "run"
    printed = run(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(real_model_dir()),
                   "--environment", f"{tmp_path / 'again.py'}:Again", "--data",
                   str(arithmetic(tmp_path / "a.jsonl", 6)), "--output-dir", str(out), "--max-steps", "2",
                   "--per-device-generation-batch-size", "2", "--per-device-training-batch-size", "4",
                   "--n-samples-per-prompt", "2", "--max-answer-seq-len", "12", "--max-turns", "2",
                   "--max-total-tokens", "64", "--eval-prompts", "2", "--eval-n-samples", "1",
                   "--actor-learning-rate", "1e-6", "--log-rollouts", "--disable-tqdm"], capsys)
    assert "turns" in printed and "tool_calls" in printed and "held out before training" in printed
    records = [r for r in read_metrics(out) if r["step_name"] == "grpo"]
    assert records[0]["turns"] == 2.0 and 0 < records[0]["logprob_gap"] < FP32_LOGPROB_ATOL, records[0]
    lines = [json.loads(line) for line in (out / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    for line in lines:
        env = [t for t in line["turns"] if t["role"] == "env"]
        assert len(env) == 1 and env[0]["text"].endswith("<|im_start|>assistant\n"), line["turns"]
        assert "<|im_start|>user\nAre you sure? Say it again.<|im_end|>" in env[0]["text"]
    assert torch.tensor([line["reward"] for line in lines]).isfinite().all()
