"""Qwen3 (dense): Llama's blocks with an RMSNorm over each head's q and k before rotary (`q_norm`, `k_norm`,
weights of size head_dim shared by all heads), and a head_dim the config states (not hidden / heads)."""
from __future__ import annotations

from dataclasses import replace

from .base import LayerWeights, ModelWeights
from .common import Relayer, layer_norm
from .llama import llama_layer, rotary_decoder_weights


def qwen3_layer(i: int, block, relayer: Relayer) -> LayerWeights:
    attn = block.self_attn
    return replace(llama_layer(i, block, relayer), q_norm=layer_norm(attn.q_norm), k_norm=layer_norm(attn.k_norm))


def qwen3_weights(model, relayer: Relayer) -> ModelWeights:
    return rotary_decoder_weights(model, relayer, qwen3_layer, qk_norm="head")
