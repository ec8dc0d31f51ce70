"""Host functions of the CUDA kernels (csrc/attention, csrc/tensor_parallel via csrc/cuda_bindings.cpp).

The binding already has reference.py's signatures and checks every input, so the functions are handed
over as they are. The CUDA backend has no norm or prefill kernel: dispatch fills those from Triton.
"""
from __future__ import annotations

CUDA_OPS = ("rotary_kv_append", "decode_attention", "tp_pack", "tp_unpack")


def make_ops(ext) -> dict:
    """{op name: function} over the loaded extension `ext` (builder.CudaOpsBuilder().load())."""
    return {name: getattr(ext, name) for name in CUDA_OPS}
