"""Rollouts for PPO: generate with the hybrid engine, then score the sequences with the training forward of
the actor, the frozen reference, the reward model and the critic (DeepSpeed-Chat's `generate_experience`).
The actor's forward can be skipped by reusing the logprobs the engine reported while generating, and the
reference can be scored by an engine's prefill-only forward (`HybridEngine.score`).

Index convention (as DeepSpeed-Chat): for a sequence of P prompt columns and N answer columns, the logits and
values at column P-1+t belong to answer token t, so every per-action tensor is (B, N).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybrid_engine import HybridEngine, SamplingParams, token_logprobs
from rlhf.core.microbatch import MicroBatch, Microbatching, in_batch_order
from rlhf.models import position_ids_from_mask


@dataclass
class Experience:
    sequences: torch.Tensor       # (B, P+N) prompt (left padded) + answer (padded after EOS)
    attention_mask: torch.Tensor  # (B, P+N) 1 on prompt tokens and on answer tokens up to and including EOS
    action_mask: torch.Tensor     # (B, N) bool
    prompt_len: int
    logprobs: torch.Tensor        # (B, N) PPO's "old" logprobs: the training forward's, or the rollout's reused
    ref_logprobs: torch.Tensor    # (B, N)
    rollout_logprobs: torch.Tensor  # (B, N) what the hybrid engine reported while generating
    values: torch.Tensor | None = None  # (B, N) the critic's, before the update; None without a critic
    # Filled once per rollout, right after generation (RLTrainer.rollout), so every minibatch and epoch sees
    # the same; rows sampled from one prompt are consecutive.
    scores: torch.Tensor | None = None      # (B,) reward model score or reward function value of each row
    rewards: torch.Tensor | None = None     # (B, N) per-token reward: KL penalty plus the clipped score at the end
    advantages: torch.Tensor | None = None  # (B, N)
    returns: torch.Tensor | None = None     # (B, N) the critic's regression targets
    env_scores: torch.Tensor | None = None  # (B,) a multi-turn environment's rewards (in `scores` already)
    teacher_logprobs: torch.Tensor | None = None  # (B, N) --teacher-model's logprobs of the sampled tokens (distill)
    correction: torch.Tensor | None = None  # (B, N) rollout-correction weights on the policy loss (None: all 1)
    loss_mask: torch.Tensor | None = None   # (B, N) bool, the tokens the losses see (None: action_mask); overlong
                                            # filtering takes truncated answers out

    def minibatches(self, size: int):
        """Row slices of this experience with at most `size` rows each."""
        B = self.sequences.shape[0]
        for start in range(0, B, size):
            rows = slice(start, start + size)
            yield Experience(**{k: (v[rows] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})


def action_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of `model`'s forward at each answer token: (B, N), fp32.

    Only the N columns that predict answer tokens go through the LM head (Hugging Face's `logits_to_keep`, which
    every supported family takes): the same numbers (bit for bit on benchmarks/rlhf_step.py's model) for N / (P + N)
    of the head's work and of the logits' memory; an actor update (forward and backward) there takes about 7% less."""
    N = sequences.shape[1] - prompt_len
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   logits_to_keep=N + 1).logits                          # (B, N + 1, V): columns P-1 .. T-1
    return token_logprobs(logits[:, :-1], sequences[:, prompt_len:], temperature)  # (B, N)


def action_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The critic's value of the state before each answer token: (B, N)."""
    return critic(sequences, attention_mask)[:, prompt_len - 1:-1].float()


def micro_logprobs(model, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
    """`action_logprobs` of one micro-batch (rlhf/core/microbatch.py), trimmed or packed: (b, N) in the batch's
    answer layout, 0 off each row's answer; only the kept columns go through the LM head."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                   use_cache=False, logits_to_keep=mb.keep).logits               # (R, K, V)
    return mb.scatter(token_logprobs(logits, mb.labels, temperature))           # (b, N)


def micro_values(critic, mb: MicroBatch) -> torch.Tensor:
    """`action_values` of one micro-batch: (b, N), 0 off each row's answer."""
    return mb.scatter(mb.gather(critic(mb.input_ids, mb.attention_mask, mb.position_ids)).float())


def micro_scores(reward_model, mb: MicroBatch) -> torch.Tensor:
    """A reward model's score (its value at the last token) of each row of one micro-batch: (b,)."""
    return mb.last_values(reward_model(mb.input_ids, mb.attention_mask, mb.position_ids))


def batch_scores(reward_model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 micro: Microbatching | None = None) -> torch.Tensor:
    """(B,) a reward model's scores, padded (`RewardModel.score`) or by micro-batch."""
    if micro is None or not micro.enabled:
        return reward_model.score(sequences, attention_mask)
    batches = micro.plan(sequences, attention_mask, prompt_len)
    return in_batch_order(batches, [micro_scores(reward_model, mb) for mb in batches])


@dataclass
class PhaseTimer:
    """Seconds per named phase, summed until `pop()`; free when off (the trainer's default). On CUDA each phase
    synchronizes before and after, so the kernels a phase launches are charged to it. `clock`: wall time by
    default; time.process_time counts this process's CPU seconds only (with one thread: its work, whatever else
    the machine runs)."""
    enabled: bool = False
    clock: Callable[[], float] = time.perf_counter
    seconds: dict = field(default_factory=dict)

    def phase(self, name: str):
        return self._timed(name) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, name: str):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = self.clock()
        try:
            yield
        finally:
            sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start

    def pop(self) -> dict:
        """The seconds per phase since the last pop(), and a fresh count."""
        out, self.seconds = self.seconds, {}
        return out


@dataclass
class RolloutStats:
    seconds: float
    new_tokens: int
    eval_switch_s: float
    relaid_bytes: int
    gathered_bytes: int = 0     # ZeRO-3 parameters all-gathered by the eval() switch
    tp_bytes: int = 0           # this rank's tensor-parallel shards written by it
    train_switch_s: float = 0.0  # the train() switch (partitioning the gathered parameters again)
    # largest |rollout - training-forward logprob| over the answer tokens; None when the rollout's logprobs were
    # reused without an audit (the training forward was not run)
    logprob_gap: float | None = None
    env: dict | None = None  # a multi-turn rollout's counts (turns, tool calls, errors, ...: Trajectories.counts)
    correction: dict | None = None  # the rollout-correction weights' statistics (rlhf/core/rollout_correction.py)
    dynamic_sampling: dict | None = None  # groups dropped and rollouts added (rlhf/core/dynamic_sampling.py)


@dataclass
class Sample:
    """What the hybrid engine returns for a batch of prompts, before any training forward."""
    sequences: torch.Tensor       # (B, P+N)
    attention_mask: torch.Tensor  # (B, P+N) the prompt's mask, then 1 on answer tokens up to and including EOS
    action_mask: torch.Tensor     # (B, N) bool
    prompt_len: int
    logprobs: torch.Tensor        # (B, N) the engine's, 0 off the action mask
    stats: RolloutStats
    temperature: float = 1.0      # what the logprobs divide the logits by; the training forwards use the same
    env_scores: torch.Tensor | None = None  # (B,) the rewards a multi-turn environment gave each trajectory


@torch.no_grad()
def sample(hybrid, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, timer: PhaseTimer | None = None, switch: bool = True) -> Sample:
    """Sample answers with the hybrid engine under `params`: switch to inference, generate, switch back to
    training (`switch=False`: an engine kept in inference mode by the caller, as `rlhf eval` does)."""
    timer = timer or PhaseTimer()
    start = time.perf_counter()
    if switch:
        with timer.phase("switch"):
            hybrid.eval()
    with timer.phase("generate"):
        out = hybrid.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id, sampling=params)
    gen_s = time.perf_counter() - start
    switch_stats = hybrid.last_switch
    if switch:
        with timer.phase("switch"):
            hybrid.train()
    stats = RolloutStats(gen_s, int(out.action_mask.sum()), switch_stats.seconds, switch_stats.relaid_bytes,
                         switch_stats.gathered_bytes, switch_stats.tp_bytes, hybrid.last_train_switch.seconds)
    attention_mask = torch.cat([prompt_mask, out.action_mask.to(prompt_mask.dtype)], dim=1)
    return Sample(out.sequences, attention_mask, out.action_mask, prompt_ids.shape[1], out.logprobs, stats,
                  params.temperature)


@torch.no_grad()
def generate_experience(s: Sample, actor, ref, critic, reuse_rollout_logprobs: bool = False, audit: bool = False,
                        timer: PhaseTimer | None = None,
                        micro: Microbatching | None = None) -> tuple[Experience, RolloutStats]:
    """One generation batch, once sampled (`sample`): score it with the training forward of the actor, the
    frozen reference and the critic (None: no values). The models are plain modules (a DeepSpeed engine's
    `.module`); `ref` may be a HybridEngine instead, scored with its prefill-only forward. The rewards are the
    caller's (a reward model or a function).

    `reuse_rollout_logprobs`: PPO's old logprobs are the engine's rollout logprobs (same weights, same tokens,
    within the measured gap), saving the actor's forward; `audit` runs that forward anyway to report the gap.
    `micro`: the training forwards by token-budget micro-batches (rlhf/core/microbatch.py; an engine-scored
    reference keeps its own padded prefill)."""
    timer = timer or PhaseTimer()
    seq, attention_mask, action_mask, P, stats = s.sequences, s.attention_mask, s.action_mask, s.prompt_len, s.stats
    temperature = s.temperature
    actor.eval()  # no dropout: the "old" logprobs must be those of the policy that generated
    mask = action_mask.float()
    logprobs = s.logprobs
    batches = micro.plan(seq, attention_mask, P) if micro is not None and micro.enabled else None

    def logprobs_of(model) -> torch.Tensor:  # (B, N): the padded forward, or its micro-batches' in the rows' order
        if batches is None:
            return action_logprobs(model, seq, attention_mask, P, temperature)
        return in_batch_order(batches, [micro_logprobs(model, mb, temperature) for mb in batches])

    if not reuse_rollout_logprobs or audit:
        with timer.phase("old_logprobs"):
            old = logprobs_of(actor) * mask
        stats.logprob_gap = max_logprob_gap(s.logprobs, old, action_mask)
        logprobs = logprobs if reuse_rollout_logprobs else old
    with timer.phase("ref_logprobs"):
        if isinstance(ref, HybridEngine):
            ref_logprobs = ref.score(seq, attention_mask, prompt_len=P, temperature=temperature)
        else:
            ref_logprobs = logprobs_of(ref)
    values = None
    if critic is not None:
        with timer.phase("values"):
            if batches is None:
                values = action_values(critic, seq, attention_mask, P)
            else:
                values = in_batch_order(batches, [micro_values(critic, mb) for mb in batches])
            values = values * mask
    actor.train()
    return Experience(seq, attention_mask, action_mask, P, logprobs, ref_logprobs * mask, s.logprobs,
                      values), stats


def max_logprob_gap(rollout: torch.Tensor, forward: torch.Tensor, action_mask: torch.Tensor) -> float:
    """Largest |rollout logprob - training-forward logprob| over the answer tokens (B, N) of a rollout."""
    gap = (rollout - forward).abs().masked_fill(~action_mask, 0.0)
    return float(gap.max()) if gap.numel() else 0.0


def sequence_kl(exp: Experience) -> torch.Tensor:
    """(B,) sum over answer tokens of logp - logp_ref: the sampled estimate of KL(actor || reference)."""
    return ((exp.logprobs - exp.ref_logprobs) * exp.action_mask).sum(-1)


def lm_loss(model, batch: dict) -> torch.Tensor:
    """The pre-training (PTX) language-model loss on a right-padded batch with -100 labels."""
    return model(**batch, use_cache=False).loss

