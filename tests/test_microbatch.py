"""Training forwards without padding waste (rlhf/core/microbatch.py): token-budget micro-batches, trimmed or packed,
give the padded forward's logprobs, values and scores; each aggregation's share puts a minibatch's loss back
together from its micro-batches; and the step-3 trainer's update (parameters after one step, every logged loss) with
--max-tokens-per-microbatch / --pack-sequences is the padded update, for PPO with a critic and GRPO."""
import dataclasses

import pytest
import torch

from rlhf.cli.presets import get_preset
from rlhf.core.experience import (
    action_logprobs,
    action_values,
    batch_scores,
    micro_logprobs,
    micro_values,
)
from rlhf.core.losses import LOSS_AGGREGATIONS, aggregate, aggregation_share
from rlhf.core.microbatch import PACKABLE_MODEL_TYPES, Microbatching, in_batch_order, split_rows
from rlhf.data import build_prompt_dataset, load_step_examples
from rlhf.models import RewardModel
from rlhf.runtime.config import config_from_options
from rlhf.runtime.distributed import init_distributed
from rlhf.steps.rl_config import RLConfig
from rlhf.steps.rl_trainer import RLTrainer, records
from tests.hf_models import tiny_model

# rows of a left-padded prompt (P = 7) and a right-padded answer (N = 9): one prompt of a single token, one answer of
# none, one of a single token, two answers filling N
PROMPT_LENS, ANSWER_LENS, P, N = [7, 3, 5, 1, 6, 2], [9, 1, 0, 4, 9, 6], 7, 9


def ragged_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(PROMPT_LENS), P + N, dtype=torch.long)
    for i, (p, a) in enumerate(zip(PROMPT_LENS, ANSWER_LENS)):
        mask[i, P - p:P + a] = 1
    return torch.randint(3, 100, mask.shape, generator=g) * mask, mask


@pytest.mark.parametrize("family", PACKABLE_MODEL_TYPES)
def test_layouts_give_the_padded_forward(family, tmp_path):
    model = tiny_model(family, tmp_path)
    critic = RewardModel(tiny_model(family, tmp_path / "critic", seed=1).model)
    seq, mask = ragged_batch()
    answer = mask[:, P:]
    with torch.no_grad():
        logprobs = action_logprobs(model, seq, mask, P) * answer                 # (B, N)
        values = action_values(critic, seq, mask, P) * answer
        scores = critic.score(seq, mask)                                         # (B,)
        for pack in (False, True):
            for budget in (0, 20, 40):
                micro = Microbatching(budget, pack)
                batches = micro.plan(seq, mask, P)
                assert len(batches) >= (3 if budget == 20 else 1)
                assert all((mb.attention_mask is None) == pack for mb in batches)
                got = in_batch_order(batches, [micro_logprobs(model, mb) for mb in batches])
                torch.testing.assert_close(got, logprobs, atol=2e-6, rtol=0)
                got = in_batch_order(batches, [micro_values(critic, mb) for mb in batches])
                torch.testing.assert_close(got, values, atol=2e-6, rtol=0)
                torch.testing.assert_close(batch_scores(critic, seq, mask, P, micro), scores, atol=2e-6, rtol=0)
        # ranks that must run as many forwards (ZeRO-3): ghost micro-batches change nothing
        micro = Microbatching(20, True, align=lambda n: n + 2)
        batches = micro.plan(seq, mask, P)
        assert [mb.ghost for mb in batches][-3:] == [False, True, True]
        got = in_batch_order(batches, [micro_logprobs(model, mb) for mb in batches])
        torch.testing.assert_close(got, logprobs, atol=2e-6, rtol=0)
        # positions that do not restart at each packed row let the rows attend to each other: not the same numbers
        mb = Microbatching(0, True).plan(seq, mask, P)[0]
        joined = dataclasses.replace(mb, position_ids=torch.arange(mb.input_ids.shape[1])[None])
        assert (in_batch_order([joined], [micro_logprobs(model, joined)]) - logprobs).abs().max() > 1e-3


def test_split_rows_keeps_the_budget_and_every_row_once():
    lengths = torch.tensor([5, 17, 3, 9, 9, 1, 30, 12])
    for pack in (False, True):
        groups = split_rows(lengths, 24, pack)
        assert sorted(torch.cat(groups).tolist()) == list(range(8))
        for g in groups:
            cost = int(lengths[g].sum()) if pack else len(g) * int(lengths[g].max())
            assert cost <= 24 or len(g) == 1  # a row past the budget goes alone
    assert split_rows(lengths, 24, False)[0].tolist() == [6]  # longest first
    assert len(split_rows(lengths, 0, False)) == 1


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregation_shares_rebuild_the_minibatch_loss(mode):
    g = torch.Generator().manual_seed(3)
    losses = torch.randn(7, 6, generator=g)
    mask = torch.rand(7, 6, generator=g) > 0.4
    mask[2] = False  # a row without any answer token
    full = aggregate(losses, mask, mode, norm_len=6)
    for parts in ([[0, 1, 2, 3, 4, 5, 6]], [[6, 0], [2], [1, 5, 3], [4]]):
        rebuilt = sum(aggregation_share(mask[r], mask, mode) * aggregate(losses[r], mask[r], mode, norm_len=6)
                      for r in map(torch.tensor, parts))
        torch.testing.assert_close(rebuilt, full, atol=1e-6, rtol=1e-6)
    # the plain mean of the micro-batches' losses (equal weights) is not it: the shares are what make it exact
    parts = [torch.tensor(r) for r in ([6, 0], [2], [1, 5, 3], [4])]
    plain = sum(aggregate(losses[r], mask[r], mode, norm_len=6) for r in parts) / len(parts)
    assert abs(plain - full) > 1e-3


def make_trainer(tiny_run, algorithm: str, micro: dict, **options) -> RLTrainer:
    cfg = config_from_options(
        RLConfig, actor_model_name_or_path=str(tiny_run / "actor"), critic_model_name_or_path=str(tiny_run / "reward"),
        algorithm=algorithm, data=[str(tiny_run / "data" / "pairs.jsonl")], data_split="0,1,1",
        per_device_generation_batch_size=8 if algorithm == "ppo" else 2, per_device_training_batch_size=8,
        max_prompt_seq_len=16, max_answer_seq_len=12, num_warmup_steps=0, actor_learning_rate=1e-3,
        critic_learning_rate=1e-3, reuse_rollout_logprobs=False, disable_tqdm=True, **micro, **options)
    torch.manual_seed(0)
    return RLTrainer(cfg, get_preset("tiny").tokenizer(), total_steps=10, device=init_distributed().device,
                     reward_fn=None)


def record_gradients(engine, into: list) -> None:
    """Make `engine.step()` append a copy of every parameter's gradient to `into` first."""
    step = engine.step

    def recorded(*args, **kwargs):
        into.extend(p.grad.clone() for p in engine.module.parameters())
        return step(*args, **kwargs)
    engine.step = recorded


@pytest.mark.parametrize("algorithm, micro, options", [
    ("ppo", {"max_tokens_per_microbatch": 40}, {}),
    ("grpo", {"max_tokens_per_microbatch": 40, "pack_sequences": True}, {}),
    ("grpo", {"max_tokens_per_microbatch": 40}, {"loss_agg": "seq-mean-token-sum-norm"}),
], ids=["ppo-trimmed", "grpo-packed", "drgrpo-trimmed"])
def test_microbatched_update_is_the_padded_update(tiny_run, algorithm, micro, options):
    padded = make_trainer(tiny_run, algorithm, {"max_tokens_per_microbatch": 0}, **options)
    split = make_trainer(tiny_run, algorithm, micro, **options)
    assert not padded.micro.enabled and split.micro.enabled
    if algorithm == "ppo":  # and one ghost micro-batch per forward, as a rank with fewer rows runs under ZeRO-3
        split.micro = dataclasses.replace(split.micro, align=lambda n: n + 1)
    tokenizer = get_preset("tiny").tokenizer()
    dataset = build_prompt_dataset(tokenizer, load_step_examples(padded.cfg.data, step=3, split="0,1,1")[:8], 16)
    batch = dataset.collate(list(range(padded.cfg.loop.per_device_generation_batch_size)))
    exps = [t.rollout(batch, *records(dataset, batch), torch.Generator().manual_seed(2))[0] for t in (padded, split)]
    mask = exps[0].action_mask
    lengths = mask.sum(-1)
    assert lengths.min() < lengths.max() and (lengths < mask.shape[1]).any()  # ragged: some answers ended at EOS
    assert len(split.micro.plan(exps[0].sequences, exps[0].attention_mask, exps[0].prompt_len)) >= 3
    torch.testing.assert_close(exps[1].sequences, exps[0].sequences, atol=0, rtol=0)
    for name in ("logprobs", "ref_logprobs", "values", "scores", "advantages", "returns"):
        if getattr(exps[0], name) is not None:  # the micro-batched forwards of the rollout
            torch.testing.assert_close(getattr(exps[1], name), getattr(exps[0], name), atol=1e-5, rtol=1e-5)
    engines = [[t.actor] + ([t.critic] if t.critic is not None else []) for t in (padded, split)]
    # each engine's accumulated gradients when it steps (Adam's first step is nearly lr * sign(g): the parameters
    # alone would hide a wrong scale of the gradient)
    grads = [[], []]
    for side, es in enumerate(engines):
        for engine in es:
            record_gradients(engine, grads[side])
    before = [[p.detach().clone() for e in es for p in e.module.parameters()] for es in engines]
    out = [t.train_on(exps[0]) for t in (padded, split)]  # the same rollout: the update alone is compared
    assert set(out[0]) == set(out[1]) and "actor_loss" in out[0]
    assert ("critic_loss" in out[0]) == (algorithm == "ppo") and ("kl_loss" in out[0]) == (algorithm != "ppo")
    for key in out[0]:
        assert out[1][key] == pytest.approx(out[0][key], rel=1e-5, abs=1e-7), key
    assert len(grads[0]) == len(grads[1]) == len(before[0]) and max(float(g.abs().max()) for g in grads[0]) > 1e-4
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)
    after = [[p.detach() for e in es for p in e.module.parameters()] for es in engines]
    # one Adam step of lr 1e-3, lr * g / (|g| + eps): where |g| is near eps (1e-8) the step's slope in g is
    # lr / (4 eps), so the gradients' fp32 differences (< 1e-7 above) can move a few such steps by a few % of lr; all
    # others agree to 1e-6 (0.1% of lr)
    diff = torch.cat([((b - b0) - (a - a0)).abs().flatten()
                      for a, b, a0, b0 in zip(after[0], after[1], before[0], before[1])])
    assert float(diff.max()) < 5e-5 and float((diff > 1e-6).float().mean()) < 1e-4


def test_packing_is_refused_for_a_family_it_is_not_checked_for(tmp_path):
    tiny_model("gpt2", tmp_path)  # absolute positions from position_ids, but its mask is not checked packed
    cfg = config_from_options(RLConfig, actor_model_name_or_path=str(tmp_path / "gpt2"), algorithm="grpo",
                              reward_fn="synthetic", pack_sequences=True, disable_tqdm=True)
    with pytest.raises(ValueError, match=rf"^--pack-sequences: {tmp_path / 'gpt2'} is a gpt2 model; packing is "
                       r"checked for llama, mistral, qwen2, qwen3 \(use --no-pack-sequences"):
        RLTrainer(cfg, None, total_steps=1, device=init_distributed().device, reward_fn=None)
