"""Rollout correction: per-token weights on the policy loss for the gap between the policy that generated (the
inference engine's numbers, ``rollout_logprobs``) and the policy the update treats as "old" (the training forward's
``old_logprobs``, same weights). In fp32 the two agree to ~1e-5 and the weights are 1; in bf16 they differ by up to
0.2 nats per token (benchmarks/logprob_gap.py), and the sampled tokens are then off-policy for the trainer.

With ``k_t = exp(old_logprobs_t - rollout_logprobs_t)`` = p_train_old / p_rollout of the sampled token t of row i:

- ``tis``    token-level truncated IS: ``w_t = min(k_t, cap)`` (Yao et al. 2025, "Your efficient RL framework secretly
             brings you off-policy RL training"; cap ~2).
- ``mis``    sequence-level masked IS: ``rho_i = prod_t k_t``, ``w_t = rho_i`` if ``rho_i <= cap`` else 0 (the whole
             row masked; Liu et al. 2025, "When speed kills stability"; veRL's ``rollout_is=sequence`` with
             rejection).
- ``icepop`` IcePop's two-sided token mask (Ling team 2025): ``w_t = k_t`` if ``low <= k_t <= high`` else 0
             (bounds 0.5 and 5).

Every function takes (B, N) tensors and returns the weights (B, N), 1 (none) or 0 off the mask, detached. The
weights multiply the per-token policy loss of every algorithm (rlhf.core.losses.POLICY_LOSSES' ``weights``).
When the trainer's old logprobs ARE the rollout's (``--reuse-rollout-logprobs``) every ``k_t`` is 1: the trainer
therefore runs the training forward whenever a correction is on.
"""
from __future__ import annotations

import torch


def token_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) ``k_t = exp(old - rollout)`` on the mask, 1 off it (log-ratio zeroed before the exponent)."""
    return torch.exp((old_logprobs - rollout_logprobs).masked_fill(~action_mask.bool(), 0.0))


def tis(old_logprobs, rollout_logprobs, action_mask, cap: float = 2.0, low: float = 0.5, high: float = 5.0):
    return token_ratio(old_logprobs, rollout_logprobs, action_mask).clamp(max=cap) * action_mask


def mis(old_logprobs, rollout_logprobs, action_mask, cap: float = 2.0, low: float = 0.5, high: float = 5.0):
    mask = action_mask.bool()
    log_rho = (old_logprobs - rollout_logprobs).masked_fill(~mask, 0.0).sum(-1, keepdim=True)  # (B, 1)
    rho = torch.exp(log_rho)  # (B, 1); an inf is past any cap and becomes 0 below (where, no product)
    return torch.where(rho <= cap, rho, torch.zeros_like(rho)) * mask


def icepop(old_logprobs, rollout_logprobs, action_mask, cap: float = 2.0, low: float = 0.5, high: float = 5.0):
    k = token_ratio(old_logprobs, rollout_logprobs, action_mask)
    return torch.where((k >= low) & (k <= high), k, torch.zeros_like(k)) * action_mask


# --rollout-correction's choices besides "none": (old, rollout, action_mask, cap, low, high) -> weights (B, N)
CORRECTIONS = {"tis": tis, "mis": mis, "icepop": icepop}


@torch.no_grad()
def correction_weights(mode: str, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       action_mask: torch.Tensor, cap: float = 2.0, low: float = 0.5,
                       high: float = 5.0) -> tuple[torch.Tensor | None, dict]:
    """The weights (B, N) of correction ``mode`` (None for "none") and their statistics over the answer tokens:
    mean, min, max, the fraction masked (weight 0) and the fraction capped (the raw ratio above ``cap``, tis)."""
    if mode == "none":
        return None, {}
    if mode not in CORRECTIONS:
        raise ValueError(f"--rollout-correction {mode}: expected none or one of {', '.join(CORRECTIONS)}")
    mask = action_mask.bool()
    weights = CORRECTIONS[mode](old_logprobs.float(), rollout_logprobs.float(), mask, cap, low, high).float()
    on = weights[mask]
    if not on.numel():
        return weights, {}
    ratio = token_ratio(old_logprobs.float(), rollout_logprobs.float(), mask)[mask]
    return weights, {"correction_mean": on.mean().item(), "correction_min": on.min().item(),
                     "correction_max": on.max().item(), "correction_masked": (on == 0).float().mean().item(),
                     "correction_capped": (ratio > cap).float().mean().item() if mode == "tis" else 0.0}
