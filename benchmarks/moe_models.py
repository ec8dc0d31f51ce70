"""Random-initialised mixture-of-experts checkpoints for the throughput benchmark's MoE rows.

    python benchmarks/moe_models.py mixtral /tmp/mixtral-moe          # write a checkpoint (config + weights)
    python benchmarks/throughput.py --model /tmp/mixtral-moe --batch-sizes 1 8

`MOE_CONFIGS` maps a family to its config's keyword arguments and `moe_config(family)` builds the config, so a
`--family` option of throughput.py can take the same table. The shapes are CPU-sized (~20-30M parameters, of which
a quarter is active per token), with the routing of the real models: top-2 of 8 experts, renormalised (Mixtral;
Qwen3-MoE with norm_topk_prob, as Qwen3-30B-A3B), grouped-query attention.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

_COMMON = dict(vocab_size=8192, hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
               max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
               pad_token_id=0)
MOE_CONFIGS = {
    "mixtral": (MixtralConfig, dict(_COMMON, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeConfig, dict(_COMMON, head_dim=64, intermediate_size=1024, moe_intermediate_size=512,
                                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
}


def moe_config(family: str):
    """The benchmark's config of `family` (a key of MOE_CONFIGS)."""
    cls, kwargs = MOE_CONFIGS[family]
    return cls(**kwargs)


def save_checkpoint(family: str, path: str, seed: int = 0) -> int:
    """Write a random `family` model to `path`; returns its parameter count."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family))
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=sorted(MOE_CONFIGS), help="which mixture-of-experts family")
    p.add_argument("path", help="the checkpoint directory to write")
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.path, "config.json")):
        p.error(f"{args.path}: a checkpoint is already there")
    n = save_checkpoint(args.family, args.path)
    print(f"{args.family}: {n / 1e6:.1f}M parameters written to {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
