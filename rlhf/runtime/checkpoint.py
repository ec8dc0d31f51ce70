"""Atomic checkpoint writes: a checkpoint is complete or absent, never half-written.

Every save goes to a temporary sibling (same filesystem, so ``os.replace`` is atomic) and is renamed into
place only after the writer returns. A previous checkpoint at the target is moved aside first and deleted
last, so an interruption at any moment leaves either the old or the new checkpoint readable (and, at
worst, a stale ``.tmp-*`` / ``.old-*`` sibling, which the next save removes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn

from rlhf.models import save_actor, save_reward_model
from rlhf.runtime.distributed import is_main_process


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clean_stale(target: Path) -> None:
    for sibling in target.parent.glob(f".{target.name}.tmp-*"):
        _remove(sibling)
    for sibling in target.parent.glob(f".{target.name}.old-*"):
        _remove(sibling)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on normal exit it replaces ``target``.

    If the body raises, the temporary directory is deleted and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    token = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{token}"
    if target.exists():
        os.replace(target, old)  # a directory cannot be replaced in one rename while it holds files
    os.replace(tmp, target)
    _remove(old)


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file, fsync it, and rename it to ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_save(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``target`` atomically."""
    with atomic_directory(target) as tmp:
        write(tmp)
    return Path(target)


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[None]:
    """Under ZeRO-3 each rank holds a shard of every parameter; gather full weights for the save."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save_actor_checkpoint(model: nn.Module, tokenizer, target: str | Path) -> Path:
    """Atomically write an actor checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.

    Every rank must call it (ZeRO-3 gathers collectively); rank 0 writes.
    """
    with gathered_parameters(model):
        if is_main_process():
            atomic_save(target, lambda tmp: save_actor(model, tokenizer, tmp))
    return Path(target)


def save_reward_checkpoint(model: nn.Module, tokenizer, target: str | Path) -> Path:
    """Atomically write a reward model (or critic) that ``RewardModel.from_pretrained`` loads.

    Every rank must call it (ZeRO-3 gathers collectively); rank 0 writes.
    """
    with gathered_parameters(model):
        if is_main_process():
            atomic_save(target, lambda tmp: save_reward_model(model, tokenizer, tmp))
    return Path(target)
