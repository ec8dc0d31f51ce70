"""Advantage estimators of step 3, picked by name: pure functions of one rollout's tensors.

Every estimator takes an ``EstimatorInput`` and returns ``(advantages, returns)``, both (B, N), zero off the
action mask. Rows come in groups of ``group_size`` consecutive rows sampled from the same prompt
(``--n-samples-per-prompt``). Adding an estimator is one function with the ``@estimator`` decorator, its
formula and paper in the docstring, and a test against the formula written out on small tensors.

Notation over answer positions t of row i: ``m`` the action mask, ``r_t`` the per-token reward
(``rlhf.core.losses.kl_penalized_rewards``: the KL penalty where the algorithm puts KL in the reward, plus the clipped
score at the last token), ``s_i = sum_t r_t m_t`` the row's outcome (verl's and TRL's RLOO reading).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.core.losses import gae, masked_mean

EPS = 1e-6  # added to standard deviations, as verl and OpenRLHF do


@dataclass
class EstimatorInput:
    rewards: torch.Tensor        # (B, N) per-token rewards, 0 off the mask
    action_mask: torch.Tensor    # (B, N) bool
    scores: torch.Tensor         # (B,) the (clipped) reward score each row's rewards include at its last token
    group_size: int = 1          # rows per prompt, consecutive
    values: torch.Tensor | None = None  # (B, N) the critic's, for gae
    gamma: float = 1.0
    lam: float = 0.95
    std_normalization: bool = True  # grpo: divide by the group's std (Dr.GRPO: off)
    teacher_log_ratio: torch.Tensor | None = None  # (B, N) logp_teacher - logp of the sampled tokens (distill)


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[EstimatorInput], tuple[torch.Tensor, torch.Tensor]]
    needs_critic: bool   # a value model is trained beside the actor
    grouped: bool        # needs several samples per prompt (group_size >= 2)


ESTIMATORS: dict[str, Estimator] = {}


def estimator(name: str, needs_critic: bool = False, grouped: bool = False):
    def register(fn):
        ESTIMATORS[name] = Estimator(fn, needs_critic, grouped)
        return fn
    return register


def outcome(x: EstimatorInput) -> torch.Tensor:
    """(B,) each row's total reward ``s_i = sum_t r_t m_t``."""
    return (x.rewards * x.action_mask).sum(-1)


def groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / G, G); rows of one prompt are consecutive."""
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} rows do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, N): the row's value on each of its action tokens."""
    return per_row[:, None] * mask.to(per_row.dtype)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, N) ``G_t = sum_{k >= t} gamma^(j(k) - j(t)) r_k m_k`` over the action positions, j counting them (the
    environment's tokens between a multi-turn trajectory's turns are not steps), by a backward scan."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    masked = rewards * mask
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t].bool(), masked[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over every action token of the batch; 0 off the mask."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) / (var.sqrt() + EPS) * mask


@estimator("gae", needs_critic=True)
def gae_estimator(x: EstimatorInput) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438):
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lambda A_{t+1}``, ``R_t = A_t + V_t``;
    rewards and values past the end are 0 (DeepSpeed-Chat; not whitened)."""
    if x.values is None:
        raise ValueError("gae needs the critic's values")
    return gae(x.rewards, x.values, x.action_mask, x.gamma, x.lam)


@estimator("grpo", grouped=True)
def grpo(x: EstimatorInput) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's group-relative outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, sec. 4.1.2):
    ``A_i = (s_i - mean_g(s)) / (std_g(s) + eps)`` on every token of row i, std unbiased over the group.
    Without std normalization it is Dr.GRPO's ``s_i - mean_g(s)`` (Liu et al. 2025, arXiv:2503.20783).
    Returns equal the advantages (no critic)."""
    scores = groups(outcome(x), x.group_size)                             # (B/G, G)
    centred = scores - scores.mean(-1, keepdim=True)
    if x.std_normalization:
        centred = centred / (scores.std(-1, keepdim=True) + EPS)
    advantages = broadcast(centred.reshape(-1), x.action_mask)
    return advantages, advantages


@estimator("rloo", grouped=True)
def rloo(x: EstimatorInput) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740):
    ``A_i = s_i - mean_{j != i} s_j = G / (G - 1) * (s_i - mean_g(s))`` on every token of row i."""
    scores = groups(outcome(x), x.group_size)                             # (B/G, G)
    G = x.group_size
    baseline = (scores.sum(-1, keepdim=True) - scores) / (G - 1)
    advantages = broadcast((scores - baseline).reshape(-1), x.action_mask)
    return advantages, advantages


@estimator("reinforce++")
def reinforce_pp(x: EstimatorInput) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): per-token rewards with the KL penalty, discounted returns
    ``G_t = sum_{k >= t} gamma^(k-t) r_k``, advantages ``whiten(G)`` over the batch's action tokens; the
    returns are the raw ``G``."""
    returns = discounted_returns(x.rewards, x.action_mask, x.gamma)
    return whiten(returns, x.action_mask), returns


@estimator("reinforce++-baseline", grouped=True)
def reinforce_pp_baseline(x: EstimatorInput) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262, as in OpenRLHF): each row's reward score minus its
    group's mean score (at the row's last token; the KL penalty stays per token), discounted returns, then
    whitened over the batch's action tokens."""
    scores = groups(x.scores, x.group_size)                               # (B/G, G)
    group_mean = scores.mean(-1, keepdim=True).expand_as(scores).reshape(-1)  # (B,)
    mask = x.action_mask
    last = mask.long().cumsum(-1).argmax(-1)                               # (B,) last action column
    rewards = x.rewards.clone()
    rewards[torch.arange(len(last)), last] -= group_mean
    returns = discounted_returns(rewards, mask, x.gamma)
    return whiten(returns, mask), returns


@estimator("distill")
def distill(x: EstimatorInput) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy distillation (Agarwal et al. 2024, GKD, arXiv:2306.13649; Thinking Machines 2025, "On-policy
    distillation"): the student samples, the teacher scores the same tokens, and each token's advantage is the
    negative per-token reverse KL ``A_t = logp_teacher_t - logp_t`` on its own, undiscounted (the discount is 0: a
    token is credited with its own divergence only). With a task reward the row's score centred on the batch's
    mean is added on each of its tokens, ``+ (s_i - mean(s))`` (a REINFORCE outcome term with a batch baseline;
    the score is 0 for every row without a reward, so the term vanishes). Returns equal the advantages."""
    if x.teacher_log_ratio is None:
        raise ValueError("distill needs the teacher's logprobs (--teacher-model)")
    mask = x.action_mask.to(x.teacher_log_ratio.dtype)
    centred = x.scores - x.scores.mean() if x.scores.numel() else x.scores  # (B,)
    advantages = x.teacher_log_ratio * mask + broadcast(centred, x.action_mask)
    return advantages, advantages
