"""Random-initialised models of each family the engine serves, for `throughput.py --family NAME`: one shape for
all (hidden 256, 4 layers, 8 query heads over 2 kv heads of dim 32 where the family has GQA, an 8192-token
vocabulary; 4.9-7.4M parameters), plus what makes each family itself (the features tests/hf_models.py's tiny configs
hold to Hugging Face): sliding windows shorter than prompt + answer, q/k norms, soft-capping, fused projections,
learned positions, partial rotary. Small enough for a 2-core CPU to time every family in about a minute.

A new family is one row here (a function of max_position_embeddings returning its config)."""
from __future__ import annotations

from collections.abc import Callable

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB, HIDDEN, LAYERS, HEADS = 8192, 256, 4, 8
# the Llama-shaped families: untied head, GQA 8:2, head dim 32; bos/eos unset (no EOS stops either side), pad 0
LLAMA_SHAPED = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=704, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
                    bos_token_id=None, eos_token_id=None)
WINDOW = 48  # sliding window: shorter than throughput.py's default prompt (64) + answer
GEMMA = dict(LLAMA_SHAPED, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
             layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2))
PLAIN = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, num_attention_heads=HEADS, pad_token_id=0, bos_token_id=None,
             eos_token_id=None)

FAMILY_CONFIGS: dict[str, Callable[[int], object]] = {
    "llama": lambda n: LlamaConfig(**LLAMA_SHAPED, max_position_embeddings=n),
    "mistral": lambda n: MistralConfig(**LLAMA_SHAPED, sliding_window=WINDOW, max_position_embeddings=n),
    "qwen2": lambda n: Qwen2Config(**dict(LLAMA_SHAPED, tie_word_embeddings=True), max_position_embeddings=n),
    "qwen3": lambda n: Qwen3Config(**LLAMA_SHAPED, head_dim=32, max_position_embeddings=n),  # q/k norms per head
    "phi3": lambda n: Phi3Config(**LLAMA_SHAPED, partial_rotary_factor=0.5, sliding_window=WINDOW,
                                 max_position_embeddings=n, original_max_position_embeddings=n),
    "olmo2": lambda n: Olmo2Config(**LLAMA_SHAPED, max_position_embeddings=n),  # q/k norms over the projection
    "gemma2": lambda n: Gemma2Config(**GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     max_position_embeddings=n),
    "gemma3": lambda n: Gemma3TextConfig(**GEMMA, max_position_embeddings=n),
    "opt": lambda n: OPTConfig(**PLAIN, hidden_size=HIDDEN, ffn_dim=1024, max_position_embeddings=n),  # offset 2
    "gpt2": lambda n: GPT2Config(**PLAIN, n_embd=HIDDEN, n_positions=n),  # Conv1D layout, learned positions
    "gpt_neox": lambda n: GPTNeoXConfig(**PLAIN, hidden_size=HIDDEN, intermediate_size=1024, rotary_pct=0.25,
                                        max_position_embeddings=n),
}
