"""Training metrics: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard and W&B, and a PNG of the
curves that matter.

Records are ``{"step_name": "sft", "step": 12, "loss": 1.9, ...}``. Each line is written with one
``write`` call on a file opened for appending, then flushed, so a crash loses at most the line being
written and never corrupts earlier ones. ``report_to`` sends every record's numbers to TensorBoard and/or W&B
too, each metric under ``<step_name>/<key>`` (``ppo/reward``, ``sft/loss``). metrics.jsonl is the record of truth:
when a resumed run cuts it back to a checkpoint (rlhf/runtime/resume.py), the reporters are rebuilt from it, so
TensorBoard shows each record once and a new W&B run holds the whole history.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
TENSORBOARD_DIR = "tensorboard"


class TensorBoardReporter:
    """Scalars in ``output_dir/tensorboard`` (``tensorboard --logdir OUTPUT_DIR/tensorboard``)."""

    def __init__(self, output_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("--report-to tensorboard: the tensorboard package is not installed (pip install "
                             "tensorboard)") from err
        self.writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))

    @staticmethod
    def clear(output_dir: Path) -> None:
        """Forget what was reported: the event files go (they are rewritten from metrics.jsonl)."""
        shutil.rmtree(output_dir / TENSORBOARD_DIR, ignore_errors=True)

    def log(self, step_name: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{step_name}/{key}", value, step)
        self.writer.flush()  # as durable as the metrics.jsonl line (SummaryWriter would wait up to 2 minutes)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One W&B run, its files in ``output_dir/wandb``, named after the output directory. Project, entity and
    mode come from W&B's own variables (``WANDB_PROJECT``, ``WANDB_MODE=offline``, ...).

    Each step name gets its own x axis, ``<step_name>/step``: the steps count from 1 each, and W&B drops values
    logged at a step lower than one it has seen."""

    def __init__(self, output_dir: Path):
        try:
            import wandb
        except ImportError as err:
            raise ValueError("--report-to wandb: the wandb package is not installed (pip install wandb)") from err
        self.run = wandb.init(dir=str(output_dir), name=output_dir.resolve().name)
        self.axes: set[str] = set()

    @staticmethod
    def clear(output_dir: Path) -> None:
        """A W&B run cannot take records back: the next run is a new one, rewritten from metrics.jsonl."""

    def log(self, step_name: str, step: int, values: dict[str, float]) -> None:
        axis = f"{step_name}/step"
        if step_name not in self.axes:
            self.run.define_metric(axis)
            self.run.define_metric(f"{step_name}/*", step_metric=axis)
            self.axes.add(step_name)
        self.run.log({axis: step, **{f"{step_name}/{key}": value for key, value in values.items()}})

    def close(self) -> None:
        self.run.finish()


REPORTERS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}


def parse_report_to(spec: str | Sequence[str] | None) -> list[str]:
    """``--report-to``'s value as names: "tensorboard,wandb" -> ["tensorboard", "wandb"]; None, "" or "none" -> []."""
    items = (spec.split(",") if isinstance(spec, str) else list(spec)) if spec is not None else []
    names = [name.strip() for name in items if name.strip() not in ("", "none")]
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"--report-to: unknown {name!r} (expected a comma-separated list of "
                             f"{', '.join(REPORTERS)}, or none)")
    return list(dict.fromkeys(names))


class MetricsLogger:
    """Append metric records to ``output_dir/metrics.jsonl`` and to each of ``report_to`` ("tensorboard",
    "wandb"; a list or a comma-separated string), only on the main process when ``enabled``."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, report_to: str | Sequence[str] | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.names = parse_report_to(report_to)  # on every rank: a bad name fails the whole run, not only rank 0
        self.reporters = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open_reporters()
        self.length = self._length()  # of metrics.jsonl as this logger last saw it

    def _open_reporters(self) -> None:
        self.reporters = [REPORTERS[name](self.path.parent) for name in self.names]

    def _length(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def _resync(self) -> None:
        """When metrics.jsonl was cut back since this logger last wrote (a resume to a checkpoint), the
        reporters start over from what the file holds now: no record reaches them twice."""
        if not self.reporters or self._length() >= self.length:
            return
        for reporter in self.reporters:
            reporter.close()
            reporter.clear(self.path.parent)
        self._open_reporters()
        for record in read_metrics(self.path.parent):
            self._report(record)
        self.length = self._length()

    def _report(self, record: dict) -> None:
        numbers = {k: v for k, v in record.items() if k not in ("step_name", "step") and _is_number(v)}
        for reporter in self.reporters:
            reporter.log(record["step_name"], record["step"], numbers)

    def log(self, step_name: str, step: int, **values: float) -> dict:
        record = {"step_name": step_name, "step": step}
        for key, value in values.items():
            record[key] = value.item() if hasattr(value, "item") else value
        if self.enabled:
            self._resync()
            append_jsonl(self.path, [record])  # reopened per line: nothing buffered survives a crash
            self.length = self._length()
            self._report(record)
        return record

    def close(self) -> None:
        """Finish the TensorBoard and W&B runs. A multi-process run ends through os._exit (common.end_process),
        where nothing is finished for them: whoever opens a logger with reporters closes it (`with logger:`)."""
        self._resync()
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append whole JSON lines to `path` in one write, flushed to disk (a crash leaves at most a torn last line,
    which readers skip, as read_metrics does)."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every complete record of ``metrics.jsonl``; a torn last line (from a crash) is skipped."""
    path = Path(output_dir) / METRICS_FILE
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# -- the plot ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    """One plot: (step group, metric key) series on the left axis, `twin` ones dashed on a right axis of their own,
    each axis labelled (`ylabel`, `twin_label`; `xlabel` the step counter of the groups drawn).

    Step groups gather step names: "sft", "rm" (step name "reward") and "rl" (any other: ppo, grpo, rloo, ...),
    each with an "_eval" twin for the held-out records. So a new RL algorithm logging under its own step name with
    the same keys lands in the same panels. "{reward}" in a title is where the run's rewards come from (a reward
    model or a reward function); "{vs}" becomes " (left) vs gold rule (right)" when the gold rule is drawn too."""
    title: str
    series: tuple[tuple[str, str], ...]
    twin: tuple[tuple[str, str], ...] = ()
    log_scale: bool = False
    ylabel: str = ""
    twin_label: str = ""
    xlabel: str = "round"  # step 3 counts rounds (rollouts and their updates); steps 1-2 optimizer steps


STEP = "optimizer step"
PANELS = (
    Panel("held out: {reward}{vs}", (("rl_eval", "greedy_reward"), ("rl_eval", "mean_reward")),
          (("rl_eval", "gold"),), ylabel="mean reward", twin_label="gold score"),
    Panel("rollouts: {reward}{vs}", (("rl", "reward"),), (("rl", "gold"),), ylabel="mean reward",
          twin_label="gold score"),
    Panel("KL(policy || reference) per answer", (("rl", "kl"),), ylabel="KL (nats)"),
    Panel("policy loss", (("rl", "actor_loss"),), ylabel="loss"),
    Panel("value loss", (("rl", "critic_loss"),), ylabel="loss"),
    Panel("answer length (tokens)", (("rl", "answer_len"),), ylabel="tokens"),
    Panel("max |rollout - training logprob|", (("rl", "logprob_gap"),), log_scale=True, ylabel="|logprob gap|"),
    Panel("SFT loss: train, held out", (("sft", "loss"), ("sft_eval", "eval_loss")), ylabel="loss", xlabel=STEP),
    Panel("reward-model loss", (("rm", "loss"),), ylabel="loss", xlabel=STEP),
    Panel("reward-model accuracy: train, held out", (("rm", "train_accuracy"), ("rm_eval", "accuracy")),
          ylabel="accuracy", xlabel=STEP),
)
REWARD_SOURCES = ("reward model", "reward function")


def step_group(step_name: str) -> str:
    """"sft" -> "sft", "reward_eval" -> "rm_eval", "grpo" -> "rl", "ppo_eval" -> "rl_eval"."""
    base, suffix = (step_name[:-5], "_eval") if step_name.endswith("_eval") else (step_name, "")
    return {"sft": "sft", "reward": "rm"}.get(base, "rl") + suffix


def collect_series(records: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(step name, key) -> [(step, value)] of the finite numbers. A step number lower than the one before starts
    the series again: a run rerun into the same directory appends to metrics.jsonl, and only the latest counts."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for record in records:
        name, step = record.get("step_name", "?"), record.get("step", 0)
        for key, value in record.items():
            if key in ("step_name", "step") or not _is_number(value) or not math.isfinite(value):
                continue
            points = series.setdefault((name, key), [])
            if points and step < points[-1][0]:
                points.clear()
            points.append((step, value))
    return series


def _lines(series, wanted: tuple[tuple[str, str], ...]) -> list[tuple[str, str, list[tuple[float, float]]]]:
    """(step name, key, points) of every series a panel asks for that is not flat (a constant says nothing)."""
    return [(name, key, points) for (name, key), points in series.items()
            if (step_group(name), key) in wanted and max(v for _, v in points) > min(v for _, v in points)]


def _titled(panel: Panel, left: list, right: list, reward_source: str) -> Panel:
    """The panel with its title for this run: the reward source named, the gold rule only when drawn."""
    reward = reward_source if left else "gold rule"
    vs = " (left) vs gold rule (right)" if left and right else ""
    return dataclasses.replace(panel, title=panel.title.format(reward=reward, vs=vs))


def panels_to_draw(series: dict, reward_source: str = "reward model") -> list[tuple[Panel, list, list]]:
    """(panel, left lines, right lines) of each of PANELS with a series that is not flat, in PANELS' order, titled
    after ``reward_source`` (one of REWARD_SOURCES: where step 3's rewards came from)."""
    if reward_source not in REWARD_SOURCES:
        raise ValueError(f"reward_source {reward_source!r}: expected one of {', '.join(REWARD_SOURCES)}")
    panels = [(panel, _lines(series, panel.series), _lines(series, panel.twin)) for panel in PANELS]
    return [(_titled(panel, left, right, reward_source), left, right) for panel, left, right in panels
            if left or right]


def plot(output_dir: str | Path, path: str | Path | None = None, reward_source: str = "reward model") -> Path | None:
    """Draw the curated panels (PANELS) that have a non-constant series into a PNG, titled after ``reward_source``
    (panels_to_draw); None when none has one."""
    fig = figure(collect_series(read_metrics(output_dir)), reward_source)
    if fig is None:
        return None
    out = Path(path) if path is not None else Path(output_dir) / PLOT_FILE
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    os.replace(tmp, out)
    return out


def figure(series: dict, reward_source: str = "reward model"):
    """The matplotlib figure of ``plot``: one axes per panel to draw (None when there is none)."""
    panels = panels_to_draw(series, reward_source)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(name.removesuffix("_eval") for name, _ in series))
    colour = {base: f"C{i % 10}" for i, base in enumerate(bases)}  # one colour per algorithm across panels
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False)
    # fixed margins: tight_layout measured every text box and took ~2 of the old plot's 3 s
    # room for the axis labels: wider gaps than the titles alone needed
    fig.subplots_adjust(left=0.08, right=0.93, bottom=0.15 / rows, top=1 - 0.18 / rows, wspace=0.45, hspace=0.7)
    for ax, (panel, left, right) in zip(axes.flat, panels):
        # proxy and truth on their own scales: with two evaluations both are straight lines corner to corner,
        # so the legend carries each one's first and last value
        handles = _draw(ax, left, panel.series, colour, "-", with_values=bool(right))
        ax.set_ylabel(panel.ylabel if left else panel.twin_label, fontsize=7)
        if right:
            twin = ax.twinx() if left else ax
            handles += _draw(twin, right, panel.twin, colour, "--", with_values=True)
            twin.tick_params(labelsize=7)
            twin.set_ylabel(panel.twin_label, fontsize=7)
        if panel.log_scale and all(v > 0 for _, _, points in left for _, v in points):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(panel.xlabel, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(handles) > 1:
            ax.legend(handles=handles, fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return fig


def _draw(ax, lines, wanted, colour: dict[str, str], style: str, with_values: bool = False) -> list:
    """Plot `lines` on `ax`: coloured by algorithm when the panel has one key, else by key (train vs held out)."""
    handles = []
    for name, key, points in lines:
        steps, values = zip(*points)
        if len(wanted) > 1:
            label, colour_of = f"{name} {key}", f"C{wanted.index((step_group(name), key))}"
        else:
            label = name.removesuffix("_eval")
            colour_of = colour[label]
            if with_values:
                label += f" {key} {values[0]:.3g} -> {values[-1]:.3g}"
        handles += ax.plot(steps, values, style, color=colour_of, label=label, marker="." if len(points) < 30 else None)
    return handles
