"""Training forwards without padding waste: a batch of rollout rows split into micro-batches by a token budget,
each holding rows of similar length trimmed to its own longest row, or packed into one row whose positions restart
at every sequence.

A rollout batch is (B, P+N): prompts left padded to P columns, answers right padded to N. Row i's tokens are the
columns [start_i, end_i) (its mask's first and last 1), its answer the columns [P, end_i). A micro-batch lays its
rows out from column 0 (no left padding), so its width is its longest row, not the batch's longest prompt plus its
longest answer:

- **trimmed** (`pack=False`): b rows right padded to the micro-batch's longest row, a 2D attention mask. Every
  attention implementation and family takes it.
- **packed** (`pack=True`): the rows concatenated into one row, `position_ids` restarting at 0 at each row and no
  attention mask. Hugging Face (transformers >= 5) builds a block-diagonal causal mask from such positions for sdpa,
  eager and flex attention (`masking_utils.find_packed_sequence_indices`), and flash_attention_2/3 run their varlen
  kernel on them (`cu_seqlens` from the positions): per-sequence attention, no padding at all. On CPU the sdpa mask is
  dense (T x T for a packed row of T tokens), so attention costs grow with the square of the pack; see
  benchmarks/RESULTS.md for whether it pays.

Sorting the rows by length before cutting keeps rows of similar length together; the budget counts the tokens a
micro-batch's forward computes (rows x width, trimmed; the sum of lengths, packed). Outputs come back to the batch's
(b, N) answer layout (`MicroBatch.scatter`), zero off each row's answer, so the losses see the padded path's tensors.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Model types whose training forward builds its causal mask from `position_ids` when given no attention mask (the
# packed layout), checked against the padded forward by tests/test_microbatch.py.
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class MicroBatch:
    """One forward's input and where its outputs go. R is b (trimmed) or 1 (packed); K the answer columns kept."""
    rows: torch.Tensor                    # (b,) rows of the batch it holds
    input_ids: torch.Tensor               # (R, W)
    attention_mask: torch.Tensor | None   # (R, W) trimmed; None packed (the mask comes from position_ids)
    position_ids: torch.Tensor            # (R, W)
    keep: torch.Tensor                    # (R, K) columns whose output belongs to an answer token (logits_to_keep)
    labels: torch.Tensor                  # (R, K) the answer token each kept column predicts
    valid: torch.Tensor                   # (R, K) bool, kept columns that are a real answer position
    dest: torch.Tensor                    # (R, K) flat index into the (b, N) answer layout (0 where not valid)
    last: torch.Tensor                    # (b,) flat index into (R * W) of each row's last token (a reward score)
    width: int                            # N, the batch's answer columns
    ghost: bool = False                   # run only to keep ranks in step (Microbatching.align): no output, no loss

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(R, K) outputs at the kept columns -> (b, N) in the batch's answer layout, 0 elsewhere (differentiable)."""
        b = self.rows.shape[0]
        flat = torch.where(self.valid, values, 0.0).reshape(-1)                  # (R * K,)
        out = values.new_zeros(b * self.width).index_add(0, self.dest.reshape(-1), flat)
        return out.view(b, self.width)                                           # (b, N)

    def gather(self, per_column: torch.Tensor) -> torch.Tensor:
        """(R, W) per-column outputs (a critic's values) -> (R, K) at the kept columns."""
        return per_column.gather(1, self.keep)

    def last_values(self, per_column: torch.Tensor) -> torch.Tensor:
        """(R, W) per-column outputs -> (b,) at each row's last token (a reward model's score)."""
        return per_column.reshape(-1)[self.last]


@dataclass(frozen=True)
class Microbatching:
    """How a step-3 batch goes through the training forwards: `max_tokens` per forward (0: the whole batch as one
    padded forward, the path before this file), trimmed rows or `pack`ed ones. `align(n)`: how many micro-batches
    every rank runs given this rank's n (their maximum), where ranks must run as many forwards (ZeRO-3 gathers the
    parameters in each); a rank with fewer runs ghosts (copies of its last micro-batch, outputs dropped, loss
    weighed 0)."""
    max_tokens: int = 0
    pack: bool = False
    align: Callable[[int], int] | None = None

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0 or self.pack

    def plan(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> list[MicroBatch]:
        batches = plan(sequences, attention_mask, prompt_len, self.max_tokens, self.pack)
        count = self.align(len(batches)) if self.align is not None else len(batches)
        return batches + [dataclasses.replace(batches[-1], ghost=True)] * (count - len(batches))


def in_batch_order(batches: list[MicroBatch], outputs: list[torch.Tensor]) -> torch.Tensor:
    """Each micro-batch's (b, ...) outputs put back in the rows' order in the batch: (B, ...); ghosts' dropped."""
    kept = [(mb, out) for mb, out in zip(batches, outputs) if not mb.ghost]
    rows = torch.cat([mb.rows for mb, _ in kept])                               # (B,)
    return torch.cat([out for _, out in kept])[torch.argsort(rows)]


def row_spans(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) first column and one past the last column of each row's tokens (mask 1); (0, 0) for an empty row."""
    T = attention_mask.shape[1]
    on = attention_mask.bool()
    start = torch.where(on.any(1), on.long().argmax(1), torch.zeros_like(on[:, 0], dtype=torch.long))
    end = torch.where(on.any(1), T - on.flip(1).long().argmax(1), torch.zeros_like(start))
    return start, end


def split_rows(lengths: torch.Tensor, max_tokens: int, pack: bool) -> list[torch.Tensor]:
    """Rows (indices into `lengths`, (B,)) grouped into micro-batches of at most `max_tokens` tokens each, longest
    rows first, greedily: trimmed, a group costs rows x its longest row; packed, the sum of its lengths. A row longer
    than the budget goes alone. `max_tokens` 0: one group of every row."""
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    if max_tokens <= 0:
        return [torch.tensor(order, dtype=torch.long)]
    groups, current, longest, total = [], [], 0, 0
    for row in order:
        n = max(int(lengths[row]), 1)
        cost = (total + n) if pack else (len(current) + 1) * max(longest, n)
        if current and cost > max_tokens:
            groups.append(current)
            current, longest, total = [], 0, 0
        current.append(row)
        longest, total = max(longest, n), total + n
    groups.append(current)
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def plan(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, max_tokens: int,
         pack: bool = False) -> list[MicroBatch]:
    """The micro-batches of a (B, P+N) rollout batch under a budget of `max_tokens` tokens per forward (0: every
    row in one micro-batch, still laid out from column 0), trimmed or packed. Packing needs each row's tokens to
    be one run (no mask 0 between its first and last token): a batch with a gap is trimmed instead."""
    start, end = row_spans(attention_mask)
    lengths = end - start                                                        # (B,)
    if pack:
        inside = torch.arange(attention_mask.shape[1], device=start.device)[None]  # (1, T)
        span = (inside >= start[:, None]) & (inside < end[:, None])              # (B, T)
        pack = bool((attention_mask.bool() == span).all())
    layout = packed if pack else trimmed
    return [layout(sequences, attention_mask, prompt_len, start, end, rows.to(sequences.device))
            for rows in split_rows(lengths.cpu(), max_tokens, pack)]


def _answer_columns(prompt_len: int, start: torch.Tensor, end: torch.Tensor, width: int):
    """For rows with spans [start, end): K = the longest answer (at least 1), the answer index t (1, K), the column
    within the row (from its first token) predicting answer token t (b, K), and which t are real (b, K)."""
    answer = (end - prompt_len).clamp(min=0)                                     # (b,) answer tokens per row
    K = max(int(answer.max()) if answer.numel() else 0, 1)
    t = torch.arange(K, device=start.device)[None]                              # (1, K)
    valid = t < answer[:, None]                                                  # (b, K)
    column = (prompt_len - 1 - start)[:, None] + t                               # (b, K) predicts answer token t
    return t, column, valid


def trimmed(sequences, attention_mask, prompt_len, start, end, rows) -> MicroBatch:
    """Rows `rows` from column 0, right padded to the longest of them; positions count the mask's 1s."""
    N = sequences.shape[1] - prompt_len
    s, e = start[rows], end[rows]                                                # (b,)
    W = max(int((e - s).max()), 1)
    cols = (s[:, None] + torch.arange(W, device=s.device)[None]).clamp(max=sequences.shape[1] - 1)  # (b, W)
    inside = cols < e[:, None]
    ids = sequences[rows].gather(1, cols) * inside                               # (b, W)
    mask = attention_mask[rows].gather(1, cols) * inside
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)                     # as rlhf.models.position_ids_from_mask
    t, column, valid = _answer_columns(prompt_len, s, e, W)
    keep = column.clamp(0, W - 1)                                                # (b, K)
    labels = ids.gather(1, (keep + 1).clamp(max=W - 1)) * valid
    dest = (torch.arange(len(rows), device=s.device)[:, None] * N + t) * valid
    last = torch.arange(len(rows), device=s.device) * W + (e - s - 1).clamp(min=0)
    return MicroBatch(rows, ids, mask, position_ids, keep, labels, valid, dest, last, N)


def packed(sequences, attention_mask, prompt_len, start, end, rows) -> MicroBatch:
    """Rows `rows` concatenated into one row of their total length, positions restarting at 0 at each."""
    N = sequences.shape[1] - prompt_len
    s, e = start[rows], end[rows]                                                # (b,)
    lengths = (e - s).clamp(min=1)  # an empty row keeps one (pad) token so every row has a last token
    offset = torch.cumsum(lengths, 0) - lengths                                 # (b,) where each row begins
    total = int(lengths.sum())
    owner = torch.repeat_interleave(torch.arange(len(rows), device=s.device), lengths)  # (total,)
    position = torch.arange(total, device=s.device) - offset[owner]             # (total,) restarts at each row
    ids = sequences[rows[owner], (s[owner] + position).clamp(max=sequences.shape[1] - 1)]
    t, column, valid = _answer_columns(prompt_len, s, e, total)
    keep = (offset[:, None] + column).clamp(0, total - 1)                       # (b, K) in the packed row
    labels = ids[(keep + 1).clamp(max=total - 1)] * valid
    valid_flat = valid.reshape(1, -1)
    dest = ((torch.arange(len(rows), device=s.device)[:, None] * N + t) * valid).reshape(1, -1)
    return MicroBatch(rows, ids[None], None, position[None], keep.reshape(1, -1), labels.reshape(1, -1), valid_flat,
                      dest, offset + lengths - 1, N)
