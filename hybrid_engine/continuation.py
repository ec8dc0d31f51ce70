"""Continued rows (issue 22): what generate(keep_cache=True) keeps of each row, and the next turn of chosen rows.

Each row's KV cache is its trajectory written compactly after its left pad: prompt, answer up to its stop token,
appended tokens (an observation, a tool response, a user turn), the next answer, ... A row's slot s then holds its
token at position s - offset (offset: the prompt's pads), so its positions count its real tokens and a sliding
window over slots is one over positions, as in the training forward over the compact trajectory.

A row's last generated token is not in the cache yet (the decode loop writes a token when it feeds it, and the last
one is never fed): it is kept `pending` and written first at the next turn, before the appended tokens. That is
one extra token per row in the next prefill, and the rule holds whether the loop stopped at an EOS, at
max_new_tokens, or (the compiled step) a few steps after every row had stopped.

The kernels read cache rows [0, R): the chosen rows' caches are moved to the first rows, in the order given,
before a turn (only rows not already in place are copied, only their used slots).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .generation import GenerationOutput, SamplingParams, decode_loop, prompt_masks
from .models import InferenceModel


@dataclass
class KeptRows:
    key_mask: torch.Tensor   # (B, S_max) bool: False on the prompt's pads, True on every later slot
    offset: torch.Tensor     # (B,) long: slot - position of the row's tokens (its prompt's pads)
    cached: torch.Tensor     # (B,) long: slots holding the row's tokens, its pending token excluded
    pending: torch.Tensor    # (B,) long: the row's last generated token, not yet in the cache
    physical: list[int]      # the cache row holding each row's cache

    @classmethod
    def after_generate(cls, attention_mask: torch.Tensor, out: GenerationOutput, max_seq_len: int) -> KeptRows:
        """The rows of a generate() whose prompts had attention_mask (B, P) and whose output is `out`."""
        B, P = attention_mask.shape
        key_mask, _ = prompt_masks(attention_mask, max_seq_len)                   # (B, S_max)
        new = out.action_mask.sum(1)                                              # (B,) >= 1
        rows = torch.arange(B, device=new.device)
        return cls(key_mask, P - attention_mask.long().sum(1), P + new - 1, out.sequences[rows, P + new - 1],
                   list(range(B)))

    @property
    def batch_size(self) -> int:
        return len(self.physical)

    def length(self, row: int) -> int:
        """The row's tokens, its left pad included: the slots its cache will hold."""
        return int(self.cached[row]) + 1


def check_rows(kept: KeptRows | None, rows, tokens, max_new_tokens: int, max_seq_len: int) -> list[int]:
    """The chosen rows as a list, after one-line errors for what cannot be continued."""
    if kept is None:
        raise ValueError("continue_rows: no kept rows: call generate(..., keep_cache=True) first (release_memory(), "
                         "score() and a new generate() drop them)")
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
    B = kept.batch_size
    if not rows:
        raise ValueError("continue_rows: rows is empty: expected at least one row to continue")
    bad = [r for r in rows if not 0 <= r < B]
    if bad:
        raise ValueError(f"continue_rows: rows {bad} out of range: the kept batch has rows 0..{B - 1}")
    if len(set(rows)) != len(rows):
        raise ValueError(f"continue_rows: rows {rows} repeat a row")
    if len(tokens) != len(rows):
        raise ValueError(f"continue_rows: {len(tokens)} token lists for {len(rows)} rows: expected one per row")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    for row, appended in zip(rows, tokens):
        if len(appended) < 1:
            raise ValueError(f"continue_rows: row {row}: no tokens to append: expected at least 1")
        length = kept.length(row)
        if length + len(appended) + max_new_tokens > max_seq_len:
            raise ValueError(f"continue_rows: row {row}: its length {length} + {len(appended)} appended tokens + "
                             f"max_new_tokens {max_new_tokens} exceeds max_seq_len {max_seq_len}")
    return rows


def arrange(cache: KVCache, kept: KeptRows, rows: list[int]) -> None:
    """Move the caches of `rows` to cache rows 0..R-1 in that order (the others after them), copying only the rows
    that move and only the slots they use."""
    order = rows + sorted((r for r in range(kept.batch_size) if r not in rows), key=lambda r: kept.physical[r])
    src = [kept.physical[r] for r in order]             # src[i]: the cache row holding what cache row i must hold
    moved = [i for i, s in enumerate(src) if s != i]
    if moved:
        used = max(int(kept.cached[order[i]]) for i in moved)
        dst_idx = torch.tensor(moved, device=cache.k.device)
        src_idx = torch.tensor([src[i] for i in moved], device=cache.k.device)
        for t in (cache.k, cache.v):                    # (L, B_max, Hkv, S_max, D); the gather copies first
            t[:, dst_idx, :, :used] = t[:, src_idx, :, :used]
    for i, r in enumerate(order):
        kept.physical[r] = i


def right_padded(rows: list[int], kept: KeptRows, tokens: Sequence[Sequence[int]], pad_token_id: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's block, its pending token then its appended tokens, right padded: ((R, T) ids, (R,) lengths)."""
    blocks = [[int(kept.pending[r])] + [int(t) for t in appended] for r, appended in zip(rows, tokens)]
    T = max(len(b) for b in blocks)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long, device=device)
    for i, block in enumerate(blocks):
        ids[i, :len(block)] = torch.tensor(block, dtype=torch.long, device=device)
    return ids, torch.tensor([len(b) for b in blocks], dtype=torch.long, device=device)


@torch.inference_mode()
def continue_rows(model: InferenceModel, cache: KVCache, kept: KeptRows, rows: list[int],
                  tokens: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams,
                  eos_ids: torch.Tensor | None, pad_token_id: int, static=None) -> GenerationOutput:
    """Prefill each chosen row's pending and appended tokens at its own offset, then generate its next turn (through
    `static`, a StaticDecoder, when given). Returns the new tokens (R, N) and updates `kept` for the next turn."""
    device = kept.cached.device
    S = cache.max_seq_len
    arrange(cache, kept, rows)
    index = torch.tensor(rows, device=device)
    block, lengths = right_padded(rows, kept, tokens, pad_token_id, device)        # (R, T), (R,)
    T = block.shape[1]
    starts, offset, key_mask = kept.cached[index], kept.offset[index], kept.key_mask[index]  # (R,) (R,) (R, S)
    slots = torch.arange(S, device=device)
    # a pad past a row's block may sit past the cache's end: its position only has to be a valid index
    positions = (starts[:, None] + slots[None, :T] - offset[:, None]).clamp_(0, S - 1)   # (R, T)
    ends = starts + lengths                                                         # (R,) first slot after the block
    first_free = int(starts.max())
    span = min(S, first_free + T)
    real = key_mask[:, :span] & (slots[None, :span] < ends[:, None])               # (R, span): pads False
    logits = model.forward_rows(block, positions, cache, starts, span, real, last=lengths - 1)  # (R, V)
    next_pos = ends - offset                                                        # (R,)
    if static is not None:
        new = static.decode(model, cache, logits, key_mask, ends, next_pos, max_new_tokens, params, eos_ids,
                            pad_token_id)
    else:
        last_slot = int(ends.max())

        def step(tok: torch.Tensor, t: int) -> torch.Tensor:
            return model.forward_rows(tok[:, None], (next_pos + t)[:, None], cache, ends + t, last_slot + t + 1,
                                      key_mask)

        new = decode_loop(logits, step, max_new_tokens, params, eos_ids, pad_token_id)
    count = new.action_mask.sum(1)                                                  # (R,) >= 1
    kept.cached[index] = ends + count - 1
    kept.pending[index] = new.sequences[torch.arange(len(rows), device=device), count - 1]
    return new


@dataclass
class ReprefillRows:
    """What generate(keep_cache=True) keeps on the Hugging Face fallback (a family the engine does not serve): each
    row's compact tokens (prompt, then each turn up to its stop token, and what was appended), re-prefilled whole by
    every continue_rows, as Hugging Face's own tool loops do. Slower, the same tokens and logprobs."""
    tokens: list[list[int]]

    @classmethod
    def after_generate(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       out: GenerationOutput) -> ReprefillRows:
        new = out.sequences[:, input_ids.shape[1]:]
        return cls([row[m.bool()].tolist() + n[a].tolist()
                    for row, m, n, a in zip(input_ids, attention_mask, new, out.action_mask)])

    def continue_rows(self, hf_generate, rows, tokens, max_new_tokens: int, params: SamplingParams, eos_token_id,
                      pad_token_id: int, max_seq_len: int, device: torch.device) -> GenerationOutput:
        rows = [int(r) for r in rows]
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < len(self.tokens) for r in rows):
            raise ValueError(f"continue_rows: rows must be distinct indices in [0, {len(self.tokens)}), got {rows}")
        if len(tokens) != len(rows) or not all(len(t) for t in tokens):
            raise ValueError("continue_rows: one non-empty token list per row expected")
        seqs = [self.tokens[r] + [int(t) for t in tok] for r, tok in zip(rows, tokens)]
        width = max(map(len, seqs))
        for r, seq in zip(rows, seqs):
            if len(seq) + max_new_tokens > max_seq_len:
                raise ValueError(f"continue_rows: row {r} holds {len(seq) - len(tokens[rows.index(r)])} tokens; with "
                                 f"{len(tokens[rows.index(r)])} appended and {max_new_tokens} new it exceeds "
                                 f"max_seq_len {max_seq_len}")
        ids = torch.tensor([[pad_token_id] * (width - len(q)) + q for q in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs], device=device)
        out = hf_generate(ids, mask, max_new_tokens, params, eos_token_id, pad_token_id)
        new = out.sequences[:, width:]
        for i, r in enumerate(rows):
            self.tokens[r] = seqs[i] + new[i][out.action_mask[i]].tolist()
        return GenerationOutput(new, out.logprobs, out.action_mask)
