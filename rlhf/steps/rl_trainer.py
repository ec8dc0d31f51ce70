"""The step-3 trainer: the models of one RL run and its loop, rollout -> rewards -> advantages -> update.

    exp = trainer.rollout(batch, prompts, fields, generator)   # engine.generate x n, scored, advantages filled
    for epoch, minibatch: trainer.train_on(minibatch)            # actor step (+ KL loss, PTX), critic step if any

The critic exists only for an estimator that needs one (PPO's GAE); the reward model only when no reward
function is given; the rest of the algorithm (estimator, policy loss, KL placement, loss aggregation) is
`cfg.algo.resolve()` (rlhf/core/algorithms.py).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import hybrid_engine
from hybrid_engine import SamplingParams
from rlhf.core.advantages import EstimatorInput
from rlhf.core.experience import (
    Experience,
    PhaseTimer,
    Sample,
    action_logprobs,
    action_values,
    batch_scores,
    generate_experience,
    lm_loss,
    micro_logprobs,
    micro_values,
    sample,
)
from rlhf.core.losses import (
    aggregate,
    aggregation_share,
    kl_divergence,
    kl_penalized_rewards,
    last_action_index,
    masked_mean,
    value_loss,
)
from rlhf.core.microbatch import PACKABLE_MODEL_TYPES, MicroBatch, Microbatching
from rlhf.core.rewards import RewardFunction
from rlhf.core.rollout_correction import correction_weights
from rlhf.envs import MultiTurn, ToolEnvironment, TurnSettings, load_environment, load_tools
from rlhf.models import VALUE_HEAD_FILE, ModelOptions, RewardModel, create_actor, create_critic, create_reward_model
from rlhf.runtime.distributed import all_gather_objects, is_distributed, to_device
from rlhf.runtime.engines import ds_config, init_inference, initialize, warmup_steps
from rlhf.runtime.guards import NonFiniteGuard, guarded_update
from rlhf.steps.eval import EvalSettings, decode_answers, evaluate

GoldFn = Callable[[list[str], list[str]], list[float]]  # (prompts, answers) -> a rule's score per row


def dropout_settings(model) -> dict[str, float]:
    """The nonzero dropout probabilities of a model: its config's fields (every family names them differently)
    and any nn.Dropout module's."""
    config = getattr(model, "config", None)
    found = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
             if ("dropout" in k or k.endswith("_pdrop")) and isinstance(v, float) and v > 0}
    found.update({name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0})
    return found


def reuse_rollout_logprobs(cfg, actor) -> bool:
    """Whether PPO's old logprobs are the rollout's: --reuse-rollout-logprobs asks for it (and refuses an actor
    with dropout, whose training forward the rollout's logprobs cannot stand for); unset, it is on exactly when
    the actor has no dropout."""
    if cfg.algo.rollout_correction != "none":  # the correction weighs the rollout against the training forward
        return False
    dropout = dropout_settings(actor)
    shown = ", ".join(f"{k}={v}" for k, v in list(dropout.items())[:3])
    if cfg.engine.reuse_rollout_logprobs and dropout:
        raise ValueError(f"--reuse-rollout-logprobs needs an actor without dropout, this one has {shown}: pass "
                         "--actor-dropout 0 or --no-reuse-rollout-logprobs")
    if cfg.engine.reuse_rollout_logprobs is None and dropout:
        warnings.warn(f"the actor has dropout ({shown}): PPO's old logprobs come from its training forward, one "
                      "more forward per rollout (--actor-dropout 0 lets the rollout's be reused)", stacklevel=2)
    return not dropout if cfg.engine.reuse_rollout_logprobs is None else cfg.engine.reuse_rollout_logprobs


class RLTrainer:
    """Holds the models (actor, reference, critic if any, reward model if no reward function) of one run.
    `timer` (off unless enabled) sums the seconds of each phase of the rollouts and updates
    (benchmarks/rlhf_step.py reads it)."""

    def __init__(self, cfg, tokenizer, total_steps: int, device: torch.device, reward_fn: RewardFunction | None,
                 max_nonfinite_steps: int = 5):
        self.cfg, self.algo, self.tokenizer, self.device = cfg, cfg.algo.resolve(), tokenizer, device
        self.sampling = cfg.sampling.params()  # the rollouts' settings; their temperature is the training forwards'
        # a non-finite loss skips its update; `round` (set by the loop) names the round in messages
        self.guard, self.round = NonFiniteGuard(max_nonfinite_steps, f"step 3 ({self.algo.name}) round"), 0
        micro = cfg.loop.per_device_training_batch_size
        actor = create_actor(cfg.actor.model_name_or_path, cfg.actor.model_options(cfg.only_optimize_lora))
        self.reuse_logprobs = reuse_rollout_logprobs(cfg, actor)
        self.rollouts = 0  # rollouts made so far, for the audit interval
        # the training forwards and backward by token-budget micro-batches, trimmed or packed (rlhf/core/microbatch.py)
        # under ZeRO-3 every rank runs as many forwards (each gathers the parameters): the most any rank needs
        zero3 = is_distributed() and 3 in (cfg.actor.zero_stage, cfg.critic.zero_stage)
        self.micro = Microbatching(cfg.loop.max_tokens_per_microbatch, cfg.loop.pack_sequences,
                                   align=(lambda n: max(all_gather_objects(n))) if zero3 else None)
        if self.micro.pack and actor.config.model_type not in PACKABLE_MODEL_TYPES:
            raise ValueError(f"--pack-sequences: {cfg.actor.model_name_or_path} is a {actor.config.model_type} model; "
                             f"packing is checked for {', '.join(PACKABLE_MODEL_TYPES)} (use --no-pack-sequences: "
                             "token-budget micro-batches work for every family)")
        self.timer = PhaseTimer()
        warmup = warmup_steps(total_steps, cfg.loop.num_warmup_steps, cfg.loop.warmup_ratio)
        self.actor = initialize(actor, ds_config(micro, 1, cfg.actor.zero_stage, cfg.offload, cfg.dtype),
                                cfg.actor.learning_rate, cfg.actor.weight_decay, total_steps, warmup,
                                cfg.loop.lr_scheduler_type,
                                lora_lr=cfg.actor.lora_learning_rate if cfg.actor.lora_dim else None)
        ref = create_actor(cfg.actor.model_name_or_path, ModelOptions())
        self.ref = init_inference(ref, micro, cfg.actor.zero_stage, cfg.offload_reference_model, cfg.dtype)
        rows = cfg.loop.per_device_generation_batch_size * self.algo.n_samples_per_prompt
        seq_len = cfg.sampling.max_prompt_seq_len + cfg.sampling.max_answer_seq_len
        # the frozen reference through the engine's prefill-only forward (its weights described once); under
        # ZeRO-3 it stays on the training forward, which gathers its layers one at a time
        self.ref_engine = None
        if cfg.engine.score_reference_with_engine and cfg.actor.zero_stage != 3:
            ref_engine = hybrid_engine.wrap(self.ref.module, max_seq_len=seq_len, max_batch_size=rows,
                                            kernels=cfg.engine.kernels, pack_weights=False, allow_fallback=True)
            # a family the engine does not serve: the reference's own training forward (the fallback's is the same)
            self.ref_engine = ref_engine if ref_engine.supported else None
        self.critic = None
        if self.algo.needs_critic:
            # from the trained reward model (DeepSpeed-Chat); from a causal LM's backbone with a new value head
            # when there is none (PPO against a reward function)
            path = cfg.critic.model_name_or_path
            build = create_critic if (Path(path) / VALUE_HEAD_FILE).is_file() else create_reward_model
            critic = build(path, cfg.critic.model_options(cfg.only_optimize_lora))
            self.critic = initialize(critic, ds_config(micro, 1, cfg.critic.zero_stage, cfg.offload, cfg.dtype),
                                     cfg.critic.learning_rate, cfg.critic.weight_decay, total_steps,
                                     warmup, cfg.loop.lr_scheduler_type,
                                     lora_lr=cfg.critic.lora_learning_rate if cfg.critic.lora_dim else None)
        self.teacher = self.load_teacher(actor, seq_len, rows) if self.algo.teacher else None
        self.reward_fn, self.reward_model = reward_fn, None
        # distill without a reward function: the teacher only; an environment: the rewards it gives
        if reward_fn is None and not self.algo.teacher and cfg.env.environment is None:
            reward = RewardModel.from_pretrained(cfg.critic.model_name_or_path)
            self.reward_model = init_inference(reward, micro, cfg.critic.zero_stage, cfg.offload_reward_model,
                                               cfg.dtype)
        self.ema = copy.deepcopy(self.actor.module).eval() if cfg.algo.enable_ema else None
        engine = cfg.engine
        if cfg.env.multi_turn:  # the trajectory's turns and observations after the prompt
            seq_len = cfg.sampling.max_prompt_seq_len + cfg.env.max_total_tokens
        # a family the engine does not serve rolls out with Hugging Face generate, after the engine's one warning
        # naming it (no dead end for a new architecture; library users of wrap() still get the refusal by default)
        self.hybrid = hybrid_engine.wrap(self.actor, max_seq_len=seq_len, max_batch_size=rows,
                                         tp_size=engine.inference_tp_size, kernels=engine.kernels,
                                         allow_fallback=True, force_fallback=not engine.enable_hybrid_engine,
                                         release_cache_after_generate=engine.release_inference_cache,
                                         pin_parameters=False if engine.unpin_actor_parameters else None,
                                         gather_partition_size=engine.tp_gather_partition_size)
        self.multi_turn, self.trajectories, self.env_errors = multi_turn(cfg, self.hybrid, tokenizer), None, 0

    def load_teacher(self, actor, seq_len: int, rows: int) -> hybrid_engine.HybridEngine:
        """--teacher-model, frozen, behind an engine whose prefill-only `score` gives its logprobs of the student's
        tokens (no teacher generation); a family the engine does not serve is scored by its own forward (the
        engine's fallback). It must read the student's token ids: the same vocabulary."""
        cfg = self.cfg
        teacher = create_actor(cfg.teacher_model, ModelOptions())
        if teacher.config.vocab_size != actor.config.vocab_size:
            raise ValueError(f"--teacher-model {cfg.teacher_model}: vocabulary of {teacher.config.vocab_size} "
                             f"tokens, the student's has {actor.config.vocab_size} (they must share a tokenizer)")
        teacher = init_inference(teacher, cfg.loop.per_device_training_batch_size, 0, False, cfg.dtype)
        return hybrid_engine.wrap(teacher.module, max_seq_len=seq_len, max_batch_size=rows,
                                  kernels=cfg.engine.kernels, pack_weights=False, allow_fallback=True)

    def answers(self, exp: Experience | Sample) -> list[str]:
        """What the reward function judges: the answer, or in a multi-turn trajectory its last model turn."""
        if self.multi_turn is not None:
            return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in final_turns(exp)]
        return decode_answers(self.tokenizer, exp)

    def score(self, exp: Experience | Sample, prompts: list[str], fields: list[dict]) -> torch.Tensor:
        """(B,) the reward of each row: an environment's (summed over its turns) plus the reward function's on the
        (final) answer, else the reward model's."""
        with self.timer.phase("reward"):
            earned = exp.env_scores.to(self.device) if getattr(exp, "env_scores", None) is not None else None
            if self.reward_fn is not None:
                scores = self.reward_fn(prompts, self.answers(exp), fields).to(self.device)
                return scores if earned is None else scores + earned
            if earned is not None:
                return earned
            if self.reward_model is None:  # distill without a task reward
                return torch.zeros(exp.sequences.shape[0], device=self.device)
            return batch_scores(self.reward_model.module, exp.sequences, exp.attention_mask, exp.prompt_len,
                                self.micro).float()

    def sample(self, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams, prompts: list[str],
               fields: list[dict], switch: bool = True) -> Sample:
        """One answer (a multi-turn trajectory with an environment) per row of the (left-padded) prompts."""
        if self.multi_turn is None:
            return sample(self.hybrid, ids, mask, params, self.cfg.sampling.max_answer_seq_len,
                          self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.timer, switch)
        if switch:
            self.hybrid.eval()
        with self.timer.phase("generate"):
            records = [{**f, "prompt": p} for p, f in zip(prompts, fields)]
            trajectories = self.multi_turn.rollout(records, params, self.cfg.sampling.max_prompt_seq_len)
        if switch:
            self.hybrid.train()
        self.trajectories = trajectories
        out = trajectories.sample
        out.env_scores = trajectories.scores
        return out

    def generate(self, batch: dict, generator: torch.Generator, n_samples: int = 1, audit: bool = False,
                 prompts: list[str] | None = None, fields: list[dict] | None = None):
        """Sample `n_samples` answers per prompt (consecutive rows; `prompts` and `fields` are the batch's records,
        repeated alike) and score them with the training forwards (the actor's skipped when its rollout logprobs
        are reused, unless `audit`)."""
        ids = batch["input_ids"].repeat_interleave(n_samples, dim=0)          # (B * n, P)
        mask = batch["attention_mask"].repeat_interleave(n_samples, dim=0)
        critic = self.critic.module if self.critic is not None else None
        ref = self.ref_engine or self.ref.module
        params = dataclasses.replace(self.sampling, generator=generator)
        s = self.sample(ids, mask, params, prompts or [""] * ids.shape[0], fields or [{}] * ids.shape[0])
        exp, stats = generate_experience(s, self.actor.module, ref, critic, self.reuse_logprobs, audit, self.timer,
                                         self.micro)
        exp.env_scores = getattr(s, "env_scores", None)
        if self.teacher is not None:
            with self.timer.phase("teacher_logprobs"), torch.no_grad():
                exp.teacher_logprobs = self.teacher.score(exp.sequences, exp.attention_mask, prompt_len=exp.prompt_len,
                                                          temperature=self.sampling.temperature) * exp.action_mask
        return exp, stats

    def rollout(self, batch: dict, prompts: list[str], fields: list[dict], generator: torch.Generator):
        """One rollout with its scores, per-token rewards, advantages and returns filled (once, for every
        minibatch and epoch); `prompts` and `fields` are the batch's records."""
        algo, n = self.algo, self.algo.n_samples_per_prompt
        interval = self.cfg.engine.logprob_audit_interval
        audit = bool(interval) and self.rollouts % interval == 0  # the first rollout, then every interval-th
        self.rollouts += 1
        prompts, fields = [p for p in prompts for _ in range(n)], [f for f in fields for _ in range(n)]
        exp, stats = self.generate(batch, generator, n, audit, prompts, fields)
        exp.scores = self.score(exp, prompts, fields)
        cfg = self.cfg.algo
        if algo.overlong_buffer:
            exp.scores = exp.scores + overlong_penalty(exp.action_mask.sum(-1), self.cfg.sampling.max_answer_seq_len,
                                                       algo.overlong_buffer, cfg.overlong_penalty_factor)
        if cfg.overlong_filtering:
            exp.loss_mask = exp.action_mask & ~truncated(exp, self.tokenizer.eos_token_id)[:, None]
        exp.correction, stats.correction = correction_weights(
            cfg.rollout_correction, exp.logprobs, exp.rollout_logprobs, exp.action_mask, cfg.rollout_correction_cap,
            cfg.rollout_correction_low, cfg.rollout_correction_high)
        exp.rewards = kl_penalized_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.action_mask, algo.kl_ctl,
                                           self.cfg.algo.clip_reward_value)
        if self.multi_turn is not None:
            stats.env = self.check_env(self.trajectories)
            place_turn_rewards(exp.rewards, exp.action_mask, self.trajectories.turn_rewards)
        clipped = exp.scores.clamp(-self.cfg.algo.clip_reward_value, self.cfg.algo.clip_reward_value)
        teacher = None if exp.teacher_logprobs is None else (exp.teacher_logprobs - exp.logprobs) * exp.action_mask
        inputs = EstimatorInput(exp.rewards, exp.action_mask, clipped, n, exp.values, algo.gamma, algo.lam,
                                algo.std_normalization, teacher)
        exp.advantages, exp.returns = algo.estimator(inputs)
        return exp, stats

    def check_env(self, trajectories) -> dict:
        """The rollout's environment counts; stops the run (one line naming the environment, the row and the
        error) once more than --max-env-errors rows have failed."""
        counts = trajectories.counts()
        failed = [(i, row.error) for i, row in enumerate(trajectories.rows) if row.error is not None]
        self.env_errors += len(failed)
        if self.env_errors > self.cfg.env.max_env_errors:
            i, error = failed[0]
            name = self.cfg.env.environment or f"tools {self.cfg.env.tools}"
            raise ValueError(f"--environment {name}: row {i}: {error} ({self.env_errors} failed rows, more than "
                             f"--max-env-errors {self.cfg.env.max_env_errors})")
        return counts

    def train_on(self, exp: Experience, ptx_batch: dict | None = None) -> dict:
        """One minibatch: actor step on the clipped policy loss (+ the KL loss term), a PTX step when given, and
        a critic step on the clipped value loss when there is a critic. With --max-tokens-per-microbatch (or
        --pack-sequences) each step accumulates the gradients of the minibatch's micro-batches, each micro-batch's
        loss weighed by its share of the minibatch's aggregation (`aggregation_share`): the same loss, gradient and
        logged numbers as one padded forward of the minibatch."""
        cfg = self.cfg
        batches = self.micro.plan(exp.sequences, exp.attention_mask, exp.prompt_len) if self.micro.enabled else [None]
        out = {"advantage": masked_mean(exp.advantages, exp.action_mask).item()}
        with self.timer.phase("actor_update"):
            out.update(self.accumulate(self.actor, batches, lambda mb: self.actor_losses(exp, mb), "actor_loss"))
            if ptx_batch is not None:
                ptx = lm_loss(self.actor, to_device(ptx_batch, self.device))
                guarded_update(self.actor, cfg.algo.unsup_coef * ptx, self.guard, self.round, "ptx_loss")
                out["ptx_loss"] = ptx.item()
        if self.critic is not None:
            with self.timer.phase("critic_update"):
                out.update(self.accumulate(self.critic, batches, lambda mb: self.critic_losses(exp, mb),
                                           "critic_loss"))
        if self.ema is not None:
            self.update_ema()
        return {"actor_loss": out.pop("actor_loss"), **out}

    def accumulate(self, engine, batches: list[MicroBatch | None], losses, name: str) -> dict:
        """One optimizer step of `engine` over `batches` (None: the padded minibatch): backward of each micro-batch's
        `losses(mb)` = (loss, its named terms), stepping at the last; the terms summed over the micro-batches. A
        non-finite loss skips the step (the guard counts it) and the window's remaining micro-batches."""
        totals = {}
        for k, mb in enumerate(batches):
            loss, terms = losses(mb)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.item()
            boundary = None if mb is None else k == len(batches) - 1
            if not guarded_update(engine, loss, self.guard, self.round, name, boundary):
                break
        return totals

    def actor_losses(self, exp: Experience, mb: MicroBatch | None) -> tuple[torch.Tensor, dict]:
        """The actor's loss on micro-batch `mb` (None: the whole minibatch, padded) as its share of the minibatch's:
        (policy loss + KL loss term, {actor_loss, kl_loss})."""
        algo, norm_len = self.algo, self.cfg.sampling.max_answer_seq_len
        mask = exp.action_mask if exp.loss_mask is None else exp.loss_mask  # overlong filtering drops rows
        if mb is None:
            rows, share = slice(None), 1.0
            logprobs = action_logprobs(self.actor, exp.sequences, exp.attention_mask, exp.prompt_len,
                                       self.sampling.temperature)
        else:
            rows, share = mb.rows, 0.0 if mb.ghost else aggregation_share(mask[mb.rows], mask, algo.loss_agg)
            logprobs = micro_logprobs(self.actor, mb, self.sampling.temperature)
        weights = None if exp.correction is None else exp.correction[rows]
        actor_loss = share * algo.policy_loss_fn(logprobs, exp.logprobs[rows], exp.advantages[rows], mask[rows],
                                                 algo.clip, algo.clip_high, algo.loss_agg, norm_len, weights)
        terms, loss = {"actor_loss": actor_loss}, actor_loss
        if algo.kl_loss_coef:
            kl = share * aggregate(kl_divergence(logprobs, exp.ref_logprobs[rows], mask[rows], algo.kl_estimator),
                                   mask[rows], algo.loss_agg, norm_len)
            loss = loss + algo.kl_loss_coef * kl
            terms["kl_loss"] = kl
        return loss, terms

    def critic_losses(self, exp: Experience, mb: MicroBatch | None) -> tuple[torch.Tensor, dict]:
        """The critic's clipped value loss on micro-batch `mb` (None: the whole minibatch) as its share."""
        if mb is None:
            rows, share = slice(None), 1.0
            values = action_values(self.critic, exp.sequences, exp.attention_mask, exp.prompt_len)
        else:
            rows = mb.rows
            share = 0.0 if mb.ghost else aggregation_share(exp.action_mask[mb.rows], exp.action_mask)
            values = micro_values(self.critic, mb)
        loss = share * value_loss(values, exp.values[rows], exp.returns[rows], exp.action_mask[rows],
                                  self.cfg.algo.cliprange_value)
        return loss, {"critic_loss": loss}

    def engines(self) -> dict:
        """The trained DeepSpeed engines, by the name their checkpoint is saved under."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def state(self) -> dict:
        """What a checkpoint needs of the trainer besides its engines (its guard's counts are the loop's to save)."""
        return {"rollouts": self.rollouts,
                "ema": {k: v.clone() for k, v in self.ema.state_dict().items()} if self.ema is not None else None}

    def load_state(self, state: dict) -> None:
        self.rollouts = state["rollouts"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    @torch.no_grad()
    def update_ema(self) -> None:
        for ema_p, p in zip(self.ema.parameters(), self.actor.module.parameters()):
            ema_p.mul_(self.cfg.algo.ema_decay).add_(p.detach().to(ema_p.dtype), alpha=1 - self.cfg.algo.ema_decay)

    def evaluate(self, loader, dataset, progress=None) -> tuple[dict, list[dict]]:
        """eval.json's result and the generations (rlhf/steps/eval.py) on held-out prompts: the greedy answer and
        --eval-n-samples at the rollouts' sampling settings, fixed seed, in one switch to inference. Only the
        engine and the reward run. `progress(n)` is told of each batch's prompts."""
        cfg = self.cfg
        settings = EvalSettings(cfg.loop.eval_n_samples, cfg.sampling.temperature, cfg.sampling.top_k,
                                cfg.sampling.top_p, cfg.loop.eval_pass_threshold, cfg.seed + 7)
        sampler = lambda ids, mask, params, prompts, fields: self.sample(  # noqa: E731
            ids, mask, params, prompts, fields, switch=False)
        rows = cfg.loop.per_device_generation_batch_size * self.algo.n_samples_per_prompt  # the engine's batch
        self.hybrid.eval()
        try:
            return evaluate(sampler, self.score, self.tokenizer, dataset, loader, settings, self.device, rows,
                            progress)
        finally:
            self.hybrid.train()


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: float, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13) of answers of `lengths` (B,)
    tokens under a budget of L = `max_len` with a buffer of C = round(buffer * L) tokens: 0 up to L - C, then
    ``factor * ((L - C) - |y|) / C`` falling to -factor at L, and -factor past it. Added to the row's reward."""
    cache = max(1, round(buffer * max_len))
    expected = max_len - cache
    penalty = ((expected - lengths.float()) / cache).clamp(min=-1.0, max=0.0)  # (B,)
    return factor * penalty


def truncated(exp: Experience, eos_token_id: int) -> torch.Tensor:
    """(B,) bool: answers that do not end in EOS (cut by the token budget), DAPO's overlong filtering's rows."""
    B = exp.action_mask.shape[0]
    last = last_action_index(exp.action_mask)                                   # (B,)
    tokens = exp.sequences[torch.arange(B, device=last.device), exp.prompt_len + last.clamp(min=0)]
    return (last >= 0) & (tokens != eos_token_id)


def records(dataset, batch: dict) -> tuple[list[str], list[dict]]:
    """The raw prompts and other record fields of a prompt batch's rows (by its `index`)."""
    rows = batch["index"].tolist()
    return [dataset.prompts[i] for i in rows], [dataset.fields[i] for i in rows]


def multi_turn(cfg, engine, tokenizer) -> MultiTurn | None:
    """The multi-turn rollout of --environment or --tools on `engine`; None for single-turn runs."""
    env = cfg.env
    if not env.multi_turn:
        return None
    settings = TurnSettings(env.max_turns, cfg.sampling.max_answer_seq_len, env.max_total_tokens, env.tool_timeout)
    if env.tools is not None:
        tools = load_tools(env.tools)
        return MultiTurn(engine, tokenizer, ToolEnvironment, settings, tools,
                         make_env=lambda: ToolEnvironment(tools, env.tool_timeout))
    cls = load_environment(env.environment)
    make = (lambda: cls(timeout=env.tool_timeout)) if issubclass(cls, ToolEnvironment) else cls
    return MultiTurn(engine, tokenizer, cls, settings, make_env=make)


def final_turns(exp: Experience | Sample) -> list[list[int]]:
    """Each row's last run of action tokens after its prompt: a multi-turn trajectory's final model turn."""
    turns = []
    for row_mask, row_ids in zip(exp.action_mask.tolist(), exp.sequences[:, exp.prompt_len:].tolist()):
        end = max((i for i, m in enumerate(row_mask) if m), default=-1) + 1
        start = end
        while start > 0 and row_mask[start - 1]:
            start -= 1
        turns.append(row_ids[start:end])
    return turns


def place_turn_rewards(rewards: torch.Tensor, action_mask: torch.Tensor, turn_rewards: list[list]) -> None:
    """Move each intermediate turn's reward from the trajectory's last action token (where the summed score was
    put) to that turn's last token, in place: token-level estimators (PPO's GAE, REINFORCE++) then credit each turn
    with its own reward; outcome estimators, which read the summed score, see no change."""
    for row, pairs in enumerate(turn_rewards):
        positions = action_mask[row].nonzero()
        if not len(positions):
            continue
        last = int(positions[-1])
        for at, reward in pairs:
            if at != last:
                rewards[row, at] += reward
                rewards[row, last] -= reward
