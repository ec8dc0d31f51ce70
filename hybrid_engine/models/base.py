"""The inference forward shared by every supported family: a decoder-only transformer over a KV cache.

A family file (llama.py, opt.py, gpt2.py, gpt_neox.py, ...) reads a Hugging Face module and describes it twice:
an `Architecture`, frozen, with the handful of switches where the families differ (norm kind, residual
layout, q/k norms, activation, positions, qkv layout, sliding windows, soft-capping), and `ModelWeights`:
tensors that *are* the training parameters (views, no copies), plus the few buffers the engine re-lays on
`eval()` (a fused QKV or gate/up matrix). `InferenceModel` resolves the switches once, when it is built at
`eval()` (which norm, which block function, which MLP), so the layer loop runs no string comparison per layer
and token.

Three entry points share the blocks: `forward` (prefill, and eager decode at an integer cache slot, every row at
the same slot), `forward_rows` (a block or one token per row at each row's own slot: continued rows, issue 22) and
`decode_static` (one token per row at per-row cache slots held in a tensor: the step `torch.compile` traces once
and replays for every token, see hybrid_engine/static.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..ops.library import packed_linear

if TYPE_CHECKING:
    from .moe import Experts

# Rows up to which a Linear uses its oneDNN-packed weight: decode steps (B rows) and small prefills. Larger
# prefills are compute-bound, where MKL's plain sgemm is as good.
PACKED_MAX_ROWS = 128


@dataclass
class Linear:
    """y = x @ W^T + b with W (out, in) as nn.Linear keeps it, or y = x @ W + b when `transposed`
    (GPT-2's Conv1D keeps W as (in, out)). `packed`, when set, is a oneDNN-blocked copy of W (see
    common.pack_linears) used for small row counts."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transposed: bool = False
    packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]:
            if torch.compiler.is_compiling():  # a custom op: inductor cannot lower the ATen one on it
                return packed_linear(x, self.packed, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


@dataclass
class AutocastLinear(Linear):
    """A Linear as torch.autocast runs nn.Linear: input, weight and bias in the low dtype (the weight and bias
    cast once, at eval(), by common.cast_linears), the output cast back to the input's dtype. Around it the
    engine keeps its own dtype, as autocast keeps norms, rotary, softmax and residual adds out of the low dtype."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x.to(self.weight.dtype)).to(x.dtype)


@dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


@dataclass
class LayerWeights:
    """One decoder block's tensors. `qkv` yields q, k, v in the order `Architecture.qkv_layout` names."""
    norm1: Norm
    norm2: Norm
    qkv: Linear
    o: Linear
    up: Linear | None    # the gated families: fused [gate; up] projection; else the first MLP projection. In a
    down: Linear | None  # mixture-of-experts layer: its shared expert (Qwen2-MoE), else None
    q_norm: Norm | None = None   # RMSNorm on q and on k before rotary, where Architecture.qk_norm is set
    k_norm: Norm | None = None
    post_norm1: Norm | None = None  # residual="sandwich" (Gemma 2/3): on the attention output, before its add
    post_norm2: Norm | None = None  # and on the MLP output
    experts: Experts | None = None  # a mixture-of-experts layer's routed experts (Architecture.moe; models/moe.py)


@dataclass(frozen=True)
class Architecture:
    """What a family is, apart from its weights: fixed for the model's life, read once by InferenceModel."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    act: Callable[[torch.Tensor], torch.Tensor]   # a module-level function (never a fresh lambda per eval)
    norm: str = "layer"                           # "rms" (Llama family) or "layer"
    gated_mlp: bool = False                       # act(gate) * up (Llama) or act(up) (OPT, GPT-2, NeoX)
    qkv_layout: str = "blocked"                   # [q heads | k heads | v heads], or "per_head" [q | k | v] (NeoX)
    residual: str = "pre_norm"                    # "pre_norm", "parallel" (NeoX), "post_norm" (OPT-350m) or
                                                  # "norm_after" (OLMo 2: h + norm1(attn(h)), h + norm2(mlp(h)))
                                                  # or "sandwich" (Gemma 2/3: h + post_norm1(attn(norm1(h))), ...)
    qk_norm: str | None = None                    # RMSNorm on q and k before rotary: "head" (Qwen3, over each
                                                  # head's D) or "projection" (OLMo 2, over all heads' H*D)
    positions: str = "rotary"                     # "rotary" or "learned" (absolute, OPT and GPT-2)
    pos_offset: int = 0                           # OPT's learned positions start at index 2
    rope_scaling: float = 1.0                     # the model's attention_scaling applied to cos and sin
    embed_scale: float = 1.0
    sliding_windows: tuple[int | None, ...] = ()  # per layer (Mistral, Qwen2 where configured); () = none
    local_rope_scaling: float = 1.0               # attention_scaling of the sliding layers' own rotary (Gemma 3)
    attn_scale: float | None = None               # softmax scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    attn_softcap: float | None = None             # scores = cap * tanh(scores / cap) before the softmax (Gemma 2):
                                                  # the attention ops' `softcap`, 0 there when None
    final_softcap: float | None = None            # logits = cap * tanh(logits / cap) (Gemma 2/3 where configured)
    moe: bool = False                             # layers may have routed experts (LayerWeights.experts)


@dataclass
class ModelWeights:
    """The tensors the inference forward reads, and the architecture they belong to."""
    arch: Architecture
    embed: torch.Tensor                      # (V, E)
    layers: list[LayerWeights]
    final_norm: Norm | None
    lm_head: Linear                          # (V, E), no bias
    pos_embed: torch.Tensor | None = None    # learned absolute positions (P_max, E_h); None for rotary
    inv_freq: torch.Tensor | None = None     # rotary frequencies (R/2,), read from the model's buffer
    local_inv_freq: torch.Tensor | None = None  # the sliding-window layers' own rotary, where a family has two
    project_in: Linear | None = None         # OPT when word_embed_proj_dim != hidden_size
    project_out: Linear | None = None


# attend(layer, i, x) -> the attention output projected by layer.o; built per forward for its mode
Attend = Callable[[LayerWeights, int, torch.Tensor], torch.Tensor]


class InferenceModel:
    """Prefill and decode over a KV cache, reading `ModelWeights` in place, with the family's switches resolved
    here, once. `ops` is read at each call (benchmarks swap single ops in place)."""

    def __init__(self, weights: ModelWeights, ops, rotary_tables: dict | None = None):
        arch = weights.arch
        self.w = weights
        self.arch = arch
        self.ops = ops
        self.scale = arch.attn_scale if arch.attn_scale is not None else arch.head_dim ** -0.5
        self.softcap = float(arch.attn_softcap or 0.0)  # the attention ops' argument: 0 = off
        # {(dtype, positions[, "local"]): (cos, sin)}; the engine passes the same dict at every eval(), so a captured
        # CUDA graph keeps reading the same table (it depends on inv_freq and the scaling, which training never moves)
        self.rotary_tables = {} if rotary_tables is None else rotary_tables
        self.norm, self.add_norm = (self._rms, self._rms_add) if arch.norm == "rms" else (self._ln, self._ln_add)
        self.block = {"pre_norm": self._pre_norm_block, "parallel": self._parallel_block,
                      "post_norm": self._post_norm_block, "norm_after": self._norm_after_block,
                      "sandwich": self._sandwich_block}[arch.residual]
        self.mlp = self._moe_mlp if arch.moe else self._gated_mlp if arch.gated_mlp else self._plain_mlp
        self.split_qkv = self._split_per_head if arch.qkv_layout == "per_head" else self._split_blocked
        if arch.qk_norm is not None and arch.qkv_layout != "blocked":
            raise NotImplementedError(f"qk_norm={arch.qk_norm!r} needs the blocked qkv layout")
        self.qkv = {None: self._qkv, "head": self._qkv_head_norm, "projection": self._qkv_projection_norm}[arch.qk_norm]
        self.rotary = arch.positions == "rotary"
        windows = arch.sliding_windows or (None,) * len(weights.layers)
        self.windows = windows
        self.distinct_windows = tuple(sorted({w for w in windows if w is not None}))
        # per layer, which (cos, sin) of _embed's it reads: 1, the local rotary, on sliding layers where there is one
        local = weights.local_inv_freq is not None
        self.layer_rope = tuple(int(local and window is not None) for window in windows)

    # -- norms: `norm` returns the normed tensor, `add_norm` (normed, x + residual) ---------------------
    def _rms(self, norm: Norm, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, norm.weight, norm.eps)

    def _rms_add(self, norm: Norm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, norm.weight, norm.eps, residual)

    def _ln(self, norm: Norm, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, norm.weight, norm.bias, norm.eps)

    def _ln_add(self, norm: Norm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.layer_norm(x, norm.weight, norm.bias, norm.eps, residual)

    # -- the three residual layouts: (layer, i, h, residual, attend) -> (h, residual) ----------------------
    def _pre_norm_block(self, layer: LayerWeights, i: int, h, residual, attend: Attend):
        """Pre-norm, with the residual add fused into the next norm: `residual` carries the stream."""
        if residual is None:
            residual, normed = h, self.norm(layer.norm1, h)
        else:
            normed, residual = self.add_norm(layer.norm1, h, residual)
        a = attend(layer, i, normed)
        normed, residual = self.add_norm(layer.norm2, a, residual)
        return self.mlp(layer, normed), residual

    def _parallel_block(self, layer: LayerWeights, i: int, h, residual, attend: Attend):
        a = attend(layer, i, self.norm(layer.norm1, h))
        m = self.mlp(layer, self.norm(layer.norm2, h))
        return m + a + h, None

    def _post_norm_block(self, layer: LayerWeights, i: int, h, residual, attend: Attend):
        h = self.add_norm(layer.norm1, attend(layer, i, h), h)[0]
        return self.add_norm(layer.norm2, self.mlp(layer, h), h)[0], None

    def _norm_after_block(self, layer: LayerWeights, i: int, h, residual, attend: Attend):
        """OLMo 2: no norm before a sublayer, its output normed before the residual add."""
        h = h + self.norm(layer.norm1, attend(layer, i, h))
        return h + self.norm(layer.norm2, self.mlp(layer, h)), None

    def _sandwich_block(self, layer: LayerWeights, i: int, h, residual, attend: Attend):
        """Gemma 3: a norm before and after each sublayer, the residual add after both."""
        h = h + self.norm(layer.post_norm1, attend(layer, i, self.norm(layer.norm1, h)))
        return h + self.norm(layer.post_norm2, self.mlp(layer, self.norm(layer.norm2, h))), None

    # -- q, k, v of a layer's input x (B, T, E): each (B, T, H|Hkv, D), q and k normed where the family does ----
    def _qkv(self, layer: LayerWeights, x: torch.Tensor):
        return self.split_qkv(layer.qkv(x))

    def _qkv_head_norm(self, layer: LayerWeights, x: torch.Tensor):
        q, k, v = self.split_qkv(layer.qkv(x))
        return self._rms(layer.q_norm, q), self._rms(layer.k_norm, k), v

    def _qkv_projection_norm(self, layer: LayerWeights, x: torch.Tensor):
        qkv = layer.qkv(x)
        B, T, _ = qkv.shape
        H, Hkv, D = self.arch.num_heads, self.arch.num_kv_heads, self.arch.head_dim
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)           # (B, T, H*D), (B, T, Hkv*D) x 2
        q = self._rms(layer.q_norm, q).view(B, T, H, D)
        k = self._rms(layer.k_norm, k).view(B, T, Hkv, D)
        return q, k, v.view(B, T, Hkv, D)

    # -- pieces -------------------------------------------------------------------------------
    def _gated_mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.up(x).chunk(2, dim=-1)
        return layer.down(self.arch.act(gate) * up)

    def _plain_mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return layer.down(self.arch.act(layer.up(x)))

    def _moe_mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """A layer of a mixture-of-experts model: dense (a gated MLP) where it has no experts (Qwen-MoE's
        mlp_only_layers, decoder_sparse_step); else its routed experts plus, where it has one, a shared expert
        scaled per token by sigmoid(shared_gate(x)) (Qwen2-MoE)."""
        experts = layer.experts
        if experts is None:
            return self._gated_mlp(layer, x)
        out = experts(self.ops, x)                                          # (B, T, E)
        if layer.up is not None:
            out = out + torch.sigmoid(experts.shared_gate(x)) * self._gated_mlp(layer, x)
        return out

    def _split_per_head(self, qkv: torch.Tensor):
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.arch.num_heads, 3, self.arch.head_dim)
        return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]

    def _split_blocked(self, qkv: torch.Tensor):
        B, T, _ = qkv.shape
        H, Hkv, D = self.arch.num_heads, self.arch.num_kv_heads, self.arch.head_dim
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        return q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype, max_positions: int, local: bool = False):
        """cos, sin: (B, T, R) for integer positions (B, T); of the sliding layers' own rotary where `local`.

        Looked up in a table of every position the cache can hold, built once per eval() with Hugging Face's
        arithmetic (fp32 position * inv_freq, then cos/sin, then the scaling): the same values bit for bit,
        for two index ops per forward instead of eight elementwise ones (a decode step is overhead-bound).
        """
        if not self.rotary:
            return None, None
        key = (dtype, max_positions, "local") if local else (dtype, max_positions)
        table = self.rotary_tables.get(key)
        if table is None:  # built by the first (eager) prefill, before any compiled step reads it
            inv_freq = self.w.local_inv_freq if local else self.w.inv_freq
            pos = torch.arange(max_positions, device=positions.device, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq.float()[None, :]              # (S, R/2)
            emb = torch.cat((freqs, freqs), dim=-1)                       # (S, R)
            s = self.arch.local_rope_scaling if local else self.arch.rope_scaling
            table = self.rotary_tables[key] = ((emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype))
        return F.embedding(positions, table[0]), F.embedding(positions, table[1])  # (B, T, R) each

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor, max_positions: int):
        """Hidden states (B, T, E) and the rotary tables: ((cos, sin),) each (B, T, R), a second pair for the
        sliding layers where the family has their own rotary (Gemma 3); ((None, None),) for learned positions."""
        w, arch = self.w, self.arch
        h = F.embedding(input_ids, w.embed)                                # (B, T, E)
        if arch.embed_scale != 1.0:
            h = h * arch.embed_scale
        if w.project_in is not None:
            h = w.project_in(h)
        if not self.rotary:  # learned absolute positions
            h = h + F.embedding(positions + arch.pos_offset, w.pos_embed)
        ropes = (self._rotary(positions, h.dtype, max_positions),)
        if self.w.local_inv_freq is not None:
            ropes += (self._rotary(positions, h.dtype, max_positions, local=True),)
        return h, ropes

    def _layers_and_head(self, h: torch.Tensor, attend: Attend, keep: int | torch.Tensor) -> torch.Tensor:
        residual = None
        for i, layer in enumerate(self.w.layers):
            h, residual = self.block(layer, i, h, residual, attend)
        if residual is not None:
            h = h + residual
        if isinstance(keep, torch.Tensor):  # (B,) one column per row: a right-padded block's last real token
            h = h[torch.arange(h.shape[0], device=h.device), keep]
        elif keep == 1:
            h = h[:, -1]
        elif keep:
            h = h[:, -keep:]  # the LM head (and its (B, T, V) logits) only where they are read
        w = self.w
        if w.final_norm is not None:
            h = self.norm(w.final_norm, h)
        if w.project_out is not None:
            h = w.project_out(h)
        logits = w.lm_head(h)
        cap = self.arch.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # -- the forwards ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                key_mask: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Logits for tokens written at cache slots [start, start+T): at the last position (B, V) with keep=1, at
        the last `keep` positions (B, keep, V), or at all of them (B, T, V) with keep=0.

        input_ids, positions: (B, T); key_mask: (B, S_max) bool, True on slots holding real tokens.
        A block of T > 1 tokens (or one at slot 0) is a prefill; one token at a later slot an eager decode step.
        """
        h, ropes = self._embed(input_ids, positions, cache.max_seq_len)
        B, T = input_ids.shape
        ops, scale, softcap = self.ops, self.scale, self.softcap

        def attend(layer: LayerWeights, i: int, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(layer, x)                                      # (B, T, H|Hkv, D)
            k_cache, v_cache = cache.layer(i)
            cos, sin = ropes[self.layer_rope[i]]
            q = ops.rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, start)  # (B, T, H, D)
            window = self.windows[i]
            if T > 1 or start == 0:
                assert start == 0, "prefill starts at slot 0"
                out = ops.prefill_attention(q.transpose(1, 2), k_cache[:B, :, :T], v_cache[:B, :, :T],
                                            key_mask[:, :T], scale, window, softcap)  # (B, H, T, D)
                return layer.o(out.transpose(1, 2).reshape(B, T, -1))
            length = start + 1
            mask = key_mask
            if window is not None and length > window:
                mask = key_mask.clone()
                mask[:, : length - window] = False
            out = ops.decode_attention(q.view(B, -1, q.shape[-1]), k_cache, v_cache, mask, length, scale, softcap)
            return layer.o(out.view(B, 1, -1))                             # (B, 1, H*D)

        return self._layers_and_head(h, attend, keep)

    @torch.inference_mode()
    def forward_rows(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, starts: torch.Tensor,
                     span: int, key_mask: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) for tokens written at each row's own cache slots: row b's T tokens at [starts[b],
        starts[b] + T), at column last[b] of each row (None: the last column).

        input_ids, positions: (B, T); starts: (B,) long; span: an int >= every starts[b] + T that fits the cache
        (capped at S_max), the slots attention reads; key_mask: (B, >= span) bool, True on slots holding real
        tokens (a right-padded block's pads False). With T > 1 the block is prefilled after what each row has
        cached (a continued row: its appended tokens); with T = 1 it is an eager decode step at per-row slots.
        A slot past S_max is not written (only pads of a right-padded block reach there).
        """
        h, ropes = self._embed(input_ids, positions, cache.max_seq_len)
        B, T = input_ids.shape
        ops, scale, softcap = self.ops, self.scale, self.softcap
        if T == 1:  # one query per row: the decode kernel, each row's later slots masked
            slots = torch.arange(span, device=key_mask.device)                     # (span,)
            filled = key_mask[:, :span] & (slots[None, :] <= starts[:, None])       # (B, span)
            masks = {None: filled}
            for window in self.distinct_windows:
                masks[window] = filled & (slots[None, :] > (starts - window)[:, None])

        def attend(layer: LayerWeights, i: int, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(layer, x)                                      # (B, T, H|Hkv, D)
            k_cache, v_cache = cache.layer(i)
            cos, sin = ropes[self.layer_rope[i]]
            q = ops.rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, 0, starts)  # (B, T, H, D)
            window = self.windows[i]
            if T == 1:
                out = ops.decode_attention(q.view(B, -1, q.shape[-1]), k_cache, v_cache, masks[window], span, scale,
                                           softcap)
                return layer.o(out.view(B, 1, -1))                         # (B, 1, H*D)
            out = ops.prefill_attention(q.transpose(1, 2), k_cache[:B, :, :span], v_cache[:B, :, :span],
                                        key_mask[:, :span], scale, window, softcap, starts)  # (B, H, T, D)
            return layer.o(out.transpose(1, 2).reshape(B, T, -1))

        return self._layers_and_head(h, attend, 1 if last is None else last)

    def decode_static(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slot: torch.Tensor,
                      key_mask: torch.Tensor) -> torch.Tensor:
        """One decode step whose cache slot is a tensor, so one traced graph serves every token: logits (B, V).

        input_ids, positions: (B, 1); slot: (B,) long, the cache slot each row's token is written to (one slot for
        every row of a left-padded batch; each row's own for continued rows); key_mask: (B, S_max) bool, True on
        real tokens. Keys and values are written in place at `slot` (index_put_ into the cache), and attention
        reads all S_max slots with each row's slots after its `slot` masked: a fixed length, for the price of
        attending to the whole cache (masked slots hold zeros or finite stale keys, see KVCache) instead of the
        filled part.
        """
        h, ropes = self._embed(input_ids, positions, cache.max_seq_len)
        B = input_ids.shape[0]
        S = cache.max_seq_len
        ops, scale, softcap, arch = self.ops, self.scale, self.softcap, self.arch
        slots = torch.arange(S, device=key_mask.device)                  # (S_max,)
        filled = key_mask & (slots[None, :] <= slot[:, None])              # (B, S_max)
        rows = torch.arange(B, device=key_mask.device)[:, None, None]     # (B, 1, 1)
        heads = torch.arange(arch.num_kv_heads, device=key_mask.device)[None, :, None]  # (1, Hkv, 1)
        masks = {None: filled}
        for window in self.distinct_windows:
            masks[window] = filled & (slots[None, :] > (slot - window)[:, None])

        def attend(layer: LayerWeights, i: int, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(layer, x)                                      # (B, 1, H|Hkv, D)
            k_new = torch.empty((B, arch.num_kv_heads, 1, arch.head_dim), dtype=k.dtype, device=k.device)
            v_new = torch.empty_like(k_new)                                # (B, Hkv, 1, D)
            # the backend's own rotary (bit-identical to the eager step), its cache write into the one-slot
            # scratch; then one in-place write into the cache at the tensor slot. index_put_ on the cache tensor
            # itself, not on a view of it: inductor writes that in place, where a write through a view of the
            # (L, B_max, ...) cache was functionalised into a copy of the whole cache per layer (8 ms a step here)
            cos, sin = ropes[self.layer_rope[i]]
            q = ops.rotary_kv_append(q, k, v, cos, sin, k_new, v_new, 0)  # (B, 1, H, D)
            index = (torch.tensor(i, device=slot.device), rows, heads, slot[:, None, None])  # (B, Hkv, 1) each
            cache.k.index_put_(index, k_new)
            cache.v.index_put_(index, v_new)
            k_cache, v_cache = cache.layer(i)
            out = ops.decode_attention(q.reshape(B, arch.num_heads, arch.head_dim), k_cache, v_cache,
                                       masks[self.windows[i]], S, scale, softcap)  # (B, H, D)
            return layer.o(out.view(B, 1, -1))                             # (B, 1, H*D)

        return self._layers_and_head(h, attend, keep=1)
