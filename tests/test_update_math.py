"""Tests of effect, not of presence: every option that changes the math of a step-3 update, checked on the path
a run takes (the config's `algo()`, `RLTrainer.rollout`, `RLTrainer.train_on` and its EMA update) against
numbers this file computes itself, on fresh random data, without rlhf.losses or rlhf.advantages:

- rollouts: per-token rewards (`kl_ctl`, `clip_reward_value`) and each estimator's advantages and returns
  (GAE's gamma and lambda, grpo with and without std normalisation, rloo's leave-one-out baseline, reinforce++'s
  discounting and batch whitening, reinforce++-baseline's group mean), each algorithm at the defaults README's
  step-3 table documents;
- updates: the gradient the actor, the PTX step and the critic backpropagate, against the gradient of the loss
  written out here on a plain copy of the model with the same weights (`cliprange`, `cliprange_high`,
  `kl_loss_coef` and the k1/k2/k3 estimators, the three loss aggregations with `max_answer_seq_len` as
  Dr.GRPO's normaliser, `cliprange_value`, `unsup_coef`), and the EMA after the step (`ema_decay`).

Each update test also checks that the options it sets change the gradient (an alternative reading of the option
gives another one), so a pass is not a coincidence of the data."""
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.cli.presets import get_preset
from rlhf.core.algorithms import ALGORITHMS
from rlhf.data import build_prompt_dataset, load_step_examples
from rlhf.models import RewardModel
from rlhf.runtime.config import config_from_options
from rlhf.runtime.distributed import init_distributed
from rlhf.steps.rl_config import RLConfig
from rlhf.steps.rl_trainer import RLTrainer, records
from tests.test_ppo_wiring import loop_gae, loop_rewards

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, NEW_TOKENS, TRAIN_TOKENS = 3, 8, 6   # prompts per rollout; answer columns sampled; kept for an update
CLIP_REWARD, GAMMA, LAM = 2.0, 0.9, 0.8
EPS = 1e-6                                     # added to standard deviations (verl, OpenRLHF)


def readme_step3_defaults() -> dict[str, dict]:
    """The per-algorithm defaults as README's step-3 table documents them: samples per prompt, where the KL goes
    (reward penalty: kl_ctl; loss: kl_loss_coef) with its coefficient, the loss aggregation."""
    table = (ROOT / "README.md").read_text().split("### Step-3 algorithms", 1)[1].split("\n\n")[2]
    rows = {}
    for line in table.splitlines()[2:]:
        name, _, _, samples, kl, agg = (cell.strip() for cell in line.strip("|").split("|"))
        coef = float(re.findall(r"\d+\.\d+", kl)[0]) if kl != "none" else 0.0
        in_reward = kl.startswith("reward penalty")
        rows[name.split("`")[1]] = {"n_samples_per_prompt": int(samples), "kl_ctl": coef if in_reward else 0.0,
                                    "kl_loss_coef": 0.0 if in_reward else coef, "loss_agg": agg,
                                    # --kl-estimator's own default where the table names none
                                    "kl_estimator": re.findall(r"k[123]", kl)[0] if "--kl-estimator" in kl else "k3"}
    return rows


README = readme_step3_defaults()


class RandomScores:
    """A reward function of fresh random scores with random signs, every other row's beyond --clip-reward-value
    (in (c, 2c)) and the others' within it."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, prompts, answers, fields) -> torch.Tensor:
        n = len(answers)
        outside = (torch.arange(n) % 2 == 0).float()
        sign = torch.randint(0, 2, (n,), generator=self.generator) * 2 - 1
        return sign * CLIP_REWARD * (outside + torch.rand(n, generator=self.generator))


def build_trainer(tiny_run, algorithm: str, **options) -> RLTrainer:
    fields = dict(actor_model_name_or_path=str(tiny_run / "actor"), critic_model_name_or_path=str(tiny_run / "reward"),
                  data=[str(tiny_run / "data" / "pairs.jsonl")], data_split="0,1,1",
                  per_device_generation_batch_size=PROMPTS, per_device_training_batch_size=64, max_prompt_seq_len=16,
                  max_answer_seq_len=NEW_TOKENS, num_warmup_steps=0, clip_reward_value=CLIP_REWARD, gamma=GAMMA,
                  lam=LAM, disable_tqdm=True)
    cfg = config_from_options(RLConfig, algorithm=algorithm, **{**fields, **options})
    cfg.validate()
    torch.manual_seed(0)
    return RLTrainer(cfg, get_preset("tiny").tokenizer(), total_steps=10, device=init_distributed().device,
                     reward_fn=RandomScores(1))


def rollout(trainer: RLTrainer, seed: int = 0):
    """One real rollout of the first prompts of step 3's slice (a generation batch of them)."""
    cfg = trainer.cfg
    prompts = cfg.loop.per_device_generation_batch_size
    dataset = build_prompt_dataset(trainer.tokenizer, load_step_examples(cfg.data, step=3, split=cfg.data_split)
                                   [:prompts], cfg.sampling.max_prompt_seq_len)
    batch = dataset.collate(list(range(prompts)))
    exp, _ = trainer.rollout(batch, *records(dataset, batch), torch.Generator().manual_seed(seed))
    return exp


# -- the estimators, written out as loops over rows and groups


def outcomes(rewards, mask) -> list[float]:
    return [float(rewards[b][mask[b]].sum()) for b in range(rewards.shape[0])]


def on_tokens(per_row: list[float], mask) -> torch.Tensor:
    return torch.tensor(per_row, device=mask.device)[:, None] * mask.float()


def loop_grpo(rewards, mask, group: int, std_normalization: bool) -> torch.Tensor:
    s, out = outcomes(rewards, mask), []
    for g in range(0, len(s), group):
        scores = s[g:g + group]
        mean = sum(scores) / group
        std = math.sqrt(sum((x - mean) ** 2 for x in scores) / (group - 1))  # unbiased, as DeepSeekMath's
        out += [(x - mean) / (std + EPS) if std_normalization else x - mean for x in scores]
    return on_tokens(out, mask)


def loop_rloo(rewards, mask, group: int) -> torch.Tensor:
    s, out = outcomes(rewards, mask), []
    for g in range(0, len(s), group):
        scores = s[g:g + group]
        out += [x - (sum(scores) - x) / (group - 1) for x in scores]  # the mean of the others
    return on_tokens(out, mask)


def loop_discounted(rewards, mask, gamma: float) -> torch.Tensor:
    returns = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for i, t in enumerate(steps):
            returns[b, t] = sum(gamma ** (k - i) * float(rewards[b, steps[k]]) for k in range(i, len(steps)))
    return returns


def loop_whiten(values, mask) -> torch.Tensor:
    tokens = values[mask].tolist()
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / len(tokens))
    return (values - mean) / (std + EPS) * mask


def expected_advantages(algorithm: str, exp, rewards, std_normalization: bool = True):
    mask, group = exp.action_mask, README[algorithm]["n_samples_per_prompt"]
    if algorithm == "ppo":
        return loop_gae(rewards, exp.values, mask, GAMMA, LAM)
    if algorithm == "grpo":
        return (loop_grpo(rewards, mask, group, std_normalization),) * 2  # no critic: returns are the advantages
    if algorithm == "rloo":
        return (loop_rloo(rewards, mask, group),) * 2
    if algorithm == "reinforce++-baseline":  # the group's mean clipped score off each row's last token
        clipped = [max(-CLIP_REWARD, min(CLIP_REWARD, float(s))) for s in exp.scores]
        rewards = rewards.clone()
        for b in range(len(clipped)):
            first = b - b % group
            last = max(t for t in range(mask.shape[1]) if mask[b, t])
            rewards[b, last] -= sum(clipped[first:first + group]) / group
    returns = loop_discounted(rewards, mask, GAMMA)
    return loop_whiten(returns, mask), returns


ROLLOUTS = {  # case: (algorithm, options beyond the algorithm's defaults)
    "ppo": ("ppo", {}),
    "grpo": ("grpo", {}),
    "dr-grpo-with-kl-reward": ("grpo", {"std_normalization": False, "kl_ctl": 0.2}),
    "rloo": ("rloo", {}),
    "reinforce++": ("reinforce++", {}),
    "reinforce++-baseline": ("reinforce++-baseline", {}),
}


@pytest.mark.parametrize("case", list(ROLLOUTS))
def test_rollout_rewards_and_advantages_follow_the_formulas(tiny_run, case):
    algorithm, options = ROLLOUTS[case]
    trainer = build_trainer(tiny_run, algorithm, **options)
    with torch.no_grad():  # move the actor off the reference so the KL penalty is not zero
        for p in trainer.actor.module.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    exp = rollout(trainer)
    mask = exp.action_mask
    assert exp.sequences.shape[0] == PROMPTS * README[algorithm]["n_samples_per_prompt"]
    assert (exp.scores.abs() > CLIP_REWARD).any() and (exp.scores.abs() < CLIP_REWARD).any()
    assert ((exp.logprobs - exp.ref_logprobs).abs() * mask).max() > 1e-2
    assert mask.any(dim=1).all() and (mask.sum(-1) < NEW_TOKENS).any()  # some rows stopped early

    kl_ctl = options.get("kl_ctl", README[algorithm]["kl_ctl"])
    rewards = loop_rewards(exp, kl_ctl, CLIP_REWARD)
    torch.testing.assert_close(exp.rewards, rewards, atol=1e-6, rtol=0)
    advantages, returns = expected_advantages(algorithm, exp, rewards, options.get("std_normalization", True))
    torch.testing.assert_close(exp.advantages, advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.returns, returns, atol=1e-5, rtol=1e-5)


def test_per_algorithm_defaults_are_readmes_table():
    assert set(README) == set(ALGORITHMS)
    for name, documented in README.items():
        algo = config_from_options(RLConfig, algorithm=name).algo.resolve()
        assert {k: getattr(algo, k) for k in documented} == documented, name


def test_explicit_options_override_every_algorithms_defaults():
    given = dict(n_samples_per_prompt=5, kl_ctl=0.123, kl_loss_coef=0.456, kl_estimator="k2", loss_agg="token-mean",
                 cliprange=0.15, cliprange_high=0.31, std_normalization=False, gamma=0.7, lam=0.6)
    for name in ALGORITHMS:
        algo = config_from_options(RLConfig, algorithm=name, **given).algo.resolve()
        got = (algo.n_samples_per_prompt, algo.kl_ctl, algo.kl_loss_coef, algo.kl_estimator, algo.loss_agg,
               algo.clip, algo.clip_high, algo.std_normalization, algo.gamma, algo.lam)
        assert got == tuple(given.values()), name
        clip_higher = config_from_options(RLConfig, algorithm=name, cliprange=0.15).algo.resolve().clip_high
        declared = ALGORITHMS[name].cliprange_high
        assert clip_higher == (0.15 if declared is None else declared)  # clip-higher only where declared


# -- one update of the real trainer against the gradient of the loss written out here


def record_backward(engine) -> list[dict]:
    """Wrap engine.backward: each call records the loss, the weights it was computed with and the gradients it
    left (ZeRO-0 fp32: on the parameters, before the step)."""
    calls, backward = [], engine.backward

    def recorded(loss, *args, **kwargs):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        out = backward(loss, *args, **kwargs)
        calls.append({"loss": loss.item(), "weights": weights,
                      "grads": {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}})
        return out
    engine.backward = recorded
    return calls


def plain_gradients(model, weights: dict, loss_fn) -> tuple[float, dict]:
    """loss_fn(model) and its gradient with `model` (a plain copy, no DeepSpeed) holding `weights`."""
    model.load_state_dict(weights)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def gradient_gap(a: dict, b: dict) -> float:
    """|a - b| / |b| over every parameter's gradient together."""
    return math.sqrt(sum(((a[n] - b[n]) ** 2).sum().item() for n in b) / sum((g ** 2).sum().item() for g in b.values()))


def assert_same_gradient(got: dict, expected: dict, alternatives: dict[str, dict]) -> None:
    assert set(got) == set(expected)
    assert gradient_gap(got, expected) < 1e-4
    for reading, grads in alternatives.items():  # the test can tell the option's reading from these
        assert gradient_gap(grads, expected) > 1e-2, f"{reading} gives the same gradient: the test proves nothing"


def answer_logprobs(model, exp) -> torch.Tensor:
    """(B, N) log p(answer token t | what precedes it) from one forward of a plain causal LM."""
    ids, mask, P = exp.sequences, exp.attention_mask, exp.prompt_len
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, ids[:, P:, None]).squeeze(-1)


def answer_values(critic, exp) -> torch.Tensor:
    """(B, N) the critic's value of the state before answer token t (tests/test_ppo_wiring.py checks this index
    against the values of each prefix)."""
    return critic(exp.sequences, exp.attention_mask)[:, exp.prompt_len - 1:-1].float()


def reduce(per_token, mask, agg: str, norm_len: int) -> torch.Tensor:
    rows = [per_token[b][mask[b]] for b in range(per_token.shape[0])]
    if agg == "token-mean":  # every token of the minibatch weighs the same
        return torch.cat(rows).sum() / sum(len(r) for r in rows)
    if agg == "seq-mean-token-mean":  # every row weighs the same
        return torch.stack([r.mean() for r in rows if len(r)]).mean()
    assert agg == "seq-mean-token-sum-norm"  # Dr.GRPO: a constant normaliser, rows x the answer budget
    return torch.cat(rows).sum() / (len(rows) * norm_len)


def kl_estimate(logp, ref, estimator: str) -> torch.Tensor:
    log_ratio = logp - ref  # Schulman's k1, k2, k3 of KL(policy || reference) from sampled tokens
    return {"k1": log_ratio, "k2": log_ratio ** 2 / 2, "k3": torch.exp(-log_ratio) + log_ratio - 1}[estimator]


def actor_loss_fn(exp, clip: float, clip_high: float, agg: str, norm_len: int, kl_coef: float, kl_est: str):
    def loss(model):
        logp = answer_logprobs(model, exp)
        ratio = torch.exp(logp - exp.logprobs)
        surrogate = torch.maximum(-exp.advantages * ratio, -exp.advantages * ratio.clamp(1 - clip, 1 + clip_high))
        total = reduce(surrogate, exp.action_mask, agg, norm_len)
        if kl_coef:
            total = total + kl_coef * reduce(kl_estimate(logp, exp.ref_logprobs, kl_est), exp.action_mask, agg,
                                             norm_len)
        return total
    return loss


def random_update_batch(trainer, seed: int):
    """A real rollout cut to TRAIN_TOKENS answer columns (fewer than --max-answer-seq-len, so Dr.GRPO's normaliser
    is not the batch's width), with fresh random old and reference logprobs, advantages, old values and returns:
    ratios of about 0.7-1.5, so the clip binds on both sides."""
    exp = rollout(trainer, seed)
    P, K = exp.prompt_len, TRAIN_TOKENS
    exp = dataclasses.replace(exp, sequences=exp.sequences[:, :P + K], attention_mask=exp.attention_mask[:, :P + K],
                              action_mask=exp.action_mask[:, :K])
    mask, g = exp.action_mask, torch.Generator().manual_seed(seed)
    assert mask.any(dim=1).all() and len(set(mask.sum(-1).tolist())) > 1  # answers of several lengths
    with torch.no_grad():
        now = answer_logprobs(trainer.actor.module, exp)
        values = answer_values(trainer.critic.module, exp) if trainer.critic is not None else None
    noise = lambda scale: (torch.randn(mask.shape, generator=g) * scale).to(mask.device) * mask  # noqa: E731
    old = now + (torch.rand(mask.shape, generator=g) - 0.5).to(mask.device) * 0.8 * mask
    return dataclasses.replace(exp, logprobs=old * mask, ref_logprobs=(now + noise(1.0)) * mask,
                               advantages=noise(1.0), returns=noise(1.0),
                               values=None if values is None else (values + noise(0.3)) * mask)


ACTOR_STEPS = {  # grpo's actor update under: its README defaults; k1 with token-mean; k2 with Dr.GRPO's sum-norm
    "grpo-defaults": {},
    "k1-token-mean": {"kl_loss_coef": 0.3, "kl_estimator": "k1", "loss_agg": "token-mean"},
    "k2-seq-mean-token-sum-norm": {"kl_loss_coef": 0.3, "kl_estimator": "k2", "loss_agg": "seq-mean-token-sum-norm"},
}
CLIP, CLIP_HIGH = 0.1, 0.25
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@pytest.mark.parametrize("case", list(ACTOR_STEPS))
def test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss(tiny_run, case):
    options = ACTOR_STEPS[case]
    trainer = build_trainer(tiny_run, "grpo", cliprange=CLIP, cliprange_high=CLIP_HIGH, **options)
    exp = random_update_batch(trainer, seed=3)
    calls = record_backward(trainer.actor)
    out = trainer.train_on(exp)
    assert len(calls) == 1

    documented = {**README["grpo"], **options}
    agg, coef, est = documented["loss_agg"], documented["kl_loss_coef"], documented["kl_estimator"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_run / "actor").to(exp.sequences.device)
    plain.load_state_dict(calls[0]["weights"])
    with torch.no_grad():
        ratio = torch.exp(answer_logprobs(plain, exp) - exp.logprobs)[exp.action_mask]
        adv = exp.advantages[exp.action_mask]
    assert ((adv > 0) & (ratio > 1 + CLIP) & (ratio < 1 + CLIP_HIGH)).any()  # only clip-higher lets these move
    assert ((adv > 0) & (ratio > 1 + CLIP_HIGH)).any() and ((adv < 0) & (ratio < 1 - CLIP)).any()

    def gradient(clip_high=CLIP_HIGH, agg=agg, norm_len=NEW_TOKENS, coef=coef, est=est):
        return plain_gradients(plain, calls[0]["weights"], actor_loss_fn(exp, CLIP, clip_high, agg, norm_len, coef,
                                                                         est))
    loss, expected = gradient()
    assert calls[0]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert out["kl_loss"] == pytest.approx(gradient(coef=1.0)[0] - gradient(coef=0.0)[0], rel=1e-4, abs=1e-7)
    alternatives = {"cliprange_high ignored": gradient(clip_high=CLIP)[1], "no KL loss": gradient(coef=0.0)[1],
                    "KL coefficient 1": gradient(coef=1.0)[1],
                    **{f"KL estimator {k}": gradient(est=k)[1] for k in ("k1", "k2", "k3") if k != est},
                    **{f"aggregation {a}": gradient(agg=a)[1] for a in AGGREGATIONS if a != agg}}
    if agg == "seq-mean-token-sum-norm":
        alternatives["normalised by the batch's answer width"] = gradient(norm_len=TRAIN_TOKENS)[1]
    assert_same_gradient(calls[0]["grads"], expected, alternatives)



UNSUP_COEF, EMA_DECAY, CLIP_VALUE = 0.37, 0.9, 0.3


def random_ptx_batch(vocab: int, seed: int) -> dict:
    """Right-padded random token rows with -100 labels on the padding and on each row's first 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 10), generator=g)
    lengths = torch.randint(6, 11, (4,), generator=g)
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def lm_loss_fn(batch: dict):
    def loss(model):  # the mean over labelled tokens of -log p(token | the tokens before it)
        ids, mask, labels = (batch[k].to(model.device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        kept = target != -100
        logp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return -logp[kept].mean()
    return loss


def value_loss_fn(exp, clip: float):
    def loss(critic):  # 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), token mean
        values = answer_values(critic, exp)
        clipped = torch.minimum(torch.maximum(values, exp.values - clip), exp.values + clip)
        per_token = torch.maximum((values - exp.returns) ** 2, (clipped - exp.returns) ** 2) / 2
        return reduce(per_token, exp.action_mask, "token-mean", NEW_TOKENS)
    return loss


@pytest.fixture(scope="module")
def ppo_step(tiny_run):
    """One PPO minibatch update (actor, PTX, critic, EMA) of the real trainer on a random batch, recorded."""
    trainer = build_trainer(tiny_run, "ppo", per_device_generation_batch_size=8, cliprange=CLIP,
                            cliprange_value=CLIP_VALUE, unsup_coef=UNSUP_COEF, enable_ema=True, ema_decay=EMA_DECAY)
    exp = random_update_batch(trainer, seed=4)
    ptx = random_ptx_batch(trainer.actor.module.config.vocab_size, seed=5)
    with torch.no_grad():  # an EMA that is not the actor's copy any more, as after some rounds
        for p in trainer.ema.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ema_before = {n: p.detach().clone() for n, p in trainer.ema.named_parameters()}
    actor_before = {n: p.detach().clone() for n, p in trainer.actor.module.named_parameters()}
    actor_calls, critic_calls = record_backward(trainer.actor), record_backward(trainer.critic)
    out = trainer.train_on(exp, ptx)
    return dict(trainer=trainer, exp=exp, ptx=ptx, out=out, actor_calls=actor_calls, critic_calls=critic_calls,
                ema_before=ema_before, actor_before=actor_before,
                ema_after={n: p.detach().clone() for n, p in trainer.ema.named_parameters()},
                actor_after={n: p.detach().clone() for n, p in trainer.actor.module.named_parameters()})


def test_ppo_actor_step_clips_the_ratio_symmetrically_without_a_kl_loss(tiny_run, ppo_step):
    exp, calls = ppo_step["exp"], ppo_step["actor_calls"]
    assert len(calls) == 2 and "kl_loss" not in ppo_step["out"]  # the policy step, then the PTX step
    plain = AutoModelForCausalLM.from_pretrained(tiny_run / "actor").to(exp.sequences.device)

    def gradient(clip=CLIP, kl_coef=README["ppo"]["kl_loss_coef"], agg=README["ppo"]["loss_agg"]):
        return plain_gradients(plain, calls[0]["weights"], actor_loss_fn(exp, clip, clip, agg, NEW_TOKENS, kl_coef,
                                                                         "k3"))
    loss, expected = gradient()
    assert calls[0]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert_same_gradient(calls[0]["grads"], expected, {"unclipped": gradient(clip=10.0)[1],
                                                       "a KL loss term": gradient(kl_coef=0.5)[1],
                                                       "seq-mean-token-mean": gradient(agg="seq-mean-token-mean")[1]})


def test_ptx_step_is_the_lm_loss_times_unsup_coef(tiny_run, ppo_step):
    call = ppo_step["actor_calls"][1]
    plain = AutoModelForCausalLM.from_pretrained(tiny_run / "actor").to(ppo_step["exp"].sequences.device)
    lm_loss, lm_grads = plain_gradients(plain, call["weights"], lm_loss_fn(ppo_step["ptx"]))
    assert ppo_step["out"]["ptx_loss"] == pytest.approx(lm_loss, rel=1e-5)
    assert call["loss"] == pytest.approx(UNSUP_COEF * lm_loss, rel=1e-5)
    before = ppo_step["actor_before"]
    assert any(not torch.equal(call["weights"][n], before[n]) for n in before), "PTX comes after the policy step"
    expected = {n: UNSUP_COEF * g for n, g in lm_grads.items()}
    assert_same_gradient(call["grads"], expected, {"unscaled": lm_grads,
                                                   "squared": {n: UNSUP_COEF * g for n, g in expected.items()}})


def test_critic_step_clips_values_at_cliprange_value(tiny_run, ppo_step):
    exp, calls = ppo_step["exp"], ppo_step["critic_calls"]
    assert len(calls) == 1
    plain = RewardModel.from_pretrained(tiny_run / "reward").to(exp.sequences.device)
    loss, expected = plain_gradients(plain, calls[0]["weights"], value_loss_fn(exp, CLIP_VALUE))
    assert calls[0]["loss"] == pytest.approx(loss, rel=1e-5) and ppo_step["out"]["critic_loss"] == calls[0]["loss"]
    alternatives = {"unclipped": plain_gradients(plain, calls[0]["weights"], value_loss_fn(exp, 1e9))[1],
                    "the policy's cliprange": plain_gradients(plain, calls[0]["weights"], value_loss_fn(exp, CLIP))[1]}
    assert_same_gradient(calls[0]["grads"], expected, alternatives)


def test_ema_moves_toward_the_updated_actor_by_one_minus_decay(ppo_step):
    before, actor, after = ppo_step["ema_before"], ppo_step["actor_after"], ppo_step["ema_after"]
    assert any(not torch.equal(actor[n], ppo_step["actor_before"][n]) for n in actor)  # the actor stepped
    for name in before:
        expected = EMA_DECAY * before[name] + (1 - EMA_DECAY) * actor[name]
        torch.testing.assert_close(after[name], expected, atol=1e-7, rtol=1e-6, msg=name)
    swapped = {n: (1 - EMA_DECAY) * before[n] + EMA_DECAY * actor[n] for n in before}
    assert max((swapped[n] - after[n]).abs().max() for n in before) > 1e-4  # the test tells decay from 1 - decay
