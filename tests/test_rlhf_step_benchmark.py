"""benchmarks/rlhf_step.py end to end on a tiny round: both sides run the real trainer, the phases add up to the
round, and the engine side skips the old-logprob forward (its rollout logprobs are reused)."""
import json

from benchmarks import rlhf_step


def test_rlhf_step_rows(tmp_path):
    out = tmp_path / "rows.json"
    assert rlhf_step.main(["--batch-size", "4", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                           "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["algorithm"] for r in rows] == ["ppo", "grpo"]
    for row in rows:
        assert row["speedup"] == row["hf_round_s"] / row["engine_round_s"]
        hf, engine = row["hf_phases_s"], row["engine_phases_s"]
        assert set(hf) == set(rlhf_step.PHASES) and hf["old_logprobs"] > 0 and engine["old_logprobs"] == 0
        assert hf["generate"] > 0 and engine["generate"] > 0 and hf["actor_update"] > 0
        assert (hf["critic_update"] > 0) == (row["algorithm"] == "ppo") == (engine["values"] > 0)
