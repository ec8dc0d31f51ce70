"""Llama, Mistral and Qwen2: RMSNorm, rotary, grouped-query attention, gated SiLU MLP.

Qwen2 adds a bias to q/k/v; Mistral (and Qwen2 where configured) a sliding attention window.
`rotary_decoder_weights` is the whole model around the blocks, shared by the families built like Llama
(Qwen3, Phi-3, OLMo 2): each of those gives only its block's tensors and its Architecture switches.
"""
from __future__ import annotations

from collections.abc import Callable

from .base import Architecture, LayerWeights, Linear, ModelWeights
from .common import Relayer, activation, layer_norm

# families whose config's sliding_window applies to every layer (their attention modules do not say)
WINDOW_FROM_CONFIG = ("mistral", "mixtral", "phi3")


def llama_attention(i: int, block, relayer: Relayer) -> dict:
    """A Llama block's attention and its two norms, as LayerWeights fields (the MoE families share them)."""
    attn = block.self_attn
    return dict(
        norm1=layer_norm(block.input_layernorm),
        norm2=layer_norm(block.post_attention_layernorm),
        qkv=relayer.fused(f"{i}.qkv", [attn.q_proj, attn.k_proj, attn.v_proj]),
        o=relayer.linear(f"{i}.o", attn.o_proj),
    )


def gated_mlp(i: int, mlp, relayer: Relayer) -> dict:
    """A gated MLP (gate_proj, up_proj, down_proj) as LayerWeights' up (the fused [gate; up]) and down."""
    return dict(up=relayer.fused(f"{i}.gate_up", [mlp.gate_proj, mlp.up_proj]),
                down=relayer.linear(f"{i}.down", mlp.down_proj))


def llama_layer(i: int, block, relayer: Relayer) -> LayerWeights:
    return LayerWeights(**llama_attention(i, block, relayer), **gated_mlp(i, block.mlp, relayer))


def rotary_decoder_weights(model, relayer: Relayer, describe_layer: Callable[[int, object, Relayer], LayerWeights],
                           **arch_options) -> ModelWeights:
    """A Llama-shaped model (`model.model` with embed_tokens, layers, norm, rotary_emb; an lm_head): its blocks as
    `describe_layer(i, block, relayer)` gives them, and an RMSNorm, gated-MLP Architecture with `arch_options`
    (qk_norm, residual, ...) on top."""
    cfg = model.config
    core = model.model
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers, windows = [], []
    for i, block in enumerate(core.layers):
        window = getattr(block.self_attn, "sliding_window", None)
        if window is None and cfg.model_type in WINDOW_FROM_CONFIG:
            window = getattr(cfg, "sliding_window", None)
        layers.append(describe_layer(i, block, relayer))
        windows.append(window)
    rotary = core.rotary_emb
    arch = Architecture(
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        act=activation(cfg.hidden_act),
        norm="rms",
        gated_mlp=True,
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        sliding_windows=tuple(windows) if any(w is not None for w in windows) else (),
        **arch_options,
    )
    return ModelWeights(
        arch=arch,
        embed=core.embed_tokens.weight,
        layers=layers,
        final_norm=layer_norm(core.norm),
        lm_head=Linear(relayer.weight("lm_head", model.get_output_embeddings())),
        inv_freq=rotary.inv_freq,
    )


def llama_weights(model, relayer: Relayer) -> ModelWeights:
    return rotary_decoder_weights(model, relayer, llama_layer)
