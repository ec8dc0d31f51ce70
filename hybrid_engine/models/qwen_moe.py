"""Qwen2-MoE and Qwen3-MoE: Qwen2's (q/k/v bias) and Qwen3's (per-head q/k norms) attention with a mixture of experts
in place of the MLP where the config puts one (`mlp_only_layers` and `decoder_sparse_step` leave some layers dense):
softmax over the router's logits, the top k, renormalised only where `norm_topk_prob`, routing weights cast to the
model's dtype. Qwen2-MoE adds a shared expert on every token, scaled by sigmoid(shared_expert_gate(x))."""
from __future__ import annotations

from .base import LayerWeights, ModelWeights
from .common import Relayer, layer_norm
from .llama import gated_mlp, llama_attention, rotary_decoder_weights
from .moe import describe_experts


def qwen_moe_layer(i: int, block, relayer: Relayer, cfg) -> LayerWeights:
    attn, mlp = block.self_attn, block.mlp
    fields = llama_attention(i, block, relayer)
    if hasattr(attn, "q_norm"):  # Qwen3-MoE
        fields.update(q_norm=layer_norm(attn.q_norm), k_norm=layer_norm(attn.k_norm))
    if not hasattr(mlp, "experts"):  # a dense layer
        return LayerWeights(**fields, **gated_mlp(i, mlp, relayer))
    shared = getattr(mlp, "shared_expert", None)
    shared_gate = relayer.linear(f"{i}.shared_gate", mlp.shared_expert_gate) if shared is not None else None
    experts = describe_experts(i, mlp, relayer, cfg, renormalize=cfg.norm_topk_prob, weights_in_model_dtype=True,
                               shared_gate=shared_gate)
    dense = gated_mlp(i, shared, relayer) if shared is not None else dict(up=None, down=None)
    return LayerWeights(**fields, **dense, experts=experts)


def qwen_moe_weights(model, relayer: Relayer) -> ModelWeights:
    cfg = model.config
    qk_norm = "head" if cfg.model_type == "qwen3_moe" else None
    return rotary_decoder_weights(model, relayer, lambda i, block, r: qwen_moe_layer(i, block, r, cfg), moe=True,
                                  qk_norm=qk_norm)
