"""Gemma 3 (text): embeddings scaled by sqrt(hidden), RMSNorms that scale by (1 + w), a norm before and after each
sublayer (residual="sandwich"), per-head q/k norms, softmax scale query_pre_attn_scalar ** -0.5, GELU-tanh gated
MLP, and sliding-window layers alternating with global ones, each kind with its own rotary (base, scaling).
Attention logit soft-capping where the config sets it (None in Gemma 3's own configs; Gemma 2's, see gemma2.py).
`gemma3_layer` is Gemma 2's block too: it has the same four norms and no q/k norms."""
from __future__ import annotations

from .base import Architecture, LayerWeights, Linear, ModelWeights
from .common import Relayer, activation


def gemma3_layer(i: int, block, relayer: Relayer) -> LayerWeights:
    attn, mlp = block.self_attn, block.mlp
    return LayerWeights(
        norm1=relayer.offset_norm(f"{i}.input_norm", block.input_layernorm),
        norm2=relayer.offset_norm(f"{i}.pre_ff_norm", block.pre_feedforward_layernorm),
        post_norm1=relayer.offset_norm(f"{i}.post_attn_norm", block.post_attention_layernorm),
        post_norm2=relayer.offset_norm(f"{i}.post_ff_norm", block.post_feedforward_layernorm),
        qkv=relayer.fused(f"{i}.qkv", [attn.q_proj, attn.k_proj, attn.v_proj]),
        o=relayer.linear(f"{i}.o", attn.o_proj),
        up=relayer.fused(f"{i}.gate_up", [mlp.gate_proj, mlp.up_proj]),
        down=relayer.linear(f"{i}.down", mlp.down_proj),
        q_norm=relayer.offset_norm(f"{i}.q_norm", attn.q_norm) if hasattr(attn, "q_norm") else None,  # Gemma 2: none
        k_norm=relayer.offset_norm(f"{i}.k_norm", attn.k_norm) if hasattr(attn, "k_norm") else None,
    )


def gemma_architecture(cfg, embed, windows: tuple, **rotary) -> Architecture:
    """What Gemma 2 and 3 share: sandwich (1 + w) RMSNorms, GELU-tanh gated MLP, embeddings scaled in the weights'
    dtype, sliding and global layers, query_pre_attn_scalar, soft-capping; `rotary` the family's own fields."""
    return Architecture(
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        act=activation(cfg.hidden_activation),
        norm="rms",
        gated_mlp=True,
        residual="sandwich",
        embed_scale=float(embed.embed_scale.to(embed.weight.dtype)),  # HF multiplies by it in the weights' dtype
        sliding_windows=windows if any(w is not None for w in windows) else (),
        attn_scale=cfg.query_pre_attn_scalar ** -0.5,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=cfg.final_logit_softcapping,
        **rotary,
    )


def gemma3_weights(model, relayer: Relayer) -> ModelWeights:
    cfg = model.config
    core = model.model
    layers = [gemma3_layer(i, block, relayer) for i, block in enumerate(core.layers)]
    windows = tuple(block.self_attn.sliding_window for block in core.layers)
    rotary = core.rotary_emb
    has_local = hasattr(rotary, "sliding_attention_inv_freq")
    global_kind = "full_attention" if hasattr(rotary, "full_attention_inv_freq") else "sliding_attention"
    embed = core.embed_tokens
    arch = gemma_architecture(
        cfg, embed, windows, qk_norm="head",
        rope_scaling=float(getattr(rotary, f"{global_kind}_attention_scaling")),
        local_rope_scaling=float(getattr(rotary, "sliding_attention_attention_scaling", 1.0)))
    return ModelWeights(
        arch=arch,
        embed=embed.weight,
        layers=layers,
        final_norm=relayer.offset_norm("final_norm", core.norm),
        lm_head=Linear(relayer.weight("lm_head", model.get_output_embeddings())),
        inv_freq=getattr(rotary, f"{global_kind}_inv_freq"),
        local_inv_freq=rotary.sliding_attention_inv_freq if has_local and global_kind != "sliding_attention" else None,
    )
