"""Rollouts for PPO: generate with the hybrid engine, then score the sequences with the training forward of
the actor, the frozen reference, the reward model and the critic (DeepSpeed-Chat's `generate_experience`).

Index convention (as DeepSpeed-Chat): for a sequence of P prompt columns and N answer columns, the logits and
values at column P-1+t belong to answer token t, so every per-action tensor is (B, N).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf.models import position_ids_from_mask


@dataclass
class Experience:
    sequences: torch.Tensor       # (B, P+N) prompt (left padded) + answer (padded after EOS)
    attention_mask: torch.Tensor  # (B, P+N) 1 on prompt tokens and on answer tokens up to and including EOS
    action_mask: torch.Tensor     # (B, N) bool
    prompt_len: int
    logprobs: torch.Tensor        # (B, N) the actor's training-forward logprobs (PPO's "old" logprobs)
    ref_logprobs: torch.Tensor    # (B, N)
    rollout_logprobs: torch.Tensor  # (B, N) what the hybrid engine reported while generating
    values: torch.Tensor | None = None  # (B, N) the critic's, before the update; None without a critic
    # Filled once per rollout, right after generation (RLTrainer.rollout), so every minibatch and epoch sees
    # the same; rows sampled from one prompt are consecutive.
    scores: torch.Tensor | None = None      # (B,) reward model score or reward function value of each row
    rewards: torch.Tensor | None = None     # (B, N) per-token reward: KL penalty plus the clipped score at the end
    advantages: torch.Tensor | None = None  # (B, N)
    returns: torch.Tensor | None = None     # (B, N) the critic's regression targets

    def minibatches(self, size: int):
        """Row slices of this experience with at most `size` rows each."""
        B = self.sequences.shape[0]
        for start in range(0, B, size):
            rows = slice(start, start + size)
            yield Experience(**{k: (v[rows] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})


def action_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of `model`'s forward at each answer token: (B, N), fp32."""
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    logits = logits[:, prompt_len - 1:-1].float()                        # (B, N, V)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)


def action_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The critic's value of the state before each answer token: (B, N)."""
    return critic(sequences, attention_mask)[:, prompt_len - 1:-1].float()


@dataclass
class RolloutStats:
    seconds: float
    new_tokens: int
    eval_switch_s: float
    relaid_bytes: int
    gathered_bytes: int = 0     # ZeRO-3 parameters all-gathered by the eval() switch
    tp_bytes: int = 0           # this rank's tensor-parallel shards written by it
    train_switch_s: float = 0.0  # the train() switch (partitioning the gathered parameters again)


@torch.no_grad()
def generate_experience(hybrid, actor, ref, critic, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
                        top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
                        ) -> tuple[Experience, RolloutStats]:
    """One generation batch: sample answers with the hybrid engine, then score them with the training forward
    of the actor, the frozen reference and the critic (None: no values). The models are plain modules (a
    DeepSpeed engine's `.module`); the rewards are the caller's (a reward model or a function)."""
    start = time.perf_counter()
    hybrid.eval()
    out = hybrid.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, do_sample=True,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, generator=generator)
    gen_s = time.perf_counter() - start
    switch = hybrid.last_switch
    hybrid.train()
    stats = RolloutStats(gen_s, int(out.action_mask.sum()), switch.seconds, switch.relaid_bytes, switch.gathered_bytes,
                         switch.tp_bytes, hybrid.last_train_switch.seconds)
    actor.eval()  # no dropout: the "old" logprobs must be those of the policy that generated
    P = prompt_ids.shape[1]
    action_mask = out.action_mask
    mask = action_mask.float()
    attention_mask = torch.cat([prompt_mask, action_mask.to(prompt_mask.dtype)], dim=1)
    seq = out.sequences
    logprobs = action_logprobs(actor, seq, attention_mask, P, temperature)
    ref_logprobs = action_logprobs(ref, seq, attention_mask, P, temperature)
    values = action_values(critic, seq, attention_mask, P) * mask if critic is not None else None
    actor.train()
    return Experience(seq, attention_mask, action_mask, P, logprobs * mask, ref_logprobs * mask, out.logprobs,
                      values), stats


def max_logprob_gap(exp: Experience) -> float:
    """Largest |rollout logprob - training-forward logprob| over the answer tokens of a rollout."""
    gap = (exp.rollout_logprobs - exp.logprobs).abs().masked_fill(~exp.action_mask, 0.0)
    return float(gap.max()) if gap.numel() else 0.0


def sequence_kl(exp: Experience) -> torch.Tensor:
    """(B,) sum over answer tokens of logp - logp_ref: the sampled estimate of KL(actor || reference)."""
    return ((exp.logprobs - exp.ref_logprobs) * exp.action_mask).sum(-1)


def lm_loss(model, batch: dict) -> torch.Tensor:
    """The pre-training (PTX) language-model loss on a right-padded batch with -100 labels."""
    return model(**batch, use_cache=False).loss

