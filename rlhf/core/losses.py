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


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """(B,) 1 where the chosen answer scores higher, 0.5 on a tie, 0 where the rejected one does. A tie is a coin
    flip: a DPO policy that is still its own reference ties every pair and reads 0.5 (chance), not 0."""
    return (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()


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

    Backwards over the action positions t (mask 1): ``delta_t = r_t + gamma * V_{t'} - V_t``,
    ``A_t = delta_t + gamma * lam * A_{t'}``, ``R_t = A_t + V_t``, with t' the row's next action position (none
    past the end: V and A zero there). Positions off the mask are skipped: past the end of the response, and in a
    multi-turn trajectory the environment's tokens between the model's turns, which are no actions of the policy.
    A and R are zero off the mask. Advantages are not whitened (as DeepSpeed-Chat). Both outputs are detached.
    Source: Schulman et al. 2016; DeepSpeed-Chat ``get_advantages_and_returns``.
    """
    mask = action_mask.to(values.dtype)  # (B, N)
    rewards, values = (rewards * mask).detach(), (values * mask).detach()  # (B, N)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        act = action_mask[:, t].bool()
        next_advantage = torch.where(act, delta + gamma * lam * next_advantage, next_advantage)
        advantages[:, t] = next_advantage
        next_value = torch.where(act, values[:, t], next_value)
    advantages = advantages * mask
    return advantages, advantages + values


def token_mean(losses: torch.Tensor, action_mask: torch.Tensor, norm_len: int | None = None) -> torch.Tensor:
    """``sum(L m) / sum(m)``: every token of the batch weighs the same (PPO, DAPO)."""
    return masked_mean(losses, action_mask)


def seq_mean_token_mean(losses: torch.Tensor, action_mask: torch.Tensor, norm_len: int | None = None) -> torch.Tensor:
    """The mean over rows with an action of ``sum_t(L m) / sum_t(m)`` (GRPO's paper)."""
    mask = action_mask.to(losses.dtype)
    per_row = (losses * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    has_action = mask.sum(-1) > 0
    return per_row[has_action].sum() / has_action.sum().clamp(min=1)


def seq_mean_token_sum_norm(losses: torch.Tensor, action_mask: torch.Tensor,
                            norm_len: int | None = None) -> torch.Tensor:
    """``sum(L m) / (B * norm_len)`` with a constant ``norm_len`` (default N), so no length bias (Dr.GRPO, Liu et al.
    2025, arXiv:2503.20783)."""
    mask = action_mask.to(losses.dtype)
    return (losses * mask).sum() / (losses.shape[0] * (norm_len or losses.shape[1]))


# --loss-agg's choices, by name: (losses (B, N), action_mask (B, N), norm_len) -> scalar
LOSS_AGGREGATIONS = {"token-mean": token_mean, "seq-mean-token-mean": seq_mean_token_mean,
                     "seq-mean-token-sum-norm": seq_mean_token_sum_norm}


# What each aggregation averages over, counted in a (B, N) mask: a micro-batch of a minibatch carries the share
# units(micro) / units(minibatch) of the minibatch's loss (gradient accumulation that weighs micro-batches right).
AGGREGATION_UNITS = {"token-mean": lambda m: m.sum(), "seq-mean-token-mean": lambda m: (m.sum(-1) > 0).sum(),
                     "seq-mean-token-sum-norm": lambda m: m.new_tensor(m.shape[0])}


def aggregation_share(micro_mask: torch.Tensor, batch_mask: torch.Tensor, mode: str = "token-mean") -> float:
    """The weight of a micro-batch's loss, ``aggregate(L[rows], m[rows], mode)``, in the minibatch's:
    ``aggregate(L, m, mode) = sum over micro-batches of share * aggregate(L[rows], m[rows], mode)`` exactly (the
    norm_len of seq-mean-token-sum-norm given, not the padded width). 0 for a micro-batch with nothing to average."""
    units = AGGREGATION_UNITS[mode]
    total = float(units(batch_mask.float()))
    return float(units(micro_mask.float())) / total if total else 0.0


def aggregate(losses: torch.Tensor, action_mask: torch.Tensor, mode: str = "token-mean",
              norm_len: int | None = None) -> torch.Tensor:
    """Reduce per-token losses (B, N) to a scalar with the ``LOSS_AGGREGATIONS`` entry ``mode``."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation {mode!r}: expected one of {', '.join(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[mode](losses, action_mask, norm_len)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip: float = 0.2,
    clip_high: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO clipped surrogate: ``ratio = exp(logp - logp_old)``,
    ``aggregate(w * max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip_high)), m)`` (token-mean by default:
    ``sum(. * m) / sum(m)``). ``clip_high`` defaults to ``clip``; a larger one is DAPO's clip-higher
    (Yu et al. 2025, arXiv:2503.14476). ``weights`` w (B, N), detached, default 1: the rollout correction's
    (rlhf/core/rollout_correction.py).

    Source: Schulman et al. 2017, eq. 7; DeepSpeed-Chat ``actor_loss_fn`` (cliprange 0.2).
    """
    clip_high = clip if clip_high is None else clip_high
    ratio = torch.exp(masked_log_ratio(logprobs, old_logprobs, action_mask))  # (B, N), 1 off the mask
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip_high)
    return aggregate(weighted(torch.max(unclipped, clipped), weights), action_mask, agg, norm_len)


def masked_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) ``logp - logp_old`` on the mask, 0 off it: zeroed before any exponent, so whatever the training forward
    gives off the mask (padding after EOS) cannot overflow to inf and turn a masked loss or its gradient into NaN."""
    return (logprobs - old_logprobs).masked_fill(~action_mask.bool(), 0.0)


def weighted(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token losses (B, N) times the detached per-token weights (B, N), or as they are without weights."""
    return losses if weights is None else losses * weights.detach()


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) ``mean_t (logp - logp_old)`` over each row's action tokens (0 for a row without any): the log of GSPO's
    sequence ratio, the geometric mean of the token ratios."""
    mask = action_mask.to(logprobs.dtype)
    return masked_log_ratio(logprobs, old_logprobs, action_mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def gspo_loss(logprobs, old_logprobs, advantages, action_mask, clip=3e-4, clip_high=None, agg="seq-mean-token-mean",
              norm_len=None, weights=None) -> torch.Tensor:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, eq. 5-7): one importance
    ratio per sequence, ``s_i = exp(mean_t (logp_t - logp_old_t))`` (the length-normalised sequence likelihood
    ratio), clipped per sequence: per-token loss ``max(-A_it s_i, -A_it clip(s_i, 1 - clip, 1 + clip_high))``,
    aggregated with ``agg`` (the paper: the mean over sequences, seq-mean-token-mean). The gradient of ``s_i`` reaches
    every token of row i through the mean: ``grad s_i = s_i mean_t grad logp_t``, and a clipped sequence gives none
    at all. The paper's clip range is tiny (3e-4 / 4e-4) because a sequence ratio moves far less than a token's."""
    clip_high = clip if clip_high is None else clip_high
    s = torch.exp(sequence_log_ratio(logprobs, old_logprobs, action_mask))[:, None]  # (B, 1)
    per_token = torch.max(-advantages * s, -advantages * s.clamp(1.0 - clip, 1.0 + clip_high))  # (B, N)
    return aggregate(weighted(per_token, weights), action_mask, agg, norm_len)


def gspo_token_loss(logprobs, old_logprobs, advantages, action_mask, clip=3e-4, clip_high=None,
                    agg="seq-mean-token-mean", norm_len=None, weights=None) -> torch.Tensor:
    """GSPO-token (Zheng et al. 2025, arXiv:2507.18071, eq. 13-14): the token ratio
    ``s_it = sg(s_i) * p_t / sg(p_t)`` has the value of the sequence ratio ``s_i`` and the gradient of the token's
    own ``logp_t`` (times ``s_i``), so token-level advantages ``A_it`` weigh each token; clipped and aggregated as
    ``gspo``. With one advantage per row (every outcome estimator) its loss and gradient equal GSPO's."""
    clip_high = clip if clip_high is None else clip_high
    s = torch.exp(sequence_log_ratio(logprobs, old_logprobs, action_mask)).detach()[:, None]  # (B, 1)
    ratio = s * torch.exp(logprobs - logprobs.detach())  # (B, N) value s_i, gradient s_i * grad logp_t
    per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip_high))
    return aggregate(weighted(per_token, weights), action_mask, agg, norm_len)


def cispo_loss(logprobs, old_logprobs, advantages, action_mask, clip=1.0, clip_high=0.28, agg="token-mean",
               norm_len=None, weights=None) -> torch.Tensor:
    """CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4-5): REINFORCE with a clipped, stop-gradient importance weight,
    per-token loss ``-sg(clip(r_t, 1 - clip, 1 + clip_high)) * A_t * logp_t``, ``r_t = exp(logp_t - logp_old_t)``,
    summed over every answer token of the batch and divided by their count (token-mean). Unlike PPO's clip, which
    zeroes the gradient of a token whose ratio left the range, every token keeps its gradient ``-w_t A_t grad
    logp_t``: only its weight is capped. The paper sets no lower bound (``clip`` 1: weights in [0, 1 + clip_high])."""
    clip_high = clip if clip_high is None else clip_high
    ratio = torch.exp(masked_log_ratio(logprobs, old_logprobs, action_mask)).detach()  # (B, N)
    per_token = -ratio.clamp(1.0 - clip, 1.0 + clip_high) * advantages * logprobs
    return aggregate(weighted(per_token, weights), action_mask, agg, norm_len)


# Policy losses an algorithm names (rlhf/core/algorithms.py; --policy-loss), each a function of (logprobs,
# old_logprobs, advantages, action_mask, clip, clip_high, agg, norm_len, weights), every tensor (B, N), to a scalar.
POLICY_LOSSES = {"ppo-clip": policy_loss, "gspo": gspo_loss, "gspo-token": gspo_token_loss, "cispo": cispo_loss}


# Per-token estimates of KL(policy || reference) from the sampled tokens' logprobs, as functions of
# d = logp_ref - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased and never negative; GRPO's choice).
# Source: Schulman, "Approximating KL divergence" (2020); DeepSeekMath eq. 4.
KL_ESTIMATORS = {"k1": lambda d: -d, "k2": lambda d: 0.5 * d ** 2, "k3": lambda d: torch.exp(d) - d - 1.0}


def kl_divergence(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, action_mask: torch.Tensor,
                  estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate (B, N) of KL(policy || reference) with the ``KL_ESTIMATORS`` entry ``estimator``; 0 off
    ``action_mask``.

    The log-ratio is zeroed off the mask *before* the estimator: off the mask the training forward still gives
    logprobs (of padding after EOS) that may sit 100 nats from the reference's (masked to 0), and k3's ``exp`` of
    more than ~88.7 is inf in fp32, which a mask applied afterwards turns into NaN (inf * 0). No clamp (veRL clamps
    d to [-20, 20] and k3 to [-10, 10]): on the mask the token was sampled from the policy, so ``d <= -logp`` stays
    far below the overflow, and a clamp of k3 at 10 (d > ~2.5 nats) would cut the KL term's gradient exactly on the
    tokens it should pull back hardest; an overflow there would be caught by the trainer's non-finite guard.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
    mask = action_mask.bool()
    d = (ref_logprobs - logprobs).masked_fill(~mask, 0.0)  # (B, N) zero off the mask before any exponent
    return KL_ESTIMATORS[estimator](d) * mask


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


DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on B pairs; each input (B,) is a summed answer logprob, ``logp(y | x)``.

    With ``h = (logp_c - logp_ref_c) - (logp_r - logp_ref_r)`` (c chosen, r rejected) the loss is the batch mean of

    - ``sigmoid``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; eps = 0 is DPO (Rafailov et al.
      2023, eq. 7, arXiv:2305.18290); eps > 0 is conservative DPO, preferences flipped with probability eps
      (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's ``label_smoothing``);
    - ``ipo``: ``(h - 1 / (2 beta))^2``, IPO with ``tau = beta`` (Azar et al. 2023, eq. 17, arXiv:2310.12036).

    Returns (loss, chosen_rewards, rejected_rewards): the implicit rewards (B,) ``beta (logp - logp_ref)``
    (DPO eq. 5; its ``beta log Z(x)`` term is the same for both answers of a pair), detached.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss {loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return losses.mean(), chosen_rewards, rejected_rewards
