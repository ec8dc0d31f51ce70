"""The 2026 policy losses (GSPO, GSPO-token, CISPO), the rollout corrections (TIS, MIS, IcePop), on-policy
distillation's advantages and DAPO's parts (dynamic sampling's group filter and batch join, the soft overlong
penalty), each against its formula written out here as loops over rows and tokens, on random rollouts with ragged
masks (answers of 1 to 7 tokens, an empty row) and groups whose rewards are all equal; the gradient too where it is
the paper's point (CISPO's stop-gradient weight, GSPO's sequence ratio)."""
import math

import pytest
import torch

from rlhf.core.advantages import ESTIMATORS, EstimatorInput
from rlhf.core.dynamic_sampling import concat, informative_rows, select_rows
from rlhf.core.experience import Experience
from rlhf.core.losses import POLICY_LOSSES, policy_loss
from rlhf.core.rollout_correction import correction_weights
from rlhf.steps.rl_trainer import overlong_penalty

LENGTHS = [1, 5, 3, 7, 1, 0, 4, 2]  # ragged answers, one-token ones and a row without any


def rollout(seed: int, spread: float = 0.3, per_row_advantage: bool = True):
    """logp (leaf, grad), old logprobs, advantages, mask (B=8, N=7); off the mask the logprobs are garbage."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(7)[None] < torch.tensor(LENGTHS)[:, None]
    old = -torch.rand(8, 7, generator=g) * 4
    logp = torch.where(mask, old + torch.randn(8, 7, generator=g) * spread, torch.randn(8, 7, generator=g) * 50)
    adv = torch.randn(8, 1, generator=g).expand(8, 7) if per_row_advantage else torch.randn(8, 7, generator=g)
    return logp.clone().requires_grad_(), old, adv.contiguous() * mask, mask


def rows_of(mask):
    return [[t for t in range(mask.shape[1]) if mask[b, t]] for b in range(mask.shape[0])]


def gspo_reference(logp, old, adv, mask, lo, hi):
    """The mean over rows with an answer of the row's mean over its tokens of max(-A s, -A clip(s)),
    s = exp(mean_t (logp - old)) of the row."""
    per_row = []
    for b, ts in enumerate(rows_of(mask)):
        if not ts:
            continue
        s = torch.exp(sum(logp[b, t] - old[b, t] for t in ts) / len(ts))
        terms = [torch.max(-adv[b, t] * s, -adv[b, t] * s.clamp(1 - lo, 1 + hi)) for t in ts]
        per_row.append(sum(terms) / len(ts))
    return sum(per_row) / len(per_row)


def grad_of(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf)
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_is_the_clipped_sequence_ratio_objective_with_its_gradient(seed):
    logp, old, adv, mask = rollout(seed)
    lo, hi = 0.05, 0.08  # wide enough that some rows clip and some do not at this spread
    got = POLICY_LOSSES["gspo"](logp, old, adv, mask, lo, hi, "seq-mean-token-mean")
    expected = gspo_reference(logp, old, adv, mask, lo, hi)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got_grad, expected_grad = grad_of(got, logp), grad_of(expected, logp)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-7)
    # the sequence ratio: every token of an unclipped row gets the same gradient; a clipped row gets none
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1)).detach()
    clipped = ((s > 1 + hi) & (adv[:, 0] > 0)) | ((s < 1 - lo) & (adv[:, 0] < 0))
    for b, ts in enumerate(rows_of(mask)):
        if ts and not clipped[b]:
            assert torch.allclose(got_grad[b, ts], got_grad[b, ts[0]].expand(len(ts)))
            assert got_grad[b, ts[0]] != 0
        elif ts:
            assert (got_grad[b, ts] == 0).all()
    assert (got_grad[~mask] == 0).all()
    token_ppo = grad_of(policy_loss(logp, old, adv, mask, lo, hi, "seq-mean-token-mean"), logp)
    assert (token_ppo - got_grad)[mask].abs().max() > 1e-3  # the token ratio would give another gradient


@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_token_equals_gspo_with_row_advantages_and_weighs_tokens_otherwise(seed):
    logp, old, adv, mask = rollout(seed)
    gspo = POLICY_LOSSES["gspo"](logp, old, adv, mask, 0.05, 0.08)
    token = POLICY_LOSSES["gspo-token"](logp, old, adv, mask, 0.05, 0.08)
    assert token.item() == pytest.approx(gspo.item(), rel=1e-6)
    torch.testing.assert_close(grad_of(token, logp), grad_of(gspo, logp), rtol=1e-5, atol=1e-7)

    logp, old, adv, mask = rollout(seed, per_row_advantage=False)
    got = POLICY_LOSSES["gspo-token"](logp, old, adv, mask, 0.05, 0.08)
    per_row = []  # written out: ratio value s_i, gradient s_i * grad logp_t, clipped on s_i's value
    for b, ts in enumerate(rows_of(mask)):
        if not ts:
            continue
        s = torch.exp(sum(logp[b, t] - old[b, t] for t in ts) / len(ts)).detach()
        terms = []
        for t in ts:
            r = s * torch.exp(logp[b, t] - logp[b, t].detach())
            terms.append(torch.max(-adv[b, t] * r, -adv[b, t] * r.clamp(0.95, 1.08)))
        per_row.append(sum(terms) / len(ts))
    expected = sum(per_row) / len(per_row)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad_of(got, logp), grad_of(expected, logp), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cispo_weights_are_clipped_and_carry_no_gradient(seed):
    logp, old, adv, mask = rollout(seed, spread=0.6, per_row_advantage=False)
    hi = 0.28
    got = POLICY_LOSSES["cispo"](logp, old, adv, mask, 1.0, hi, "token-mean")
    ratio = torch.exp(logp - old).detach()
    count = int(mask.sum())
    expected = -sum(min(float(ratio[b, t]), 1 + hi) * adv[b, t] * logp[b, t]
                    for b, ts in enumerate(rows_of(mask)) for t in ts) / count
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    grad = grad_of(got, logp)
    # d/dlogp_t = -min(r_t, 1 + eps) A_t / count: the weight is a constant, every token keeps a gradient
    want = -ratio.clamp(max=1 + hi) * adv / count * mask
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-8)
    above = mask & (ratio > 1 + hi) & (adv > 0)
    assert above.any() and (grad[above] != 0).all()
    assert (grad_of(policy_loss(logp, old, adv, mask, 0.2, hi), logp)[above] == 0).all()  # PPO drops them
    with_grad_weight = -torch.exp(logp - old).clamp(max=1 + hi) * adv * logp
    alt = grad_of(with_grad_weight[mask].sum() / count, logp)
    assert (alt - grad)[mask].abs().max() > 1e-3  # a weight with a gradient would give another one


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_correction_weights_multiply_each_tokens_loss(name):
    """Token-mean of w_t L_t: the weighted loss is sum_t w_t times the loss weighted by the indicator of token t."""
    logp, old, adv, mask = rollout(3, per_row_advantage=False)
    w = torch.rand(8, 7, generator=torch.Generator().manual_seed(5)) * 2 * mask
    fn = POLICY_LOSSES[name]
    got = fn(logp, old, adv, mask, 0.2, 0.28, "token-mean", None, w)
    expected = 0.0
    for b, ts in enumerate(rows_of(mask)):
        for t in ts:
            one = torch.zeros(8, 7)
            one[b, t] = 1.0
            expected = expected + w[b, t] * fn(logp, old, adv, mask, 0.2, 0.28, "token-mean", None, one)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != pytest.approx(fn(logp, old, adv, mask, 0.2, 0.28, "token-mean").item(), rel=1e-3)


def correction_reference(mode, old, rollout_lp, mask, cap=2.0, low=0.5, high=5.0):
    w = torch.zeros_like(old)
    for b, ts in enumerate(rows_of(mask)):
        rho = math.exp(sum(float(old[b, t] - rollout_lp[b, t]) for t in ts))
        for t in ts:
            k = math.exp(float(old[b, t] - rollout_lp[b, t]))
            w[b, t] = {"tis": min(k, cap), "mis": rho if rho <= cap else 0.0,
                       "icepop": k if low <= k <= high else 0.0}[mode]
    return w


@pytest.mark.parametrize("mode", ["tis", "mis", "icepop"])
def test_rollout_corrections_follow_their_formulas(mode):
    g = torch.Generator().manual_seed(7)
    mask = torch.arange(7)[None] < torch.tensor(LENGTHS)[:, None]
    old = -torch.rand(8, 7, generator=g) * 4
    rollout_lp = torch.where(mask, old + torch.randn(8, 7, generator=g) * 1.2, torch.full((8, 7), 300.0))
    rollout_lp[3] -= 0.5  # row 3's sequence ratio well past the cap (its 7 tokens: e^3.5 more)
    weights, stats = correction_weights(mode, old, rollout_lp, mask)
    torch.testing.assert_close(weights, correction_reference(mode, old, rollout_lp, mask), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(weights).all() and (weights[~mask] == 0).all()
    on = weights[mask]
    assert stats["correction_mean"] == pytest.approx(on.mean().item())
    assert stats["correction_min"] == pytest.approx(on.min().item())
    assert stats["correction_max"] == pytest.approx(on.max().item())
    assert stats["correction_masked"] == pytest.approx((on == 0).float().mean().item())
    assert 0 < stats["correction_masked"] < 1 if mode != "tis" else stats["correction_capped"] > 0
    same, _ = correction_weights(mode, old, old, mask)  # reused rollout logprobs: the identity
    assert torch.equal(same, mask.float())
    assert correction_weights("none", old, rollout_lp, mask) == (None, {})


def test_distill_advantage_is_the_per_token_reverse_kl_plus_the_centred_score():
    g = torch.Generator().manual_seed(11)
    mask = torch.arange(7)[None] < torch.tensor(LENGTHS)[:, None]
    logp, teacher = -torch.rand(8, 7, generator=g) * 3, -torch.rand(8, 7, generator=g) * 3
    ratio = (teacher - logp) * mask
    for scores in (torch.zeros(8), torch.randn(8, generator=g)):
        x = EstimatorInput(torch.zeros(8, 7), mask, scores, teacher_log_ratio=ratio)
        adv, ret = ESTIMATORS["distill"].fn(x)
        mean = sum(scores.tolist()) / 8
        for b in range(8):
            for t in range(7):
                want = float(teacher[b, t] - logp[b, t]) + float(scores[b]) - mean if mask[b, t] else 0.0
                assert adv[b, t].item() == pytest.approx(want, abs=1e-6)
        assert torch.equal(adv, ret)
    with pytest.raises(ValueError, match="teacher"):
        ESTIMATORS["distill"].fn(EstimatorInput(torch.zeros(8, 7), mask, torch.zeros(8)))


def test_informative_rows_drop_groups_whose_rewards_are_all_equal():
    scores = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0.5, 0.5, 0.5, 0.5, -1, 2, 2, 2])
    keep = informative_rows(scores, 4)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4


def experience(P: int, N: int, B: int, seed: int) -> Experience:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    action = torch.arange(N)[None] < lengths[:, None]
    prompt_mask = (torch.arange(P)[None] >= torch.randint(0, P, (B,), generator=g)[:, None]).long()
    seq = torch.randint(3, 50, (B, P + N), generator=g)
    r = lambda: torch.randn(B, N, generator=g) * action  # noqa: E731
    return Experience(seq, torch.cat([prompt_mask, action.long()], 1), action, P, r(), r(), r(),
                      scores=torch.randn(B, generator=g), rewards=r(), advantages=r(), returns=r())


def test_concat_pads_prompts_left_and_answers_right():
    a, b = experience(5, 3, 4, 0), experience(3, 6, 2, 1)
    joined = concat([a, select_rows(b, torch.tensor([True, False]))], pad_token_id=0)
    assert joined.prompt_len == 5 and joined.sequences.shape == (5, 11) and joined.action_mask.shape == (5, 6)
    for i, (src, row) in enumerate([(a, 0), (a, 1), (a, 2), (a, 3), (b, 0)]):
        P, N = src.prompt_len, src.action_mask.shape[1]
        keep = joined.attention_mask[i].bool()
        assert joined.sequences[i][keep].tolist() == src.sequences[row][src.attention_mask[row].bool()].tolist()
        assert joined.sequences[i, 5 - P:5].tolist() == src.sequences[row, :P].tolist()
        assert joined.action_mask[i, :N].tolist() == src.action_mask[row].tolist()
        assert not joined.action_mask[i, N:].any() and not joined.attention_mask[i, :5 - P].any()
        torch.testing.assert_close(joined.advantages[i, :N], src.advantages[row])
        assert joined.scores[i] == src.scores[row]


@pytest.mark.parametrize("length,expected", [(0, 0.0), (12, 0.0), (13, -0.25), (15, -0.75), (16, -1.0), (20, -1.0)])
def test_soft_overlong_penalty(length, expected):
    # L = 16, buffer 0.25: C = 4 tokens, no penalty up to 12, then ((16 - 4) - |y|) / 4, -1 at and past 16
    assert overlong_penalty(torch.tensor([length]), 16, 0.25).item() == pytest.approx(expected)
    assert overlong_penalty(torch.tensor([length]), 16, 0.25, factor=0.5).item() == pytest.approx(expected / 2)
