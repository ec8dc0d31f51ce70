"""Checkpoints of the whole training state, and exact resume.

Layout under ``OUTPUT_DIR``::

    run_state.json                      steps begun and finished (with their summaries), and the length of
                                        metrics.jsonl when each began
    checkpoints/<step>/step-000040/     one checkpoint after 40 optimizer steps (steps 1-2, DPO) or rounds (RL):
        <engine>/                         DeepSpeed's save_checkpoint of each trained model (actor, critic, ...):
                                          weights, optimizer, scheduler, ZeRO partitions
        rank<r>.pt                        each rank's RNG streams, loop position, EMA weights and counters
        meta.json                         counter, world size, length of metrics.jsonl; written last

A checkpoint is built in ``.tmp-step-N`` and renamed into place by rank 0 once every rank has written its part,
so one that fails to write leaves the previous ones as they were; ``keep`` newest are kept. Resume restores the
engines through DeepSpeed's ``load_checkpoint``, truncates metrics.jsonl to the length it had at the save (so
each record appears once), and gives the step its saved state to fast-forward its data and restore RNG streams.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rlhf.runtime.checkpoint import atomic_write_bytes
from rlhf.runtime.distributed import all_gather_objects, barrier, rank_world

CHECKPOINT_DIR = "checkpoints"
RUN_STATE_FILE = "run_state.json"
_STEP_DIR = re.compile(r"step-(\d+)$")


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG stream a step draws from: torch (CPU and CUDA), numpy, python, and the named generators."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generators": {name: g.get_state() for name, g in (generators or {}).items()}}


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


def _metrics_length(path: Path | None) -> int:
    return path.stat().st_size if path is not None and path.exists() else 0


def truncate_metrics(path: Path | None, length: int) -> None:
    """Cut metrics.jsonl back to ``length`` bytes: the records written after that point are written again."""
    if path is not None and path.exists() and path.stat().st_size > length:
        with open(path, "r+b") as f:
            f.truncate(length)
            f.flush()
            os.fsync(f.fileno())


# A first checkpoint's size before any exists: Adam's fp32 master weights and two moments are 12 bytes per parameter;
# measured 12.1 (9.63 MB for the tiny preset's 797k-parameter actor under ZeRO-3, one process); the full weights
# besides them (ZeRO 0-2) add 4 more
ESTIMATED_BYTES_PER_PARAMETER = 16


class DiskFullError(ValueError):
    """A checkpoint that does not fit on its disk: one line naming the directory and the room it needed."""


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _disk_full(err: BaseException, free: int, needed: int) -> bool:
    """Whether a failed write was the disk filling: ENOSPC/EDQUOT somewhere in the chain, or (torch.save's zip
    writer says only "unexpected pos") less room left than a checkpoint needs, or under 1 MiB."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(err, (OSError, RuntimeError)) and free < max(needed, 2**20)


class Checkpointer:
    """Full training-state checkpoints of one step (``name``: sft, reward, dpo, ppo, grpo, ...).

    ``interval`` counts optimizer steps or rounds (0: only when asked, e.g. at the end and on a signal);
    ``metrics_path`` is the metrics.jsonl to truncate on resume (None on ranks that do not write it).
    """

    def __init__(self, run_dir: str | Path, name: str, interval: int = 0, keep: int = 2,
                 metrics_path: str | Path | None = None, resume: bool = False):
        if keep < 1:
            raise ValueError(f"--keep-checkpoints {keep}: expected at least 1")
        if interval < 0:
            raise ValueError(f"--save-interval {interval}: expected 0 (off) or a positive number of steps")
        self.root = Path(run_dir) / CHECKPOINT_DIR / name
        self.name, self.interval, self.keep, self.resume = name, interval, keep, resume
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.last_saved: int | None = None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def path(self, counter: int) -> Path:
        return self.root / f"step-{counter:06d}"

    def remove(self) -> None:
        """Every checkpoint of this step: once the step has finished (its model saved, run_state.json saying so),
        --resume skips it and they are never read again (1.6 GB each for a 135M-parameter model)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def due(self, counter: int) -> bool:
        return self.interval > 0 and counter % self.interval == 0 and counter != self.last_saved

    def save(self, counter: int, engines: dict, state: dict) -> Path:
        """Every rank calls it. ``engines``: name -> DeepSpeed engine; ``state``: this rank's picklable state.

        A disk without room for it (about the size of the newest checkpoint: it is written before the oldest is
        removed) ends the run before anything is written, and a disk that fills while writing ends it too, both
        with a ``DiskFullError`` (one line, exit 2); the checkpoints already there are kept either way."""
        rank, world = rank_world()
        final = self.path(counter)
        tmp = self.root / f".tmp-step-{counter:06d}"
        needed = self.require_space(final, engines)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            for name, engine in engines.items():
                engine.save_checkpoint(str(tmp / name), tag="state")
            torch.save(state, tmp / f"rank{rank}.pt")
            barrier()
            if rank == 0:
                meta = {"step": self.name, "counter": counter, "world_size": world,
                        "metrics_length": _metrics_length(self.metrics_path)}
                atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=1).encode())
                if final.exists():  # saved again at the same counter (e.g. a signal right after an interval save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for old in self.checkpoints()[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as err:
            free = _free_bytes(self.root)  # before the partial checkpoint is removed
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(err, free, needed):
                raise DiskFullError(self._full_message(final, free, needed, "filled while writing it")) from err
            raise
        barrier()
        self.last_saved = counter
        return final

    def require_space(self, final: Path, engines: dict) -> int:
        """The bytes the next checkpoint needs (the newest one's size, else ``ESTIMATED_BYTES_PER_PARAMETER`` per
        trained parameter); a ``DiskFullError`` on every rank when any rank's disk has less free."""
        latest = self.latest()
        needed = _tree_bytes(latest) if latest is not None else ESTIMATED_BYTES_PER_PARAMETER * sum(
            getattr(p, "ds_numel", p.numel()) for engine in engines.values()
            for p in (engine.module.parameters() if hasattr(engine, "module") else ()))
        free = min(all_gather_objects(_free_bytes(self.root)))
        if free < needed:
            raise DiskFullError(self._full_message(final, free, needed, "has too little room"))
        return needed

    def _full_message(self, final: Path, free: int, needed: int, what: str) -> str:
        latest = self.latest()
        kept = f"the previous checkpoint {latest} is kept" if latest is not None else "no earlier checkpoint exists"
        return (f"checkpoint {final}: the disk of {self.root} {what} ({_mb(free)} free, a checkpoint needs about "
                f"{_mb(needed)}); {kept}. Free space there, then rerun with --resume")

    def load(self, engines: dict) -> dict | None:
        """With ``resume``, the newest checkpoint's state (engines loaded in place, metrics.jsonl truncated);
        else, or when there is none, None."""
        path = self.latest() if self.resume else None
        if path is None:
            return None
        rank, world = rank_world()
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != world:
            raise ValueError(f"{path}: saved by {meta['world_size']} process(es), resumed with {world}; resume "
                             "with the same number of processes")
        for name, engine in engines.items():
            load_path, _ = engine.load_checkpoint(str(path / name), tag="state")
            if load_path is None:
                raise ValueError(f"{path / name}: not a readable DeepSpeed checkpoint")
        state = torch.load(path / f"rank{rank}.pt", weights_only=False)
        if rank == 0:
            truncate_metrics(self.metrics_path, meta["metrics_length"])
        barrier()
        self.last_saved = meta["counter"]
        return state


class RunState:
    """``OUTPUT_DIR/run_state.json``: the steps of the run begun and finished, each finished one's summary, and
    the length of metrics.jsonl when each began. Rank 0 writes it (atomically); every rank reads it."""

    def __init__(self, run_dir: str | Path, metrics_path: Path, write: bool = True):
        self.path = Path(run_dir) / RUN_STATE_FILE
        self.metrics_path, self.write = metrics_path, write
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"steps": {}}

    def _save(self) -> None:
        if self.write:
            atomic_write_bytes(self.path, json.dumps(self.data, indent=1).encode())

    def begun(self) -> list[str]:
        return list(self.data["steps"])

    def summary(self, name: str) -> dict | None:
        """The summary of a finished step, else None."""
        return self.data["steps"].get(name, {}).get("summary")

    def begin(self, name: str, from_checkpoint: bool = False) -> None:
        """A step starts, or starts again after a kill: unless it continues from a checkpoint (which cuts
        metrics.jsonl back itself), the records it wrote on the earlier try are cut away."""
        entry = self.data["steps"].get(name)
        if entry is None:
            self.data["steps"][name] = {"metrics_length": _metrics_length(self.metrics_path)}
            self._save()
        elif self.write and not from_checkpoint:
            truncate_metrics(self.metrics_path, entry["metrics_length"])

    def finish(self, name: str, summary: dict) -> None:
        self.data["steps"][name]["summary"] = summary
        self._save()

    def forget(self, names: list[str]) -> list[str]:
        """Start these steps over (``--overwrite``): metrics.jsonl is cut back to where the earliest began, and
        the steps begun after it are forgotten too; returns every step forgotten."""
        starts = [self.data["steps"][n]["metrics_length"] for n in names if n in self.data["steps"]]
        if not starts:
            return []
        cut = min(starts)
        if self.write:
            truncate_metrics(self.metrics_path, cut)
        gone = [n for n, e in self.data["steps"].items() if e["metrics_length"] >= cut]
        self.data["steps"] = {n: e for n, e in self.data["steps"].items() if n not in gone}
        self._save()
        return gone


class RunControl:
    """What a training loop consults between optimizer steps: the checkpointer (None: no checkpoints), the stop
    signal (None: signals keep their default action) and the non-finite limit. ``resume_hint`` is the command
    line that continues the run, printed when a signal stops it."""

    def __init__(self, checkpointer: Checkpointer | None = None, stop=None, max_nonfinite_steps: int = 5,
                 resume_hint: str = "rerun the same command with --resume"):
        self.checkpointer, self.stop = checkpointer, stop
        self.max_nonfinite_steps, self.resume_hint = max_nonfinite_steps, resume_hint

    def load(self, engines: dict) -> dict | None:
        return self.checkpointer.load(engines) if self.checkpointer is not None else None

    def after_update(self, counter: int, engines: dict, state, guard=None, last: bool = False) -> None:
        """Checkpoint when the interval is due, at the ``last`` update, or when a signal asked to stop (then
        raise ``Stopped``). ``state`` is a callable giving this rank's state, built only when saving."""
        stopping = self.stop is not None and self.stop.requested()
        ckpt = self.checkpointer
        if ckpt is None:
            if stopping:
                raise self.stop.stop(f"update {counter}", "none (no checkpointer)", self.resume_hint)
            return
        if stopping or last or ckpt.due(counter):
            path = ckpt.save(counter, engines, state()) if ckpt.last_saved != counter else ckpt.path(counter)
            if guard is not None:
                guard.last_checkpoint = str(path)
            if stopping:
                raise self.stop.stop(f"{ckpt.name} update {counter}", path, self.resume_hint)


def open_run(run_dir: str | Path, names: list[str], outputs: dict[str, str], resume: bool, overwrite: bool,
             metrics_path: Path, is_main: bool) -> RunState:
    """The run state of ``run_dir`` for a run of the steps ``names`` (whose final outputs are ``outputs``).

    A directory that already holds one of these steps (begun, checkpointed or saved) is an error unless ``resume``
    (continue where it stopped) or ``overwrite`` (forget those steps, their checkpoints and metrics records, and
    the steps begun after them). A step that began but left nothing to continue from (it failed or was killed
    before any checkpoint, its model unsaved) is no such step: it is forgotten and runs again, since --resume
    would start it over too. Call on every rank; rank 0 (``is_main``) changes files.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: give one (--resume continues the run in --output-dir, "
                         "--overwrite starts its steps over)")
    run_dir = Path(run_dir)
    state = RunState(run_dir, metrics_path, write=is_main)
    saved = [n for n in names if Checkpointer(run_dir, n).latest() is not None or state.summary(n) is not None
             or (n in outputs and Path(outputs[n]).exists())]
    found = [n for n in names if n in saved or n in state.begun() or (run_dir / CHECKPOINT_DIR / n).exists()]
    barrier()  # every rank has looked before rank 0 writes run_state.json for the first step
    if found and not saved and not (resume or overwrite):  # begun, nothing saved: nothing to lose by starting over
        if is_main:
            for name in {*found, *state.forget(found)}:
                shutil.rmtree(run_dir / CHECKPOINT_DIR / name, ignore_errors=True)  # a half-written .tmp-step-N
        barrier()
        return RunState(run_dir, metrics_path, write=is_main)
    if found and not (resume or overwrite):
        raise ValueError(f"--output-dir {run_dir} already holds this run's {', '.join(found)} (begun or saved "
                         "earlier): add --resume to continue it, or --overwrite to start over")
    if overwrite and found:
        if is_main:
            for name in {*found, *state.forget(found)}:
                shutil.rmtree(run_dir / CHECKPOINT_DIR / name, ignore_errors=True)
        barrier()
        state = RunState(run_dir, metrics_path, write=is_main)
    return state


class StepRunner:
    """Runs a run's steps in order (``runner(name, title, train)``, ``train(control) -> summary``): a step
    finished earlier is skipped under ``--resume`` (its summary kept), any other one runs with a RunControl of
    its own, the run's stop signal and its flags (``save_interval``, ``keep_checkpoints``,
    ``max_nonfinite_steps``, ``resume``). ``summary`` collects the steps' summaries by title."""

    def __init__(self, run: RunState, run_dir: Path, args, stop, metrics_path: Path | None, is_main: bool,
                 resume_hint: str):
        self.run, self.run_dir, self.args, self.stop = run, run_dir, args, stop
        self.metrics_path, self.is_main, self.resume_hint = metrics_path, is_main, resume_hint
        self.summary: dict[str, dict] = {}

    def __call__(self, name: str, title: str, train) -> dict:
        args = self.args
        done = self.run.summary(name) if args.resume else None
        if done is not None:
            if self.is_main:
                print(f"rlhf train: {title} finished earlier: skipped (--resume)", flush=True)
                Checkpointer(self.run_dir, name).remove()  # left by a kill between finishing and removing them
        else:
            ckpt = Checkpointer(self.run_dir, name, args.save_interval, args.keep_checkpoints, self.metrics_path,
                                resume=args.resume)
            self.run.begin(name, from_checkpoint=ckpt.resume and ckpt.latest() is not None)
            done = train(RunControl(ckpt, self.stop, args.max_nonfinite_steps, self.resume_hint))
            self.run.finish(name, done)
            if self.is_main:
                ckpt.remove()
            barrier()  # rank 0 saved the step's output: no rank reads it in the next step before it is whole
        self.summary[title] = done
        return done
