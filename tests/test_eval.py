"""`rlhf eval` and step 3's held-out evaluation (rlhf/steps/eval.py): pass@k against its combinatorial definition,
the summary against a hand computation, and the whole path on SmolLM2: `rlhf train --step 3 --algorithm grpo` on a
file of prompts and answers, then `rlhf eval` on the model before and after, every number of eval.json recomputed
from generations.jsonl."""
import itertools
import json
import math
import random
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.cli import main as cli_main
from rlhf.data import encode_prompt
from rlhf.steps.eval import mean_stderr, pass_at_k, pass_ks, summarize
from tests.hf_models import save_word_actor

REWARD = '''
def exact_number(prompts, responses, answer):
    return [1.0 if r.strip().rstrip(".") == a else 0.5 if a in r else 0.0 for r, a in zip(responses, answer)]
'''


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_chance_that_k_of_n_answers_hold_a_passing_one(n):
    """Chen et al.'s estimator equals the share of the k-subsets of the n answers that contain a passing one."""
    for c in range(n + 1):
        answers = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(answers, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_pass_ks_doubles_up_to_the_number_of_samples():
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(16)[-1] == 16


def test_summary_by_hand():
    greedy = [1.0, 0.0, 0.5]
    samples = [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.5]]
    result = summarize(greedy, samples, pass_threshold=1.0)
    assert list(result) == ["greedy_reward", "mean_reward", "pass_at_k", "n_prompts", "n_samples"]
    assert (result["n_prompts"], result["n_samples"]) == (3, 4)
    assert result["greedy_reward"]["mean"] == pytest.approx(0.5)
    # per-prompt values 1, 0, 0.5: sample std 0.5, over sqrt(3)
    assert result["greedy_reward"]["stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert result["mean_reward"]["mean"] == pytest.approx((0.5 + 0.0 + 0.875) / 3)
    # passing answers per prompt: 2, 0, 3 of 4. pass@1 = c/4; pass@2 = 1 - C(4-c,2)/C(4,2): 5/6, 0, 1
    assert result["pass_at_k"]["1"]["mean"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert result["pass_at_k"]["2"]["mean"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert result["pass_at_k"]["4"]["mean"] == pytest.approx(2 / 3)
    assert result["pass_at_k"]["4"]["stderr"] == pytest.approx(statistics.stdev([1, 0, 1]) / math.sqrt(3))
    assert mean_stderr([0.25]) == {"mean": 0.25, "stderr": None}  # one prompt: no standard error
    # the threshold decides what passes: at 0.5 the last prompt's 4 answers all pass
    assert summarize(greedy, samples, pass_threshold=0.5)["pass_at_k"]["1"]["mean"] == pytest.approx((0.5 + 0 + 1) / 3)


def recompute(generations: list[dict], threshold: float) -> dict:
    """eval.json's numbers from generations.jsonl, written out the long way."""
    by_prompt: dict[int, list[dict]] = {}
    for g in generations:
        by_prompt.setdefault(g["index"], []).append(g)
    greedy = [next(g["reward"] for g in gens if g["sample"] is None) for gens in by_prompt.values()]
    sampled = [[g["reward"] for g in gens if g["sample"] is not None] for gens in by_prompt.values()]
    n = len(sampled[0])

    def stat(values):
        return values and (statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values)))

    out = {"greedy_reward": stat(greedy), "mean_reward": stat([statistics.mean(s) for s in sampled])}
    for k in pass_ks(n):
        out[f"pass@{k}"] = stat([1 - math.comb(n - sum(r >= threshold for r in s), k) / math.comb(n, k)
                                 for s in sampled])
    return out


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def arithmetic(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(rng.randrange(1, 10), rng.randrange(1, 10)) for _ in range(n)]
    return [{"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)} for a, b in pairs]


def test_train_then_eval_on_a_prompt_answer_file_with_smollm2(tmp_path, capsys):
    """The issue's run: a file of prompts and answers and nothing else, a reward function taking `answer`, GRPO from
    the CLI, `rlhf eval` before and after; eval.json agrees with a hand computation on generations.jsonl, the rewards
    there with the function on the answers, and the greedy answers with Hugging Face's greedy generate."""
    from tests.real_model import real_model_dir

    model = real_model_dir()
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD)
    train = write_records(tmp_path / "train.jsonl", arithmetic(0, 4))
    heldout = write_records(tmp_path / "heldout.jsonl", arithmetic(1, 3))
    assert cli_main(["train", "--step", "3", "--algorithm", "grpo", "--actor-model", str(model), "--reward-fn",
                     f"{fn}:exact_number", "--data", str(train), "--eval-data", str(heldout), "--output-dir",
                     str(tmp_path / "run"), "--max-steps", "1", "--per-device-generation-batch-size", "2",
                     "--per-device-training-batch-size", "4", "--n-samples-per-prompt", "2",
                     "--max-answer-seq-len", "8", "--eval-n-samples", "2", "--actor-learning-rate", "1e-5",
                     "--disable-tqdm"]) == 0
    out = capsys.readouterr().out
    assert "step 3 grpo: held out before training: greedy_reward " in out and "(3 prompts x 2 samples)" in out
    run = tmp_path / "run" / "grpo"
    assert json.loads((run / "eval_before.json").read_text())["n_prompts"] == 3
    results = {}
    for name, checkpoint in (("before", model), ("after", run / "actor")):
        argv = ["eval", str(checkpoint), "--data", str(heldout), "--reward-fn", f"{fn}:exact_number",
                "--n-samples", "4", "--max-new-tokens", "8", "--temperature", "0.8", "--output-dir",
                str(tmp_path / name)]
        assert cli_main(argv) == 0
        printed = capsys.readouterr().out
        result = json.loads((tmp_path / name / "eval.json").read_text())
        generations = [json.loads(line) for line in (tmp_path / name / "generations.jsonl").read_text().splitlines()]
        assert set(result) == {"greedy_reward", "mean_reward", "pass_at_k", "n_prompts", "n_samples"}
        assert (result["n_prompts"], result["n_samples"], len(generations)) == (3, 4, 3 * 5)
        assert f"greedy_reward {result['greedy_reward']['mean']:.3f} ± " in printed
        records = [json.loads(line) for line in heldout.read_text().splitlines()]
        for g in generations:  # each reward is the function's on that answer, for that record's answer
            assert g["prompt"] == records[g["index"]]["prompt"]
            assert g["reward"] == (1.0 if g["answer"].strip().rstrip(".") == records[g["index"]]["answer"]
                                   else 0.5 if records[g["index"]]["answer"] in g["answer"] else 0.0)
        hand = recompute(generations, threshold=1.0)
        shown = {"greedy_reward": result["greedy_reward"], "mean_reward": result["mean_reward"],
                 **{f"pass@{k}": v for k, v in result["pass_at_k"].items()}}
        assert list(shown) == list(hand) == ["greedy_reward", "mean_reward", "pass@1", "pass@2", "pass@4"]
        for key, (mean, stderr) in hand.items():
            assert shown[key]["mean"] == pytest.approx(mean, abs=1e-12), key
            assert shown[key]["stderr"] == pytest.approx(stderr, abs=1e-12), key
        results[name] = generations
    # the same seed gets the same answers: run again, byte-identical files
    assert cli_main([*argv[:-1], str(tmp_path / "again")]) == 0
    again, after = (tmp_path / name / "generations.jsonl" for name in ("again", "after"))
    assert again.read_bytes() == after.read_bytes()
    capsys.readouterr()
    # the engine's greedy answers are Hugging Face's
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    for g in [g for g in results["before"] if g["sample"] is None]:
        ids = torch.tensor([encode_prompt(tokenizer, g["prompt"])])
        new = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        assert tokenizer.decode(new, skip_special_tokens=True) == g["answer"]


@pytest.fixture(scope="module")
def word_actor(tmp_path_factory):
    path = tmp_path_factory.mktemp("actor")
    save_word_actor(path)
    return path


def test_eval_of_a_tiny_actor_reads_its_options_from_a_config_file(word_actor, tmp_path, capsys):
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD)
    data = write_records(tmp_path / "p.jsonl", [{"prompt": f"review: pizza {i}", "answer": "good"} for i in range(5)])
    config = tmp_path / "eval.yaml"
    config.write_text(f"checkpoint: {word_actor}\ndata: [{data}]\nreward-fn: {fn}:exact_number\nn-samples: 3\n"
                      f"max_new_tokens: 4\nlimit: 4\noutput-dir: {tmp_path / 'ev'}\n")
    assert cli_main(["eval", "--config", str(config), "--n-samples", "2"]) == 0  # the flag wins over the file
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert (result["n_prompts"], result["n_samples"]) == (4, 2) and list(result["pass_at_k"]) == ["1", "2"]
    assert "(4 prompts x 2 samples)" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda a: [x for x in a if x not in ("--reward-fn", "FN")], "give exactly one of --reward-fn FILE.py:FUNCTION "
                                                                "and --reward-model DIR, got neither"),
    (lambda a: [*a, "--reward-model", "rm"], "got both"),
    (lambda a: a[:a.index("--data")] + a[a.index("--data") + 2:], "missing --data (on the command line or in the "
                                                                  "--config file)"),
    (lambda a: [*a, "--n-samples", "0"], "--n-samples"),
    (lambda a: [*a, "--sampels", "2"], "did you mean --n-samples?"),
])
def test_eval_bad_input_is_one_line(word_actor, tmp_path, capsys, change, message):
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD)
    data = write_records(tmp_path / "p.jsonl", [{"prompt": "review: pizza", "answer": "good"}])
    argv = ["eval", str(word_actor), "--data", str(data), "--reward-fn", "FN", "--output-dir", str(tmp_path / "ev")]
    argv = [f"{fn}:exact_number" if x == "FN" else x for x in change(argv)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf eval: error: ") and message in err[0], err
    assert not (tmp_path / "ev").exists()


def test_eval_refuses_a_record_without_the_reward_functions_field(word_actor, tmp_path, capsys):
    fn = tmp_path / "reward.py"
    fn.write_text(REWARD)
    data = write_records(tmp_path / "p.jsonl", [{"prompt": "review: pizza", "answer": "good"},
                                                {"prompt": "review: movie"}])
    assert cli_main(["eval", str(word_actor), "--data", str(data), "--reward-fn", f"{fn}:exact_number",
                     "--output-dir", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err.strip() == (f"rlhf eval: error: {data}:2: field 'answer' missing (the reward "
                                               "function exact_number takes answer)")
    assert not (tmp_path / "ev").exists()
