"""The C++ extensions' functions as `torch.library` custom ops with fake implementations, so `torch.compile`
traces a decode step through every backend (the Triton kernels are `triton_op`s already).

Why both a custom op and the plain pybind11 call: through the dispatcher a call costs ~5-10 us, the direct call
~1 us (csrc/cpu/bindings.cpp), and an eager CPU decode step makes ~10 op calls per layer. So the host functions
in cpu.py and cuda.py call the extension directly when run eagerly and the custom op only while dynamo traces
(`torch.compiler.is_compiling()`, folded to a constant in the trace), where the call cost is paid once per graph
replay at most, and not at all inside a CUDA graph.

Every op is defined once per process, in its namespace (hybrid_engine_cpu, hybrid_engine_cuda), over whichever
extension `bind` was last given for it: the extension is loaded lazily, the schema is fixed. Ops that write
their arguments declare them in mutates_args and return nothing (a custom op may not return an alias of an
input): the host functions return the written tensor themselves, as the references do.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.library import custom_op, register_fake

_EXTENSIONS: dict[str, object] = {}   # namespace -> the loaded extension its ops call
_DEFINED: dict[str, dict[str, Callable]] = {}
OPS = ("rms_norm", "rms_norm_residual", "layer_norm", "layer_norm_residual", "rotary_kv_append", "kv_append",
       "decode_attention", "prefill_attention", "tp_pack", "tp_unpack")


@custom_op("hybrid_engine_cpu::packed_linear", mutates_args=())  # every device type: packed is MkldnnCPU
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b with W a oneDNN-packed weight (models/common.pack_linears): opaque to inductor, which cannot
    lower mkldnn._linear_pointwise on an unfrozen packed weight itself. x: (..., in) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@register_fake("hybrid_engine_cpu::packed_linear")
def _(x, packed, bias):
    return x.new_empty(x.shape[:-1] + (packed.shape[0],))


def _empty(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)


def _define(ns: str, device: str) -> dict[str, Callable]:
    """Define the namespace's ops (once); returns {name: torch.ops callable}."""
    ext = lambda: _EXTENSIONS[ns]  # noqa: E731  (read at call time: the extension is bound after definition)

    @custom_op(f"{ns}::rms_norm", mutates_args=(), device_types=device)
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return ext().rms_norm(x, weight, eps)

    @register_fake(f"{ns}::rms_norm")
    def _(x, weight, eps):
        return _empty(x, dtype=weight.dtype)  # the reference's promotion: weight * h.to(x.dtype)

    @custom_op(f"{ns}::rms_norm_residual", mutates_args=(), device_types=device)
    def rms_norm_residual(x: torch.Tensor, weight: torch.Tensor, eps: float,
                          residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, summed = ext().rms_norm_residual(x, weight, eps, residual)
        return out, summed

    @register_fake(f"{ns}::rms_norm_residual")
    def _(x, weight, eps, residual):
        return _empty(x, dtype=weight.dtype), _empty(x)

    @custom_op(f"{ns}::layer_norm", mutates_args=(), device_types=device)
    def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        return ext().layer_norm(x, weight, bias, eps, None)[0]

    @register_fake(f"{ns}::layer_norm")
    def _(x, weight, bias, eps):
        return _empty(x)

    @custom_op(f"{ns}::layer_norm_residual", mutates_args=(), device_types=device)
    def layer_norm_residual(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                            residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, summed = ext().layer_norm(x, weight, bias, eps, residual)
        return out, summed

    @register_fake(f"{ns}::layer_norm_residual")
    def _(x, weight, bias, eps, residual):
        return _empty(x), _empty(x)

    @custom_op(f"{ns}::rotary_kv_append", mutates_args=("k_cache", "v_cache"), device_types=device)
    def rotary_kv_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
        return ext().rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, start)

    @register_fake(f"{ns}::rotary_kv_append")
    def _(q, k, v, cos, sin, k_cache, v_cache, start):
        return _empty(q)  # (B, T, H, D) contiguous, rotated

    @custom_op(f"{ns}::kv_append", mutates_args=("k_cache", "v_cache"), device_types=device)
    def kv_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  start: int) -> None:
        ext().rotary_kv_append(q, k, v, None, None, k_cache, v_cache, start)  # no rotary: the cache write only

    @register_fake(f"{ns}::kv_append")
    def _(q, k, v, k_cache, v_cache, start):
        return None

    @custom_op(f"{ns}::decode_attention", mutates_args=(), device_types=device)
    def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                         length: int, scale: float) -> torch.Tensor:
        return ext().decode_attention(q, k_cache, v_cache, key_mask, length, scale)

    @register_fake(f"{ns}::decode_attention")
    def _(q, k_cache, v_cache, key_mask, length, scale):
        return _empty(q)  # (B, H, D)

    @custom_op(f"{ns}::prefill_attention", mutates_args=(), device_types=device)
    def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                          sliding_window: int | None) -> torch.Tensor:
        return ext().prefill_attention(q, k, v, key_mask, scale, sliding_window)

    @register_fake(f"{ns}::prefill_attention")
    def _(q, k, v, key_mask, scale, sliding_window):
        return _empty(q)  # (B, H, T, D)

    @custom_op(f"{ns}::tp_pack", mutates_args=("shard",), device_types=device)
    def tp_pack(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, splits: list[int], dim: int) -> None:
        ext().tp_pack(full, shard, rank, world, splits, dim)

    @register_fake(f"{ns}::tp_pack")
    def _(full, shard, rank, world, splits, dim):
        return None

    @custom_op(f"{ns}::tp_unpack", mutates_args=("full",), device_types=device)
    def tp_unpack(shard: torch.Tensor, full: torch.Tensor, rank: int, world: int, splits: list[int],
                  dim: int) -> None:
        ext().tp_unpack(shard, full, rank, world, splits, dim)

    @register_fake(f"{ns}::tp_unpack")
    def _(shard, full, rank, world, splits, dim):
        return None

    namespace = getattr(torch.ops, ns)
    return {name: getattr(namespace, name) for name in OPS}


def bind(ns: str, device: str, ext) -> dict[str, Callable]:
    """The custom ops of namespace `ns` (defined on first use), now calling `ext`: {name: torch.ops callable}."""
    _EXTENSIONS[ns] = ext
    if ns not in _DEFINED:
        _DEFINED[ns] = _define(ns, device)
    return _DEFINED[ns]
