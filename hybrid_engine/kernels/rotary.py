"""Rotary embedding of q and k fused with the KV-cache write, in Triton: one program per token."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import block, check, launch


@triton.jit
def _rotate(ptrs, offs_d, cos, sin, HALF, ROT, live, HAS_ROT: tl.constexpr):
    """Rows at `ptrs` (offsets along D in offs_d) rotated on their first ROT features, in fp32."""
    x = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)
    if HAS_ROT:
        in_rot = offs_d < ROT
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        xp = tl.load(ptrs + (partner - offs_d)[None, :], mask=live & in_rot[None, :], other=0.0).to(tl.float32)
        xp = tl.where(first[None, :], -xp, xp)
        x = x * cos[None, :] + xp * sin[None, :]
    return x


@triton.jit
def _rotary_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, rs_ptr, start, T, H, HKV, D,
                      ROT, S, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_h, sc_s,
                      HAS_ROT: tl.constexpr, ROW_START: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    slot = start + t
    if ROW_START:  # a continued row's own offset; a slot past S_max (a right-padded block's pad) is not written
        slot += tl.load(rs_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    cos = tl.zeros([BLOCK_D], dtype=tl.float32)
    sin = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_ROT:
        in_rot = offs_d < ROT
        cos = tl.load(cos_ptr + bt * ROT + offs_d, mask=in_rot, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + bt * ROT + offs_d, mask=in_rot, other=0.0).to(tl.float32)
        q_live = (offs_h[:, None] < H) & (offs_d[None, :] < D)
        q_ptrs = q_ptr + b * sq_b + t * sq_t + offs_h[:, None] * sq_h + offs_d[None, :]
        q = _rotate(q_ptrs, offs_d, cos, sin, ROT // 2, ROT, q_live, HAS_ROT)
        qo_ptrs = qo_ptr + (bt * H + offs_h[:, None]) * D + offs_d[None, :]
        tl.store(qo_ptrs, q.to(qo_ptr.dtype.element_ty), mask=q_live)
    kv_live = (offs_h[:, None] < HKV) & (offs_d[None, :] < D)
    fits = (offs_d[None, :] * 0 + slot) < S  # a block: the interpreter rejects a scalar in a block mask
    k_ptrs = k_ptr + b * sk_b + t * sk_t + offs_h[:, None] * sk_h + offs_d[None, :]
    k = _rotate(k_ptrs, offs_d, cos, sin, ROT // 2, ROT, kv_live, HAS_ROT)
    cache = b * sc_b + offs_h[:, None] * sc_h + slot * sc_s + offs_d[None, :]
    tl.store(kc_ptr + cache, k.to(kc_ptr.dtype.element_ty), mask=kv_live & fits)
    v = tl.load(v_ptr + b * sv_b + t * sv_t + offs_h[:, None] * sv_h + offs_d[None, :], mask=kv_live)
    tl.store(vc_ptr + cache, v, mask=kv_live & fits)


def _launch(q, k, v, cos, sin, k_cache, v_cache, start, q_out, row_start=None):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    check(k.shape == v.shape and tuple(k.shape) == (B, T, Hkv, D), "rotary_kv_append",
          f"k, v must be (B, T, Hkv, D) = ({B}, {T}, Hkv, {D}), got {tuple(k.shape)}, {tuple(v.shape)}")
    check(k_cache.shape == v_cache.shape and k_cache.shape[0] >= B and k_cache.shape[1] == Hkv
          and k_cache.shape[3] == D, "rotary_kv_append", f"k_cache must be (>= {B}, {Hkv}, S_max, {D}), got "
          f"{tuple(k_cache.shape)}")
    if row_start is None:
        check(0 <= start and start + T <= k_cache.shape[2], "rotary_kv_append",
              f"slots [{start}, {start + T}) do not fit in S_max = {k_cache.shape[2]}")
    else:  # per-row offsets: slots past S_max are skipped in the kernel
        check(tuple(row_start.shape) == (B,) and row_start.dtype == torch.long, "rotary_kv_append",
              f"row_start must be int64 ({B},), got {row_start.dtype} {tuple(row_start.shape)}")
        row_start = row_start.contiguous()
    check(all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache)), "rotary_kv_append",
          "q, k, v and the caches must be contiguous in their last dim")
    rot = cos.shape[-1] if cos is not None else 0
    if cos is not None:
        check(tuple(cos.shape) == (B, T, rot) and sin.shape == cos.shape and rot % 2 == 0 and rot <= D,
              "rotary_kv_append", f"cos, sin must be ({B}, {T}, R), R even <= {D}; got {tuple(cos.shape)}")
        cos, sin = cos.contiguous(), sin.contiguous()
    if B * T == 0:
        return
    launch(_rotary_kv_kernel, (B * T,))(
        q, k, v, cos, sin, q_out, k_cache, v_cache, row_start, start, T, H, Hkv, D, rot, k_cache.shape[2],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HAS_ROT=cos is not None, ROW_START=row_start is not None, BLOCK_H=block(max(H, Hkv), 1), BLOCK_D=block(D, 16))


@triton_op("hybrid_engine::rotary_kv_append", mutates_args=("k_cache", "v_cache"))
def rotary_kv_append_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                        row_start: torch.Tensor | None = None) -> torch.Tensor:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (B, T, H, D) contiguous
    _launch(q, k, v, cos, sin, k_cache, v_cache, start, q_out, row_start)
    return q_out


@triton_op("hybrid_engine::kv_append", mutates_args=("k_cache", "v_cache"))
def kv_append_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 start: int, row_start: torch.Tensor | None = None) -> None:
    B, T, Hkv, D = k.shape
    q = k[:, :, :0]  # no query heads: nothing to rotate or return
    _launch(q, k, v, None, None, k_cache, v_cache, start, None, row_start)


def rotary_kv_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                     row_start: torch.Tensor | None = None):
    """reference.rotary_kv_append in one kernel. q: (B, T, H, D); k, v: (B, T, Hkv, D); cos, sin: (B, T, R);
    k_cache, v_cache: (B_max, Hkv, S_max, D); row_start: (B,) long per-row offsets, or None. Returns q rotated (a
    new tensor), or q itself without cos."""
    if cos is None:
        torch.ops.hybrid_engine.kv_append(k, v, k_cache, v_cache, start, row_start)
        return q
    return torch.ops.hybrid_engine.rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, start, row_start)
