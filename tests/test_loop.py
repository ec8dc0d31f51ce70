"""The one training loop (rlhf/runtime/loop.py) with a stand-in update, no model: batches that resume where they
stopped, records windowed and logged every log_interval, and a run stopped after a checkpoint that, resumed,
logs what the uninterrupted run logged."""

import pytest
import torch
from torch.utils.data import Dataset

from rlhf.runtime.distributed import make_dataloader
from rlhf.runtime.guards import NonFiniteGuard
from rlhf.runtime.loop import Batches, run_loop
from rlhf.runtime.resume import Checkpointer, RunControl


class Numbers(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> torch.Tensor:
        return torch.tensor(items)


def loader():
    return make_dataloader(Numbers(7), 2, shuffle=True, seed=3)  # 4 batches an epoch, the last one short


def test_batches_seek_gives_the_batches_the_run_had_next():
    everything = [b.tolist() for b in Batches(loader(), 3)]
    assert len(everything) == 12 and everything[:4] != everything[4:8]  # each epoch its own order
    for cut in range(1, 12):
        first = Batches(loader(), 3)
        drawn = iter(first)
        for _ in range(cut):
            next(drawn)
        resumed = Batches(loader(), 3)
        resumed.seek(first.position())
        assert [b.tolist() for b in resumed] == everything[cut:], f"resumed after {cut} batches"


class Metrics:
    def __init__(self):
        self.records = []

    def log(self, step_name: str, step: int, **values) -> None:
        self.records.append({"step_name": step_name, "step": step, **values})


class Killed(Exception):
    pass


def train(tmp_path, resume: bool = False, kill_at_batch: int | None = None) -> list[dict]:
    """6 updates of 2 batches each over 3 epochs; a record draws from torch's stream and a named generator."""
    metrics, generator = Metrics(), torch.Generator().manual_seed(5)
    control = RunControl(Checkpointer(tmp_path, "test", interval=2, resume=resume))
    seen = []

    def update(batch, step: int):
        seen.append(batch)
        if len(seen) == kill_at_batch:
            raise Killed
        if len(seen) % 2:
            return None  # accumulating
        return [{"x": float(batch.sum()) + torch.rand(()).item() + torch.rand((), generator=generator).item()}]

    step, last = run_loop(update, Batches(loader(), 3), 6, name="test", desc="test", metrics=metrics,
                          control=control, engines={}, guard=NonFiniteGuard(3, "test"), resumed=control.load({}),
                          log_interval=4, show_bar=False, generators={"g": generator},
                          postfix=lambda r: {"x": r["x"]})
    assert step == 6 and last["x"] == metrics.records[-1]["x"]
    return metrics.records


def test_records_are_window_means_and_a_resumed_run_logs_the_rest(tmp_path):
    torch.manual_seed(0)
    full = train(tmp_path / "full")
    assert [r["step"] for r in full] == [4, 6]  # every log_interval, and the last
    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(tmp_path / "run", kill_at_batch=6)  # in update 3: the checkpoint of update 2 holds half a window
    torch.manual_seed(123)  # a new process: the checkpoint's streams must replace this one
    assert train(tmp_path / "run", resume=True) == full
