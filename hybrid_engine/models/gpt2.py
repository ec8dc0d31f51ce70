"""GPT-2: learned absolute positions, LayerNorm, Conv1D projections stored (in, out), one fused c_attn."""
from __future__ import annotations

from .base import Architecture, LayerWeights, Linear, ModelWeights
from .common import Relayer, activation, layer_norm


def gpt2_weights(model, relayer: Relayer) -> ModelWeights:
    cfg = model.config
    core = model.transformer
    if cfg.scale_attn_by_inverse_layer_idx or not cfg.scale_attn_weights:
        raise NotImplementedError("GPT-2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights "
                                  "is not supported by the inference path")
    layers = []
    for i, block in enumerate(core.h):
        layers.append(LayerWeights(
            norm1=layer_norm(block.ln_1),
            norm2=layer_norm(block.ln_2),
            qkv=relayer.linear(f"{i}.qkv", block.attn.c_attn, transposed=True),  # already [q | k | v]
            o=relayer.linear(f"{i}.o", block.attn.c_proj, transposed=True),
            up=relayer.linear(f"{i}.fc", block.mlp.c_fc, transposed=True),
            down=relayer.linear(f"{i}.proj", block.mlp.c_proj, transposed=True),
        ))
    arch = Architecture(num_heads=cfg.n_head, num_kv_heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
                        act=activation(cfg.activation_function), positions="learned")
    return ModelWeights(
        arch=arch,
        embed=core.wte.weight,
        layers=layers,
        final_norm=layer_norm(core.ln_f),
        lm_head=Linear(relayer.weight("lm_head", model.get_output_embeddings())),
        pos_embed=core.wpe.weight,
    )
