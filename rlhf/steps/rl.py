"""Step 3: reinforcement learning of the actor, rollouts through the hybrid engine. One loop for every
algorithm (rlhf/steps/rl_trainer.py): rollout -> rewards -> advantages -> update.

    python -m rlhf.steps.rl --actor-model-name-or-path out/actor --critic-model-name-or-path out/reward \
        --data pairs.jsonl --output-dir out/ppo
    python -m rlhf.steps.rl --algorithm grpo --reward-fn synthetic --actor-model-name-or-path out/actor ...

`--algorithm ppo` is DeepSpeed-Chat's PPO: per-token reward -kl_ctl * (logp - logp_ref) with the clipped reward
score added at the last answer token, GAE (gamma 1, lambda 0.95) with a critic, clipped policy surrogate and
clipped value loss (0.2 each), `ppo_epochs` passes over `generation_batches` rollouts, an optional EMA of the
actor and an optional pre-training (PTX) loss. The other algorithms (rlhf/core/algorithms.py) are critic-free:
`--n-samples-per-prompt` answers per prompt, an advantage estimator from rlhf/core/advantages.py, KL as a reward
penalty or a loss term. The options are typed groups (rlhf/steps/rl_config.py). Rewards come from the reward
model or from `--reward-fn` (rlhf/core/rewards.py).
PPO's "old" logprobs are those the hybrid engine reported while generating (`--reuse-rollout-logprobs`, on when
the actor has no dropout); every `--logprob-audit-interval` rollouts (and every rollout with
`--no-reuse-rollout-logprobs`) the training forward runs too and the round logs the largest gap between the two.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf.core.algorithms import Algorithm
from rlhf.core.dynamic_sampling import concat, informative_rows, select_rows
from rlhf.core.experience import sequence_kl
from rlhf.core.rewards import RewardFunction
from rlhf.data import build_prompt_dataset, build_sft_dataset, load_step_examples, train_eval_split
from rlhf.data.synthetic import gold_scores
from rlhf.envs.rollout import trajectory_records
from rlhf.models import load_tokenizer, require_checkpoint, require_model_source
from rlhf.runtime.checkpoint import save_actor_checkpoint, save_reward_checkpoint
from rlhf.runtime.config import config_from_args, step_main
from rlhf.runtime.distributed import init_distributed, make_dataloader, to_device
from rlhf.runtime.loop import Batches, run_loop
from rlhf.runtime.metrics import MetricsLogger, append_jsonl
from rlhf.runtime.process import run_cli
from rlhf.runtime.resume import RunControl
from rlhf.steps.eval import flat_metrics, format_result, load_eval_examples, write_eval
from rlhf.steps.rl_config import RLConfig
from rlhf.steps.rl_trainer import GoldFn, RLTrainer, records


def require_step3_models(cfg: RLConfig, algo: Algorithm) -> None:
    """One line, before any model is loaded, unless the actor is a model and the reward model (without a reward
    function) a step-2 checkpoint with its value head; with a reward function PPO's critic starts from any model."""
    require_model_source(cfg.actor.model_name_or_path, "--actor-model-name-or-path")
    if algo.teacher:
        require_model_source(cfg.teacher_model, "--teacher-model")
    if algo.teacher and cfg.reward_fn is None:  # distillation alone: the teacher is the signal
        return
    if cfg.reward_fn is None and cfg.env.environment is None:  # an environment gives rewards of its own
        require_checkpoint(cfg.critic.model_name_or_path, "--critic-model-name-or-path expects step 2's output, "
                           "or give --reward-fn FILE.py:FUNCTION",
                           reward=True)
    elif algo.needs_critic:
        require_model_source(cfg.critic.model_name_or_path, "--critic-model-name-or-path")


@dataclass
class PromptData:
    """Step 3's prompts: the training and held-out sets with their loaders, and the PTX batches (None without
    --unsupervised-data)."""
    train_set: object
    eval_set: object
    loader: object
    eval_loader: object
    ptx_batches: object | None
    extra_batches: object | None = None  # dynamic sampling's further prompt batches (a second shuffle, cycled)


def prompt_data(cfg: RLConfig, tokenizer, reward_fn: RewardFunction | None = None) -> PromptData:
    """Step 3's prompts (a source of prompts whole, step 3's slice of a pair source), a held-out share of at most
    cfg.loop.eval_prompts, and the PTX data. Every record must hold the fields ``reward_fn`` takes."""
    if not cfg.data:
        raise ValueError("step 3 needs --data (prompt records, or pair records: the prompts of step 3's slice are "
                         "used)")
    examples = load_step_examples(cfg.data, step=3, split=cfg.data_split, seed=cfg.seed)
    if cfg.eval_data:  # the user's own held-out prompts, whole: every prompt of --data trains
        train_examples, eval_examples = examples, load_eval_examples(cfg.eval_data)
    else:
        eval_fraction = min(0.5, cfg.loop.eval_prompts / max(len(examples), 1)) if cfg.loop.eval_prompts else 0.0
        train_examples, eval_examples = train_eval_split(examples, eval_fraction, cfg.seed)
    if reward_fn is not None:
        reward_fn.check_fields(train_examples + eval_examples)
    train_set = build_prompt_dataset(tokenizer, train_examples, cfg.sampling.max_prompt_seq_len)
    eval_set = build_prompt_dataset(tokenizer, eval_examples, cfg.sampling.max_prompt_seq_len)
    if len(train_set) == 0:
        raise ValueError(f"step 3: no prompts in {cfg.data} with --data-split {cfg.data_split} "
                         f"and --max-prompt-seq-len {cfg.sampling.max_prompt_seq_len}")
    loader = make_dataloader(train_set, cfg.loop.per_device_generation_batch_size, shuffle=True, seed=cfg.seed,
                             drop_last=len(train_set) >= cfg.loop.per_device_generation_batch_size)
    eval_loader = make_dataloader(eval_set, cfg.loop.per_device_generation_batch_size, shuffle=False)
    ptx_batches = None
    if cfg.unsupervised_data:
        ptx = build_sft_dataset(tokenizer, load_step_examples(cfg.unsupervised_data, step=1, split="1,0,0"),
                                cfg.sampling.max_prompt_seq_len + cfg.sampling.max_answer_seq_len)
        ptx_batches = itertools.cycle(make_dataloader(ptx, cfg.loop.per_device_training_batch_size, seed=cfg.seed))
    extra = None
    if cfg.algo.resolve().dynamic_sampling:
        extra = itertools.cycle(make_dataloader(train_set, cfg.loop.per_device_generation_batch_size, shuffle=True,
                                                seed=cfg.seed + 1, drop_last=loader.drop_last))
    return PromptData(train_set, eval_set, loader, eval_loader, ptx_batches, extra)


@dataclass
class Tally:
    """What step 3 counts besides the loop's position; a checkpoint holds it."""
    ptx: int = 0           # PTX batches drawn
    extra: int = 0         # dynamic sampling's extra prompt batches drawn
    history: list = field(default_factory=list)  # each round's record
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    before: dict = field(default_factory=dict)   # the held-out evaluation before training (eval.json's result)
    gold_before: float | None = None


def held_out(trainer: RLTrainer, data: PromptData, gold_fn: GoldFn | None, output_dir: str, when: str,
             is_main: bool, show_bar: bool) -> tuple[dict, float | None]:
    """The held-out evaluation (rlhf/steps/eval.py) `when` ("before" or "after" training): written to
    OUTPUT_DIR/eval_{when}.json and generations_{when}.jsonl, printed in one line; with `gold_fn`, also the
    rule's mean score of the sampled answers. ({}, None) without held-out prompts."""
    if not len(data.eval_set):
        return {}, None
    with tqdm(total=len(data.eval_set), desc=f"step 3 {trainer.algo.name} held out {when}", unit="prompt",
              disable=not show_bar) as bar:
        result, generations = trainer.evaluate(data.eval_loader, data.eval_set, bar.update)
    sampled = [g for g in generations if g["sample"] is not None]
    gold = None
    if gold_fn is not None:
        gold = sum(gold_fn([g["prompt"] for g in sampled], [g["answer"] for g in sampled])) / len(sampled)
    if is_main:
        write_eval(output_dir, result, generations, suffix=f"_{when}")
        print(f"step 3 {trainer.algo.name}: held out {when} training: {format_result(result)}", flush=True)
    return result, gold


def round_record(exp, stats, prompts: list[str], trainer: RLTrainer, gold_fn: GoldFn | None) -> dict:
    """The metrics of one rollout (the round's losses are added after its updates)."""
    record = {"reward": exp.scores.mean().item(), "kl": sequence_kl(exp).mean().item(),
              "answer_len": exp.action_mask.sum(-1).float().mean().item(),
              "gen_tokens_per_s": stats.new_tokens / max(stats.seconds, 1e-9),
              "eval_switch_s": stats.eval_switch_s, "relaid_bytes": stats.relaid_bytes,
              "gathered_bytes": stats.gathered_bytes, "tp_bytes": stats.tp_bytes,
              "train_switch_s": stats.train_switch_s}
    if stats.logprob_gap is not None:  # not measured on a rollout whose logprobs were reused unaudited
        record["logprob_gap"] = stats.logprob_gap
    if stats.env is not None:  # a multi-turn rollout: turns, tool calls, errors, ...
        record.update(stats.env)
    record.update(stats.correction or {})  # the rollout-correction weights' mean, min, max, masked, capped
    record.update(stats.dynamic_sampling or {})
    if gold_fn is not None:
        n = trainer.algo.n_samples_per_prompt
        golds = gold_fn([p for p in prompts for _ in range(n)], trainer.answers(exp))
        record["gold"] = sum(golds) / len(golds)
    return record


def fit(trainer: RLTrainer, data: PromptData, cfg: RLConfig, rounds: int, tally: Tally, generator: torch.Generator,
        metrics: MetricsLogger, control: RunControl, resumed: dict | None, gold_fn: GoldFn | None,
        device: torch.device, is_main: bool) -> int:
    """`rounds` rounds of the loop (rlhf/runtime/loop.py) over the prompt batches, from `resumed` (a checkpoint's
    state, `tally` and the trainer already restored from it) if given: rollout -> rewards -> advantages
    (RLTrainer.rollout) of each batch, and once `cfg.loop.generation_batches` rollouts are buffered,
    `cfg.loop.ppo_epochs` passes of updates (RLTrainer.train_on) over their minibatches: one round. Returns the
    rounds done."""
    name = trainer.algo.name
    buffer = []  # the rollouts of the round in progress

    def update(batch, step: int) -> list[dict] | None:
        trainer.round = step
        batch = to_device(batch, device)
        prompts, fields = records(data.train_set, batch)
        exp, stats = trainer.rollout(batch, prompts, fields, generator)
        train_exp = exp
        if trainer.algo.dynamic_sampling:
            def more():
                tally.extra += 1
                extra = to_device(next(data.extra_batches), device)
                return (extra, *records(data.train_set, extra))
            train_exp = fill_groups(trainer, exp, stats, more, generator)
        if cfg.env.log_rollouts and is_main and trainer.trajectories is not None:
            append_jsonl(Path(cfg.output_dir) / "rollouts.jsonl",
                         trajectory_records(trainer.trajectories, trainer.tokenizer, step))
        tally.gen_tokens, tally.gen_seconds = tally.gen_tokens + stats.new_tokens, tally.gen_seconds + stats.seconds
        if not trainer.guard.ok(step, reward=exp.scores, advantage=exp.advantages):
            return None  # this rollout is not trained on
        record = round_record(exp, stats, prompts, trainer, gold_fn)
        if train_exp.sequences.shape[0]:  # dynamic sampling may keep no group at all
            buffer.append(train_exp)
        if len(buffer) < cfg.loop.generation_batches:
            return [record] if not train_exp.sequences.shape[0] else None
        losses = []
        for _ in range(cfg.loop.ppo_epochs):
            for rollout in buffer:
                for mb in rollout.minibatches(cfg.loop.per_device_training_batch_size):
                    ptx = next(data.ptx_batches) if data.ptx_batches else None
                    tally.ptx += ptx is not None
                    losses.append(trainer.train_on(mb, ptx))
        buffer.clear()
        record.update({k: sum(d[k] for d in losses) / len(losses) for k in losses[0]})
        tally.history.append(record)
        if cfg.loop.print_answers and is_main and step % cfg.loop.log_interval == 0:
            print(f"[{name} {step}] {prompts[0]} -> {trainer.answers(exp)[0]}")
        return [record]

    def postfix(record: dict) -> dict:
        return {"reward": f"{record['reward']:.3f}", "kl": f"{record['kl']:.3f}",
                **({"gap": f"{record['logprob_gap']:.1e}"} if "logprob_gap" in record else {})}

    # a round's record is its own (its rollout's reward, its updates' losses), logged every log_interval rounds
    steps, _ = run_loop(update, Batches(data.loader, cfg.loop.num_train_epochs), rounds, name=name,
                        desc=f"step 3 {name}", metrics=metrics, control=control, engines=trainer.engines(),
                        guard=trainer.guard, resumed=resumed, log_interval=cfg.loop.log_interval,
                        show_bar=not cfg.disable_tqdm and is_main, print_lines=cfg.disable_tqdm and is_main,
                        saved=lambda: {**dataclasses.asdict(tally), "trainer": trainer.state()},
                        generators={"sampling": generator}, summarize=lambda window: window[-1], log_last=False,
                        postfix=postfix)
    return steps


def fill_groups(trainer: RLTrainer, exp, stats, more, generator: torch.Generator):
    """DAPO's dynamic sampling: the rows of `exp` (a rollout, advantages filled) whose group's rewards differ, then
    those of further rollouts of `more()`'s prompt batches until as many rows as `exp`'s are kept or
    --max-extra-rollouts were added; the batch is cut to that many rows. `stats` gets the round's counts."""
    n, target = trainer.algo.n_samples_per_prompt, exp.sequences.shape[0]
    kept, rows, sampled, dropped, added = [], 0, 0, 0, 0
    current = exp
    while True:
        keep = informative_rows(current.scores, n)
        sampled, dropped = sampled + len(keep) // n, dropped + int((~keep).sum()) // n
        kept.append(select_rows(current, keep))
        rows += int(keep.sum())
        if rows >= target or added >= trainer.cfg.algo.max_extra_rollouts:
            break
        current, more_stats = trainer.rollout(*more(), generator)
        stats.new_tokens, stats.seconds = stats.new_tokens + more_stats.new_tokens, stats.seconds + more_stats.seconds
        added += 1
    stats.dynamic_sampling = {"dropped_groups": dropped / sampled, "extra_rollouts": added,
                              "kept_rows": min(rows, target)}
    joined = concat(kept, trainer.tokenizer.pad_token_id)
    return select_rows(joined, torch.arange(min(rows, target), device=joined.sequences.device))


def run_ppo(cfg: RLConfig, tokenizer=None, metrics: MetricsLogger | None = None,
            gold_fn: GoldFn | None = None, control: RunControl | None = None) -> dict:
    """Train the actor with `cfg.algo.algorithm`; save actor/ (and critic/ for PPO, actor_ema/) under cfg.output_dir.
    `gold_fn` (prompts, answers) -> scores is a rule to report before and after (cfg.gold_task names the
    built-in one)."""
    algo = cfg.validate()
    require_step3_models(cfg, algo)
    start = time.time()
    dist = init_distributed()
    if algo.dynamic_sampling and dist.world_size > 1:
        # each rank would keep its own number of rows, so ranks could step a different number of minibatches (or
        # none) and wait on each other's gradients forever; a refusal until the kept rows are agreed across ranks
        raise ValueError(f"--dynamic-sampling runs in one process only (this run has {dist.world_size}): "
                         "pass --no-dynamic-sampling")
    torch.manual_seed(cfg.seed)
    tokenizer = tokenizer or load_tokenizer(cfg.actor.model_name_or_path)
    metrics = metrics or MetricsLogger(cfg.output_dir, enabled=dist.is_main)
    reward_fn = RewardFunction(cfg.reward_fn) if cfg.reward_fn else None
    if gold_fn is None and cfg.gold_task == "synthetic":
        gold_fn = gold_scores
    data = prompt_data(cfg, tokenizer, reward_fn)

    rounds = len(data.loader) * cfg.loop.num_train_epochs // cfg.loop.generation_batches
    rounds = min(rounds, cfg.loop.max_steps) if cfg.loop.max_steps else rounds
    minibatches = -(-cfg.loop.per_device_generation_batch_size * algo.n_samples_per_prompt
                    // cfg.loop.per_device_training_batch_size)
    control = control or RunControl()
    updates = rounds * cfg.loop.ppo_epochs * cfg.loop.generation_batches * minibatches
    trainer = RLTrainer(cfg, tokenizer, updates, dist.device, reward_fn, control.max_nonfinite_steps)
    tally = Tally()
    resumed = control.load(trainer.engines())
    show_bar = dist.is_main and not cfg.disable_tqdm
    if resumed is None:
        tally.before, tally.gold_before = held_out(trainer, data, gold_fn, cfg.output_dir, "before", dist.is_main,
                                                    show_bar)
        metrics.log(f"{algo.name}_eval", 0, **eval_metrics(tally.before, tally.gold_before))
    else:  # step 3's own state, as fit saved it (the loop replays the prompt order and the RNG streams)
        tally = Tally(**{f.name: resumed["saved"][f.name] for f in dataclasses.fields(Tally)})
        for _ in range(tally.ptx):
            next(data.ptx_batches)
        for _ in range(tally.extra):
            next(data.extra_batches)
        trainer.load_state(resumed["saved"]["trainer"])
    generator = torch.Generator(device=dist.device).manual_seed(cfg.seed + dist.rank)
    steps = fit(trainer, data, cfg, rounds, tally, generator, metrics, control, resumed, gold_fn, dist.device,
                dist.is_main)

    after, gold_after = held_out(trainer, data, gold_fn, cfg.output_dir, "after", dist.is_main, show_bar)
    metrics.log(f"{algo.name}_eval", steps, **eval_metrics(after, gold_after))
    save_actor_checkpoint(trainer.actor.module, tokenizer, f"{cfg.output_dir}/actor")
    if trainer.critic is not None:
        save_reward_checkpoint(trainer.critic.module, tokenizer, f"{cfg.output_dir}/critic")
    if trainer.ema is not None:
        save_actor_checkpoint(trainer.ema, tokenizer, f"{cfg.output_dir}/actor_ema")
    return summary(trainer, data, steps, tally, after, gold_after, cfg.output_dir, time.time() - start)


def eval_metrics(result: dict, gold: float | None) -> dict:
    """A held-out evaluation's metrics.jsonl record: greedy_reward, mean_reward, pass@k (and gold)."""
    return {**(flat_metrics(result) if result else {}), **({"gold": gold} if gold is not None else {})}


def summary(trainer: RLTrainer, data: PromptData, steps: int, tally: Tally, after: dict, gold_after: float | None,
            output_dir: str, seconds: float) -> dict:
    """The run's summary: the held-out evaluation (and gold) before and after, the last rounds' means, the largest
    logprob gap, skipped updates."""
    last = tally.history[-min(5, len(tally.history)):] if tally.history else [{}]
    mean = lambda key: sum(r.get(key, float("nan")) for r in last) / len(last)  # noqa: E731
    before = tally.before
    score = lambda result, key: result[key]["mean"] if result else None  # noqa: E731
    return {
        "algorithm": trainer.algo.name, "output_dir": output_dir, "steps": steps,
        "prompts": len(data.train_set), "dropped_prompts": data.train_set.num_dropped,
        "eval_prompts": len(data.eval_set),
        "greedy_reward_before": score(before, "greedy_reward"), "greedy_reward_after": score(after, "greedy_reward"),
        "reward_before": score(before, "mean_reward"), "reward_after": score(after, "mean_reward"),
        "eval_before": before or None, "eval_after": after or None,
        "gold_before": tally.gold_before, "gold_after": gold_after,
        "final_reward": mean("reward"), "final_kl": mean("kl"),
        **({"turns": mean("turns"), "tool_calls": sum(r["tool_calls"] for r in tally.history),
            "env_errors": sum(r["env_errors"] for r in tally.history)} if "turns" in last[0] else {}),
        "max_logprob_gap": max((r["logprob_gap"] for r in tally.history if "logprob_gap" in r), default=0.0),
        "gen_tokens_per_s": tally.gen_tokens / max(tally.gen_seconds, 1e-9),
        "nonfinite_skipped": trainer.guard.skipped,
        "deepspeed_skipped_steps": sum(e.skipped_steps for e in trainer.engines().values()),
        "seconds": seconds,
    }


def rl_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> RLConfig:
    return config_from_args(RLConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    return step_main(RLConfig, run_ppo, "Step 3: RL of the actor (PPO, GRPO, RLOO, REINFORCE++, GSPO, CISPO, DAPO, "
                     "on-policy distillation) against the reward model, a reward function or a teacher", argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m rlhf.steps.rl"))
