"""hybrid_engine: fast rollouts from the very model you train.

    engine = hybrid_engine.wrap(model, max_seq_len=512, max_batch_size=8)
    engine.eval(); out = engine.generate(input_ids, attention_mask, max_new_tokens=64)
    engine.train()  # back to the module's own forward, with autograd

Multi-turn (an agent's rollout): keep every row's KV cache, append each row's observation tokens and go on,
without re-prefilling what is cached; positions are per row, so the logprobs are those of one training forward
over each row's compact trajectory (left pad, prompt, answer 1, observation 1, answer 2, ...).

    out = engine.generate(input_ids, attention_mask, max_new_tokens=64, eos_token_id=eos, keep_cache=True)
    out2 = engine.continue_rows([0, 2], [obs_ids_0, obs_ids_2], max_new_tokens=64, eos_token_id=eos)
    out2.sequences, out2.logprobs, out2.action_mask  # (2, N) each: the new tokens only, rows in the order given
"""
from __future__ import annotations

import torch.nn as nn

from .engine import EngineConfig, HybridEngine
from .generation import GenerationOutput, SamplingParams
from .logprobs import token_logprobs

__all__ = ["EngineConfig", "GenerationOutput", "HybridEngine", "SamplingParams", "token_logprobs", "wrap"]


def wrap(model: nn.Module, max_seq_len: int = 512, max_batch_size: int = 8, tp_size: int = 1,
         kernels: str | None = None, allow_fallback: bool = False, **options) -> HybridEngine:
    """Wrap a Hugging Face causal LM (a family of hybrid_engine.models.FAMILIES: Llama, Mistral, Qwen2, Qwen3,
    Phi-3, OLMo 2, Gemma 2, Gemma 3 text, OPT, GPT-2, GPT-NeoX, Mixtral, Qwen2-MoE, Qwen3-MoE), a PEFT model around
    one, or a DeepSpeed engine, DDP / DataParallel (accelerate's wrappers) or torch.compile module around either;
    the parameters under the wrappers are read in place (FSDP's shards are refused in one line). Another
    architecture raises NotImplementedError naming it unless `allow_fallback` (generate() then delegates to
    Hugging Face's); tp_size > 1 refuses the families of parallel.TP_REFUSED (OLMo 2), naming why.

    max_seq_len and max_batch_size plan the KV cache; they are not hard limits of generate(): a longer prompt
    re-plans the cache, a larger batch is generated max_batch_size rows at a time. engine.train() restores the
    module's mode that engine.eval() found. Under torch.autocast (or with options autocast_dtype=...) generation
    runs its projections in the autocast dtype (EngineConfig.autocast_dtype says how).
    `options` are further EngineConfig fields."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len}: expected at least 2 (a prompt token and a new one)")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size}: expected at least 1")
    config = EngineConfig(max_seq_len=max_seq_len, max_batch_size=max_batch_size, tp_size=tp_size, kernels=kernels,
                          allow_fallback=allow_fallback, **options)
    return HybridEngine(model, config)
