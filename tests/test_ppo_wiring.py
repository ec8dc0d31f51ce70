"""PPO's wiring, checked on real rounds of the trainer against quantities the test computes itself, without
rlhf.core.losses or the trainer's indexing: the critic's values are those of each answer prefix, the per-token
rewards carry the KL penalty and the clipped score, GAE is a plain backward loop, the critic steps on the
value loss, and the policy loss clips the ratio once it has moved (a second PPO epoch)."""
import pytest
import torch

from rlhf.cli.presets import get_preset
from rlhf.data import build_prompt_dataset, load_step_examples
from rlhf.runtime.config import config_from_options
from rlhf.runtime.distributed import init_distributed, make_dataloader
from rlhf.steps.rl_config import RLConfig
from rlhf.steps.rl_trainer import RLTrainer, records

ROWS, MINIBATCH, NEW_TOKENS = 8, 4, 8


def prefix(exp, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt and its first t answer tokens: (ids, attention_mask), (B, P + t) each."""
    end = exp.prompt_len + t
    return exp.sequences[:, :end], exp.attention_mask[:, :end]


@torch.no_grad()
def prefix_values(critic, exp) -> torch.Tensor:
    """(B, N) the critic's value of the state before answer token t: its value at the end of that prefix."""
    return torch.stack([critic(*prefix(exp, t))[:, -1] for t in range(exp.action_mask.shape[1])], dim=1)


@torch.no_grad()
def prefix_logprobs(actor, exp) -> torch.Tensor:
    """(B, N) log p(answer token t | the prefix before it), from the actor's last logits on that prefix."""
    cols = []
    for t in range(exp.action_mask.shape[1]):
        ids, mask = prefix(exp, t)
        logits = actor(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        token = exp.sequences[:, exp.prompt_len + t]                                   # (B,)
        cols.append(torch.log_softmax(logits[:, -1].float(), -1).gather(-1, token[:, None]).squeeze(-1))
    return torch.stack(cols, dim=1)


def loop_rewards(exp, kl_ctl: float, clip: float) -> torch.Tensor:
    rewards = torch.zeros_like(exp.logprobs)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if exp.action_mask[b, t]]
        for t in steps:
            rewards[b, t] = -kl_ctl * (exp.logprobs[b, t] - exp.ref_logprobs[b, t])
        if steps:
            rewards[b, steps[-1]] += max(-clip, min(clip, float(exp.scores[b])))
    return rewards


def loop_gae(rewards, values, mask, gamma: float, lam: float):
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())  # answers are contiguous from column 0
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            advantages[b, t] = running
            returns[b, t] = running + float(values[b, t])
    return advantages, returns


@pytest.fixture(scope="module")
def trainer_and_prompts(tiny_run):
    budget = get_preset("tiny").ppo
    cfg = config_from_options(
        RLConfig, actor_model_name_or_path=str(tiny_run / "actor"),
        critic_model_name_or_path=str(tiny_run / "reward"), data=[str(tiny_run / "data" / "pairs.jsonl")],
        data_split="0,1,1", output_dir=str(tiny_run / "wiring"), per_device_generation_batch_size=ROWS,
        per_device_training_batch_size=MINIBATCH, max_prompt_seq_len=budget.max_prompt_seq_len,
        max_answer_seq_len=NEW_TOKENS, num_warmup_steps=0, actor_learning_rate=2e-3, critic_learning_rate=1e-3,
        kl_ctl=0.5, clip_reward_value=1.0, cliprange=0.02, gamma=0.9, lam=0.8, disable_tqdm=True)
    tokenizer = get_preset("tiny").tokenizer()
    dist = init_distributed()
    torch.manual_seed(0)
    trainer = RLTrainer(cfg, tokenizer, total_steps=100, device=dist.device, reward_fn=None)
    prompts = build_prompt_dataset(tokenizer, load_step_examples(cfg.data, step=3, split=cfg.data_split)[:2 * ROWS],
                                   cfg.sampling.max_prompt_seq_len)
    return trainer, [(batch, *records(prompts, batch)) for batch in make_dataloader(prompts, ROWS, shuffle=False)]


def check_rollout(trainer, exp) -> None:
    cfg = trainer.cfg
    mask = exp.action_mask
    assert mask.any(dim=1).all() and not mask.all()  # some rows stopped at EOS: the masks are exercised
    torch.testing.assert_close(exp.values, prefix_values(trainer.critic.module, exp) * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.logprobs, prefix_logprobs(trainer.actor.module, exp) * mask, atol=1e-5, rtol=0)
    rewards = loop_rewards(exp, cfg.algo.kl_ctl, cfg.algo.clip_reward_value)
    torch.testing.assert_close(exp.rewards, rewards, atol=1e-6, rtol=0)
    advantages, returns = loop_gae(rewards, exp.values, mask, cfg.algo.gamma, cfg.algo.lam)
    torch.testing.assert_close(exp.advantages, advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.returns, returns, atol=1e-5, rtol=1e-5)


def test_two_ppo_rounds_match_independent_formulas(trainer_and_prompts):
    trainer, batches = trainer_and_prompts
    cfg = trainer.cfg
    generator = torch.Generator().manual_seed(5)

    exp, _ = trainer.rollout(*batches[0], generator)
    check_rollout(trainer, exp)
    # the policy starts as the reference: its old logprobs (the rollout's, reused) and the reference's (its training
    # forward) differ by the rollout gap only
    torch.testing.assert_close(exp.logprobs, exp.ref_logprobs, atol=1e-5, rtol=0)

    # epoch 1, first minibatch: the critic has not moved, so the value loss is plain 0.5 * (V - R)^2
    mb = next(exp.minibatches(MINIBATCH))
    critic_before = [p.detach().clone() for p in trainer.critic.module.parameters()]
    m = mb.action_mask.float()
    expected_value_loss = (0.5 * (mb.values - mb.returns) ** 2 * m).sum() / m.sum()
    out = trainer.train_on(mb, None)
    assert out["critic_loss"] == pytest.approx(expected_value_loss.item(), rel=1e-4, abs=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(critic_before, trainer.critic.module.parameters())]
    assert all(moved), "the critic did not step"
    for rest in list(exp.minibatches(MINIBATCH))[1:]:
        trainer.train_on(rest, None)

    # epoch 2: the policy has moved away from the one that generated, so the clip is active
    mb = next(exp.minibatches(MINIBATCH))
    now = prefix_logprobs(trainer.actor.module, mb) * mb.action_mask
    ratio = torch.exp(now - mb.logprobs)
    m = mb.action_mask.float()
    eps = cfg.algo.cliprange
    clipped = torch.maximum(-mb.advantages * ratio, -mb.advantages * ratio.clamp(1 - eps, 1 + eps))
    expected, unclipped = (clipped * m).sum() / m.sum(), (-mb.advantages * ratio * m).sum() / m.sum()
    assert abs(expected - unclipped) > 1e-3, "the ratio stayed inside the clip range: the test would prove nothing"
    out = trainer.train_on(mb, None)
    assert out["actor_loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)

    # round 2: the actor now differs from the reference, so the KL penalty is in the rewards
    exp2, _ = trainer.rollout(*batches[1], generator)
    check_rollout(trainer, exp2)
    assert ((exp2.logprobs - exp2.ref_logprobs).abs() * exp2.action_mask).max() > 1e-3


def test_grpo_builds_no_critic_and_groups_its_samples(tiny_run):
    """A critic-free run holds two DeepSpeed engines (actor with an optimizer, frozen reference), no critic and
    no reward model; each prompt's answers sit in consecutive rows and their advantages are centred per group."""
    from deepspeed import DeepSpeedEngine

    from rlhf.core.rewards import RewardFunction

    cfg = config_from_options(
        RLConfig, actor_model_name_or_path=str(tiny_run / "actor"), algorithm="grpo", reward_fn="synthetic",
        data=[str(tiny_run / "data" / "pairs.jsonl")], data_split="0,1,1", n_samples_per_prompt=3,
        per_device_generation_batch_size=4, per_device_training_batch_size=12, max_prompt_seq_len=16,
        max_answer_seq_len=8, num_warmup_steps=0, disable_tqdm=True)
    tokenizer = get_preset("tiny").tokenizer()
    trainer = RLTrainer(cfg, tokenizer, total_steps=10, device=init_distributed().device,
                        reward_fn=RewardFunction("synthetic"))
    engines = {name: v for name, v in vars(trainer).items() if isinstance(v, DeepSpeedEngine)}
    assert set(engines) == {"actor", "ref"} and trainer.critic is None and trainer.reward_model is None
    assert engines["actor"].optimizer is not None and engines["ref"].optimizer is None
    dataset = build_prompt_dataset(tokenizer, load_step_examples(cfg.data, step=3, split=cfg.data_split)[:4], 16)
    batch = dataset.collate(list(range(4)))
    exp, _ = trainer.rollout(batch, *records(dataset, batch), torch.Generator().manual_seed(0))
    assert exp.values is None and exp.sequences.shape[0] == 12
    P = exp.prompt_len
    assert torch.equal(exp.sequences[:, :P], batch["input_ids"].repeat_interleave(3, dim=0))
    first = exp.advantages[:, 0].view(4, 3)  # every row has at least one answer token
    torch.testing.assert_close(first.sum(-1), torch.zeros(4), atol=1e-5, rtol=0)  # centred within each group
    out = trainer.train_on(exp)
    assert "critic_loss" not in out and out["kl_loss"] == 0  # the policy is still the reference: k3 is 0
    backward, losses = trainer.actor.backward, []
    trainer.actor.backward = lambda loss: (losses.append(loss.item()), backward(loss))
    out = trainer.train_on(exp)  # a second epoch: the policy has moved away from the reference
    # the actor stepped on the policy loss plus the KL loss term (GRPO's 0.04 by default)
    assert out["kl_loss"] > 1e-6
    assert losses == [pytest.approx(out["actor_loss"] + 0.04 * out["kl_loss"], rel=1e-6)]
