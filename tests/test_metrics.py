"""metrics.jsonl's records also reach TensorBoard and W&B (offline) under <step_name>/<key>; the PNG draws the
curated panels, picked by metric key whatever the RL algorithm's step name, and no flat series."""
import struct
import time

import pytest

from rlhf.runtime.metrics import STEP, MetricsLogger, collect_series, figure, panels_to_draw, plot, read_metrics

# What a short run logs: steps 1 and 2, then two RL algorithms under their own step names with the same keys.
RECORDS = [
    ("sft", 1, dict(loss=2.0, lr=1e-3)), ("sft", 2, dict(loss=1.5, lr=1e-3)),
    ("sft_eval", 2, dict(eval_loss=1.7, perplexity=5.5)),
    ("reward", 1, dict(loss=0.7, train_accuracy=0.5, lr=5e-5)),
    ("reward", 2, dict(loss=0.5, train_accuracy=0.8, lr=5e-5)),
    ("reward_eval", 0, dict(accuracy=0.5)), ("reward_eval", 2, dict(accuracy=0.9)),
    ("ppo_eval", 0, dict(greedy_reward=0.2, mean_reward=0.1, gold=0.2)),
    ("ppo", 1, dict(reward=0.1, kl=0.0, actor_loss=0.3, critic_loss=0.0, answer_len=7.0, logprob_gap=1e-6, gold=0.2)),
    ("ppo", 2, dict(reward=0.4, kl=0.2, actor_loss=0.1, critic_loss=0.0, answer_len=9.0, logprob_gap=2e-6, gold=0.3)),
    ("ppo_eval", 2, dict(greedy_reward=0.6, mean_reward=0.5, gold=0.4)),
    ("grpo", 1, dict(reward=0.2, kl=0.0, actor_loss=0.05, answer_len=8.0, logprob_gap=1e-6, gold=0.2)),
    ("grpo", 2, dict(reward=0.3, kl=0.1, actor_loss=-0.02, answer_len=8.0, logprob_gap=3e-6, gold=0.3)),
]


def log_all(logger):
    for name, step, values in RECORDS:
        logger.log(name, step, **values)


def test_tensorboard_gets_every_record_under_its_step_name(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, report_to="tensorboard")
    log_all(logger)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = {f"{name}/{key}" for name, _, values in RECORDS for key in values}
    assert set(events.Tags()["scalars"]) == expected
    assert [(e.step, e.value) for e in events.Scalars("ppo/reward")] == [(1, pytest.approx(0.1)),
                                                                         (2, pytest.approx(0.4))]
    assert [e.value for e in events.Scalars("grpo/actor_loss")] == [pytest.approx(0.05), pytest.approx(-0.02)]
    assert len(read_metrics(tmp_path)) == len(RECORDS)  # metrics.jsonl as before


def test_tensorboard_shows_each_record_once_after_a_resume_cuts_metrics_back(tmp_path):
    """A resumed run cuts metrics.jsonl back to its checkpoint and logs those rounds again: TensorBoard is rebuilt
    from the file, so it holds each step once, with the resumed run's values (it held both before)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf.runtime.resume import truncate_metrics

    killed = MetricsLogger(tmp_path, report_to="tensorboard")
    for step in (1, 2, 3):
        killed.log("ppo", step, reward=float(step))
    checkpoint_length = len("".join(line + "\n" for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2]))
    # (the killed process never closes its writer) a new process resumes from the checkpoint after round 2
    resumed = MetricsLogger(tmp_path, report_to="tensorboard")
    truncate_metrics(tmp_path / "metrics.jsonl", checkpoint_length)
    for step in (3, 4):
        resumed.log("ppo", step, reward=10.0 * step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("ppo/reward")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [r["reward"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 30.0, 40.0]


def wandb_records(run_file) -> list:
    """The protobuf Records of an offline W&B run file: a ":W&B" header (7 bytes), then LevelDB-log chunks in 32 KiB
    blocks (each a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def wandb_history(run_file, timeout_s: float = 30.0) -> list[dict]:
    """The history rows of a finished offline run, {key: value}. run.finish() can return before W&B's service
    process has written the file (seen 1 time in 3 here), so this waits for the run's exit record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # a key with "/" comes as nested_key parts
    return [{"/".join(item.nested_key) or item.key: float(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_gets_every_record_with_its_own_step_axis(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, report_to=["wandb"])
    log_all(logger)
    logger.close()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert len(rows) == len(RECORDS), rows
    ppo = [row for row in rows if "ppo/reward" in row]
    assert [(r["ppo/step"], r["ppo/reward"], r["ppo/critic_loss"]) for r in ppo] == [(1, 0.1, 0.0), (2, 0.4, 0.0)]
    assert [r["grpo/step"] for r in rows if "grpo/kl" in r] == [1, 2]  # W&B's own _step runs on; ours restart


def test_wandb_after_a_resume_cut_gets_a_new_run_with_the_whole_history(tmp_path, monkeypatch):
    """A W&B run cannot take records back: after metrics.jsonl is cut back, a new run holds every record once."""
    from rlhf.runtime.resume import truncate_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, report_to=["wandb"])
    for step in (1, 2, 3):
        logger.log("ppo", step, reward=float(step))
    truncate_metrics(tmp_path / "metrics.jsonl", len("".join(
        line + "\n" for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2])))
    logger.log("ppo", 3, reward=30.0)
    logger.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)
    assert len(runs) == 2
    assert [(r["ppo/step"], r["ppo/reward"]) for r in wandb_history(runs[-1])] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_unknown_report_to_is_one_line_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"^--report-to: unknown 'mlflow' \(expected a comma-separated list of "
                       r"tensorboard, wandb, or none\)$"):
        MetricsLogger(tmp_path, report_to="tensorboard,mlflow")
    assert MetricsLogger(tmp_path, report_to="none").reporters == []


def test_plot_draws_the_curated_panels_by_metric_key_and_nothing_flat(tmp_path):
    log_all(MetricsLogger(tmp_path))
    panels = panels_to_draw(collect_series(read_metrics(tmp_path)))
    drawn = {panel.title: sorted(f"{name}:{key}" for name, key, _ in left + right) for panel, left, right in panels}
    assert drawn == {
        "held out: reward model (left) vs gold rule (right)": ["ppo_eval:gold", "ppo_eval:greedy_reward",
                                                               "ppo_eval:mean_reward"],
        "rollouts: reward model (left) vs gold rule (right)": ["grpo:gold", "grpo:reward", "ppo:gold", "ppo:reward"],
        "KL(policy || reference) per answer": ["grpo:kl", "ppo:kl"],
        "policy loss": ["grpo:actor_loss", "ppo:actor_loss"],
        # no "value loss": critic_loss is flat; grpo's answer_len is flat, ppo's is not
        "answer length (tokens)": ["ppo:answer_len"],
        "max |rollout - training logprob|": ["grpo:logprob_gap", "ppo:logprob_gap"],
        # sft_eval has one point: flat
        "SFT loss: train, held out": ["sft:loss"],
        "reward-model loss": ["reward:loss"],
        "reward-model accuracy: train, held out": ["reward:train_accuracy", "reward_eval:accuracy"],
    }
    png = plot(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp.png"))


def test_plot_titles_follow_the_reward_source_and_every_panel_has_axis_labels(tmp_path):
    """A reward-function run's panels used to say "reward model vs gold rule", and no panel had axis labels."""
    log_all(MetricsLogger(tmp_path))
    series = collect_series(read_metrics(tmp_path))
    titles = [panel.title for panel, _, _ in panels_to_draw(series, "reward function")]
    assert titles[:2] == ["held out: reward function (left) vs gold rule (right)",
                          "rollouts: reward function (left) vs gold rule (right)"]
    assert not any("reward model (left)" in t for t in titles)
    no_gold = {key: points for key, points in series.items() if key[1] != "gold"}  # a user's data: no gold rule
    titles = [panel.title for panel, _, _ in panels_to_draw(no_gold, "reward function")]
    assert titles[:2] == ["held out: reward function", "rollouts: reward function"]
    fig = figure(series, "reward function")
    drawn = [ax for ax in fig.axes if ax.axison and ax.get_title()]
    assert len(drawn) == len(panels_to_draw(series))
    for ax in drawn:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    by_title = {ax.get_title(): ax for ax in drawn}
    assert by_title["policy loss"].get_xlabel() == "round" and by_title["reward-model loss"].get_xlabel() == STEP
    twins = [ax for ax in fig.axes if not ax.get_title() and ax.get_ylabel()]
    assert {ax.get_ylabel() for ax in twins} == {"gold score"}
    with pytest.raises(ValueError, match="reward_source 'gold'"):
        panels_to_draw(series, "gold")


def test_a_rerun_into_the_same_directory_plots_its_own_curve(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step, loss in [(1, 3.0), (2, 2.0), (3, 1.0), (1, 2.5), (2, 2.2)]:  # a second run appends from step 1
        logger.log("sft", step, loss=loss)
    assert collect_series(read_metrics(tmp_path))[("sft", "loss")] == [(1, 2.5), (2, 2.2)]
    assert plot(tmp_path / "empty") is None
