"""Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks k of X experts per token, each expert a
gated MLP, and their outputs are summed with the router's weights.

Hugging Face 5 keeps a layer's experts as two fused parameters, `experts.gate_up_proj` (X, 2I, E) with [gate; up]
rows per expert and `experts.down_proj` (X, E, I), and the router as `gate.weight` (X, E). `Experts` reads the three
in place (or base + LoRA delta where PEFT wraps them, see Relayer.param); the grouped matmuls are the `moe_experts`
op (hybrid_engine/ops), so every kernel backend serves them. A shared expert (Qwen2-MoE) is the layer's dense gated
MLP (`LayerWeights.up`/`down`) scaled per token by sigmoid(`shared_gate`(x)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PACKED_MAX_ROWS, Linear
from .common import Relayer


def route(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype | None):
    """Hugging Face's top-k router: softmax in fp32, the k largest, renormalised to sum to 1 where the family does.
    logits: (N, X). Returns (weights (N, k) in `dtype`, or fp32 where None; expert index (N, k))."""
    probs = torch.softmax(logits.float(), dim=-1)                 # (N, X)
    weights, index = torch.topk(probs, top_k, dim=-1)             # (N, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if dtype is None else weights.to(dtype)), index


@dataclass
class Experts:
    """One layer's routed experts. Calling it gives the weighted sum of each token's k experts: (B, T, E)."""
    router: Linear                   # (X, E), no bias
    gate_up: torch.Tensor            # (X, 2I, E): [gate; up] rows per expert
    down: torch.Tensor               # (X, E, I)
    top_k: int
    renormalize: bool                # Mixtral: always; Qwen-MoE: config.norm_topk_prob
    act: str                         # the config's activation name (ops take names)
    weights_in_model_dtype: bool     # Qwen-MoE casts the routing weights to the model's dtype; Mixtral keeps fp32
    shared_gate: Linear | None = None  # (1, E): sigmoid gate of a shared expert (Qwen2-MoE)
    packed: tuple[list, list] | None = None  # oneDNN-packed copies of each gate_up[e] and down[e] (pack_linears)

    def __call__(self, ops, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        flat = x.reshape(B * T, E)                                    # (N, E)
        logits = self.router(flat)                                    # (N, X)
        weights, index = route(logits, self.top_k, self.renormalize,
                               logits.dtype if self.weights_in_model_dtype else None)
        packed = self.packed if self.packed is not None and B * T <= PACKED_MAX_ROWS else (None, None)
        out = ops.moe_experts(flat, self.gate_up, self.down, index, weights, self.act, *packed)  # (N, E)
        return self.reduce(out).view(B, T, E)

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """The experts' sum as computed here; a tensor-parallel shard all-reduces it (parallel.py)."""
        return out


def describe_experts(i: int, moe_block, relayer: Relayer, cfg, renormalize: bool, weights_in_model_dtype: bool,
                     shared_gate: Linear | None = None) -> Experts:
    """Layer i's `Experts` from a Hugging Face sparse MoE block (`gate`: the router, `experts`: the fused weights)."""
    return Experts(
        router=Linear(relayer.param(f"{i}.router", moe_block.gate, "weight")),
        gate_up=relayer.param(f"{i}.experts.gate_up", moe_block.experts, "gate_up_proj"),
        down=relayer.param(f"{i}.experts.down", moe_block.experts, "down_proj"),
        top_k=cfg.num_experts_per_tok,
        renormalize=renormalize,
        act=cfg.hidden_act,
        weights_in_model_dtype=weights_in_model_dtype,
        shared_gate=shared_gate,
    )
