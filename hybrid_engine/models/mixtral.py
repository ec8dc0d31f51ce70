"""Mixtral: Mistral's attention (a sliding window from the config, on every layer) and, in every layer, a mixture of
experts in place of the MLP: softmax over the router's logits, the top k, renormalised to sum to 1, routing weights
kept in fp32 (models/moe.py)."""
from __future__ import annotations

from .base import LayerWeights, ModelWeights
from .common import Relayer
from .llama import llama_attention, rotary_decoder_weights
from .moe import describe_experts


def mixtral_weights(model, relayer: Relayer) -> ModelWeights:
    cfg = model.config

    def layer(i: int, block, relayer: Relayer) -> LayerWeights:
        experts = describe_experts(i, block.mlp, relayer, cfg, renormalize=True, weights_in_model_dtype=False)
        return LayerWeights(**llama_attention(i, block, relayer), up=None, down=None, experts=experts)

    return rotary_decoder_weights(model, relayer, layer, moe=True)
