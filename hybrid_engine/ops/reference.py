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
  * softcap: attention logit soft-capping (Gemma 2): scores = softcap * tanh(scores / softcap) after the scale and
    before the mask and softmax, as Hugging Face computes it; 0 turns it off.
  * Rotary: the "rotate half" (GPT-NeoX / Llama) convention on the first `rotary_dim` features of a head;
    cos and sin are (B, T, rotary_dim) with the two halves repeated, already scaled as the model wants.
  * Experts (mixture of experts): Hugging Face 5's fused layout, gate_up (X, 2I, E) with [gate; up] rows per
    expert and down (X, E, I); an activation is named by its Hugging Face config name (ACTIVATIONS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import custom_op, register_fake


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (gelu_new, gelu_pytorch_tanh and gelu_fast are all this)."""
    return F.gelu(x, approximate="tanh")


# One function object per name for the model's life: a compiled decode step guards on the function's identity,
# so a lambda made anew at each eval() would recompile it. Ops that take an activation take its name (a custom
# op cannot take a function).
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_tanh,
               "gelu_pytorch_tanh": gelu_tanh, "gelu_fast": gelu_tanh}


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


def soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap * tanh(scores / softcap): logits bounded to (-softcap, softcap); softcap 0 leaves them as they are."""
    return torch.tanh(scores / softcap) * softcap if softcap else scores


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                      sliding_window: int | None = None, softcap: float = 0.0,
                      q_start: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a left-padded prompt block, or over a block of rows continued at their own offsets.

    q: (B, H, T, D); k, v: (B, Hkv, Tk, D); key_mask: (B, Tk) bool, True on real tokens. Returns (B, H, T, D).
    q_start: None (then Tk == T: query i is key i), or (B,) long: query i of row b sits at key index
    q_start[b] + i (a block appended after what the row has cached; k, v are the cache's first Tk slots).
    Query p attends to keys j <= p (and p - j < sliding_window). A pad query attends only to itself so that no
    row of the softmax is empty (its output is never used).
    With softcap (which SDPA cannot apply) the scores are written out: fp32 softmax, as Hugging Face's eager path.
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
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)).float() * scale, softcap)  # (B, H, T, T)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                     length: int, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """One query token per row against the first `length` cache slots.

    q: (B, H, D); k_cache, v_cache: (B_max, Hkv, S_max, D); key_mask: (B, S_max) bool. Returns (B, H, D).
    The query group of grouped-query attention is folded into the matmul: (B, Hkv, G, D) @ (B, Hkv, D, L).
    """
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    k = k_cache[:B, :, :length]  # (B, Hkv, L, D)
    v = v_cache[:B, :, :length]
    qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    scores = soft_cap(torch.matmul(qg, k.transpose(-1, -2)).float() * scale, softcap)  # (B, Hkv, G, L)
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


def _expert_linear(rows: torch.Tensor, weight: torch.Tensor, packed: list[torch.Tensor] | None, expert: int):
    """rows @ weight[expert]^T, through the expert's oneDNN-packed copy where one is given."""
    if packed is None:
        return F.linear(rows, weight[expert])
    return torch.ops.mkldnn._linear_pointwise(rows, packed[expert], None, "none", [], "")


def _grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_index: torch.Tensor,
                     expert_weights: torch.Tensor, act: str, packed_gate_up: list[torch.Tensor] | None = None,
                     packed_down: list[torch.Tensor] | None = None) -> torch.Tensor:
    """moe_experts run eagerly: the (token, expert) pairs sorted by expert, each expert run once on its rows."""
    N, k = expert_index.shape
    E = x.shape[-1]
    fn = ACTIVATIONS[act]
    pairs = expert_index.reshape(-1)                                   # (N*k,) expert of pair n*k + j
    order = torch.argsort(pairs, stable=True)                          # (N*k,) pairs grouped by expert
    counts = torch.bincount(pairs, minlength=gate_up.shape[0]).tolist()  # rows per expert (one host sync)
    rows = x[order // k]                                               # (N*k, E) each pair's token
    out = torch.empty_like(rows)                                       # (N*k, E)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            seg = rows[start:start + count]                            # (n_e, E)
            gate, up = _expert_linear(seg, gate_up, packed_gate_up, expert).chunk(2, dim=-1)  # (n_e, I) x 2
            out[start:start + count] = _expert_linear(fn(gate) * up, down, packed_down, expert)
            start += count
    weighted = out * expert_weights.reshape(-1)[order, None]          # (N*k, E) in the weights' promoted dtype
    unsorted = torch.empty_like(weighted)
    unsorted[order] = weighted                                         # back to pair order n*k + j
    return unsorted.view(N, k, E).sum(dim=1).to(x.dtype)               # (N, E)


@custom_op("hybrid_engine::moe_experts", mutates_args=(), schema=(
    "(Tensor x, Tensor gate_up, Tensor down, Tensor expert_index, Tensor expert_weights, str act, "
    "Tensor[]? packed_gate_up, Tensor[]? packed_down) -> Tensor"))
def _moe_experts_op(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_index: torch.Tensor,
                    expert_weights: torch.Tensor, act: str, packed_gate_up: list[torch.Tensor] | None,
                    packed_down: list[torch.Tensor] | None) -> torch.Tensor:
    return _grouped_experts(x, gate_up, down, expert_index, expert_weights, act, packed_gate_up, packed_down)


@register_fake("hybrid_engine::moe_experts")
def _(x, gate_up, down, expert_index, expert_weights, act, packed_gate_up, packed_down):
    return torch.empty_like(x)


def moe_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_index: torch.Tensor,
                expert_weights: torch.Tensor, act: str = "silu", packed_gate_up: list[torch.Tensor] | None = None,
                packed_down: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts of a mixture-of-experts MLP (Mixtral, Qwen2/3-MoE), grouped: each expert runs once, on
    the tokens routed to it, never on all tokens.

    x: (N, E); gate_up: (X, 2I, E), [gate; up] rows of each of X experts; down: (X, E, I); expert_index: (N, k)
    long, the k experts of each token; expert_weights: (N, k), their routing weights. Returns (N, E):
    sum_j w[n, j] * down[e](act(gate[e] x[n]) * up[e] x[n]) with e = expert_index[n, j], summed over j in order,
    in the weights' promoted dtype, then cast to x's (as Hugging Face's grouped experts do). packed_gate_up,
    packed_down: optional per-expert oneDNN-packed copies of gate_up[e] and down[e] (CPU; models/common.pack_linears),
    used instead of them: MKL's sgemm reads a few-row product's weights at ~6 GB/s here, oneDNN's layout at 14-16.

    The group sizes are data: eagerly they are read on the host (one sync per call); while torch.compile traces,
    the same code runs as the custom op hybrid_engine::moe_experts, opaque to the graph (fake: an (N, E) tensor).
    """
    if torch.compiler.is_compiling():
        return torch.ops.hybrid_engine.moe_experts(x, gate_up, down, expert_index, expert_weights, act,
                                                   packed_gate_up, packed_down)
    return _grouped_experts(x, gate_up, down, expert_index, expert_weights, act, packed_gate_up, packed_down)
