"""Prefill + decode loop over the preallocated KV cache: greedy or sampled tokens, per-row stop at EOS,
logprobs of the chosen tokens and the action mask."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import KVCache
from .logprobs import token_logprobs
from .models import InferenceModel


@dataclass
class GenerationOutput:
    sequences: torch.Tensor    # (B, P + N) long: the prompts as given (left or right padded), then the new tokens
                               # (continue_rows: (R, N), the new tokens only)
    logprobs: torch.Tensor     # (B, N) float: log softmax(logits / temperature) at each new token, 0 after EOS
    action_mask: torch.Tensor  # (B, N) bool: new tokens up to and including EOS


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 0               # 0 or None: off
    top_p: float = 1.0
    generator: torch.Generator | None = None
    min_p: float = 0.0                  # keep tokens of probability >= min_p x the top token's (0: off)
    repetition_penalty: float = 1.0     # Hugging Face's, over the prompt's and the new tokens' ids (1: off)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0


class RepetitionPenalty:
    """Hugging Face's RepetitionPenaltyLogitsProcessor over each row's tokens so far (its prompt as given, pads
    included, as HF's input_ids are, then its new tokens): a seen token's logit is divided by `penalty` where
    positive and multiplied by it where negative. Kept as a (B, V) mask of seen ids, updated with each choice."""

    def __init__(self, penalty: float, prompt_ids: torch.Tensor, vocab: int):
        self.penalty = penalty
        self.seen = torch.zeros(prompt_ids.shape[0], vocab, dtype=torch.bool, device=prompt_ids.device)  # (B, V)
        self.seen.scatter_(1, prompt_ids, True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)       # (B, V)
        return torch.where(self.seen, penalized, logits)

    def update(self, tokens: torch.Tensor) -> None:
        self.seen.scatter_(1, tokens[:, None], True)


def filter_logits(scores: torch.Tensor, top_k: int | None, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, outside the nucleus of mass top_p (Hugging Face's
    semantics: the smallest set whose probability exceeds top_p, at least one token) and, after both, below
    min_p times the top probability (HF's MinPLogitsWarper, applied last as HF does). scores: (B, V)."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]                # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)                        # (B, V) ascending
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1] = False                                              # keep the most likely
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(dim=-1)                                            # (B, V)
        scores = scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, params: SamplingParams,
                penalty: RepetitionPenalty | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; returns (tokens (B,), logprobs (B,)) with logprobs of softmax(logits / T).
    The repetition penalty changes the choice only: the logprobs stay the training forward's (the contract)."""
    scores = penalty.apply(logits) if penalty is not None else logits                    # (B, V)
    if params.do_sample:
        scores = scores / params.temperature if params.temperature != 1.0 else scores   # (B, V) fp32
        probs = filter_logits(scores, params.top_k, params.top_p, params.min_p).softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=params.generator).squeeze(-1)
    else:
        tokens = scores.argmax(dim=-1)
    if penalty is not None:
        penalty.update(tokens)
    return tokens, token_logprobs(logits, tokens, params.temperature)


def prompt_masks(attention_mask: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_mask (B, S_max) bool: True on the prompt's real tokens and on every slot after it; positions (B, P)
    long: each real token's index among its row's real tokens, the rule Hugging Face's forward applies to a
    left-padded row), for left-padded prompts with attention_mask (B, P)."""
    B, P = attention_mask.shape
    key_mask = torch.zeros(B, max_seq_len, dtype=torch.bool, device=attention_mask.device)  # (B, S_max)
    key_mask[:, :P] = attention_mask.bool()
    key_mask[:, P:] = True
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)                # (B, P)
    return key_mask, positions


@torch.inference_mode()
def generate(model: InferenceModel, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             max_new_tokens: int, params: SamplingParams, eos_ids: torch.Tensor | None,
             pad_token_id: int) -> GenerationOutput:
    """Generate up to max_new_tokens after left-padded prompts. Stops early once every row has hit EOS, so
    N (the number of new-token columns) may be smaller than max_new_tokens, as with Hugging Face."""
    P = input_ids.shape[1]
    key_mask, positions = prompt_masks(attention_mask, cache.max_seq_len)          # (B, S_max), (B, P)
    logits = model.forward(input_ids, positions, cache, 0, key_mask)              # (B, V)
    next_pos = positions[:, -1:] + 1                                               # (B, 1)

    def step(tok: torch.Tensor, t: int) -> torch.Tensor:  # every row writes slot P + t: prompts are left padded
        return model.forward(tok[:, None], next_pos + t, cache, P + t, key_mask)

    penalty = RepetitionPenalty(params.repetition_penalty, input_ids, logits.shape[-1]) if params.penalized else None
    new = decode_loop(logits, step, max_new_tokens, params, eos_ids, pad_token_id, penalty)
    return GenerationOutput(torch.cat([input_ids, new.sequences], dim=1), new.logprobs, new.action_mask)


def decode_loop(logits: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor], max_new_tokens: int,
                params: SamplingParams, eos_ids: torch.Tensor | None, pad_token_id: int,
                penalty: RepetitionPenalty | None = None) -> GenerationOutput:
    """Choose up to max_new_tokens per row from the prefill's last logits (B, V), feeding the tokens chosen at
    step t through `step(tokens (B,), t)` for the next logits; each row stops at its first EOS, and the loop once
    every row has. Returns sequences (B, N): the new tokens only (pad after a row's stop)."""
    B = logits.shape[0]
    device = logits.device
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    action_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        tok, logp = next_tokens(logits, params, penalty)
        alive = ~finished
        tok = torch.where(alive, tok, pad_token_id)
        tokens[:, t] = tok
        logprobs[:, t] = torch.where(alive, logp, 0.0)
        action_mask[:, t] = alive
        steps = t + 1
        if eos_ids is not None:
            finished |= torch.isin(tok, eos_ids)
            # one host sync per step buys the early exit; a CUDA-graph decode would check every k steps
            if bool(finished.all()):
                break
        if t + 1 == max_new_tokens:
            break
        logits = step(tok, t)
    return GenerationOutput(tokens[:, :steps], logprobs[:, :steps].contiguous(), action_mask[:, :steps].contiguous())
