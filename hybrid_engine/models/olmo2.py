"""OLMo 2: Llama's attention and MLP with the norms moved: none before a sublayer, an RMSNorm on each sublayer's
output before its residual add (`post_attention_layernorm`, `post_feedforward_layernorm`), and RMSNorms on the
whole q and k projections (over all heads' H*D features, not per head) before rotary."""
from __future__ import annotations

from .base import LayerWeights, ModelWeights
from .common import Relayer, layer_norm
from .llama import rotary_decoder_weights


def olmo2_layer(i: int, block, relayer: Relayer) -> LayerWeights:
    attn, mlp = block.self_attn, block.mlp
    return LayerWeights(
        norm1=layer_norm(block.post_attention_layernorm),     # on the attention output (residual="norm_after")
        norm2=layer_norm(block.post_feedforward_layernorm),   # on the MLP output
        qkv=relayer.fused(f"{i}.qkv", [attn.q_proj, attn.k_proj, attn.v_proj]),
        o=relayer.linear(f"{i}.o", attn.o_proj),
        up=relayer.fused(f"{i}.gate_up", [mlp.gate_proj, mlp.up_proj]),
        down=relayer.linear(f"{i}.down", mlp.down_proj),
        q_norm=layer_norm(attn.q_norm),
        k_norm=layer_norm(attn.k_norm),
    )


def olmo2_weights(model, relayer: Relayer) -> ModelWeights:
    return rotary_decoder_weights(model, relayer, olmo2_layer, residual="norm_after", qk_norm="projection")
