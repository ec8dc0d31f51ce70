"""Gemma 2: Gemma 3's block (gemma3.py: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms before and after each
sublayer, softmax scale query_pre_attn_scalar ** -0.5, GELU-tanh gated MLP) without q/k norms, sliding-window
layers alternating with global ones under one rotary, and logit soft-capping twice: on the attention scores
(`attn_logit_softcapping`, the attention ops' `softcap`) and on the final logits (`final_logit_softcapping`)."""
from __future__ import annotations

from .base import Linear, ModelWeights
from .common import Relayer
from .gemma3 import gemma3_layer, gemma_architecture


def gemma2_weights(model, relayer: Relayer) -> ModelWeights:
    cfg = model.config
    core = model.model
    windows = tuple(block.self_attn.sliding_window for block in core.layers)  # None on the global layers
    embed = core.embed_tokens
    arch = gemma_architecture(cfg, embed, windows, rope_scaling=float(core.rotary_emb.attention_scaling))
    return ModelWeights(
        arch=arch,
        embed=embed.weight,
        layers=[gemma3_layer(i, block, relayer) for i, block in enumerate(core.layers)],
        final_norm=relayer.offset_norm("final_norm", core.norm),
        lm_head=Linear(relayer.weight("lm_head", model.get_output_embeddings())),
        inv_freq=core.rotary_emb.inv_freq,
    )
