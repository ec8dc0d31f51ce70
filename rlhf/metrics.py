"""Training metrics: one JSON object per line in ``metrics.jsonl``, and a PNG of the curves.

Records are ``{"step_name": "sft", "step": 12, "loss": 1.9, ...}``. Each line is written with one
``write`` call on a file opened for appending, then flushed, so a crash loses at most the line being
written and never corrupts earlier ones.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


class MetricsLogger:
    """Append metric records to ``output_dir/metrics.jsonl`` (only on the main process when ``enabled``)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step_name: str, step: int, **values: float) -> dict:
        record = {"step_name": step_name, "step": step}
        for key, value in values.items():
            record[key] = value.item() if hasattr(value, "item") else value
        if self.enabled:
            line = json.dumps(record) + "\n"
            with open(self.path, "a") as f:  # reopened per line: nothing buffered survives a crash
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return record


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


def plot(output_dir: str | Path, path: str | Path | None = None, max_panels: int = 24) -> Path | None:
    """Draw each numeric metric of each step against its step number into a PNG; None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for record in read_metrics(output_dir):
        name, step = record.get("step_name", "?"), record.get("step", 0)
        for key, value in record.items():
            if key in ("step_name", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                series[(name, key)].append((step, value))
    panels = list(series.items())[:max_panels]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, ((name, key), points) in zip(axes.flat, panels):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(f"{name}: {key}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(path) if path is not None else Path(output_dir) / PLOT_FILE
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
