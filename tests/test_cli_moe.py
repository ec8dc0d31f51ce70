"""`rlhf train --step 3 --algorithm grpo` on a mixture-of-experts checkpoint (tiny Mixtral: top-2 of 6 experts in
every layer) from the CLI, rollouts on the engine's own inference path: two rounds, the rollout logprobs equal to the
training forward's."""
import json

from tests.hf_models import save_word_actor

LENGTH = '''
def length(prompts, responses, **fields):
    return [float(len(r.split())) for r in responses]
'''


def test_grpo_two_rounds_on_a_mixtral_checkpoint(tmp_path, capsys, monkeypatch):
    from hybrid_engine.models.moe import Experts
    from rlhf.cli.train import main

    calls = []
    routed = Experts.__call__
    monkeypatch.setattr(Experts, "__call__", lambda self, ops, x: calls.append(x.shape) or routed(self, ops, x))

    actor = tmp_path / "mixtral"
    save_word_actor(actor, "mixtral")
    (tmp_path / "rewards.py").write_text(LENGTH)
    data = tmp_path / "prompts.jsonl"
    words = ("pizza", "movie", "book", "hotel")
    data.write_text("".join(json.dumps({"prompt": f"review: {words[i % 4]} {i}"}) + "\n" for i in range(12)))
    summaries = main(["--step", "3", "--algorithm", "grpo", "--actor-model", str(actor), "--reward-fn",
                      f"{tmp_path / 'rewards.py'}:length", "--data", str(data), "--output-dir", str(tmp_path / "run"),
                      "--max-steps", "2", "--per-device-generation-batch-size", "4",
                      "--per-device-training-batch-size", "8", "--n-samples-per-prompt", "2",
                      "--max-answer-seq-len", "6", "--eval-prompts", "4", "--disable-tqdm"])
    summary = next(v for k, v in summaries.items() if k.startswith("step 3"))
    assert summary["steps"] == 2, summary
    assert summary["max_logprob_gap"] < 1e-5, summary  # the engine's rollout logprobs are the training forward's
    assert "step 3 grpo 2/2: reward " in capsys.readouterr().out
    assert calls, "the rollouts did not run the engine's experts"
