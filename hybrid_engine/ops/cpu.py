"""Host functions of the C++ CPU twins (csrc/cpu/), with the signatures of reference.py.

Thin on purpose: at decode shapes an op's work is a few microseconds, so each wrapper is one Python call
into one pybind11 function (no torch.library dispatch), with the checks done in C++.
"""
from __future__ import annotations

import torch


def make_ops(ext) -> dict:
    """{op name: function} over the loaded extension `ext` (builder.CpuOpsBuilder().load())."""

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        if residual is None:
            return ext.rms_norm(x, weight, eps)
        return ext.rms_norm_residual(x, weight, eps, residual)

    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None):
        out, summed = ext.layer_norm(x, weight, bias, eps, residual)
        return out if residual is None else (out, summed)

    def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                          sliding_window: int | None = None) -> torch.Tensor:
        return ext.prefill_attention(q, k, v, key_mask, scale, sliding_window)

    return {"rms_norm": rms_norm, "layer_norm": layer_norm, "rotary_kv_append": ext.rotary_kv_append,
            "prefill_attention": prefill_attention, "decode_attention": ext.decode_attention,
            "tp_pack": ext.tp_pack, "tp_unpack": ext.tp_unpack}
