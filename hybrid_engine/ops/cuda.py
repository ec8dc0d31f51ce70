"""Host functions of the CUDA kernels (csrc/attention, csrc/tensor_parallel via csrc/cuda_bindings.cpp).

The binding already has reference.py's signatures and checks every input; the host functions call it directly
when run eagerly and through torch.library custom ops (namespace hybrid_engine_cuda, library.py) while
torch.compile traces, exactly as the CPU twins do. The CUDA backend has no norm or prefill kernel: those ops'
tables list no "cuda" entry, so dispatch takes Triton's (else torch's).
"""
from __future__ import annotations

from .cpu import host_functions
from .library import bind

CUDA_OPS = ("rotary_kv_append", "decode_attention", "tp_pack", "tp_unpack")


def make_ops(ext) -> dict:
    """{op name: function} over the loaded extension `ext` (builder.CudaOpsBuilder().load())."""
    functions = host_functions(ext, bind("hybrid_engine_cuda", "cuda", ext))
    return {name: functions[name] for name in CUDA_OPS}
