"""Attention in Triton: causal flash-attention forward for prefill, and flash-decoding over the KV cache.

Both take the key_mask convention of reference.py (True on real tokens) and grouped-query attention (query
head h reads kv head h // G). Online softmax in fp32; a pad query attends only to itself, as the reference.
With softcap > 0 each score becomes softcap * tanh(score / softcap) before the mask (Gemma 2), a compile-time
branch (SOFTCAP) so the kernels without it are unchanged.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import INTERPRETED, block, check, launch, upcast


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tanh(x):
    """tanh in fp32 from tl.exp (the interpreter runs no libdevice): (1 - e) / (1 + e) with e = exp(-2|x|), and
    below |x| 0.4, where 1 - e cancels (a relative error up to ~1e-6 near 0), its Taylor series to x^13 (the
    next term, 0.0015 x^15, is < 4e-9 of tanh there)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (
        62.0 / 2835.0 + a2 * (-1382.0 / 155925.0 + a2 * (21844.0 / 6081075.0)))))))
    t = tl.where(a < 0.4, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(q, k, scale, softcap, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    """(M, N) scores of query tile q (M, D) against key tile k (N, D): scaled, then soft-capped if SOFTCAP."""
    s = _dot(q, tl.trans(k), UPCAST) * scale
    if SOFTCAP:
        s = _tanh(s / softcap) * softcap
    return s


@triton.jit
def _online_step(s, allowed, m_i, l_i, acc, v, UPCAST: tl.constexpr):
    """One block of the online softmax: scores s (M, N), value block v (N, D) -> updated m_i, l_i, acc."""
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no allowed key yet stay at 0
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, qs_ptr, T, TK, H, G, D, scale, window, softcap,
                    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b,
                    HAS_WINDOW: tl.constexpr, Q_START: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (query block, b * H + h). Query i of row b sits at key index q0 + i: q0 = 0 for a prompt (TK == T),
    the row's own offset after its cached keys for a continued row (Q_START)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // G
    q0 = 0
    if Q_START:
        q0 = tl.load(qs_ptr + b)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos_m = q0 + offs_m  # the queries' key indices
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_live = offs_d[None, :] < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_live, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum(TK, q0 + start_m + BLOCK_M)  # causal: no key past the block's last query
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, q0 + start_m - window + 1) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_live = offs_n < TK
        kv_mask = n_live[:, None] & d_live
        k = tl.load(k_ptr + b * sk_b + hk * sk_h + offs_n[:, None] * sk_t + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * sv_b + hk * sv_h + offs_n[:, None] * sv_t + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        real = tl.load(mask_ptr + b * sm_b + offs_n, mask=n_live, other=0) != 0
        s = _scores(q, k, scale, softcap, UPCAST, SOFTCAP)
        allowed = (offs_n[None, :] <= pos_m[:, None]) & real[None, :] & n_live[None, :]
        if HAS_WINDOW:
            allowed = allowed & (pos_m[:, None] - offs_n[None, :] < window)
        allowed = allowed | ((pos_m[:, None] == offs_n[None, :]) & n_live[None, :])  # a pad query: itself
        m_i, l_i, acc = _online_step(s, allowed, m_i, l_i, acc, v, UPCAST)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key at all (a pad past the keys given): zeros
    o_ptrs = o_ptr + ((b * H + h) * T + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < T) & d_live)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, part_ptr, ml_ptr, length, chunk, splits, H, G, D, scale,
                   softcap, sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b,
                   UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Program (b, kv head, split): the G query heads of one kv head against slots [split*chunk, +chunk).

    `splits` is a run-time argument, not a constexpr: the split count grows with the cache length, and as a
    constexpr it compiled one variant per count (~30 over a long batch-1 rollout). Triton still specialises an
    int on being 1 or a multiple of 16, so a growing cache compiles a handful of variants, the unsplit one
    without the branch.
    """
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    g_live = offs_g < G
    d_live = offs_d[None, :] < D
    heads = hk * G + offs_g  # (BLOCK_G,) query heads of this kv head
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=g_live[:, None] & d_live,
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(length, lo + chunk)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_live = offs_n < hi
        kv_mask = n_live[:, None] & d_live
        k = tl.load(k_ptr + b * sk_b + hk * sk_h + offs_n[:, None] * sk_s + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * sv_b + hk * sv_h + offs_n[:, None] * sv_s + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        real = tl.load(mask_ptr + b * sm_b + offs_n, mask=n_live, other=0) != 0
        s = _scores(q, k, scale, softcap, UPCAST, SOFTCAP)
        m_i, l_i, acc = _online_step(s, (real & n_live)[None, :], m_i, l_i, acc, v, UPCAST)
    row = b * H + heads  # (BLOCK_G,) rows of the (B * H) outputs
    if splits == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + row[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g_live[:, None] & d_live)
    else:  # unnormalised partials, combined by _decode_reduce_kernel
        part = row * splits + split
        tl.store(part_ptr + part[:, None] * D + offs_d[None, :], acc, mask=g_live[:, None] & d_live)
        tl.store(ml_ptr + part * 2, m_i, mask=g_live)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=g_live)


@triton.jit
def _decode_reduce_kernel(part_ptr, ml_ptr, o_ptr, D, splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row `row` of the output from its `splits` partials, BLOCK_S at a time (an online softmax over splits)."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_run = tl.full([], float("-inf"), dtype=tl.float32)
    num = tl.zeros([BLOCK_D], dtype=tl.float32)
    den = tl.zeros([], dtype=tl.float32)
    for start_s in range(0, splits, BLOCK_S):
        offs_s = start_s + tl.arange(0, BLOCK_S)
        s_live = offs_s < splits
        m = tl.load(ml_ptr + (row * splits + offs_s) * 2, mask=s_live, other=float("-inf"))
        l = tl.load(ml_ptr + (row * splits + offs_s) * 2 + 1, mask=s_live, other=0.0)
        parts = tl.load(part_ptr + (row * splits + offs_s[:, None]) * D + offs_d[None, :],
                        mask=s_live[:, None] & (offs_d[None, :] < D), other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits with no real key (m = -inf) weigh 0
        alpha = tl.exp(m_run - m_safe)
        w = tl.exp(m - m_safe)
        num = num * alpha + tl.sum(parts * w[:, None], axis=0)
        den = den * alpha + tl.sum(l * w, axis=0)
        m_run = m_new
    tl.store(o_ptr + row * D + offs_d, (num / den).to(o_ptr.dtype.element_ty), mask=offs_d < D)


# Shared memory one program may use: the least of the GPUs csrc/compile_check.sh builds for, an A100's 163 KB
# (sm_80; an H100/H200 allows 227 KB), so one choice of tiles compiles on both.
SMEM_LIMIT = 163 * 1024
# Pipelining depth of the K/V loads: Triton's default on NVIDIA, passed at launch so smem_bytes counts what runs.
NUM_STAGES = 3
_REDUCE_BLOCK_S = 16  # splits combined per step of _decode_reduce_kernel


def smem_bytes(block_m: int, block_n: int, block_d: int, dtype: torch.dtype) -> int:
    """Shared memory of one attention program, estimated: the (M, D) query tile and NUM_STAGES - 1 buffers of
    the (N, D) key and value tiles (the loads the pipeliner keeps in flight), in the input dtype, plus the fp32
    (M, N) probabilities staged for the second dot. Against Triton 3.9's sm_80 and sm_90 builds (compiled
    without a GPU; metadata.shared): within 128 bytes in fp32, 2-3x above in 16-bit (tensor-core layouts)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return elem * block_d * (block_m + 2 * (NUM_STAGES - 1) * block_n) + 4 * block_m * block_n


def tile_sizes(dtype: torch.dtype, head_dim: int, group: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) of the attention kernels on a GPU. BLOCK_M: query positions per prefill
    program, or with `group` the query heads of one kv head in decode; BLOCK_N: keys per step; BLOCK_D: head_dim
    rounded up to a power of two.

    Prefill starts from 64x64 tiles in 16-bit and 32x64 in fp32 or past head dim 128 (whose (M, D)
    accumulators take twice the registers); then BLOCK_N, then (prefill only) BLOCK_M, are halved down to 16
    (tl.dot's least) until smem_bytes fits SMEM_LIMIT. fp32 at head dim 256 compiles to 296 KB at 32x64 (past
    even an H100's 227 KB), 164 KB at 32x32 (past an A100's 163 KB), 98 KB at 32x16.
    """
    block_d = block(head_dim)
    if group is not None:
        block_m = block(group)
    else:
        block_m = 64 if dtype != torch.float32 and block_d <= 128 else 32
    block_n = 64
    while smem_bytes(block_m, block_n, block_d, dtype) > SMEM_LIMIT and block_n > 16:
        block_n //= 2
    while group is None and smem_bytes(block_m, block_n, block_d, dtype) > SMEM_LIMIT and block_m > 16:
        block_m //= 2
    return block_m, block_n, block_d


def _tiles(dtype: torch.dtype, head_dim: int, group: int | None = None) -> tuple[int, int, int]:
    """tile_sizes, at most 32 x 32 under the interpreter: it runs numpy over whole tiles, and 32-wide ones are
    ~20% faster at the tests' short prompts (T 20: 104 vs 120 ms a prefill). Smaller GPU tiles are kept, so
    CPU tests run fp32 head dim 256 on its 32x16 tiles."""
    block_m, block_n, block_d = tile_sizes(dtype, head_dim, group)
    if INTERPRETED:
        block_n = min(block_n, 32)
        block_m = block_m if group is not None else min(block_m, 32)
    return block_m, block_n, block_d


@triton_op("hybrid_engine::prefill_attention", mutates_args=())
def prefill_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                         sliding_window: int | None = None, softcap: float = 0.0,
                         q_start: torch.Tensor | None = None) -> torch.Tensor:
    B, H, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    check(k.shape == v.shape and tuple(k.shape) == (B, Hkv, Tk, D) and Hkv > 0 and H % Hkv == 0
          and (Tk == T or q_start is not None), "prefill_attention",
          f"k, v must be (B, Hkv, T, D) = ({B}, Hkv | {H}, {T}, {D}) (Tk keys with q_start), got {tuple(k.shape)}")
    check(tuple(key_mask.shape) == (B, Tk) and key_mask.dtype == torch.bool, "prefill_attention",
          f"key_mask must be bool ({B}, {Tk}), got {key_mask.dtype} {tuple(key_mask.shape)}")
    if q_start is not None:
        check(tuple(q_start.shape) == (B,) and q_start.dtype == torch.long, "prefill_attention",
              f"q_start must be int64 ({B},), got {q_start.dtype} {tuple(q_start.shape)}")
        q_start = q_start.contiguous()
    check(all(t.stride(-1) == 1 for t in (q, k, v)), "prefill_attention", "q, k, v must be contiguous in D")
    check(softcap >= 0, "prefill_attention", f"softcap must be >= 0 (0: off), got {softcap}")
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    mask = key_mask.contiguous().view(torch.uint8)  # (B, Tk)
    block_m, block_n, block_d = _tiles(q.dtype, D)
    grid = (triton.cdiv(T, block_m), B * H)
    launch(_prefill_kernel, grid)(
        q, k, v, mask, out, q_start, T, Tk, H, H // Hkv, D, scale, sliding_window or 0, float(softcap),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0),
        HAS_WINDOW=sliding_window is not None, Q_START=q_start is not None, UPCAST=upcast(q.dtype),
        SOFTCAP=softcap > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_stages=NUM_STAGES)
    return out


def decode_splits(batch_kv_heads: int, length: int, device: torch.device) -> int:
    """How many pieces to cut the cache into: enough programs for ~2 waves of SMs, >= 128 slots each."""
    if INTERPRETED:
        return min(4, triton.cdiv(length, 64))  # small, but > 1 on the tests' longer caches
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, batch_kv_heads), triton.cdiv(length, 128), 64))


@triton_op("hybrid_engine::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                        length: int, scale: float, softcap: float = 0.0, num_splits: int = 0) -> torch.Tensor:
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    check(k_cache.shape == v_cache.shape and k_cache.shape[0] >= B and k_cache.shape[3] == D and H % Hkv == 0,
          "decode_attention", f"k_cache must be (>= {B}, Hkv | {H}, S_max, {D}), got {tuple(k_cache.shape)}")
    check(1 <= length <= k_cache.shape[2], "decode_attention", f"length {length} not in [1, {k_cache.shape[2]}]")
    check(key_mask.dtype == torch.bool and key_mask.shape[0] >= B and key_mask.shape[1] >= length,
          "decode_attention", f"key_mask must be bool (>= {B}, >= {length}), got {tuple(key_mask.shape)}")
    check(all(t.stride(-1) == 1 for t in (q, k_cache, v_cache)), "decode_attention",
          "inputs must be contiguous in D")
    check(softcap >= 0, "decode_attention", f"softcap must be >= 0 (0: off), got {softcap}")
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    G = H // Hkv
    mask = key_mask.contiguous().view(torch.uint8)
    splits = num_splits or decode_splits(B * Hkv, length, q.device)
    block_g, block_n, block_d = _tiles(q.dtype, D, group=G)
    chunk = triton.cdiv(triton.cdiv(length, splits), block_n) * block_n
    splits = triton.cdiv(length, chunk)
    part = torch.empty((B * H * splits, D) if splits > 1 else (0,), dtype=torch.float32, device=q.device)
    ml = torch.empty((B * H * splits * 2,) if splits > 1 else (0,), dtype=torch.float32, device=q.device)
    launch(_decode_kernel, (B, Hkv, splits))(
        q, k_cache, v_cache, mask, out, part, ml, length, chunk, splits, H, G, D, scale, float(softcap),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), mask.stride(0),
        UPCAST=upcast(q.dtype), SOFTCAP=softcap > 0, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        num_stages=NUM_STAGES)
    if splits > 1:
        launch(_decode_reduce_kernel, (B * H,))(part, ml, out, D, splits, BLOCK_S=_REDUCE_BLOCK_S,
                                                     BLOCK_D=block_d)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                      sliding_window: int | None = None, softcap: float = 0.0,
                      q_start: torch.Tensor | None = None) -> torch.Tensor:
    """reference.prefill_attention. q: (B, H, T, D); k, v: (B, Hkv, T, D), or (B, Hkv, Tk, D) with q_start (B,)
    long, the key index of each row's first query; key_mask: (B, T | Tk). -> (B, H, T, D)."""
    return torch.ops.hybrid_engine.prefill_attention(q, k, v, key_mask, scale, sliding_window, softcap, q_start)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                     length: int, scale: float, softcap: float = 0.0, num_splits: int = 0) -> torch.Tensor:
    """reference.decode_attention. q: (B, H, D); caches (B_max, Hkv, S_max, D); key_mask (B, S_max) -> (B, H, D).

    num_splits: pieces of the cache reduced separately (flash-decoding); 0 picks from the SM count.
    """
    return torch.ops.hybrid_engine.decode_attention(q, k_cache, v_cache, key_mask, length, scale, softcap,
                                                    num_splits)
