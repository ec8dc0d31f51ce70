"""Tiny random-initialised Hugging Face models with awkward shapes, saved and loaded back through
`save_pretrained` / `AutoModelForCausalLM.from_pretrained` as users' checkpoints are."""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 101  # odd on purpose

CONFIGS = {
    # grouped-query attention, head dim 12 (not a power of two), rope_theta 5000, untied head
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=5000.0,
                                 max_position_embeddings=128, tie_word_embeddings=False),
    # Llama-3 rope scaling, GQA 6:2 with head dim 10, tied embeddings
    "llama3_rope": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=60, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=2, head_dim=10,
                                       max_position_embeddings=128, tie_word_embeddings=True,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16},
                                       rope_theta=500000.0),
    # sliding window shorter than prompt + answer
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=12, sliding_window=9,
                                     max_position_embeddings=128, rope_theta=20000.0),
    # QKV bias, tied embeddings, GQA
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=56, intermediate_size=88, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True, rope_theta=1_000_000.0),
    # per-head q/k norms, explicit head_dim 14 (hidden 40 / 5 heads would be 8), 5 heads over 1 kv head, untied head
    "qwen3": lambda: Qwen3Config(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                 num_attention_heads=5, num_key_value_heads=1, head_dim=14, rope_theta=10000.0,
                                 max_position_embeddings=128, tie_word_embeddings=False),
    # tied embeddings, GQA 6:3 with head dim 6, attention bias
    "qwen3_tied": lambda: Qwen3Config(vocab_size=VOCAB, hidden_size=36, intermediate_size=56, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=3, head_dim=6, attention_bias=True,
                                      max_position_embeddings=128, tie_word_embeddings=True),
    # fused qkv_proj and gate_up_proj, GQA 6:2 with head dim 8, half rotary, sliding window shorter than the prompt
    "phi3": lambda: Phi3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                               num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.5,
                               sliding_window=9, max_position_embeddings=128, original_max_position_embeddings=128,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    # q/k norms over whole projections, norms after attention and MLP; 3 heads over 1 kv head, tied embeddings
    "olmo2": lambda: Olmo2Config(vocab_size=VOCAB, hidden_size=42, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True),
    # sliding (window 6, shorter than the prompts) / global / sliding layers, each kind with its own rotary (global:
    # linear scaling), 3 heads over 1 kv head of dim 10, query_pre_attn_scalar 24, final logit soft-capping, tied
    "gemma3": lambda: Gemma3TextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                       num_attention_heads=3, num_key_value_heads=1, head_dim=10,
                                       query_pre_attn_scalar=24, sliding_window=6,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                       rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                           "rope_theta": 50000.0},
                                                        "sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 5000.0}},
                                       final_logit_softcapping=30.0, max_position_embeddings=128, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2),
    # attention logit soft-capping low enough to bite (2.5: the scores of these weights reach past it), sliding (window
    # 5, shorter than the prompts) / global / sliding layers under one rotary, 6 heads over 2 kv heads of dim 10 (not
    # hidden / heads; 3 and 1 per rank under TP 2), query_pre_attn_scalar 20, final soft-capping, untied head
    "gemma2": lambda: Gemma2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=10, query_pre_attn_scalar=20,
                                   sliding_window=5, layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention"],
                                   attn_logit_softcapping=2.5, final_logit_softcapping=8.0, rope_theta=20000.0,
                                   max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False),
    # mixture of experts, top-2 of 6 renormalised, in every layer; 5 heads over 1 kv head of dim 8, sliding window 9
    # shorter than prompt + answer
    "mixtral": lambda: MixtralConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=5, num_key_value_heads=1, num_local_experts=6,
                                     num_experts_per_tok=2, sliding_window=9, max_position_embeddings=128,
                                     rope_theta=20000.0, tie_word_embeddings=False),
    # top-2 of 6 experts not renormalised, per-head q/k norms, a dense layer between two MoE layers (mlp_only_layers),
    # GQA 6:2 with head dim 10, tied embeddings; hidden and expert widths multiples of 8: HF 5.25 runs
    # its experts with torch.grouped_mm on CPU, which needs 16-byte strides in bf16
    "qwen3_moe": lambda: Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=48,
                                        moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=6,
                                        num_key_value_heads=2, head_dim=10, num_experts=6, num_experts_per_tok=2,
                                        norm_topk_prob=False, mlp_only_layers=[1], max_position_embeddings=128,
                                        tie_word_embeddings=True),
    # a shared expert under a sigmoid gate beside top-3 of 6 renormalised experts, dense first layer
    # (decoder_sparse_step 2), q/k/v bias, GQA 4:2, untied head
    "qwen2_moe": lambda: Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                        moe_intermediate_size=16, shared_expert_intermediate_size=28,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                        decoder_sparse_step=2, max_position_embeddings=128,
                                        tie_word_embeddings=False),
    # word_embed_proj_dim != hidden_size (project_in/out), learned positions offset by 2
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                             eos_token_id=2),
    # post-norm OPT (as opt-350m)
    "opt_post_norm": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=40, ffn_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, do_layer_norm_before=False,
                                       max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    # Conv1D layout, head dim 10
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=0, eos_token_id=0),
    # partial rotary (a quarter of head dim 16), parallel residual
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                      max_position_embeddings=128, rotary_emb_base=7000, bos_token_id=0,
                                      eos_token_id=0),
    # sequential residual, half rotary of head dim 12
    "gpt_neox_seq": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                          num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False,
                                          max_position_embeddings=128, bos_token_id=0, eos_token_id=0),
}


def tiny_model(name: str, tmp_path, seed: int = 0, dtype=torch.float32):
    """Build the named config with random weights, save it, and load it back from disk."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    # larger-than-default init spreads the logits, so greedy choices are not near-ties
    # and norm weights moved off their init (ones, or zeros for Gemma's 1 + w), so a norm read wrongly shows
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif param_name.endswith("weight"):  # 1-D weights are the norms'
                p.add_(torch.randn_like(p), alpha=0.1)
    path = tmp_path / name
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def left_padded_prompts(batch_lengths: list[int], pad_id: int, seed: int = 1, low: int = 3):
    """Random prompts of the given lengths, left padded to the longest: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    P = max(batch_lengths)
    ids = torch.full((len(batch_lengths), P), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(batch_lengths):
        ids[i, P - n:] = torch.randint(low, VOCAB, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def hf_logprobs(model, sequences, attention_mask, prompt_len, temperature: float = 1.0):
    """log softmax(logits / T) of the Hugging Face forward at each token after the prompt: (B, N)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions).logits.float()
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1] / temperature, dim=-1)
    return logp.gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)


def assert_stops_at_first_eos(out, prompt_len: int, eos: int, pad: int) -> list[int]:
    """Each row of a GenerationOutput ends at its first EOS: action_mask True up to and including it, then pad
    tokens and logprob 0. Returns each row's number of unmasked new tokens."""
    new = out.sequences[:, prompt_len:]                                          # (B, N)
    stops = []
    for row in range(new.shape[0]):
        hits = (new[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else new.shape[1]
        where = f"row {row}, {stop} new tokens up to its first EOS"
        assert out.action_mask[row, :stop].all() and not out.action_mask[row, stop:].any(), \
            f"{where}: action_mask {out.action_mask[row].int().tolist()}"
        assert (new[row, stop:] == pad).all(), f"{where}: tokens {new[row].tolist()}, pad {pad}"
        assert (out.logprobs[row, stop:] == 0).all(), f"{where}: logprobs {out.logprobs[row].tolist()}"
        stops.append(stop)
    return stops


def eos_produced_mid_generation(new_tokens: torch.Tensor) -> int:
    """A token that some row of an EOS-free run (new_tokens: (B, N)) produces for the first time and later follows
    with another token: taken as EOS it stops that row before the end, and the stop changes what comes after even
    when pad id == EOS id (tiny random models often repeat one token to the end). A token first produced at step 1
    or later is preferred, so the stop happens in a decode step; step 0 (the prefill's token) is the fallback."""
    B, N = new_tokens.shape
    for step in [*range(1, N - 1), 0]:
        for row in range(B):
            token = new_tokens[row, step]
            if not (new_tokens[row, :step] == token).any() and (new_tokens[row, step + 1:] != token).any():
                return int(token)
    raise AssertionError(f"no row of {new_tokens.tolist()} produces a token that could stop it before the end")


def assert_logprobs_match_forward(model, out, attention_mask, temperature: float = 1.0) -> None:
    """A GenerationOutput's logprobs equal log softmax(logits / T) of the Hugging Face forward where action_mask is
    True and are 0 where it is False. attention_mask: (B, P), the prompts'."""
    ones = torch.ones_like(out.action_mask, dtype=attention_mask.dtype)                  # (B, N)
    full_mask = torch.cat([attention_mask, ones], dim=1)                                # (B, P + N)
    ref = hf_logprobs(model, out.sequences, full_mask, attention_mask.shape[1], temperature)  # (B, N)
    torch.testing.assert_close(out.logprobs, ref.masked_fill(~out.action_mask, 0.0), atol=1e-5, rtol=0)


def save_word_actor(path, config=None):
    """A tiny actor with the tiny preset's word tokenizer, saved to `path` (bad-input, reward-function and CLI tests
    need a real checkpoint, not a good one): a one-layer Llama, or `config` (a tiny config of any family, or the name
    of one of CONFIGS) with its vocabulary and special ids made the tokenizer's. Returns (config, tokenizer)."""
    from rlhf.cli.presets import build_word_tokenizer

    tokenizer = build_word_tokenizer()
    if config is None:
        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=64)
    elif isinstance(config, str):
        config = CONFIGS[config]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return config, tokenizer
