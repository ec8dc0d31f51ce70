"""Each advantage estimator and policy-loss option against its formula, worked out by hand on small tensors
(the numbers in the comments), with groups of unequal answer lengths."""
import math

import pytest
import torch

from rlhf.core.advantages import ESTIMATORS, EstimatorInput
from rlhf.core.losses import aggregate, kl_divergence, policy_loss

T = torch.tensor


def run(name, rewards, mask, scores, group_size, **kw):
    x = EstimatorInput(T(rewards, dtype=torch.float32), T(mask, dtype=torch.bool), T(scores, dtype=torch.float32),
                       group_size, **kw)
    return ESTIMATORS[name].fn(x)


# Two groups of two rows; answers of 2, 3, 1 and 2 tokens; the score sits at each row's last token.
MASK = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
REWARDS = [[0, 1, 0], [0, 0, 3], [2, 0, 0], [0, 2, 0]]
SCORES = [1, 3, 2, 2]


def test_grpo_divides_by_the_group_std():
    adv, ret = run("grpo", REWARDS, MASK, SCORES, 2)
    a = 1 / (math.sqrt(2) + 1e-6)  # group (1, 3): mean 2, unbiased std sqrt(2); group (2, 2): all 0
    expected = T([[-a, -a, 0], [a, a, a], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)


def test_dr_grpo_only_centres():
    adv, _ = run("grpo", REWARDS, MASK, SCORES, 2, std_normalization=False)
    torch.testing.assert_close(adv, T([[-1.0, -1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]))


def test_grpo_outcome_includes_a_kl_penalty_in_the_rewards():
    rewards = [[-0.5, 1, 0], [0, 0, 3], [2, 0, 0], [0, 2, 0]]  # row 0 outcome 0.5: group (0.5, 3), mean 1.75
    adv, _ = run("grpo", rewards, MASK, SCORES, 2, std_normalization=False)
    torch.testing.assert_close(adv[:2], T([[-1.25, -1.25, 0], [1.25, 1.25, 1.25]]))


def test_rloo_leaves_one_out():
    adv, _ = run("rloo", REWARDS, MASK, SCORES, 2)  # baseline of a pair: the other row
    torch.testing.assert_close(adv, T([[-2.0, -2, 0], [2, 2, 2], [0, 0, 0], [0, 0, 0]]))
    # a group of three, lengths 1, 2, 3: baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    adv, _ = run("rloo", [[1, 0, 0], [0, 2, 0], [0, 0, 6]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]], [1, 2, 6], 3)
    torch.testing.assert_close(adv, T([[-3.0, 0, 0], [-1.5, -1.5, 0], [4.5, 4.5, 4.5]]))


# Per-token rewards with a KL penalty: row 0 (3 tokens, score 1.0 at the end), row 1 (2 tokens, score 0.5 and
# a penalty of 0.3 on its first token).
PP_REWARDS, PP_MASK, PP_SCORES = [[0.1, -0.2, 1.0], [0.3, 0.5, 0.0]], [[1, 1, 1], [1, 1, 0]], [1.0, 0.5]
# whitened over the five tokens when the returns deviate from their mean by (.1, 0, .2 | 0, -.3): std sqrt(.028)
PP_WHITE = T([[0.1, 0, 0.2], [0, -0.3, 0]]) / (math.sqrt(0.028) + 1e-6)


def test_reinforce_pp_whitens_discounted_returns_over_the_batch():
    adv, ret = run("reinforce++", PP_REWARDS, PP_MASK, PP_SCORES, 1)
    torch.testing.assert_close(ret, T([[0.9, 0.8, 1.0], [0.8, 0.5, 0.0]]))  # mean 0.8
    torch.testing.assert_close(adv, PP_WHITE)
    _, ret = run("reinforce++", PP_REWARDS, PP_MASK, PP_SCORES, 1, gamma=0.5)
    torch.testing.assert_close(ret, T([[0.25, 0.3, 1.0], [0.55, 0.5, 0.0]]))  # 0.1 + .5 * (-.2 + .5 * 1)


def test_reinforce_pp_baseline_subtracts_the_group_mean_score_then_whitens():
    adv, ret = run("reinforce++-baseline", PP_REWARDS, PP_MASK, PP_SCORES, 2)
    # group mean score 0.75, taken off each row's last token: [.1, -.2, .25] and [.3, -.25]
    torch.testing.assert_close(ret, T([[0.15, 0.05, 0.25], [0.05, -0.25, 0.0]]))  # mean 0.05
    torch.testing.assert_close(adv, PP_WHITE)


def test_gae_needs_values_and_matches_its_recursion():
    with pytest.raises(ValueError, match="gae needs the critic's values"):
        run("gae", REWARDS, MASK, SCORES, 1)
    adv, ret = run("gae", [[0.0, 1.0]], [[1, 1]], [1.0], 1, values=T([[0.5, 0.25]]), gamma=0.9, lam=0.5)
    d1 = 1.0 - 0.25                    # last token: no next value
    d0 = 0.0 + 0.9 * 0.25 - 0.5
    torch.testing.assert_close(adv, T([[d0 + 0.9 * 0.5 * d1, d1]]))
    torch.testing.assert_close(ret, adv + T([[0.5, 0.25]]))


def test_group_estimators_refuse_rows_that_do_not_fill_groups():
    with pytest.raises(ValueError, match="3 rows do not split into groups of 2"):
        run("grpo", REWARDS[:3], MASK[:3], SCORES[:3], 2)


def test_table_says_which_estimators_need_a_critic_or_groups():
    assert {n for n, e in ESTIMATORS.items() if e.needs_critic} == {"gae"}
    assert {n for n, e in ESTIMATORS.items() if e.grouped} == {"grpo", "rloo", "reinforce++-baseline"}


LOSSES, LMASK = T([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]), T([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 7 / 3),                       # (1 + 2 + 4) / 3 tokens
    ("seq-mean-token-mean", (1.5 + 4) / 2),      # rows' means, the empty row left out
    ("seq-mean-token-sum-norm", 7 / (3 * 4)),    # sum over B=3 rows times norm_len 4
])
def test_loss_aggregations(mode, expected):
    assert aggregate(LOSSES, LMASK, mode, norm_len=4).item() == pytest.approx(expected)


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="'seq-sum'.*token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate(LOSSES, LMASK, "seq-sum")


def test_clip_higher_raises_only_the_upper_bound():
    ratio = T([[0.5, 1.5]])
    old = T([[0.0, 0.0]])
    logp, adv, mask = ratio.log(), T([[1.0, 1.0]]), T([[1, 1]], dtype=torch.bool)
    # per token max(-A r, -A clip(r)): r=0.5 -> max(-0.5, -0.8) = -0.5; r=1.5 -> max(-1.5, -(1 + eps_high))
    assert policy_loss(logp, old, adv, mask, 0.2).item() == pytest.approx((-0.5 - 1.2) / 2)
    assert policy_loss(logp, old, adv, mask, 0.2, clip_high=0.28).item() == pytest.approx((-0.5 - 1.28) / 2)
    # negative advantages: the lower bound binds at r=0.5 (max(0.5, 0.8) = 0.8), clip_high changes nothing there
    assert policy_loss(logp, old, -adv, mask, 0.2, clip_high=0.28).item() == pytest.approx((0.8 + 1.5) / 2)


def test_kl_estimators():
    logp, ref, mask = T([[-1.0]]), T([[-1.5]]), T([[True]])  # d = ref - logp = -0.5
    assert kl_divergence(logp, ref, mask, "k1").item() == pytest.approx(0.5)
    assert kl_divergence(logp, ref, mask, "k2").item() == pytest.approx(0.125)
    assert kl_divergence(logp, ref, mask, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    with pytest.raises(ValueError, match="'k4'"):
        kl_divergence(logp, ref, mask, "k4")
