"""The ops the inference forward calls, each with a dispatch table of backends.

`select(kernels, device)` returns an `OpSet`: one callable per op, chosen once when the engine is built, so the
decode loop pays no dispatch cost per call. Backends, fastest first:

  cuda    C++/CUDA kernels (csrc/attention, csrc/tensor_parallel), JIT-built by builder.CudaOpsBuilder. It has
          no norm or prefill kernel: those ops use Triton (else torch), and `backends()` says so.
  triton  Triton kernels (hybrid_engine/kernels); on CPU only under TRITON_INTERPRET=1 (slow; for tests).
  cpu     C++ CPU twins (csrc/cpu), JIT-built by builder.CpuOpsBuilder; every op.
  torch   the plain PyTorch references (reference.py); every op, every device.

`kernels` is one of auto|cuda|triton|cpu|torch, or None for $HYBRID_ENGINE_KERNELS (default auto). `auto`
takes, per op, the first backend in its order for the device that loads, and warns once when it falls back.
An explicitly requested backend that cannot load raises `BackendError`, naming the op and why.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference
from .builder import BuildError, CpuOpsBuilder, CudaOpsBuilder

OP_NAMES = ("rms_norm", "layer_norm", "rotary_kv_append", "prefill_attention", "decode_attention",
            "tp_pack", "tp_unpack")
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}  # interpreted Triton: never auto
CUDA_LACKS = ("rms_norm", "layer_norm", "prefill_attention")  # served by Triton (else torch) under `cuda`
# Per-op exceptions to AUTO_ORDER: (device, op) -> (order, why), each with the evidence behind it.
AUTO_PREFER = {
    # benchmarks/kernels.py: torch's SDPA flash kernel beats the C++ prefill at T=64 (1632 vs 1990 us).
    ("cpu", "prefill_attention"): (("torch", "cpu"), "measured faster on cpu (benchmarks/kernels.py)"),
    # Unmeasured: the CUDA decode kernel's inner loop handles one key per warp iteration, the Triton one a
    # 64-key tile per tl.dot, and no run of benchmarks/kernels.py on a GPU shows the CUDA kernel faster. Until
    # one does, auto takes Triton's.
    ("cuda", "decode_attention"): (("triton", "cuda", "torch"),
                                   "Triton's tiled kernel until benchmarks/kernels.py shows the CUDA one faster"),
}


class BackendError(RuntimeError):
    """An explicitly requested backend cannot serve an op on this device."""


@dataclass(frozen=True)
class OpSet:
    """One chosen implementation per op; `choices` says which backend each op uses and why."""
    rms_norm: Callable
    layer_norm: Callable
    rotary_kv_append: Callable
    prefill_attention: Callable
    decode_attention: Callable
    tp_pack: Callable
    tp_unpack: Callable
    choices: dict


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
    return {name: getattr(kernels, name) for name in OP_NAMES}


def _load(backend: str, device: str) -> dict:
    """{op: function} that `backend` provides on `device`; raises BuildError with the reason if it cannot."""
    if backend == "torch":
        return {name: getattr(reference, name) for name in OP_NAMES}
    if backend == "cpu":
        if device != "cpu":
            raise BuildError(f"cpu: the C++ CPU twins run on CPU tensors, not {device!r}")
        from .cpu import make_ops
        return make_ops(CpuOpsBuilder().load())
    if backend == "cuda":
        if device != "cuda":
            raise BuildError(f"cuda: the CUDA kernels run on CUDA tensors, not {device!r}")
        from .cuda import make_ops
        return make_ops(CudaOpsBuilder().load())
    return _load_triton(device)


_WARNED: set[str] = set()
_CACHE: dict[tuple[str, str], OpSet] = {}


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _select_auto(device: str) -> tuple[dict, dict]:
    tables, failures = {}, {}
    for backend in AUTO_ORDER.get(device, ("torch",)):
        try:
            tables[backend] = _load(backend, device)
        except BuildError as err:
            failures[backend] = str(err)
    why = "; ".join(f"{b} unavailable: {r}" for b, r in failures.items())
    fns, choices = {}, {}
    for name in OP_NAMES:
        order, reason = AUTO_PREFER.get((device, name), (AUTO_ORDER.get(device, ("torch",)), "fastest that loads"))
        backend = next(b for b in order if b in tables and name in tables[b])
        fns[name] = tables[backend][name]
        choices[name] = (backend, f"auto on {device}: {reason}" + (f" ({why})" if why else ""))
    if failures:
        detail = "; ".join(failures.values())
        _warn_once(f"hybrid_engine.ops: kernels='auto' on {device} fell back for some ops ({detail})")
    return fns, choices


def _select_explicit(backend: str, device: str) -> tuple[dict, dict]:
    try:
        table = _load(backend, device)
    except BuildError as err:
        ops = ", ".join(OP_NAMES)
        raise BackendError(f"kernels={backend!r} on {device}: ops {ops} cannot use it: {err}") from err
    choices = {name: (backend, "requested") for name in table}
    if backend == "cuda":  # the documented gap: no CUDA norm or prefill kernel, so Triton's, else torch's
        try:
            helper, via = _load("triton", device), "triton"
        except BuildError as err:
            helper, via = _load("torch", device), f"torch (triton unavailable: {err})"
        for name in CUDA_LACKS:
            table[name] = helper[name]
            choices[name] = (via.split(" ")[0], f"requested cuda has no {name} kernel; using {via}")
    return table, choices


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
