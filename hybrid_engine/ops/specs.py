"""Every op the inference forward calls, declared once: one `OpSpec` per op, in SPECS.

A spec holds the op's name, its plain PyTorch reference (reference.py: the `torch` backend and the ground truth),
the backends with a kernel for it, the order kernels="auto" tries them on each device where that is not simply
fastest-first (with the evidence), the torch.library custom ops its C++/CUDA extension functions are traced as
(schema and fake implementation), and its host function over a loaded extension. Everything else is derived:
OP_NAMES and OpSet (ops/__init__.py), the custom ops of each extension's namespace and the host functions of
the `cpu` and `cuda` backends (library.py), and the CUDA op list (the specs whose backends include "cuda").

Adding an op: its reference in reference.py, its spec here, its kernel in each backend that lists it (a Triton
host function exported by hybrid_engine/kernels/__init__.py; a C++ function in csrc/cpu/*.cpp bound in
csrc/cpu/bindings.cpp; a CUDA kernel in csrc/<family>/*.cu bound in csrc/cuda_bindings.cpp), and its tests. An
op a backend lacks is simply absent from its `backends`: an explicit request for that backend serves the op
from the op's own auto order (the CUDA backend has no norm or prefill kernel, so under kernels="cuda" those come
from Triton, else torch), and says so in `ops.backends()`.

Host functions are thin on purpose: at decode shapes an op's work is a few microseconds, so each one is one
Python call into one pybind11 function (no torch.library dispatch, ~1 us instead of ~5-10 us), with the checks
done in C++. Only while torch.compile traces (`torch.compiler.is_compiling()`, folded to a constant in the
trace) do they call the custom op instead, whose fake implementation gives the output shapes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference

FASTEST_FIRST = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}  # interpreted Triton: never auto


@dataclass(frozen=True)
class LibraryOp:
    """An extension function as a torch.library custom op: what a compiled decode step calls instead of the
    pybind11 function. `schema` is torch's schema syntax without the name; an argument the op writes is
    `Tensor(a!)`, and such an op returns nothing (a custom op may not return an alias of an input)."""
    name: str
    schema: str
    call: Callable   # (extension, *args) -> outputs: the real implementation
    fake: Callable   # (*args) -> empty outputs of the shapes and dtypes `call` returns


@dataclass(frozen=True)
class OpSpec:
    name: str
    reference: Callable                     # the torch backend; its signature is the op's
    backends: tuple[str, ...]               # backends with a kernel (torch: the reference)
    library: tuple[LibraryOp, ...] = ()     # the custom ops `host` calls under tracing (cpu and cuda backends)
    host: Callable | None = None            # (extension, {name: custom op}) -> the op over a C++/CUDA extension
    auto: dict[str, tuple[str, ...]] = field(default_factory=dict)  # device -> order, where not FASTEST_FIRST
    why: dict[str, str] = field(default_factory=dict)               # device -> the evidence for that order

    def order(self, device: str) -> tuple[str, ...]:
        """The backends auto tries for this op on `device`, first to last (only those with a kernel)."""
        order = self.auto.get(device, FASTEST_FIRST.get(device, ("torch",)))
        return tuple(b for b in order if b in self.backends)

    def reason(self, device: str) -> str:
        return self.why.get(device, "fastest that loads")


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device)


def _discard(written: torch.Tensor) -> None:
    """An op that writes its arguments returns nothing (the host function returns the written tensor)."""
    return None


_compiling = torch.compiler.is_compiling


# -- RMSNorm [after a residual add]: kernels/norms.py, csrc/cpu/norm.cpp
def _rms_norm_host(ext, lib):
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        if residual is None:
            return lib["rms_norm"](x, weight, eps) if _compiling() else ext.rms_norm(x, weight, eps)
        if _compiling():
            return lib["rms_norm_residual"](x, weight, eps, residual)
        return ext.rms_norm_residual(x, weight, eps, residual)
    return rms_norm


RMS_NORM = OpSpec(
    "rms_norm", reference.rms_norm, ("triton", "cpu", "torch"), host=_rms_norm_host, library=(
        LibraryOp("rms_norm", "(Tensor x, Tensor weight, float eps) -> Tensor",
                  lambda ext, x, weight, eps: ext.rms_norm(x, weight, eps),
                  # the reference's promotion: weight * h.to(x.dtype)
                  lambda x, weight, eps: _empty(x, dtype=weight.dtype)),
        LibraryOp("rms_norm_residual", "(Tensor x, Tensor weight, float eps, Tensor residual) -> (Tensor, Tensor)",
                  lambda ext, x, weight, eps, residual: tuple(ext.rms_norm_residual(x, weight, eps, residual)),
                  lambda x, weight, eps, residual: (_empty(x, dtype=weight.dtype), _empty(x)))))


# -- LayerNorm [after a residual add]: kernels/norms.py, csrc/cpu/norm.cpp
def _layer_norm_host(ext, lib):
    def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None):
        if _compiling():
            if residual is None:
                return lib["layer_norm"](x, weight, bias, eps)
            return lib["layer_norm_residual"](x, weight, bias, eps, residual)
        out, summed = ext.layer_norm(x, weight, bias, eps, residual)
        return out if residual is None else (out, summed)
    return layer_norm


LAYER_NORM = OpSpec(
    "layer_norm", reference.layer_norm, ("triton", "cpu", "torch"), host=_layer_norm_host, library=(
        LibraryOp("layer_norm", "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor",
                  lambda ext, x, weight, bias, eps: ext.layer_norm(x, weight, bias, eps, None)[0],
                  lambda x, weight, bias, eps: _empty(x)),
        LibraryOp("layer_norm_residual",
                  "(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor residual) -> (Tensor, Tensor)",
                  lambda ext, x, weight, bias, eps, residual: tuple(ext.layer_norm(x, weight, bias, eps, residual)),
                  lambda x, weight, bias, eps, residual: (_empty(x), _empty(x)))))


# -- rotary on q, k and the KV-cache write: csrc/attention (CUDA), kernels/rotary.py, csrc/cpu/rotary.cpp
def _rotary_kv_append_host(ext, lib):
    def rotary_kv_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                         sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                         row_start: torch.Tensor | None = None):
        if not _compiling():
            return ext.rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, start, row_start)
        if cos is None:  # the op writes the cache only and returns q itself: not expressible as a custom op
            lib["kv_append"](q, k, v, k_cache, v_cache, start, row_start)
            return q
        return lib["rotary_kv_append"](q, k, v, cos, sin, k_cache, v_cache, start, row_start)
    return rotary_kv_append


ROTARY_KV_APPEND = OpSpec(
    "rotary_kv_append", reference.rotary_kv_append, ("cuda", "triton", "cpu", "torch"),
    host=_rotary_kv_append_host, library=(
        LibraryOp("rotary_kv_append", "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
                  "Tensor(b!) v_cache, SymInt start, Tensor? row_start=None) -> Tensor",
                  lambda ext, q, k, v, cos, sin, k_cache, v_cache, start, row_start=None:
                  ext.rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, start, row_start),
                  lambda q, k, v, cos, sin, k_cache, v_cache, start, row_start=None: _empty(q)),  # (B, T, H, D)
        LibraryOp("kv_append", "(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt start, "
                  "Tensor? row_start=None) -> ()",  # no rotary: the cache write only
                  lambda ext, q, k, v, k_cache, v_cache, start, row_start=None:
                  _discard(ext.rotary_kv_append(q, k, v, None, None, k_cache, v_cache, start, row_start)),
                  lambda q, k, v, k_cache, v_cache, start, row_start=None: None)))


# -- causal attention over a left-padded prompt, or rows continued at their own offsets: kernels/attention.py,
#    csrc/cpu/attention.cpp
def _prefill_attention_host(ext, lib):
    def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                          sliding_window: int | None = None, softcap: float = 0.0,
                          q_start: torch.Tensor | None = None) -> torch.Tensor:
        if _compiling():
            return lib["prefill_attention"](q, k, v, key_mask, scale, sliding_window, softcap, q_start)
        return ext.prefill_attention(q, k, v, key_mask, scale, sliding_window, softcap, q_start)
    return prefill_attention


PREFILL_ATTENTION = OpSpec(
    "prefill_attention", reference.prefill_attention, ("triton", "cpu", "torch"),
    host=_prefill_attention_host, library=(
        LibraryOp("prefill_attention",
                  "(Tensor q, Tensor k, Tensor v, Tensor key_mask, float scale, SymInt? sliding_window, "
                  "float softcap=0.0, Tensor? q_start=None) -> Tensor",
                  lambda ext, q, k, v, key_mask, scale, sliding_window, softcap=0.0, q_start=None:
                  ext.prefill_attention(q, k, v, key_mask, scale, sliding_window, softcap, q_start),
                  lambda q, k, v, key_mask, scale, sliding_window, softcap=0.0, q_start=None: _empty(q)),),
    # benchmarks/kernel_speed.py: torch's SDPA flash kernel beats the C++ prefill at T=64 (1632 vs 1990 us)
    auto={"cpu": ("torch", "cpu")}, why={"cpu": "measured faster on cpu (benchmarks/kernel_speed.py)"})


# -- one query per row against the KV cache: csrc/attention, kernels/attention.py, csrc/cpu/attention.cpp
def _decode_attention_host(ext, lib):
    def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                         length: int, scale: float, softcap: float = 0.0) -> torch.Tensor:
        if _compiling():
            return lib["decode_attention"](q, k_cache, v_cache, key_mask, length, scale, softcap)
        return ext.decode_attention(q, k_cache, v_cache, key_mask, length, scale, softcap)
    return decode_attention


DECODE_ATTENTION = OpSpec(
    "decode_attention", reference.decode_attention, ("cuda", "triton", "cpu", "torch"),
    host=_decode_attention_host, library=(
        LibraryOp("decode_attention",
                  "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_mask, SymInt length, float scale, "
                  "float softcap) -> Tensor",
                  lambda ext, q, k_cache, v_cache, key_mask, length, scale, softcap:
                  ext.decode_attention(q, k_cache, v_cache, key_mask, length, scale, softcap),
                  lambda q, k_cache, v_cache, key_mask, length, scale, softcap: _empty(q)),),  # (B, H, D)
    # Unmeasured: the CUDA kernel's inner loop handles one key per warp iteration, the Triton one a 64-key
    # tile per tl.dot, and no run of benchmarks/kernel_speed.py on a GPU shows the CUDA kernel faster. Until one
    # does, auto takes Triton's.
    auto={"cuda": ("triton", "cuda", "torch")},
    why={"cuda": "Triton's tiled kernel until benchmarks/kernel_speed.py shows the CUDA one faster"})


# -- tensor-parallel shard copies: csrc/tensor_parallel, kernels/tensor_parallel.py, csrc/cpu/tensor_parallel.cpp
def _tp_pack_host(ext, lib):
    def tp_pack(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, splits, dim: int = 0):
        if not _compiling():
            return ext.tp_pack(full, shard, rank, world, splits, dim)
        lib["tp_pack"](full, shard, rank, world, list(splits), dim)
        return shard
    return tp_pack


def _tp_unpack_host(ext, lib):
    def tp_unpack(shard: torch.Tensor, full: torch.Tensor, rank: int, world: int, splits, dim: int = 0):
        if not _compiling():
            return ext.tp_unpack(shard, full, rank, world, splits, dim)
        lib["tp_unpack"](shard, full, rank, world, list(splits), dim)
        return full
    return tp_unpack


TP_PACK = OpSpec(
    "tp_pack", reference.tp_pack, ("cuda", "triton", "cpu", "torch"), host=_tp_pack_host, library=(
        LibraryOp("tp_pack",
                  "(Tensor full, Tensor(a!) shard, SymInt rank, SymInt world, SymInt[] splits, SymInt dim) -> ()",
                  lambda ext, full, shard, rank, world, splits, dim:
                  _discard(ext.tp_pack(full, shard, rank, world, splits, dim)),
                  lambda full, shard, rank, world, splits, dim: None),))
TP_UNPACK = OpSpec(
    "tp_unpack", reference.tp_unpack, ("cuda", "triton", "cpu", "torch"), host=_tp_unpack_host, library=(
        LibraryOp("tp_unpack",
                  "(Tensor shard, Tensor(a!) full, SymInt rank, SymInt world, SymInt[] splits, SymInt dim) -> ()",
                  lambda ext, shard, full, rank, world, splits, dim:
                  _discard(ext.tp_unpack(shard, full, rank, world, splits, dim)),
                  lambda shard, full, rank, world, splits, dim: None),))


# -- a mixture-of-experts MLP's routed experts, grouped by expert: reference.py only. Torch ops serve every device
# (per expert, one matmul on the rows routed to it); an explicit kernels= request serves it from torch, saying so.
MOE_EXPERTS = OpSpec("moe_experts", reference.moe_experts, ("torch",))

# The order is OpSet's field order and backends()'s.
SPECS = (RMS_NORM, LAYER_NORM, ROTARY_KV_APPEND, PREFILL_ATTENTION, DECODE_ATTENTION, TP_PACK, TP_UNPACK, MOE_EXPERTS)
