"""Loss functions on small cases whose expected numbers are worked out by hand from the formulas."""

import math

import pytest
import torch

from rlhf.core.losses import (
    gae,
    kl_penalized_rewards,
    masked_mean,
    pair_accuracy,
    pairwise_loss,
    policy_loss,
    value_loss,
)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_masked_mean():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)  # (1 + 3) / 2
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([2.0, 0.0])  # empty row -> 0


def test_pairwise_loss_hand_computed():
    # softplus(0 - 1) = log(1 + e^-1) = 0.3132617; softplus(2 - 0) = log(1 + e^2) = 2.1269280; mean 1.2200949
    loss = pairwise_loss(t([1.0, 0.0]), t([0.0, 2.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(1.2200949, rel=1e-6)


def test_pair_accuracy_counts_a_tie_as_half():
    assert pair_accuracy(t([2.0, 0.0, 1.0, -3.0]), t([1.0, 0.0, 4.0, -3.0])).tolist() == [1.0, 0.5, 0.0, 0.5]


def test_pairwise_loss_is_finite_for_large_margins():
    chosen = t([100.0, -100.0]).requires_grad_()
    loss = pairwise_loss(chosen, t([-100.0, 100.0]))  # -log sigmoid(200) ~ 0, -log sigmoid(-200) = 200
    assert loss.item() == pytest.approx(100.0)
    loss.backward()
    assert torch.isfinite(chosen.grad).all() and chosen.grad.tolist() == pytest.approx([0.0, -0.5])


def test_kl_penalized_rewards_hand_computed():
    logprobs = t([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    rewards = kl_penalized_rewards(logprobs, ref, t([2.0, 7.0, 3.0]), mask, kl_coef=0.1, clip_reward=5.0)
    # row 0: -0.1 * (logp - ref) = [-0.05, 0.1, 0, (masked)], score 2 at the last action token (index 2)
    # row 1: no KL, score 7 clipped to 5 at index 3; row 2: no action token, so no reward at all
    expected = [[-0.05, 0.1, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    assert rewards.tolist() == [pytest.approx(row) for row in expected]
    low = kl_penalized_rewards(logprobs[1:2], ref[1:2], t([-9.0]), mask[1:2], clip_reward=5.0)
    assert low[0, 3].item() == pytest.approx(-5.0)


def test_gae_hand_computed_full_mask():
    # gamma 1, lambda 0.95, V = [0.5, 0.2, 0.1], r = [0, 0, 1]:
    # t2: delta = 1 + 0 - 0.1 = 0.9, A = 0.9; t1: delta = 0 + 0.1 - 0.2 = -0.1, A = -0.1 + 0.95 * 0.9 = 0.755
    # t0: delta = 0 + 0.2 - 0.5 = -0.3, A = -0.3 + 0.95 * 0.755 = 0.41725; R = A + V
    advantages, returns = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.1]]), torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert advantages[0].tolist() == pytest.approx([0.41725, 0.755, 0.9])
    assert returns[0].tolist() == pytest.approx([0.91725, 0.955, 1.0])


def test_gae_ignores_rewards_and_values_past_the_end():
    # mask [1, 1, 0]: position 2 counts as V = r = 0. t1: delta = 1 - 0.2 = 0.8; t0: -0.3 + 0.95 * 0.8 = 0.46
    advantages, returns = gae(t([[0.0, 1.0, 7.0]]), t([[0.5, 0.2, 0.1]]), torch.tensor([[1, 1, 0]]))
    assert advantages[0].tolist() == pytest.approx([0.46, 0.8, 0.0])
    assert returns[0].tolist() == pytest.approx([0.96, 1.0, 0.0])


def test_gae_gamma_and_lambda():
    # gamma 0.9, lambda 0.5, r = [1, 0, 2], V = [0, 1, 0]:
    # t2: delta = 2, A = 2; t1: delta = 0 + 0.9 * 0 - 1 = -1, A = -1 + 0.45 * 2 = -0.1
    # t0: delta = 1 + 0.9 * 1 - 0 = 1.9, A = 1.9 + 0.45 * -0.1 = 1.855
    advantages, returns = gae(t([[1.0, 0.0, 2.0]]), t([[0.0, 1.0, 0.0]]), torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([1.855, -0.1, 2.0])
    assert returns[0].tolist() == pytest.approx([1.855, 0.9, 2.0])
    assert not advantages.requires_grad


def test_gae_and_returns_skip_environment_tokens_between_turns():
    """A multi-turn row: model tokens, two environment tokens, model tokens, padding. GAE and the discounted returns
    are those of the model tokens alone, as if the environment's were not there (not zero-valued steps)."""
    from rlhf.core.advantages import discounted_returns

    mask = torch.tensor([[1, 1, 0, 0, 1, 0]])
    rewards, values = t([[0.0, 0.5, 9.0, 9.0, 1.0, 9.0]]), t([[0.5, 0.2, 7.0, 7.0, 0.1, 7.0]])
    compact = mask[0].bool()
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    adv_c, ret_c = gae(rewards[:, compact], values[:, compact], torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert adv[0, compact].tolist() == pytest.approx(adv_c[0].tolist()) and adv[0, ~compact].abs().sum() == 0
    assert ret[0, compact].tolist() == pytest.approx(ret_c[0].tolist()) and ret[0, ~compact].abs().sum() == 0
    # t1's next step is t4: delta = 0.5 + 0.9 * 0.1 - 0.2 = 0.39 (not 0.5 + 0.9 * 0 - 0.2)
    assert adv[0, 1].item() == pytest.approx(0.39 + 0.45 * (1.0 - 0.1))
    returns = discounted_returns(rewards, mask, 0.9)
    assert returns[0].tolist() == pytest.approx([0.9 * 1.4, 0.5 + 0.9 * 1.0, 0.0, 0.0, 1.0, 0.0])


def test_policy_loss_hand_computed():
    # ratios [1, 1.5, 0.5], A [1, 2, -1], clip 0.2:
    # t0: max(-1, -1) = -1; t1: max(-3, -2 * 1.2 = -2.4) = -2.4; t2: max(0.5, 1 * 0.8) = 0.8
    logprobs = t([[0.0, math.log(1.5), math.log(0.5)]])
    old, advantages = torch.zeros(1, 3), t([[1.0, 2.0, -1.0]])
    assert policy_loss(logprobs, old, advantages, torch.ones(1, 3)).item() == pytest.approx(-2.6 / 3)
    assert policy_loss(logprobs, old, advantages, torch.tensor([[1, 1, 0]])).item() == pytest.approx(-1.7)


def test_policy_loss_gradient_vanishes_when_clipped():
    logprobs = t([[math.log(1.5)]]).requires_grad_()
    policy_loss(logprobs, torch.zeros(1, 1), t([[2.0]]), torch.ones(1, 1)).backward()
    assert logprobs.grad.item() == 0.0  # ratio 1.5 > 1.2 with A > 0: the clipped branch is constant


def test_value_loss_hand_computed():
    # V_clip = clip(V, V_old - 0.2, V_old + 0.2) = [0.7, 0.0, 0.5]
    # t0: max((1 - 2)^2, (0.7 - 2)^2) = 1.69; t1: max(1, 1) = 1; t2: 0 -> 0.5 * 2.69 / 3
    values, old, returns = t([[1.0, 0.0, 0.5]]), t([[0.5, 0.1, 0.5]]), t([[2.0, -1.0, 0.5]])
    assert value_loss(values, old, returns, torch.ones(1, 3)).item() == pytest.approx(0.5 * 2.69 / 3)
    assert value_loss(values, old, returns, torch.tensor([[0, 1, 1]])).item() == pytest.approx(0.5 * 1.0 / 2)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_is_finite_whatever_the_logprobs_off_the_mask(estimator):
    """The KL loss term on a ragged rollout whose positions after EOS hold training-forward logprobs 90-400 nats from
    the reference's (masked to 0 there): the value and gradient of the on-mask tokens alone, never NaN (k3 once
    took exp of the off-mask log-ratio, inf, and inf * 0 made the whole loss NaN)."""
    from rlhf.core.losses import aggregate, kl_divergence

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 5, 3, 7])
    mask = torch.arange(7)[None] < lengths[:, None]  # (4, 7): answers of 1, 5, 3 and 7 tokens
    ref = (-torch.rand(4, 7, generator=g) * 3).masked_fill(~mask, 0.0)
    off = -90.0 - 310.0 * torch.rand(4, 7, generator=g)  # beyond exp's fp32 range: exp(-off) = inf
    logp = torch.where(mask, ref + torch.randn(4, 7, generator=g) * 0.5, off).requires_grad_()
    loss = aggregate(kl_divergence(logp, ref, mask, estimator), mask, "seq-mean-token-mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()

    on = logp.detach()[mask].clone().requires_grad_()
    d = ref[mask] - on  # the estimate written out on the mask's tokens only
    per_token = {"k1": -d, "k2": d ** 2 / 2, "k3": torch.exp(d) - d - 1}[estimator]
    rows = torch.repeat_interleave(torch.arange(4), lengths)
    expected = torch.stack([per_token[rows == r].mean() for r in range(4)]).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(logp.grad[mask], on.grad)
