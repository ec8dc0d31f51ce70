"""The formula the project is built on: the logprob of a token under softmax(logits / temperature).

Every path that reports or trains on a token's logprob calls `token_logprobs`: the eager decode loop
(generation.py), the compiled decode step (static.py), the prefill-only `HybridEngine.score` and the Hugging Face
fallback (engine.py), and the training forwards of rlhf (rlhf/core/experience.py). One formula is what makes the
rollout's logprobs and the training forward's agree to the rounding of the forwards themselves.
"""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, in fp32.

    logits: (..., V) any float dtype; tokens: (...) long; returns (...) fp32. `temperature` is a float, or a 0-dim
    tensor (the compiled decode step keeps it a tensor, so a new temperature is not a new graph; dividing by 1.0 is
    exact, so the result is the same either way)."""
    logits = logits.float()
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
