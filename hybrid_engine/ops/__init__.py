"""The ops the inference forward calls, each declared once in specs.py with its own dispatch table of backends.

`select(kernels, device)` returns an `OpSet`: one callable per op, chosen once when the engine is built, so the
decode loop pays no dispatch cost per call. Backends, fastest first:

  cuda    C++/CUDA kernels (csrc/attention, csrc/tensor_parallel), JIT-built by builder.CudaOpsBuilder. It has
          no norm or prefill kernel: their specs list no cuda backend, so under kernels="cuda" they use their auto
          order (Triton, else torch), and `backends()` says so.
  triton  Triton kernels (hybrid_engine/kernels); on CPU only under TRITON_INTERPRET=1 (slow; for tests).
  cpu     C++ CPU twins (csrc/cpu), JIT-built by builder.CpuOpsBuilder; every op.
  torch   the plain PyTorch references (reference.py); every op, every device.

`kernels` is one of auto|cuda|triton|cpu|torch, or None for $HYBRID_ENGINE_KERNELS (default auto). `auto`
takes, per op, the first backend in the op's order for the device that loads, and warns once when it falls
back. An explicitly requested backend that cannot load raises `BackendError`, naming the ops and why.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import make_dataclass

import torch

from . import reference
from .builder import BuildError, CpuOpsBuilder, CudaOpsBuilder
from .specs import FASTEST_FIRST, SPECS, OpSpec

OP_NAMES = tuple(spec.name for spec in SPECS)
CUDA_OPS = tuple(spec.name for spec in SPECS if "cuda" in spec.backends)  # csrc/cuda_bindings.cpp binds these
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
__all__ = ["BACKENDS", "CUDA_OPS", "OP_NAMES", "SPECS", "BackendError", "BuildError", "OpSet", "OpSpec", "backends",
           "reference", "requested_backend", "select"]


class BackendError(RuntimeError):
    """An explicitly requested backend cannot serve an op on this device."""


OpSet = make_dataclass("OpSet", [(name, Callable) for name in OP_NAMES] + [("choices", dict)], frozen=True)
OpSet.__module__ = __name__
OpSet.__doc__ = "One chosen implementation per op (a field per spec); `choices`: which backend each op uses and why."


def requested_backend(kernels: str | None = None) -> str:
    """The backend asked for: the `kernels=` argument, else $HYBRID_ENGINE_KERNELS, else auto."""
    name = kernels or os.environ.get("HYBRID_ENGINE_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"kernels={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _load_triton(device: str) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise BuildError("triton: no CUDA GPU visible")
    if device not in ("cuda", "cpu"):
        raise BuildError(f"triton: no kernels for device {device!r}")
    try:
        from .. import kernels
    except ImportError as err:
        raise BuildError(f"triton: cannot import the Triton kernels ({err})") from err
    if device == "cpu" and not kernels.INTERPRETED:
        raise BuildError("triton: CPU tensors need the interpreter: set TRITON_INTERPRET=1 before importing "
                         "hybrid_engine.kernels")
    if device == "cuda" and kernels.INTERPRETED:
        raise BuildError("triton: TRITON_INTERPRET=1 is set, so the kernels would not be compiled for the GPU")
    return {spec.name: getattr(kernels, spec.name) for spec in SPECS if "triton" in spec.backends}


def _load(backend: str, device: str) -> dict:
    """{op: function} that `backend` provides on `device` (the ops whose specs list it); raises BuildError with the
    reason if it cannot."""
    if backend == "torch":
        return {spec.name: spec.reference for spec in SPECS}
    if backend == "cpu":
        if device != "cpu":
            raise BuildError(f"cpu: the C++ CPU twins run on CPU tensors, not {device!r}")
        from .library import host_functions
        return host_functions("cpu", CpuOpsBuilder().load())
    if backend == "cuda":
        if device != "cuda":
            raise BuildError(f"cuda: the CUDA kernels run on CUDA tensors, not {device!r}")
        from .library import host_functions
        return host_functions("cuda", CudaOpsBuilder().load())
    return _load_triton(device)


_WARNED: set[str] = set()
_CACHE: dict[tuple[str, str], OpSet] = {}


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_all(backends, device: str) -> tuple[dict, dict]:
    """({backend: {op: function}} of those that load, {backend: why not} of those that do not)."""
    tables, failures = {}, {}
    for backend in backends:
        try:
            tables[backend] = _load(backend, device)
        except BuildError as err:
            failures[backend] = str(err)
    return tables, failures


def _first(spec: OpSpec, device: str, loaded: dict) -> str:
    return next(b for b in spec.order(device) if b in loaded and spec.name in loaded[b])


def _select_auto(device: str) -> tuple[dict, dict]:
    loaded, failures = _load_all(FASTEST_FIRST.get(device, ("torch",)), device)
    why = "; ".join(f"{b} unavailable: {r}" for b, r in failures.items())
    fns, choices = {}, {}
    for spec in SPECS:
        backend = _first(spec, device, loaded)
        fns[spec.name] = loaded[backend][spec.name]
        choices[spec.name] = (backend, f"auto on {device}: {spec.reason(device)}" + (f" ({why})" if why else ""))
    if failures:
        detail = "; ".join(failures.values())
        _warn_once(f"hybrid_engine.ops: kernels='auto' on {device} fell back for some ops ({detail})")
    return fns, choices


def _select_explicit(backend: str, device: str) -> tuple[dict, dict]:
    """The requested backend for every op it has a kernel for (raising if it cannot load); each other op from
    its own auto order (under `cuda`: the norms and prefill from Triton, else torch)."""
    served = [spec.name for spec in SPECS if backend in spec.backends]
    try:
        own = _load(backend, device)
    except BuildError as err:
        raise BackendError(f"kernels={backend!r} on {device}: ops {', '.join(served)} cannot use it: {err}") from err
    fns = {name: own[name] for name in served}
    choices = {name: (backend, "requested") for name in served}
    lacking = [spec for spec in SPECS if backend not in spec.backends]
    if lacking:
        helpers = {b for spec in lacking for b in spec.order(device)}
        loaded, failures = _load_all([b for b in FASTEST_FIRST.get(device, ("torch",)) if b in helpers], device)
        why = "; ".join(f"{b} unavailable: {r}" for b, r in failures.items())
        for spec in lacking:
            via = _first(spec, device, loaded)
            fns[spec.name] = loaded[via][spec.name]
            choices[spec.name] = (via, f"requested {backend} has no {spec.name} kernel; using {via}"
                                  + (f" ({why})" if why else ""))
    return fns, choices


def select(kernels: str | None = None, device: str | torch.device = "cpu") -> OpSet:
    """Choose one implementation per op for `device` (a device or its type: "cpu", "cuda", "cuda:1")."""
    backend = requested_backend(kernels)
    dev = torch.device(device).type
    key = (backend, dev)
    if key not in _CACHE:
        fns, choices = _select_auto(dev) if backend == "auto" else _select_explicit(backend, dev)
        _CACHE[key] = OpSet(**fns, choices=choices)
    return _CACHE[key]


def backends(kernels: str | None = None, device: str | torch.device = "cpu") -> dict:
    """What each op uses and why: {op: (backend, reason)}."""
    return dict(select(kernels, device).choices)
