"""benchmarks/rlhf_step.py end to end on a tiny round: every side runs the real trainer, the phases add up to the
round, and the engine sides (padded, token-budget, packed) skip the old-logprob forward (rollout logprobs reused)."""
import json

from benchmarks import rlhf_step


def test_rlhf_step_rows(tmp_path):
    out = tmp_path / "rows.json"
    assert rlhf_step.main(["--batch-size", "4", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                           "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["algorithm"] for r in rows] == ["ppo", "grpo"]
    for row in rows:
        assert row["sides"] == ["hf", "engine", "budget", "packed"]
        hf = row["hf_phases_s"]
        assert set(hf) == set(rlhf_step.PHASES) and hf["old_logprobs"] > 0 and hf["actor_update"] > 0
        for side in row["sides"][1:]:  # the engine sides: padded, token-budget micro-batches, packed
            assert row[f"{side}_speedup"] == row["hf_round_s"] / row[f"{side}_round_s"]
            engine = row[f"{side}_phases_s"]
            assert set(engine) == set(hf) and engine["old_logprobs"] == 0 and engine["generate"] > 0
            assert (hf["critic_update"] > 0) == (row["algorithm"] == "ppo") == (engine["values"] > 0)
