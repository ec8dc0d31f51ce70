"""DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, sec. 3.2): a group whose answers all earned the same
reward has zero group-relative advantage on every token, so it only dilutes the batch; such groups are dropped and
more prompts are rolled out until the batch holds as many rows as one rollout (at most --max-extra-rollouts more
rollouts per round). Rows from several rollouts are joined here: prompts left-padded and answers right-padded to
the widest, so every per-token tensor keeps the (B, P+N) / (B, N) index convention of rlhf/core/experience.py.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from rlhf.core.experience import Experience


def informative_rows(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: rows of groups (consecutive `group_size` rows) whose scores are not all equal."""
    groups = scores.view(-1, group_size)                                   # (B/G, G)
    varied = (groups != groups[:, :1]).any(-1)                             # (B/G,)
    return varied.repeat_interleave(group_size)


def select_rows(exp: Experience, rows: torch.Tensor) -> Experience:
    """The experience's rows where `rows` (B,) is True (or at the given indices)."""
    return Experience(**{k: (v[rows] if torch.is_tensor(v) else v) for k, v in exp.__dict__.items()})


def _widen(v: torch.Tensor, P: int, N: int, width_P: int, width_N: int, fill: int) -> torch.Tensor:
    if v.dim() < 2:
        return v
    dtype = v.dtype
    v = v.long() if dtype == torch.bool else v
    if v.shape[1] == P + N:  # prompt columns left-padded, answer columns right-padded
        return F.pad(v, (width_P - P, width_N - N), value=fill).to(dtype)
    return F.pad(v, (0, width_N - N), value=0).to(dtype)  # (B, N): answer columns only


def concat(exps: list[Experience], pad_token_id: int) -> Experience:
    """One experience of the rows of `exps` in order (each a rollout's, with its own prompt and answer widths)."""
    width_P = max(e.prompt_len for e in exps)
    width_N = max(e.action_mask.shape[1] for e in exps)
    fields = {}
    for f in dataclasses.fields(Experience):
        values = [getattr(e, f.name) for e in exps]
        if f.name == "prompt_len":
            fields[f.name] = width_P
        elif any(v is None for v in values):
            fields[f.name] = None
        else:
            fields[f.name] = torch.cat([_widen(v, e.prompt_len, e.action_mask.shape[1], width_P, width_N,
                                               pad_token_id if f.name == "sequences" else 0)
                                        for v, e in zip(values, exps)])
    return Experience(**fields)
