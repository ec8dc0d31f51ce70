"""The 2026 algorithms' wiring through the real trainer (RLTrainer.rollout / train_on and step 3's dynamic
sampling), against numbers computed here from plain models: the teacher's logprobs and distill's advantages, DAPO's
overlong penalty in the scores, the rollout-correction weights reaching the actor's gradient (and turning the reuse
of rollout logprobs off), dynamic sampling's kept rows, and each new policy loss's gradient on a real batch."""
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.core.dynamic_sampling import informative_rows
from rlhf.data import build_prompt_dataset, load_step_examples
from rlhf.steps.rl import fill_groups
from rlhf.steps.rl_trainer import records
from tests.test_policy_losses import gspo_reference
from tests.test_update_math import (
    NEW_TOKENS,
    RandomScores,
    answer_logprobs,
    assert_same_gradient,
    build_trainer,
    plain_gradients,
    random_update_batch,
    record_backward,
    rollout,
)


def perturb(model, scale: float = 0.02) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_distill_scores_the_students_tokens_with_the_teacher(tiny_run):
    trainer = build_trainer(tiny_run, "distill", teacher_model=str(tiny_run / "actor"))
    torch.manual_seed(1)
    perturb(trainer.actor.module)  # the student moves off its teacher (the SFT model)
    exp = rollout(trainer)
    mask = exp.action_mask
    teacher = AutoModelForCausalLM.from_pretrained(tiny_run / "actor").to(exp.sequences.device)
    with torch.no_grad():
        expected_teacher = answer_logprobs(teacher, exp) * mask
    torch.testing.assert_close(exp.teacher_logprobs, expected_teacher, atol=1e-5, rtol=0)
    assert ((exp.teacher_logprobs - exp.logprobs).abs() * mask).max() > 1e-2
    scores = RandomScores(1)(None, [None] * mask.shape[0], None)  # the reward function's first call, again
    assert torch.equal(exp.scores.cpu(), scores.float())
    clipped = [max(-2.0, min(2.0, float(s))) for s in scores]
    mean = sum(clipped) / len(clipped)
    expected = torch.zeros_like(exp.advantages)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                expected[b, t] = expected_teacher[b, t] - exp.logprobs[b, t] + clipped[b] - mean
    torch.testing.assert_close(exp.advantages, expected, atol=1e-5, rtol=0)


def test_dapo_adds_the_soft_overlong_penalty_to_the_scores(tiny_run):
    trainer = build_trainer(tiny_run, "dapo", overlong_filtering=True)
    exp = rollout(trainer)
    lengths = exp.action_mask.sum(-1).tolist()
    raw = RandomScores(1)(None, [None] * len(lengths), None)
    cache = round(0.2 * NEW_TOKENS)  # 2 of the 8 answer tokens
    penalty = [min(0.0, max(-1.0, ((NEW_TOKENS - cache) - n) / cache)) for n in lengths]
    assert any(p < 0 for p in penalty) and any(p == 0 for p in penalty)
    torch.testing.assert_close(exp.scores.cpu(), raw.float() + torch.tensor(penalty), atol=1e-6, rtol=0)
    eos = trainer.tokenizer.eos_token_id
    cut = [not any(exp.sequences[b, exp.prompt_len + t] == eos and exp.action_mask[b, t] for t in range(NEW_TOKENS))
           for b in range(len(lengths))]
    assert any(cut) and not all(cut)
    assert exp.loss_mask.tolist() == [[bool(m) and not c for m in row] for row, c in zip(exp.action_mask.tolist(),
                                                                                          cut)]


def test_dynamic_sampling_keeps_informative_groups_until_the_batch_is_full(tiny_run):
    trainer = build_trainer(tiny_run, "dapo", overlong_buffer=0.0)  # scores as the reward function gives them
    calls = []

    def tied(prompts, answers, fields):  # groups 0 and 2 of every rollout tie; group 1 of the first one too
        calls.append(len(answers))
        scores = torch.rand(len(answers))
        scores[0:4], scores[8:12] = 1.0, 0.0
        if len(calls) == 1:
            scores[4:8] = 0.5
        return scores
    trainer.reward_fn = tied
    cfg = trainer.cfg
    dataset = build_prompt_dataset(trainer.tokenizer, load_step_examples(cfg.data, step=3, split=cfg.data_split)
                                   [:3], cfg.sampling.max_prompt_seq_len)
    batch = dataset.collate([0, 1, 2])
    generator = torch.Generator().manual_seed(0)
    exp, stats = trainer.rollout(batch, *records(dataset, batch), generator)
    assert not informative_rows(exp.scores, 4).any()
    extra = []

    def more():
        extra.append(1)
        return (batch, *records(dataset, batch))
    kept = fill_groups(trainer, exp, stats, more, generator)
    # rollout 1: nothing kept; rollouts 2-4: group 1 each (4 rows), 12 rows reached after three extra rollouts
    assert len(extra) == 3 and kept.sequences.shape[0] == 12
    assert stats.dynamic_sampling == {"dropped_groups": 9 / 12, "extra_rollouts": 3, "kept_rows": 12}
    assert not (kept.scores == 1.0).any() and not (kept.scores == 0.0).any()
    assert kept.action_mask.any(-1).all() and kept.advantages.abs().sum() > 0

    trainer.cfg.algo.max_extra_rollouts = 1  # the cap: a round still short trains on what it kept
    calls.clear()
    exp, stats = trainer.rollout(batch, *records(dataset, batch), generator)
    kept = fill_groups(trainer, exp, stats, more, generator)
    assert kept.sequences.shape[0] == 4 and stats.dynamic_sampling["extra_rollouts"] == 1


def test_rollout_correction_needs_the_training_forward_and_weighs_the_actor_loss(tiny_run):
    with pytest.raises(ValueError, match="--rollout-correction tis .* drop --reuse-rollout-logprobs"):
        build_trainer(tiny_run, "grpo", rollout_correction="tis", reuse_rollout_logprobs=True)
    trainer = build_trainer(tiny_run, "grpo", rollout_correction="tis", kl_loss_coef=0.0)
    assert not trainer.reuse_logprobs
    exp = random_update_batch(trainer, seed=3)
    g = torch.Generator().manual_seed(9)
    weights = (torch.rand(exp.action_mask.shape, generator=g) * 2).to(exp.action_mask.device) * exp.action_mask
    exp = dataclasses.replace(exp, correction=weights)
    calls = record_backward(trainer.actor)
    trainer.train_on(exp)
    plain = AutoModelForCausalLM.from_pretrained(tiny_run / "actor").to(exp.sequences.device)

    def loss_fn(w):
        def loss(model):
            logp = answer_logprobs(model, exp)
            ratio = torch.exp(logp - exp.logprobs)
            per_token = torch.maximum(-exp.advantages * ratio, -exp.advantages * ratio.clamp(0.8, 1.2)) * w
            rows = [per_token[b][exp.action_mask[b]] for b in range(per_token.shape[0])]
            return torch.stack([r.mean() for r in rows if len(r)]).mean()  # grpo: seq-mean-token-mean
        return loss
    _, expected = plain_gradients(plain, calls[0]["weights"], loss_fn(weights))
    _, unweighted = plain_gradients(plain, calls[0]["weights"], loss_fn(1.0))
    assert_same_gradient(calls[0]["grads"], expected, {"no correction": unweighted})


@pytest.mark.parametrize("algorithm", ["gspo", "cispo"])
def test_new_policy_losses_reach_the_actors_gradient(tiny_run, algorithm):
    options = {"cliprange": 0.02, "cliprange_high": 0.03} if algorithm == "gspo" else {"cliprange_high": 0.1}
    trainer = build_trainer(tiny_run, algorithm, **options)
    exp = random_update_batch(trainer, seed=5)
    exp = dataclasses.replace(exp, advantages=exp.advantages[:, :1].expand_as(exp.advantages) * exp.action_mask)
    calls = record_backward(trainer.actor)
    trainer.train_on(exp)
    plain = AutoModelForCausalLM.from_pretrained(tiny_run / "actor").to(exp.sequences.device)
    mask = exp.action_mask

    def gspo(model, lo=0.02, hi=0.03):
        return gspo_reference(answer_logprobs(model, exp), exp.logprobs, exp.advantages, mask, lo, hi)

    def cispo(model, stop_gradient=True):
        logp = answer_logprobs(model, exp)
        ratio = torch.exp(logp - exp.logprobs)
        weight = (ratio.detach() if stop_gradient else ratio).clamp(max=1.1)
        return (-weight * exp.advantages * logp)[mask].sum() / mask.sum()
    if algorithm == "gspo":
        _, expected = plain_gradients(plain, calls[0]["weights"], gspo)
        alternatives = {"unclipped": plain_gradients(plain, calls[0]["weights"], lambda m: gspo(m, 10, 10))[1]}
    else:
        _, expected = plain_gradients(plain, calls[0]["weights"], cispo)
        alternatives = {"weight with a gradient":
                        plain_gradients(plain, calls[0]["weights"], lambda m: cispo(m, False))[1]}
    assert_same_gradient(calls[0]["grads"], expected, alternatives)
