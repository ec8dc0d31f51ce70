"""Reward functions: the three ways to name one, the record fields they receive, and a one-line error naming the
function and the row for each way they can fail."""
import pytest
import torch

from rlhf.cli import main as cli_main
from rlhf.core.rewards import RewardFunction

GOOD = '''
def exact(prompts, responses, answer=None, **fields):
    return [float(r.strip() == a) for r, a in zip(responses, answer)]

def broken(prompts, responses, **fields):
    return [1.0 / len(r) for r in responses]  # ZeroDivisionError on an empty response

def short(prompts, responses, **fields):
    return [0.0] * (len(responses) - 1)

def words(prompts, responses, **fields):
    return ["high" if r else 0.0 for r in responses]

def nan(prompts, responses, **fields):
    return [float("nan") if r == "b" else 1.0 for r in responses]

def scalar(prompts, responses, **fields):
    return 1.0
'''


@pytest.fixture
def module(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(GOOD)
    return path


def test_a_file_function_gets_the_records_fields_as_columns(module):
    fn = RewardFunction(f"{module}:exact")
    out = fn(["q1", "q2", "q3"], ["4", "five", "6 "], [{"answer": "4"}, {"answer": "5"}, {"answer": "6"}])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 1.0]


def test_a_module_function_and_the_built_in_rule():
    from rlhf.data.synthetic import gold_scores

    fn = RewardFunction("rlhf.core.rewards:synthetic_reward")
    prompts, answers = ["review: pizza hotel"] * 2, ["the pizza was great", "awful hotel"]
    assert fn(prompts, answers, [{}, {}]).tolist() == pytest.approx(gold_scores(prompts, answers))
    rule = RewardFunction("synthetic")(prompts, answers, [{}, {}])
    assert rule.tolist() == pytest.approx(gold_scores(prompts, answers))


@pytest.mark.parametrize("spec,message", [
    ("nofunction", "expected 'synthetic', 'path/to/file.py:function' or 'package.module:function'"),
    ("missing.py:f", "missing.py: file not found"),
    ("no_such_package_xyz:f", "cannot import no_such_package_xyz: ModuleNotFoundError"),
    ("{module}:absent", "has no function 'absent'"),
    ("{bad}:f", "cannot import {bad}: RuntimeError: boom at import"),
])
def test_import_failures(spec, message, module, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom at import')\n")
    spec, message = spec.format(module=module, bad=bad), message.format(bad=bad)
    with pytest.raises(ValueError, match="^--reward-fn ") as err:
        RewardFunction(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,message", [
    ("broken", "raised ZeroDivisionError: float division by zero on row 1 (prompt 'q2')"),
    ("short", "returned 2 values for 3 rows"),
    ("words", "row 0: returned 'high' (str), expected a number"),
    ("scalar", "returned float, expected a list of 3 numbers"),
])
def test_call_failures_name_the_function_and_the_row(name, message, module):
    fn = RewardFunction(f"{module}:{name}")
    with pytest.raises(ValueError) as err:
        fn(["q1", "q2", "q3"], ["a", "", "c"], [{}, {}, {}])
    text = str(err.value)
    assert text.startswith(f"--reward-fn {module}:{name}: ") and message in text and "\n" not in text


def test_a_nan_reward_is_passed_on_to_the_trainer_guard(module):
    rewards = RewardFunction(f"{module}:nan")(["q1", "q2", "q3"], ["a", "b", "c"], [{}, {}, {}])
    assert rewards[0] == 1.0 and rewards[1].isnan() and rewards[2] == 1.0


def test_cli_reports_a_bad_reward_function_in_one_line_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--algorithm", "grpo", "--reward-fn", "nowhere.py:f", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf train: error: --reward-fn nowhere.py:f: nowhere.py: file not found"]
    assert not (out / "actor").exists()


def test_group_algorithms_need_two_samples(tmp_path, capsys):
    argv = ["train", "--algorithm", "rloo", "--n-samples-per-prompt", "1", "--output-dir", str(tmp_path / "run")]
    assert cli_main(argv) == 2
    assert "--algorithm rloo compares the answers to one prompt: --n-samples-per-prompt 1, expected at least 2" \
        in capsys.readouterr().err
