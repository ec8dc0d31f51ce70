"""The C++ extensions' functions as `torch.library` custom ops with fake implementations, so `torch.compile`
traces a decode step through every backend (the Triton kernels are `triton_op`s already).

Why both a custom op and the plain pybind11 call: through the dispatcher a call costs ~5-10 us, the direct call
~1 us (csrc/cpu/bindings.cpp), and an eager CPU decode step makes ~10 op calls per layer. So the host functions
(specs.py) call the extension directly when run eagerly and the custom op only while dynamo traces
(`torch.compiler.is_compiling()`, folded to a constant in the trace), where the call cost is paid once per graph
replay at most, and not at all inside a CUDA graph.

Every op is defined once per process from its spec's schema and fake (specs.py), in its backend's namespace
(hybrid_engine_cpu, hybrid_engine_cuda), over whichever extension `bind` was last given for it: the extension is
loaded lazily, the schema is fixed. Ops that write
their arguments declare them in mutates_args and return nothing (a custom op may not return an alias of an
input): the host functions return the written tensor themselves, as the references do.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.library import custom_op, register_fake

from .specs import SPECS

_EXTENSIONS: dict[str, object] = {}   # namespace -> the loaded extension its ops call
_DEFINED: dict[str, dict[str, Callable]] = {}


@custom_op("hybrid_engine_cpu::packed_linear", mutates_args=())  # every device type: packed is MkldnnCPU
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b with W a oneDNN-packed weight (models/common.pack_linears): opaque to inductor, which cannot
    lower mkldnn._linear_pointwise on an unfrozen packed weight itself. x: (..., in) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@register_fake("hybrid_engine_cpu::packed_linear")
def _(x, packed, bias):
    return x.new_empty(x.shape[:-1] + (packed.shape[0],))


def _calling_bound(ns: str, call: Callable) -> Callable:
    """The op's implementation: `call` over the extension bound to `ns` when it runs (bound after definition)."""
    return lambda *args: call(_EXTENSIONS[ns], *args)


def _define(ns: str, device: str, specs) -> dict[str, Callable]:
    """Define the custom ops of `specs` in namespace `ns` (once), each calling the extension bound last, with the
    schema and fake implementation its spec declares; returns {name: torch.ops callable}."""
    namespace_ops = {}
    for op in (op for spec in specs for op in spec.library):
        schema = torch._C.parse_schema(f"{ns}::{op.name}{op.schema}")
        written = [arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
        custom_op(f"{ns}::{op.name}", _calling_bound(ns, op.call), mutates_args=written, device_types=device,
                  schema=op.schema)
        register_fake(f"{ns}::{op.name}")(op.fake)
        namespace_ops[op.name] = getattr(getattr(torch.ops, ns), op.name)
    return namespace_ops


def bind(ns: str, device: str, ext, specs) -> dict[str, Callable]:
    """The custom ops of `specs` in namespace `ns` (defined on first use), now calling `ext`."""
    _EXTENSIONS[ns] = ext
    if ns not in _DEFINED:
        _DEFINED[ns] = _define(ns, device, specs)
    return _DEFINED[ns]


def host_functions(backend: str, ext) -> dict[str, Callable]:
    """{op: host function} of every op whose spec lists `backend` ("cpu" or "cuda"), over the loaded extension
    `ext`: the pybind11 function when run eagerly, its custom op (namespace hybrid_engine_<backend>) under
    tracing. Each carries the extension function's name, doc and attributes (tests tell backends apart by them)."""
    specs = [spec for spec in SPECS if backend in spec.backends]
    lib = bind(f"hybrid_engine_{backend}", backend, ext, specs)
    functions = {}
    for spec in specs:
        fn = spec.host(ext, lib)
        wrapped = getattr(ext, spec.name, None)
        functions[spec.name] = functools.wraps(wrapped)(fn) if wrapped is not None else fn
    return functions
