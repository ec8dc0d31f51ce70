"""The inference forward shared by every supported family: a decoder-only transformer over a KV cache.

A family file (llama.py, opt.py, gpt2.py, gpt_neox.py) reads a Hugging Face module and describes it as a
`ModelWeights`: tensors that *are* the training parameters (views, no copies), plus the few buffers the
engine re-lays on `eval()` (a fused QKV or gate/up matrix), and the handful of switches where the families
differ (norm, residual layout, positions, activation). `InferenceModel` runs that description.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache import KVCache

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
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


@dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    rms: bool  # RMSNorm (Llama family) or LayerNorm


@dataclass
class LayerWeights:
    """One decoder block. `qkv` yields q, k, v in the order `qkv_layout` names:
    "blocked" = [q heads | k heads | v heads]; "per_head" = per head [q | k | v] (GPT-NeoX)."""
    norm1: Norm
    norm2: Norm
    qkv: Linear
    o: Linear
    up: Linear      # the gated families: fused [gate; up] projection; else the first MLP projection
    down: Linear
    sliding_window: int | None = None


@dataclass
class ModelWeights:
    """What the inference forward reads, plus the family's switches."""
    embed: torch.Tensor                      # (V, E)
    layers: list[LayerWeights]
    final_norm: Norm | None
    lm_head: Linear                          # (V, E), no bias
    num_heads: int
    num_kv_heads: int
    head_dim: int
    act: Callable[[torch.Tensor], torch.Tensor]
    gated_mlp: bool                          # act(gate) * up (Llama) or act(up) (OPT, GPT-2, NeoX)
    qkv_layout: str = "blocked"
    residual: str = "pre_norm"               # "pre_norm", "parallel" (NeoX) or "post_norm" (OPT-350m)
    pos_embed: torch.Tensor | None = None    # learned absolute positions (E_h); None for rotary
    pos_offset: int = 0                      # OPT's learned positions start at index 2
    inv_freq: torch.Tensor | None = None     # rotary frequencies (R/2,), read from the model's buffer
    rope_scaling: float = 1.0                # the model's attention_scaling applied to cos and sin
    project_in: Linear | None = None         # OPT when word_embed_proj_dim != hidden_size
    project_out: Linear | None = None
    embed_scale: float = 1.0
    relaid_bytes: int = 0                    # bytes of the buffers re-laid on eval()
    extra: dict = field(default_factory=dict)


class InferenceModel:
    """Prefill and decode over a KV cache, reading `ModelWeights` in place."""

    def __init__(self, weights: ModelWeights, ops):
        self.w = weights
        self.ops = ops
        self.scale = weights.head_dim ** -0.5
        self._rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- pieces -------------------------------------------------------------------------------
    def _norm(self, norm: Norm, x, residual=None):
        if norm.rms:
            return self.ops.rms_norm(x, norm.weight, norm.eps, residual)
        return self.ops.layer_norm(x, norm.weight, norm.bias, norm.eps, residual)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype, max_positions: int):
        """cos, sin: (B, T, R) for integer positions (B, T).

        Looked up in a table of every position the cache can hold, built once per eval() with Hugging Face's
        arithmetic (fp32 position * inv_freq, then cos/sin, then the scaling): the same values bit for bit,
        for two index ops per forward instead of eight elementwise ones (a decode step is overhead-bound).
        """
        if self.w.inv_freq is None:
            return None, None
        table = self._rotary_table
        if table is None or table[0].shape[0] < max_positions or table[0].dtype != dtype:
            pos = torch.arange(max_positions, device=positions.device, dtype=torch.float32)
            freqs = pos[:, None] * self.w.inv_freq.float()[None, :]       # (S, R/2)
            emb = torch.cat((freqs, freqs), dim=-1)                       # (S, R)
            s = self.w.rope_scaling
            table = self._rotary_table = ((emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype))
        return F.embedding(positions, table[0]), F.embedding(positions, table[1])  # (B, T, R) each

    def _split_qkv(self, qkv: torch.Tensor):
        B, T, _ = qkv.shape
        H, Hkv, D = self.w.num_heads, self.w.num_kv_heads, self.w.head_dim
        if self.w.qkv_layout == "per_head":
            qkv = qkv.view(B, T, H, 3, D)
            return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        return q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)

    def _attention(self, layer: LayerWeights, i: int, x: torch.Tensor, cos, sin, cache: KVCache,
                   start: int, key_mask: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = self._split_qkv(layer.qkv(x))                           # (B, T, H|Hkv, D)
        k_cache, v_cache = cache.layer(i)
        q = self.ops.rotary_kv_append(q, k, v, cos, sin, k_cache, v_cache, start)  # (B, T, H, D)
        if T > 1 or start == 0:
            assert start == 0, "prefill starts at slot 0"
            out = self.ops.prefill_attention(q.transpose(1, 2), k_cache[:B, :, :T], v_cache[:B, :, :T],
                                             key_mask[:, :T], self.scale, layer.sliding_window)  # (B, H, T, D)
            out = out.transpose(1, 2).reshape(B, T, -1)
        else:
            length = start + 1
            mask = key_mask
            if layer.sliding_window is not None and length > layer.sliding_window:
                mask = key_mask.clone()
                mask[:, : length - layer.sliding_window] = False
            out = self.ops.decode_attention(q.view(B, -1, q.shape[-1]), k_cache, v_cache, mask, length,
                                            self.scale).view(B, 1, -1)     # (B, 1, H*D)
        return layer.o(out)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = layer.up(x)
        if self.w.gated_mlp:
            gate, up = h.chunk(2, dim=-1)
            h = self.w.act(gate) * up
        else:
            h = self.w.act(h)
        return layer.down(h)

    # -- the forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                key_mask: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Logits (B, V) at the last position (or (B, T, V)) for tokens written at cache slots [start, start+T).

        input_ids, positions: (B, T); key_mask: (B, S_max) bool, True on slots holding real tokens.
        """
        w = self.w
        h = F.embedding(input_ids, w.embed)                                # (B, T, E)
        if w.embed_scale != 1.0:
            h = h * w.embed_scale
        if w.project_in is not None:
            h = w.project_in(h)
        if w.pos_embed is not None:
            h = h + F.embedding(positions + w.pos_offset, w.pos_embed)
        cos, sin = self._rotary(positions, h.dtype, cache.max_seq_len)

        residual = None
        for i, layer in enumerate(w.layers):
            if w.residual == "parallel":
                a = self._attention(layer, i, self._norm(layer.norm1, h), cos, sin, cache, start, key_mask)
                m = self._mlp(layer, self._norm(layer.norm2, h))
                h = m + a + h
            elif w.residual == "post_norm":
                h = self._norm(layer.norm1, self._attention(layer, i, h, cos, sin, cache, start, key_mask), h)[0]
                h = self._norm(layer.norm2, self._mlp(layer, h), h)[0]
            else:  # pre-norm, the residual add fused into the next norm
                if residual is None:
                    residual, normed = h, self._norm(layer.norm1, h)
                else:
                    normed, residual = self._norm(layer.norm1, h, residual)
                a = self._attention(layer, i, normed, cos, sin, cache, start, key_mask)
                normed, residual = self._norm(layer.norm2, a, residual)
                h = self._mlp(layer, normed)
        if residual is not None:
            h = h + residual
        if last_only:
            h = h[:, -1]
        if w.final_norm is not None:
            h = self._norm(w.final_norm, h)
        if w.project_out is not None:
            h = w.project_out(h)
        return w.lm_head(h).float()
