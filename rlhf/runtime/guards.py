"""What stops a run cleanly: SIGTERM/SIGINT (finish the optimizer step, checkpoint, exit 143/130) and non-finite
losses, rewards or advantages (skip the update; stop after ``--max-nonfinite-steps`` in a row).

Both decisions are agreed by every rank (one all-reduce), so ranks skip or stop at the same step and no
collective is left waiting.
"""

from __future__ import annotations

import math
import signal
import sys
import warnings

import torch

from rlhf.runtime.distributed import is_distributed


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank."""
    import torch.distributed as dist

    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint; ``code`` is the exit status (128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopSignal:
    """SIGTERM and SIGINT set a flag that the training loops read between optimizer steps (``requested()``); a
    second SIGINT interrupts at once. Use as a context manager: the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(f"rlhf: {signal.Signals(signum).name} received: stopping after this optimizer step", file=sys.stderr,
              flush=True)

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return _any_rank(self.received is not None)

    def stop(self, where: str, checkpoint, resume_hint: str) -> Stopped:
        """The exception that ends the run, after ``checkpoint`` was written."""
        signum = self.received if self.received is not None else signal.SIGTERM
        name = signal.Signals(signum).name
        return Stopped(f"stopped by {name} after {where}; checkpoint {checkpoint}. Continue with: {resume_hint}",
                       128 + int(signum))


def _finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(value)


class NonFiniteError(ValueError):
    """Too many updates in a row had a non-finite quantity."""


class NonFiniteGuard:
    """Counts updates skipped for a non-finite loss, reward or advantage, and ends the run after ``limit`` in a
    row. ``where`` names the step in messages ("step 3 (grpo) round")."""

    def __init__(self, limit: int, where: str):
        if limit < 1:
            raise ValueError(f"--max-nonfinite-steps {limit}: expected at least 1")
        self.limit, self.where = limit, where
        self.skipped, self.in_a_row = 0, 0
        self.last_checkpoint: str | None = None

    def ok(self, step: int, **quantities) -> bool:
        """True when every quantity is finite on every rank; else the update is to be skipped (counted)."""
        bad = [name for name, value in quantities.items() if value is not None and not _finite(value)]
        if not _any_rank(bool(bad)):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        what = ", ".join(bad) or "a quantity on another rank"
        if self.in_a_row >= self.limit:
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "no checkpoint was written (--save-interval)"
            raise NonFiniteError(f"{self.where} {step}: {what} not finite for {self.in_a_row} updates in a row "
                                 f"(--max-nonfinite-steps {self.limit}); {kept}")
        warnings.warn(f"{self.where} {step}: {what} not finite; update skipped ({self.skipped} so far)",
                      RuntimeWarning, stacklevel=2)
        return False

    def state(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state(self, state: dict) -> None:
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]


def _gradient_norm(engine) -> torch.Tensor | None:
    """The gradient norm of a ZeRO-0 fp32 engine before its step; None elsewhere. ZeRO 1-3 check the norm of
    their gradient partitions themselves and skip a non-finite step (counted in ``engine.skipped_steps``), as
    fp16's loss scaler does; a ZeRO-0 step would apply it."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    norms = [p.grad.detach().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def guarded_update(engine, loss: torch.Tensor, guard: NonFiniteGuard, step: int, name: str = "loss",
                   boundary: bool | None = None) -> bool:
    """``engine.backward(loss)`` and ``engine.step()`` unless ``loss`` is not finite (then neither runs: False);
    a non-finite gradient norm at the accumulation boundary drops the window's gradients instead of stepping.

    ``boundary``: None, the engine's own count of micro-steps decides where its accumulation window ends; True or
    False, the caller's micro-batches do (the step-3 trainer's token-budget micro-batches of one minibatch: False
    for all but the last, whose update steps). A non-finite loss then also drops what the window accumulated, and
    the caller skips the window's remaining micro-batches."""
    if not guard.ok(step, **{name: loss}):
        if boundary is not None:
            engine.optimizer.zero_grad(set_to_none=True)
        return False
    if boundary is not None:
        engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss)
    if boundary is False:
        return True
    if engine.is_gradient_accumulation_boundary() and not guard.ok(step, gradient_norm=_gradient_norm(engine)):
        engine.optimizer.zero_grad(set_to_none=True)
        return True
    engine.step()
    return True
