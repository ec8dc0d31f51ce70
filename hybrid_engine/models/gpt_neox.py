"""GPT-NeoX (Pythia): LayerNorm, partial rotary, fused per-head QKV, parallel or sequential residual."""
from __future__ import annotations

from .base import Architecture, LayerWeights, Linear, ModelWeights
from .common import Relayer, activation, layer_norm


def gpt_neox_weights(model, relayer: Relayer) -> ModelWeights:
    cfg = model.config
    core = model.gpt_neox
    layers = []
    for i, block in enumerate(core.layers):
        layers.append(LayerWeights(
            norm1=layer_norm(block.input_layernorm),
            norm2=layer_norm(block.post_attention_layernorm),
            qkv=relayer.linear(f"{i}.qkv", block.attention.query_key_value),  # per head [q | k | v]
            o=relayer.linear(f"{i}.o", block.attention.dense),
            up=relayer.linear(f"{i}.fc", block.mlp.dense_h_to_4h),
            down=relayer.linear(f"{i}.proj", block.mlp.dense_4h_to_h),
        ))
    rotary = core.rotary_emb
    arch = Architecture(
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        act=activation(cfg.hidden_act),
        qkv_layout="per_head",
        residual="parallel" if cfg.use_parallel_residual else "pre_norm",
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )
    return ModelWeights(
        arch=arch,
        embed=core.embed_in.weight,
        layers=layers,
        final_norm=layer_norm(core.final_layer_norm),
        lm_head=Linear(relayer.weight("lm_head", model.get_output_embeddings())),
        inv_freq=rotary.inv_freq,
    )
