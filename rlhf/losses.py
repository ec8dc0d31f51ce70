"""Pure loss functions of RLHF with DeepSpeed-Chat's semantics.

Shapes: B sequences, N response (action) positions. ``action_mask`` (B, N) is 1 on generated tokens up to
and including EOS and 0 after. Sources: DeepSpeed-Chat, ``dschat/rlhf/ppo_trainer.py``
(``compute_rewards``, ``get_advantages_and_returns``, ``actor_loss_fn``, ``critic_loss_fn``) and
``dschat/utils/model/reward_model.py``; InstructGPT (Ouyang et al., 2022) eq. 1 and 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(values * mask) / sum(mask)`` over ``dim`` (all elements when None); 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model ranking loss ``mean(-log sigmoid(s_chosen - s_rejected))``.

    Computed as ``softplus(s_rejected - s_chosen)``, the same value without the overflow of a naive
    ``log(sigmoid(.))`` (which DeepSpeed-Chat users saw become Inf). Source: InstructGPT eq. 1;
    DeepSpeed-Chat ``RewardModel.forward``.
    """
    return F.softplus(rejected_scores - chosen_scores).mean()


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 in each row of ``action_mask`` (B, N); -1 for a row with no action."""
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)  # (N,)
    marked = torch.where(action_mask.bool(), positions, torch.full_like(positions, -1))  # (B, N)
    return marked.max(dim=1).values


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float = 0.1,
    clip_reward: float = 5.0,
) -> torch.Tensor:
    """Per-token rewards (B, N): ``r_t = -kl_coef * (logp_t - logp_ref_t)`` on action tokens, plus
    ``clip(score, -clip_reward, clip_reward)`` at the last action token of each row; 0 off the mask.

    DeepSpeed-Chat ``compute_rewards`` (it indexes one past EOS; we place the score on the last generated
    token, the common reading). Rows without any action token get no score.
    """
    mask = action_mask.to(logprobs.dtype)  # (B, N)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask  # (B, N)
    last = last_action_index(action_mask)  # (B,)
    rows = torch.nonzero(last >= 0).squeeze(1)
    clipped = scores.to(rewards.dtype).clamp(-clip_reward, clip_reward)  # (B,)
    rewards[rows, last[rows]] += clipped[rows]
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response positions; returns (advantages, returns), each (B, N).

    Backwards over t: ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``R_t = A_t + V_t``; rewards and values past the end of the response are zero, so A and R are zero
    there too. Advantages are not whitened (as DeepSpeed-Chat). Both outputs are detached.
    Source: Schulman et al. 2016; DeepSpeed-Chat ``get_advantages_and_returns``.
    """
    mask = action_mask.to(values.dtype)  # (B, N)
    rewards, values = (rewards * mask).detach(), (values * mask).detach()  # (B, N)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """PPO clipped surrogate: ``ratio = exp(logp - logp_old)``,
    ``sum(max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)) * m) / sum(m)``.

    Source: Schulman et al. 2017, eq. 7; DeepSpeed-Chat ``actor_loss_fn`` (cliprange 0.2).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, N)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    return masked_mean(torch.max(unclipped, clipped), action_mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss: ``V_clip = clip(V, V_old - clip, V_old + clip)``,
    ``0.5 * sum(max((V - R)^2, (V_clip - R)^2) * m) / sum(m)``.

    Source: DeepSpeed-Chat ``critic_loss_fn`` (cliprange_value 0.2), after OpenAI baselines' PPO2.
    """
    clipped_values = torch.max(torch.min(values, old_values + clip), old_values - clip)  # (B, N)
    loss = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(loss, action_mask)
