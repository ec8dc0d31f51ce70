"""The ops the inference forward calls, each with a dispatch table of backends.

`select(kernels)` returns an `OpSet`: one callable per op, chosen once when the engine is built, so the
decode loop pays no dispatch cost per call. Backends: `torch` (the reference in reference.py) for now.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from . import reference

OP_NAMES = ("rms_norm", "layer_norm", "rotary_kv_append", "prefill_attention", "decode_attention",
            "tp_pack", "tp_unpack")
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


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


def select(kernels: str | None = None, device: str = "cpu") -> OpSet:
    """Choose one implementation per op for `device`."""
    requested_backend(kernels)
    fns = {name: getattr(reference, name) for name in OP_NAMES}
    return OpSet(**fns, choices={name: ("torch", "reference") for name in OP_NAMES})


def backends(kernels: str | None = None, device: str = "cpu") -> dict:
    """What each op uses and why: {op: (backend, reason)}."""
    return select(kernels, device).choices
