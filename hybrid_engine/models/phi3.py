"""Phi-3: Llama's forward on checkpoints that fuse the projections: `qkv_proj` is [q heads | k heads | v heads] and
`gate_up_proj` is [gate; up], the layouts the engine runs, so both are read in place (no re-laying copy).
Partial rotary (`partial_rotary_factor`) comes with the rotary module's inv_freq; a sliding window from the config
applies to every layer, as in Mistral."""
from __future__ import annotations

from .base import LayerWeights, ModelWeights
from .common import Relayer, layer_norm
from .llama import rotary_decoder_weights


def phi3_layer(i: int, block, relayer: Relayer) -> LayerWeights:
    attn, mlp = block.self_attn, block.mlp
    return LayerWeights(
        norm1=layer_norm(block.input_layernorm),
        norm2=layer_norm(block.post_attention_layernorm),
        qkv=relayer.linear(f"{i}.qkv", attn.qkv_proj),
        o=relayer.linear(f"{i}.o", attn.o_proj),
        up=relayer.linear(f"{i}.gate_up", mlp.gate_up_proj),
        down=relayer.linear(f"{i}.down", mlp.down_proj),
    )


def phi3_weights(model, relayer: Relayer) -> ModelWeights:
    return rotary_decoder_weights(model, relayer, phi3_layer)
