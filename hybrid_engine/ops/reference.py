"""Plain PyTorch references for every op the inference forward calls.

These are the `torch` backend of each op's dispatch table and the ground truth every other backend
(Triton, C++ CPU, CUDA) is tested against. They favour clarity over speed, but are not slow: the decode
attention avoids repeating K/V for grouped-query attention by folding the query group into the matmul.

Conventions shared by every backend:
  * KV cache: k_cache, v_cache are (B, Hkv, S_max, D); slot s of row b holds the key at cache position s.
    Prompts are left padded, so every row writes the same slots and a row's pads sit at its first slots.
    A continued row (HybridEngine.continue_rows) writes at its own offset: `row_start` of rotary_kv_append and
    `q_start` of prefill_attention, (B,) long, give each row's first slot.
  * key_mask: (B, S_max) bool, True where a cache slot holds a real (non-pad) token.
  * Rotary: the "rotate half" (GPT-NeoX / Llama) convention on the first `rotary_dim` features of a head;
    cos and sin are (B, T, rotary_dim) with the two halves repeated, already scaled as the model wants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm, optionally after a residual add. Returns `out`, or `(out, x + residual)` with a residual.

    Computed in fp32 and cast back, as Hugging Face's Llama does: weight * (x * rsqrt(mean(x^2) + eps)).
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None):
    """LayerNorm, optionally after a residual add. Returns `out`, or `(out, x + residual)` with a residual."""
    if residual is not None:
        x = x + residual
    out = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, x)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of each head. x: (B, T, H, D); cos, sin: (B, T, R)."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, R)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def rotary_kv_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                     row_start: torch.Tensor | None = None):
    """Apply rotary to q and k (when cos is given) and write k, v into cache slots [start, start + T).

    q: (B, T, H, D); k, v: (B, T, Hkv, D); k_cache, v_cache: (B_max, Hkv, S_max, D), rows [0, B) written.
    row_start: (B,) long, or None: row b writes slots [start + row_start[b], ... + T) instead, and a slot at or
    past S_max is not written (the pads of a right-padded block of rows near the end of their cache).
    Returns q, rotated, as (B, T, H, D).
    """
    if cos is not None:
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    B, T = k.shape[:2]
    if row_start is None:
        k_cache[:B, :, start:start + T] = k.transpose(1, 2)
        v_cache[:B, :, start:start + T] = v.transpose(1, 2)
        return q
    slots = start + row_start[:, None] + torch.arange(T, device=k.device)     # (B, T)
    fits = slots < k_cache.shape[2]
    rows = torch.arange(B, device=k.device)[:, None].expand(B, T)             # (B, T)
    k_cache[rows[fits], :, slots[fits]] = k[fits]                             # (n, Hkv, D)
    v_cache[rows[fits], :, slots[fits]] = v[fits]
    return q


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                      sliding_window: int | None = None, q_start: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a left-padded prompt block, or over a block of rows continued at their own offsets.

    q: (B, H, T, D); k, v: (B, Hkv, Tk, D); key_mask: (B, Tk) bool, True on real tokens. Returns (B, H, T, D).
    q_start: None (then Tk == T: query i is key i), or (B,) long: query i of row b sits at key index
    q_start[b] + i (a block appended after what the row has cached; k, v are the cache's first Tk slots).
    Query p attends to keys j <= p (and p - j < sliding_window). A pad query attends only to itself so that no
    row of the softmax is empty (its output is never used).
    """
    B, H, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qpos = torch.arange(T, device=q.device)[None, :]                          # (1, T)
    if q_start is not None:
        qpos = qpos + q_start[:, None]                                        # (B, T)
    kpos = torch.arange(Tk, device=q.device)
    allowed = kpos[None, None, :] <= qpos[:, :, None]                         # (B|1, T, Tk) causal
    if sliding_window is not None:
        allowed = allowed & (qpos[:, :, None] - kpos[None, None, :] < sliding_window)
    mask = allowed & key_mask[:, None, :]                                      # (B, T, Tk)
    mask = mask | (kpos[None, None, :] == qpos[:, :, None])
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                     length: int, scale: float) -> torch.Tensor:
    """One query token per row against the first `length` cache slots.

    q: (B, H, D); k_cache, v_cache: (B_max, Hkv, S_max, D); key_mask: (B, S_max) bool. Returns (B, H, D).
    The query group of grouped-query attention is folded into the matmul: (B, Hkv, G, D) @ (B, Hkv, D, L).
    """
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    k = k_cache[:B, :, :length]  # (B, Hkv, L, D)
    v = v_cache[:B, :, :length]
    qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G, L)
    scores = scores.masked_fill(~key_mask[:B, None, None, :length], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(B, H, D)


def tp_pack(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, splits: tuple[int, ...],
            dim: int = 0) -> torch.Tensor:
    """Copy rank `rank`'s slice of `full` into `shard`.

    `full` is made of consecutive segments along `dim` whose sizes are `splits` (e.g. q, k, v rows of a fused
    QKV weight); each segment is cut into `world` equal parts and the shard holds part `rank` of every segment,
    in order. Returns `shard`.
    """
    out, off = 0, 0
    for size in splits:
        part = size // world
        src = full.narrow(dim, off + rank * part, part)
        shard.narrow(dim, out, part).copy_(src)
        out += part
        off += size
    return shard


def tp_unpack(shard: torch.Tensor, full: torch.Tensor, rank: int, world: int, splits: tuple[int, ...],
              dim: int = 0) -> torch.Tensor:
    """The inverse of tp_pack: copy `shard` back into rank `rank`'s slice of every segment of `full`."""
    out, off = 0, 0
    for size in splits:
        part = size // world
        full.narrow(dim, off + rank * part, part).copy_(shard.narrow(dim, out, part))
        out += part
        off += size
    return full
