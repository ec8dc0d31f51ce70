"""Reward functions: the three ways to name one, the record fields they receive, and a one-line error naming the
function and the row for each way they can fail."""
import json

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


def test_declared_parameters_are_the_fields_a_record_must_hold(module, tmp_path):
    path = tmp_path / "fields.py"
    path.write_text("def f(prompts, responses, answer, *args, tests=None, **fields):\n    return [0.0]\n"
                    "def g(p, r, /, *, answer):\n    return [0.0]\n")
    assert RewardFunction(f"{path}:f").required_fields() == ["answer", "tests"]
    assert RewardFunction(f"{path}:g").required_fields() == ["answer"]
    assert RewardFunction(f"{module}:broken").required_fields() == []
    assert RewardFunction("synthetic").required_fields() == []


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    """A tiny saved actor with the preset's word tokenizer."""
    from tests.hf_models import save_word_actor

    root = tmp_path_factory.mktemp("actor")
    save_word_actor(root)
    return root


EXACT = '''
import json, os

def exact_number(prompts, responses, answer, **fields):
    with open(os.environ["SEEN"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "answer": answer, "fields": sorted(fields)}) + "\\n")
    return [float(r.strip() == a) for r, a in zip(responses, answer)]
'''


def prompt_file(tmp_path, n: int, drop_answer_at: int | None = None):
    words = ("pizza", "movie", "book", "hotel")
    records = [{"prompt": f"review: {words[i % 4]} {i}", "answer": words[i % 4], "id": i}
               for i in range(n)]
    if drop_answer_at is not None:
        del records[drop_answer_at - 1]["answer"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_grpo_trains_on_a_file_of_prompts_and_answers(actor, tmp_path, monkeypatch, capsys):
    """`rlhf train --step 3 --algorithm grpo --reward-fn f.py:fn --data prompts.jsonl`: the file goes to step 3 whole
    (no --data-split), and each row's fields reach the function."""
    fn = tmp_path / "rewards.py"
    fn.write_text(EXACT)
    monkeypatch.setenv("SEEN", str(tmp_path / "seen.jsonl"))
    data = prompt_file(tmp_path, 12)
    summary = cli_main(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(actor), "--reward-fn",
                        f"{fn}:exact_number", "--data", str(data), "--output-dir", str(tmp_path / "run"),
                        "--max-steps", "1", "--per-device-generation-batch-size", "4",
                        "--per-device-training-batch-size", "8", "--n-samples-per-prompt", "2",
                        "--max-answer-seq-len", "4", "--eval-prompts", "4", "--disable-tqdm"])
    assert summary == 0
    assert "step 3 grpo 1/1: reward 0.000 kl " in capsys.readouterr().out  # --disable-tqdm: a line per logged round
    calls = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    records = {r["prompt"]: r for r in map(json.loads, data.read_text().splitlines())}
    seen = {p for call in calls for p in call["prompts"]}
    # 4 held out (evaluated before and after) and one round's batch of 4 of the other 8: the file is step 3's whole
    # (the default --data-split 2,4,4 would have left it 5 prompts)
    assert len(seen) == 8 and seen <= set(records)
    for call in calls:
        assert call["answer"] == [records[p]["answer"] for p in call["prompts"]] and call["fields"] == ["id"]


def test_a_record_without_a_field_the_reward_function_takes_is_refused_before_training(actor, tmp_path, capsys):
    fn = tmp_path / "rewards.py"
    fn.write_text(EXACT)
    data = prompt_file(tmp_path, 6, drop_answer_at=5)
    out = tmp_path / "run"
    assert cli_main(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(actor), "--reward-fn",
                     f"{fn}:exact_number", "--data", str(data), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"rlhf train: error: {data}:5: field 'answer' missing (the reward function exact_number "
                       "takes answer)")
    assert not out.exists()
    with pytest.raises(ValueError, match=r"prompts\.jsonl:5: field 'answer' missing"):  # python -m rlhf.steps.rl
        from rlhf.steps.rl import main as rl_main
        rl_main(["--actor-model-name-or-path", str(actor), "--algorithm", "grpo", "--reward-fn", f"{fn}:exact_number",
                 "--data", str(data), "--output-dir", str(tmp_path / "rl")])


def test_a_run_that_failed_before_training_anything_is_rerun_without_overwrite(actor, tmp_path, capsys):
    """The reward function raised in the first rollout: nothing trained, nothing saved, so the retry runs."""
    (tmp_path / "bad.py").write_text("def f(prompts, responses, **fields):\n    raise KeyError('answer')\n")
    (tmp_path / "good.py").write_text("def f(prompts, responses, **fields):\n    return [0.0] * len(prompts)\n")
    argv = ["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(actor), "--data",
            str(prompt_file(tmp_path, 8)), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
            "--per-device-generation-batch-size", "4", "--per-device-training-batch-size", "8",
            "--max-answer-seq-len", "4", "--eval-prompts", "0", "--disable-tqdm"]
    assert cli_main([*argv, "--reward-fn", f"{tmp_path / 'bad.py'}:f"]) == 2
    assert "raised KeyError" in capsys.readouterr().err
    assert cli_main([*argv, "--reward-fn", f"{tmp_path / 'good.py'}:f"]) == 0
    assert (tmp_path / "run" / "grpo" / "actor").is_dir()


def test_step3_warmup_ratio_is_a_fraction_of_the_runs_optimizer_steps(actor, tmp_path, monkeypatch):
    """--warmup-ratio 0.5 over 2 rounds of 4 minibatches each (4 prompts, GRPO's 4 answers each, 4 rows a minibatch):
    4 warm-up steps for the actor; without --warmup-ratio, --num-warmup-steps as before."""
    import rlhf.steps.rl_trainer as rl_trainer

    seen = []
    initialize = rl_trainer.initialize
    monkeypatch.setattr(rl_trainer, "initialize", lambda *a, **k: seen.append(a[4:6]) or initialize(*a, **k))
    (tmp_path / "zero.py").write_text("def f(prompts, responses, **fields):\n    return [0.0] * len(prompts)\n")
    argv = ["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(actor), "--data",
            str(prompt_file(tmp_path, 8)), "--reward-fn", f"{tmp_path / 'zero.py'}:f", "--max-steps", "2",
            "--per-device-generation-batch-size", "4", "--per-device-training-batch-size", "4",
            "--max-answer-seq-len", "2", "--eval-prompts", "0", "--disable-tqdm", "--num-warmup-steps", "3"]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "a"), "--warmup-ratio", "0.5"]) == 0
    assert cli_main([*argv, "--output-dir", str(tmp_path / "b")]) == 0
    assert seen == [(8, 4), (8, 3)]  # (optimizer steps, warm-up steps)
