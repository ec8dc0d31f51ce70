"""Tokenized datasets and collators for the three steps.

- Step 1 (SFT): prompt + answer + EOS, RIGHT-padded; labels are -100 on the prompt and on padding, so the
  loss is the answer's only.
- Step 2 (RM, DPO): (chosen, rejected) sequences; a batch of B pairs is one (2B, T) tensor, the B chosen rows
  first, then the B rejected rows (DeepSpeed-Chat's layout), right-padded. Its labels are -100 on the shared
  prompt and on padding, as step 1's, so DPO sums the answer's logprobs only; the reward model ignores them.
- Step 3 (PPO): prompts only, LEFT-padded so every row's generation starts at the same column; prompts
  longer than ``max_prompt_len`` tokens are dropped and counted.

Prompts are formatted with the tokenizer's chat template when it has one, else as
``"Human: {prompt}\\n\\nAssistant:"``; an hh-rlhf prompt already ends with "Assistant:" and is used as is.
Prompt and answer are tokenized separately and concatenated, so the prompt/answer boundary is exact
whatever the tokenizer merges.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from rlhf.data.formats import DataError, Example

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Human: {prompt}\n\nAssistant:"
IGNORE_INDEX = -100  # labels with this value are skipped by the cross-entropy of HF causal LMs


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat(turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def format_prompt(tokenizer, prompt: str, messages: tuple = ()) -> str:
    """The text the model sees before its answer; ``messages``: a conversational record's turns, which the
    tokenizer's chat template writes when it has one (``prompt`` holds them hh-rlhf style otherwise)."""
    if messages and _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(_chat(messages), tokenize=False, add_generation_prompt=True)
    if prompt.rstrip().endswith("Assistant:"):  # an hh-rlhf dialogue carries its own turns
        return prompt
    if _has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return DEFAULT_TEMPLATE.format(prompt=prompt)


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def encode_prompt(tokenizer, prompt: str, messages: tuple = ()) -> list[int]:
    """Token ids of the formatted prompt (with BOS when the tokenizer adds one and no chat template did)."""
    text = format_prompt(tokenizer, prompt, messages)
    # A chat template writes its own BOS; adding special tokens again would double it.
    templated = _has_chat_template(tokenizer) and (bool(messages) or not prompt.rstrip().endswith("Assistant:"))
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer followed by EOS (the reward model scores the EOS position)."""
    text = answer if _has_chat_template(tokenizer) else " " + answer.lstrip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        if len(row):
            if left:
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _mask(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left=left)


class SFTDataset(Dataset):
    """(input_ids, labels) per example; ``collate`` right-pads a batch."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], pad_id: int, num_dropped: int = 0):
        self.rows, self.pad_id, self.num_dropped = rows, pad_id, num_dropped

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.rows[i]

    def collate(self, batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids = [b[0] for b in batch]
        return {
            "input_ids": _pad(ids, self.pad_id),  # (B, T)
            "attention_mask": _mask(ids),  # (B, T)
            "labels": _pad([b[1] for b in batch], IGNORE_INDEX),  # (B, T)
        }


class PairDataset(Dataset):
    """(chosen_ids, rejected_ids, prompt_len) per pair, both sequences starting with the same ``prompt_len``
    prompt tokens; ``collate`` gives (2B, T) input_ids, attention_mask and labels: chosen rows, then rejected
    rows, labels -100 on the prompt and on padding."""

    def __init__(self, rows: list[tuple[list[int], list[int], int]], pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], int]:
        return self.rows[i]

    def collate(self, batch: list[tuple[list[int], list[int], int]]) -> dict[str, torch.Tensor]:
        seqs = [b[0] for b in batch] + [b[1] for b in batch]
        prompt_lens = [b[2] for b in batch] * 2
        labels = [[IGNORE_INDEX] * min(n, len(seq)) + seq[n:] for seq, n in zip(seqs, prompt_lens)]
        return {"input_ids": _pad(seqs, self.pad_id), "attention_mask": _mask(seqs),
                "labels": _pad(labels, IGNORE_INDEX)}  # (2B, T) each


class PromptDataset(Dataset):
    """Prompt token ids; ``collate`` LEFT-pads and gives each row's ``index`` into ``prompts`` and ``fields``
    (what a reward function is handed). ``num_dropped`` counts prompts over the length limit."""

    def __init__(self, rows: list[list[int]], pad_id: int, num_dropped: int = 0, prompts: list[str] | None = None,
                 fields: list[dict] | None = None):
        self.rows, self.pad_id, self.num_dropped = rows, pad_id, num_dropped
        self.prompts = prompts or []  # the raw prompt texts, aligned with rows
        self.fields = fields or [{} for _ in rows]  # each record's other fields, aligned with rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        return {"input_ids": _pad(rows, self.pad_id, left=True), "attention_mask": _mask(rows, left=True),
                "index": torch.tensor(indices, dtype=torch.long)}  # (B, T), (B, T), (B,)


UNKNOWN_TOKEN_LIMIT = 0.05  # a share of unknown tokens above which the model cannot see what the data says
_warned_unknown: weakref.WeakSet = weakref.WeakSet()  # tokenizers already warned about: once per run, not per set


def warn_unknown_tokens(tokenizer, rows: Sequence[Sequence[int]], what: str) -> None:
    """Warn (once per tokenizer) when more than UNKNOWN_TOKEN_LIMIT of the tokens of ``rows`` are the tokenizer's
    unknown token: the tiny preset's word-level tokenizer maps most words of real data to it."""
    unk = getattr(tokenizer, "unk_token_id", None)
    total = sum(len(ids) for ids in rows)
    if unk is None or not total or tokenizer in _warned_unknown:
        return
    share = sum(ids.count(unk) for ids in rows) / total
    if share > UNKNOWN_TOKEN_LIMIT:
        _warned_unknown.add(tokenizer)
        name = getattr(tokenizer, "name_or_path", "") or f"{type(tokenizer).__name__}, {len(tokenizer)} tokens"
        logger.warning("%.0f%% of the tokens of the %s are the unknown token %s of the tokenizer '%s': the model "
                       "cannot see what this data says. For real data train a real model (--actor-model, or "
                       "--model-name-or-path; e.g. HuggingFaceTB/SmolLM2-135M-Instruct) instead of the tiny preset's "
                       "word tokenizer, which knows only the synthetic task's words",
                       100 * share, what, tokenizer.unk_token, name)


def build_sft_dataset(tokenizer, examples: Sequence[Example], max_seq_len: int = 512) -> SFTDataset:
    """Prompt + chosen answer, truncated to ``max_seq_len``; an example whose prompt fills it is dropped."""
    rows, dropped = [], 0
    for ex in examples:
        prompt_ids, answer_ids = encode_prompt(tokenizer, ex.prompt, ex.messages), encode_answer(tokenizer, ex.chosen)
        if len(prompt_ids) >= max_seq_len:  # nothing of the answer would be left to learn from
            dropped += 1
            continue
        ids = (prompt_ids + answer_ids)[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_seq_len]
        rows.append((ids, labels))
    if dropped:
        logger.warning(
            "SFT: dropped %d of %d examples whose prompt fills max_seq_len=%d", dropped, len(examples), max_seq_len
        )
    warn_unknown_tokens(tokenizer, [ids for ids, _ in rows], "SFT examples")
    return SFTDataset(rows, pad_token_id(tokenizer), dropped)


def build_pair_dataset(tokenizer, examples: Sequence[Example], max_seq_len: int = 512) -> PairDataset:
    """(prompt + chosen, prompt + rejected), each truncated to ``max_seq_len``; SFT-only examples are skipped.

    A pair whose two sequences are the same (as written, once tokenized, or once truncated) carries no preference:
    such pairs are dropped with one warning giving the counts, and a DataError is raised when none is left."""
    rows, tokenized, pairs = [], [], 0
    same = {"as written": 0, "once tokenized": 0, f"once truncated to --max-seq-len {max_seq_len}": 0}
    reasons = list(same)
    for ex in examples:
        if ex.rejected is None:
            continue
        pairs += 1
        if ex.chosen == ex.rejected:
            same[reasons[0]] += 1
            continue
        prompt_ids = encode_prompt(tokenizer, ex.prompt, ex.messages)
        chosen, rejected = encode_answer(tokenizer, ex.chosen), encode_answer(tokenizer, ex.rejected)
        tokenized += [prompt_ids + chosen, prompt_ids + rejected]
        if chosen == rejected:  # e.g. a word-level tokenizer that maps both answers' words to <unk>
            same[reasons[1]] += 1
            continue
        chosen, rejected = (prompt_ids + chosen)[:max_seq_len], (prompt_ids + rejected)[:max_seq_len]
        if chosen == rejected:
            same[reasons[2]] += 1
            continue
        rows.append((chosen, rejected, len(prompt_ids)))
    warn_unknown_tokens(tokenizer, tokenized, "preference pairs")  # first: it may be why the pairs are the same
    dropped = sum(same.values())
    if dropped:
        why = ", ".join(f"{count} identical {reason}" for reason, count in same.items() if count)
        if not rows:
            raise DataError(f"none of the {pairs} preference pairs has a chosen answer that differs from the rejected "
                            f"one ({why}); expected pairs whose answers differ"
                            + (" (a longer --max-seq-len keeps more of each answer)" if same[reasons[2]] else ""))
        logger.warning("dropped %d of %d preference pairs whose chosen and rejected answers are the same (%s): they "
                       "carry no preference", dropped, pairs, why)
    return PairDataset(rows, pad_token_id(tokenizer))


def build_prompt_dataset(tokenizer, examples: Sequence[Example], max_prompt_len: int = 256) -> PromptDataset:
    """Step-3 prompts; those longer than ``max_prompt_len`` tokens are dropped, counted and logged."""
    rows, prompts, fields, dropped = [], [], [], 0
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.prompt, ex.messages)
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        rows.append(ids)
        prompts.append(ex.prompt)
        fields.append(ex.fields)
    if dropped:
        logger.warning(
            "PPO: dropped %d of %d prompts longer than max_prompt_len=%d tokens",
            dropped,
            len(examples),
            max_prompt_len,
        )
    warn_unknown_tokens(tokenizer, rows, "step-3 prompts")
    return PromptDataset(rows, pad_token_id(tokenizer), dropped, prompts, fields)
