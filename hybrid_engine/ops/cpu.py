"""Host functions of the C++ CPU twins (csrc/cpu/), with the signatures of reference.py.

Thin on purpose: at decode shapes an op's work is a few microseconds, so each wrapper is one Python call
into one pybind11 function (no torch.library dispatch), with the checks done in C++. While torch.compile traces
(a compiled decode step) they call the same functions as torch.library custom ops instead (library.py), whose
fake implementations give the output shapes.
"""
from __future__ import annotations

import functools

import torch

from .library import bind


def make_ops(ext, namespace: str = "hybrid_engine_cpu", device: str = "cpu") -> dict:
    """{op name: function} over the loaded extension `ext` (builder.CpuOpsBuilder().load())."""
    lib = bind(namespace, device, ext)
    return host_functions(ext, lib)


def host_functions(ext, lib: dict) -> dict:
    """The seven ops over `ext` eagerly and over its custom ops `lib` under tracing (cpu.py and cuda.py)."""
    compiling = torch.compiler.is_compiling

    def like(name: str):
        """Carry the extension function's name, doc and attributes (tests tell backends apart by them)."""
        fn = getattr(ext, name, None)
        return functools.wraps(fn) if fn is not None else (lambda f: f)

    @like("rms_norm")
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        if residual is None:
            return lib["rms_norm"](x, weight, eps) if compiling() else ext.rms_norm(x, weight, eps)
        if compiling():
            return lib["rms_norm_residual"](x, weight, eps, residual)
        return ext.rms_norm_residual(x, weight, eps, residual)

    @like("layer_norm")
    def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None):
        if compiling():
            if residual is None:
                return lib["layer_norm"](x, weight, bias, eps)
            return lib["layer_norm_residual"](x, weight, bias, eps, residual)
        out, summed = ext.layer_norm(x, weight, bias, eps, residual)
        return out if residual is None else (out, summed)

    @like("rotary_kv_append")
    def rotary_kv_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                         sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int):
        if not compiling():
            return ext.rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, start)
        if cos is None:  # the op writes the cache only and returns q itself: not expressible as a custom op
            lib["kv_append"](q, k, v, k_cache, v_cache, start)
            return q
        return lib["rotary_kv_append"](q, k, v, cos, sin, k_cache, v_cache, start)

    @like("decode_attention")
    def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                         length: int, scale: float) -> torch.Tensor:
        if compiling():
            return lib["decode_attention"](q, k_cache, v_cache, key_mask, length, scale)
        return ext.decode_attention(q, k_cache, v_cache, key_mask, length, scale)

    @like("prefill_attention")
    def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                          sliding_window: int | None = None) -> torch.Tensor:
        if compiling():
            return lib["prefill_attention"](q, k, v, key_mask, scale, sliding_window)
        return ext.prefill_attention(q, k, v, key_mask, scale, sliding_window)

    @like("tp_pack")
    def tp_pack(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, splits, dim: int = 0):
        if not compiling():
            return ext.tp_pack(full, shard, rank, world, splits, dim)
        lib["tp_pack"](full, shard, rank, world, list(splits), dim)
        return shard

    @like("tp_unpack")
    def tp_unpack(shard: torch.Tensor, full: torch.Tensor, rank: int, world: int, splits, dim: int = 0):
        if not compiling():
            return ext.tp_unpack(shard, full, rank, world, splits, dim)
        lib["tp_unpack"](shard, full, rank, world, list(splits), dim)
        return full

    return {"rms_norm": rms_norm, "layer_norm": layer_norm, "rotary_kv_append": rotary_kv_append,
            "prefill_attention": prefill_attention, "decode_attention": decode_attention,
            "tp_pack": tp_pack, "tp_unpack": tp_unpack}
