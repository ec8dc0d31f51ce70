"""Fused residual add + RMSNorm / LayerNorm in Triton: one program per row, statistics in fp32."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import block, check, launch


@triton.jit
def _norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, N, eps,
                 HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=live, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * N + cols, mask=live, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)  # the reference adds in the input dtype
        tl.store(sum_ptr + row * N + cols, s, mask=live)
        x = s.to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = (x * rstd).to(dtype).to(tl.float32)  # rounded to the input dtype before the weight, as HF Llama
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(live, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=live)


def _launch(x, residual, weight, bias, eps, rms, out_dtype):
    check(x.dim() >= 1, "norm", "x must have at least 1 dim, got a scalar")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        check(t is None or tuple(t.shape) == (N,), "norm",
              f"{name} must be ({N},), got {getattr(t, 'shape', '')}")
    check(residual is None or residual.shape == x.shape, "norm", "residual must have the shape of x")
    if x.numel() == 0:  # an empty batch: a grid of 0 programs is no launch (and -1 rows is ambiguous at N = 0)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        return out, (torch.empty_like(x) if residual is not None else None)
    x2 = x.reshape(-1, N).contiguous()  # (rows, N)
    res2 = residual.reshape(-1, N).contiguous() if residual is not None else None
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(x2) if residual is not None else None
    launch(_norm_kernel, (x2.shape[0],))(
        x2, res2, weight, bias, summed, out, N, eps, HAS_RES=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, RMS=rms, BLOCK=block(N, 16))
    return out.view(x.shape), (summed.view(x.shape) if summed is not None else None)


@triton_op("hybrid_engine::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, None, eps, True, torch.promote_types(x.dtype, weight.dtype))[0]


@triton_op("hybrid_engine::rms_norm_residual", mutates_args=())
def rms_norm_residual_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                         residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, None, eps, True, torch.promote_types(x.dtype, weight.dtype))


@triton_op("hybrid_engine::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    return _launch(x, None, weight, bias, eps, False, x.dtype)[0]


@triton_op("hybrid_engine::layer_norm_residual", mutates_args=())
def layer_norm_residual_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, bias, eps, False, x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """reference.rms_norm in one kernel. x: (..., N); weight: (N,). Returns out, or (out, x + residual)."""
    if residual is None:
        return torch.ops.hybrid_engine.rms_norm(x, weight, eps)
    return torch.ops.hybrid_engine.rms_norm_residual(x, weight, eps, residual)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None):
    """reference.layer_norm in one kernel. x: (..., N); weight, bias: (N,). Returns out, or (out, x + residual)."""
    if residual is None:
        return torch.ops.hybrid_engine.layer_norm(x, weight, bias, eps)
    return torch.ops.hybrid_engine.layer_norm_residual(x, weight, bias, eps, residual)
