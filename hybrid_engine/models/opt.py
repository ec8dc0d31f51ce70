"""OPT: learned absolute positions offset by 2, LayerNorm, ReLU MLP, optional projections between the
word-embedding width and the hidden width, pre- or post-norm (`do_layer_norm_before`, False for 350m)."""
from __future__ import annotations

from .base import Architecture, LayerWeights, Linear, ModelWeights
from .common import Relayer, activation, layer_norm


def opt_weights(model, relayer: Relayer) -> ModelWeights:
    cfg = model.config
    dec = model.model.decoder
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    layers = []
    for i, block in enumerate(dec.layers):
        attn = block.self_attn
        layers.append(LayerWeights(
            norm1=layer_norm(block.self_attn_layer_norm),
            norm2=layer_norm(block.final_layer_norm),
            qkv=relayer.fused(f"{i}.qkv", [attn.q_proj, attn.k_proj, attn.v_proj]),
            o=relayer.linear(f"{i}.o", attn.out_proj),
            up=relayer.linear(f"{i}.fc1", block.fc1),
            down=relayer.linear(f"{i}.fc2", block.fc2),
        ))
    arch = Architecture(
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_attention_heads,
        head_dim=head_dim,
        act=activation(cfg.activation_function),
        residual="pre_norm" if cfg.do_layer_norm_before else "post_norm",
        positions="learned",
        pos_offset=dec.embed_positions.offset,
    )
    return ModelWeights(
        arch=arch,
        embed=dec.embed_tokens.weight,
        layers=layers,
        final_norm=layer_norm(dec.final_layer_norm) if dec.final_layer_norm is not None else None,
        lm_head=Linear(relayer.weight("lm_head", model.get_output_embeddings())),
        pos_embed=dec.embed_positions.weight,
        project_in=relayer.linear("project_in", dec.project_in) if dec.project_in is not None else None,
        project_out=relayer.linear("project_out", dec.project_out) if dec.project_out is not None else None,
    )
