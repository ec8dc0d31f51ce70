"""PPO's old logprobs reused from the rollout (--reuse-rollout-logprobs): the same numbers the engine reported,
audited against the training forward every --logprob-audit-interval rollouts, the old behaviour behind
--no-reuse-rollout-logprobs, and a one-line refusal for an actor with dropout."""
import pytest
import torch

from rlhf.cli.presets import get_preset
from rlhf.core.experience import action_logprobs
from rlhf.data import build_prompt_dataset, load_step_examples
from rlhf.runtime.config import config_from_options
from rlhf.runtime.distributed import init_distributed, make_dataloader
from rlhf.steps.rl import main
from rlhf.steps.rl_config import RLConfig
from rlhf.steps.rl_trainer import RLTrainer, records

ROWS = 4


def make_trainer(tiny_run, **fields) -> RLTrainer:
    cfg = config_from_options(
        RLConfig, actor_model_name_or_path=str(tiny_run / "actor"),
        critic_model_name_or_path=str(tiny_run / "reward"), per_device_generation_batch_size=ROWS,
        per_device_training_batch_size=ROWS, max_prompt_seq_len=get_preset("tiny").ppo.max_prompt_seq_len,
        max_answer_seq_len=8, disable_tqdm=True, **fields)
    cfg.validate()
    return RLTrainer(cfg, get_preset("tiny").tokenizer(), total_steps=10, device=init_distributed().device,
                     reward_fn=None)


@pytest.fixture(scope="module")
def prompts(tiny_run):
    dataset = build_prompt_dataset(get_preset("tiny").tokenizer(),
                                   load_step_examples([str(tiny_run / "data" / "pairs.jsonl")], step=3,
                                                      split="0,1,1")[:ROWS], 256)
    batch = next(iter(make_dataloader(dataset, ROWS, shuffle=False)))
    return (batch, *records(dataset, batch))


def training_forward(trainer, exp) -> torch.Tensor:
    trainer.actor.module.eval()
    with torch.no_grad():
        logprobs = action_logprobs(trainer.actor.module, exp.sequences, exp.attention_mask, exp.prompt_len)
    trainer.actor.module.train()
    return logprobs * exp.action_mask


def test_reused_logprobs_are_the_rollouts_and_every_kth_rollout_is_audited(tiny_run, prompts):
    # reuse unset: on, the tiny actor has no dropout; the reference scored by the engine's prefill
    trainer = make_trainer(tiny_run, logprob_audit_interval=2, score_reference_with_engine=True)
    assert trainer.reuse_logprobs and trainer.ref_engine is not None
    generator = torch.Generator().manual_seed(3)
    gaps = []
    for _ in range(3):
        exp, stats = trainer.rollout(*prompts, generator)
        assert torch.equal(exp.logprobs, exp.rollout_logprobs)
        if not gaps:  # no update yet: the policy is the reference, scored by the engine's prefill
            torch.testing.assert_close(exp.ref_logprobs, exp.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(exp.logprobs, training_forward(trainer, exp), atol=1e-5, rtol=0)
        gaps.append(stats.logprob_gap)
        trainer.train_on(exp)
    assert gaps[1] is None and all(0 <= g < 1e-5 for g in (gaps[0], gaps[2])), gaps


def test_without_reuse_the_training_forward_gives_the_old_logprobs_every_rollout(tiny_run, prompts):
    trainer = make_trainer(tiny_run, reuse_rollout_logprobs=False)
    assert trainer.ref_engine is None
    exp, stats = trainer.rollout(*prompts, torch.Generator().manual_seed(3))
    assert torch.equal(exp.logprobs, training_forward(trainer, exp))
    assert stats.logprob_gap == (exp.rollout_logprobs - exp.logprobs).abs().max().item() < 1e-5
    exp, stats = trainer.rollout(*prompts, torch.Generator().manual_seed(4))
    assert stats.logprob_gap is not None


def test_reuse_refused_with_dropout_and_off_by_default(tiny_run):
    with pytest.raises(ValueError, match="--reuse-rollout-logprobs needs an actor without dropout, this one has "
                                         r"attention_dropout=0.1.*--actor-dropout 0 or --no-reuse-rollout-logprobs"):
        make_trainer(tiny_run, actor_dropout=0.1, reuse_rollout_logprobs=True)
    with pytest.warns(UserWarning, match=r"the actor has dropout \(attention_dropout=0.1\): PPO's old logprobs"):
        assert not make_trainer(tiny_run, actor_dropout=0.1).reuse_logprobs


def test_cli_refuses_reuse_with_dropout_in_one_line(tiny_run, capsys):
    argv = ["--actor-model-name-or-path", str(tiny_run / "actor"), "--critic-model-name-or-path",
            str(tiny_run / "reward"), "--data", str(tiny_run / "data" / "pairs.jsonl"), "--output-dir",
            str(tiny_run / "reuse_refused"), "--actor-dropout", "0.1", "--reuse-rollout-logprobs", "--disable-tqdm"]
    from rlhf.runtime.process import run_cli

    assert run_cli(main, "python -m rlhf.steps.rl", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m rlhf.steps.rl: error: --reuse-rollout-logprobs needs an actor without dropout")
