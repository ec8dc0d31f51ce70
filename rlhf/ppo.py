"""Step 3: PPO of the actor against the reward model, rollouts through the hybrid engine.

    python -m rlhf.ppo --actor-model-name-or-path out/actor --critic-model-name-or-path out/reward \
        --data pairs.jsonl --output-dir out/ppo

DeepSpeed-Chat's semantics by default: per-token reward -kl_ctl * (logp - logp_ref) with the clipped reward
score added at the last answer token, GAE (gamma 1, lambda 0.95), clipped policy surrogate and clipped value
loss (0.2 each), `ppo_epochs` passes over `generation_batches` rollouts, an optional EMA of the actor and an
optional pre-training (PTX) loss. The actor and critic are DeepSpeed engines; the reference and reward models
are frozen DeepSpeed engines. Every PPO step logs the largest gap between the logprobs the hybrid engine
reported while generating and the training forward's on the same tokens.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import hybrid_engine
from rlhf.checkpoint import save_actor_checkpoint, save_reward_checkpoint
from rlhf.common import add_config_args, all_reduce_sum, config_from_args, opt, run_cli, step_main, to_device
from rlhf.data import (
    build_prompt_dataset,
    build_sft_dataset,
    load_step_examples,
    make_dataloader,
    train_eval_split,
)
from rlhf.data.synthetic import gold_scores
from rlhf.deepspeed_utils import ds_config, init_distributed, init_inference, initialize
from rlhf.experience import (
    Experience,
    action_logprobs,
    action_values,
    generate_experience,
    lm_loss,
    max_logprob_gap,
    sequence_kl,
)
from rlhf.losses import gae, kl_penalized_rewards, masked_mean, policy_loss, value_loss
from rlhf.metrics import MetricsLogger
from rlhf.models import ModelOptions, RewardModel, create_actor, create_critic, load_tokenizer


@dataclass
class PPOConfig:
    """Step-3 options; DeepSpeed-Chat's step-3 defaults unless noted."""
    actor_model_name_or_path: str = opt("outputs/actor", "the SFT actor (step 1's output)")
    critic_model_name_or_path: str = opt("outputs/reward", "the reward model (step 2's output); the critic starts "
                                         "from it")
    data: list[str] = opt([], "prompt sources, each PATH or PATH:WEIGHT (pair records; step 3's slice is used)")
    data_split: str = opt("2,4,4", "proportions of each pair source for steps 1,2,3")
    unsupervised_data: list[str] = opt([], "pre-training (PTX) data: prompt/response records, LM loss on them")
    unsup_coef: float = opt(27.8, "weight of the PTX loss")
    output_dir: str = opt("outputs/ppo", "where actor/, critic/ (and actor_ema/) are written")
    per_device_generation_batch_size: int = opt(16, "prompts per rollout per device")
    per_device_training_batch_size: int = opt(16, "rows per PPO minibatch per device")
    generation_batches: int = opt(1, "rollouts collected before each round of PPO updates")
    ppo_epochs: int = opt(1, "passes over the collected rollouts per round")
    num_train_epochs: int = opt(1, "passes over the prompts")
    max_steps: int = opt(0, "stop after this many PPO rounds (0: all prompts)")
    max_prompt_seq_len: int = opt(256, "longer prompts are dropped (and counted)")
    max_answer_seq_len: int = opt(256, "new tokens per answer")
    actor_learning_rate: float = opt(9.65e-6, "actor learning rate")
    critic_learning_rate: float = opt(5e-6, "critic learning rate")
    actor_weight_decay: float = opt(0.0, "actor weight decay")
    critic_weight_decay: float = opt(0.0, "critic weight decay")
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule", choices=["linear", "cosine", "constant",
                                                                               "constant_with_warmup"])
    num_warmup_steps: int = opt(100, "optimizer steps of linear warmup")
    kl_ctl: float = opt(0.1, "KL penalty coefficient beta")
    clip_reward_value: float = opt(5.0, "reward-model scores are clipped to [-c, c]")
    cliprange: float = opt(0.2, "policy ratio clip epsilon")
    cliprange_value: float = opt(0.2, "value clip epsilon")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    temperature: float = opt(1.0, "sampling temperature of rollouts (logprobs use the same)")
    top_k: int = opt(0, "sample from the k most likely tokens (0: off)")
    top_p: float = opt(1.0, "nucleus sampling mass (1: off)")
    enable_ema: bool = opt(False, "keep an exponential moving average of the actor (saved as actor_ema/)")
    ema_decay: float = opt(0.992, "EMA decay")
    dtype: str = opt("fp32", "training precision of every model", choices=["fp32", "bf16", "fp16"])
    actor_zero_stage: int = opt(0, "ZeRO stage of the actor (the reference model: 3 if this is 3, else 0)",
                                choices=[0, 1, 2, 3])
    critic_zero_stage: int = opt(0, "ZeRO stage of the critic (the reward model: 3 if this is 3, else 0)",
                                 choices=[0, 1, 2, 3])
    offload: bool = opt(False, "offload actor/critic optimizer state to CPU")
    offload_reference_model: bool = opt(False, "offload the reference model's parameters (ZeRO-3) to CPU")
    offload_reward_model: bool = opt(False, "offload the reward model's parameters (ZeRO-3) to CPU")
    actor_gradient_checkpointing: bool = opt(False, "activation checkpointing in the actor")
    critic_gradient_checkpointing: bool = opt(False, "activation checkpointing in the critic")
    actor_dropout: float | None = opt(None, "override the actor's dropout (default: keep the model's)")
    critic_dropout: float | None = opt(None, "override the critic's dropout")
    actor_lora_dim: int = opt(0, "LoRA rank of the actor (0: none)")
    actor_lora_module_name: str = opt("layers.", "LoRA on actor Linear layers whose name contains this")
    critic_lora_dim: int = opt(0, "LoRA rank of the critic (0: none)")
    critic_lora_module_name: str = opt("layers.", "LoRA on critic Linear layers whose name contains this")
    only_optimize_lora: bool = opt(False, "train only the LoRA weights")
    actor_lora_learning_rate: float = opt(5e-4, "learning rate of the actor's LoRA weights")
    critic_lora_learning_rate: float = opt(5e-4, "learning rate of the critic's LoRA weights")
    enable_hybrid_engine: bool = opt(True, "generate with the hybrid engine (off: Hugging Face generate via the "
                                     "engine's fallback)")
    release_inference_cache: bool = opt(False, "free the KV cache after every rollout")
    inference_tp_size: int = opt(1, "tensor-parallel degree of generation (needs actor ZeRO-3)")
    unpin_actor_parameters: bool = opt(False, "ZeRO-3: gather the actor's layers during each generation forward "
                                       "instead of once per rollout (slower, less memory)")
    tp_gather_partition_size: int = opt(8, "ZeRO-3: actor layers gathered at a time (0: all at once)")
    kernels: str | None = opt(None, "hybrid-engine kernels: auto|cuda|triton|cpu|torch")
    gold_task: str = opt("none", "score answers with a rule too: 'synthetic' (the built-in task) or 'none'",
                         choices=["none", "synthetic"])
    eval_prompts: int = opt(256, "held-out prompts scored before and after PPO")
    print_answers: bool = opt(False, "print a prompt and its answer every log interval")
    log_interval: int = opt(1, "PPO rounds between metrics.jsonl records")
    seed: int = opt(1234, "seed of data order and sampling")
    disable_tqdm: bool = opt(False, "no progress bars")

    def validate(self) -> None:
        if self.inference_tp_size > 1 and self.actor_zero_stage != 3:
            raise ValueError("--inference-tp-size > 1 requires --actor-zero-stage 3 (as DeepSpeed-Chat)")
        if self.max_answer_seq_len < 2:
            raise ValueError(f"--max-answer-seq-len {self.max_answer_seq_len}: expected at least 2")


def _options(cfg: PPOConfig, who: str) -> ModelOptions:
    return ModelOptions(dropout=getattr(cfg, f"{who}_dropout"),
                        gradient_checkpointing=getattr(cfg, f"{who}_gradient_checkpointing"),
                        lora_dim=getattr(cfg, f"{who}_lora_dim"),
                        lora_module_name=getattr(cfg, f"{who}_lora_module_name"),
                        only_optimize_lora=cfg.only_optimize_lora)


class PPOTrainer:
    """Holds the four models and does one PPO round at a time (readable top to bottom in `step`)."""

    def __init__(self, cfg: PPOConfig, tokenizer, total_steps: int, device: torch.device):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        micro = cfg.per_device_training_batch_size

        def config(stage, offload=False):
            return ds_config(micro, 1, stage, offload, cfg.dtype)

        actor = create_actor(cfg.actor_model_name_or_path, _options(cfg, "actor"))
        self.actor = initialize(actor, config(cfg.actor_zero_stage, cfg.offload), cfg.actor_learning_rate,
                                cfg.actor_weight_decay, total_steps, cfg.num_warmup_steps, cfg.lr_scheduler_type,
                                lora_lr=cfg.actor_lora_learning_rate if cfg.actor_lora_dim else None)
        ref = create_actor(cfg.actor_model_name_or_path, ModelOptions())
        self.ref = init_inference(ref, micro, cfg.actor_zero_stage, cfg.offload_reference_model, cfg.dtype)
        critic = create_critic(cfg.critic_model_name_or_path, _options(cfg, "critic"))
        self.critic = initialize(critic, config(cfg.critic_zero_stage, cfg.offload), cfg.critic_learning_rate,
                                 cfg.critic_weight_decay, total_steps, cfg.num_warmup_steps, cfg.lr_scheduler_type,
                                 lora_lr=cfg.critic_lora_learning_rate if cfg.critic_lora_dim else None)
        reward = RewardModel.from_pretrained(cfg.critic_model_name_or_path)
        self.reward = init_inference(reward, micro, cfg.critic_zero_stage, cfg.offload_reward_model, cfg.dtype)
        self.ema = copy.deepcopy(self.actor.module).eval() if cfg.enable_ema else None
        self.hybrid = hybrid_engine.wrap(self.actor, max_seq_len=cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
                                         max_batch_size=cfg.per_device_generation_batch_size,
                                         tp_size=cfg.inference_tp_size, kernels=cfg.kernels,
                                         force_fallback=not cfg.enable_hybrid_engine,
                                         release_cache_after_generate=cfg.release_inference_cache,
                                         pin_parameters=False if cfg.unpin_actor_parameters else None,
                                         gather_partition_size=cfg.tp_gather_partition_size)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def rollout(self, batch: dict, generator: torch.Generator) -> tuple[Experience, object]:
        """Generate and score one batch of prompts; the experience comes back with its rewards, advantages and
        returns filled."""
        cfg = self.cfg
        exp, stats = generate_experience(self.hybrid, self.actor.module, self.ref.module, self.reward.module,
                                         self.critic.module, batch["input_ids"], batch["attention_mask"],
                                         cfg.max_answer_seq_len, self.eos_id, self.pad_id, cfg.temperature,
                                         cfg.top_k, cfg.top_p, generator)
        exp.rewards = kl_penalized_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.action_mask, cfg.kl_ctl,
                                           cfg.clip_reward_value)
        exp.advantages, exp.returns = gae(exp.rewards, exp.values, exp.action_mask, cfg.gamma, cfg.lam)
        return exp, stats

    def train_on(self, exp: Experience, ptx_batch: dict | None) -> dict:
        """PPO losses on one minibatch of experience: actor step, critic step, and a PTX step when given."""
        cfg = self.cfg
        advantages, returns = exp.advantages, exp.returns
        logprobs = action_logprobs(self.actor, exp.sequences, exp.attention_mask, exp.prompt_len, cfg.temperature)
        actor_loss = policy_loss(logprobs, exp.logprobs, advantages, exp.action_mask, cfg.cliprange)
        self.actor.backward(actor_loss)
        self.actor.step()
        ptx = None
        if ptx_batch is not None:
            ptx = lm_loss(self.actor, to_device(ptx_batch, self.device))
            self.actor.backward(cfg.unsup_coef * ptx)
            self.actor.step()
        values = action_values(self.critic, exp.sequences, exp.attention_mask, exp.prompt_len)
        critic_loss = value_loss(values, exp.values, returns, exp.action_mask, cfg.cliprange_value)
        self.critic.backward(critic_loss)
        self.critic.step()
        if self.ema is not None:
            self.update_ema()
        out = {"actor_loss": actor_loss.item(), "critic_loss": critic_loss.item(),
               "advantage": masked_mean(advantages, exp.action_mask).item()}
        if ptx is not None:
            out["ptx_loss"] = ptx.item()
        return out

    @torch.no_grad()
    def update_ema(self) -> None:
        for ema_p, p in zip(self.ema.parameters(), self.actor.module.parameters()):
            ema_p.mul_(self.cfg.ema_decay).add_(p.detach().to(ema_p.dtype), alpha=1 - self.cfg.ema_decay)

    def gold(self, exp: Experience) -> list[float]:
        """The synthetic task's rule on each decoded prompt and answer (rows carry their own prompts, so this
        holds on every rank whatever its data shard)."""
        prompts = self.tokenizer.batch_decode(exp.sequences[:, :exp.prompt_len], skip_special_tokens=True)
        answers = self.tokenizer.batch_decode(exp.sequences[:, exp.prompt_len:], skip_special_tokens=True)
        return gold_scores(prompts, answers)

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Mean reward-model score (and gold score) of sampled answers to held-out prompts, fixed seed; the means
        are over every rank's rows."""
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7)
        totals = [0.0, 0.0, 0.0]  # reward sum, gold sum, rows
        for batch in loader:
            exp, _ = self.rollout(to_device(batch, self.device), generator)
            totals[0] += exp.scores.sum().item()
            if self.cfg.gold_task == "synthetic":
                totals[1] += sum(self.gold(exp))
            totals[2] += len(exp.scores)
        reward, gold, rows = all_reduce_sum(totals, self.device)
        out = {"reward": reward / max(rows, 1)}
        if self.cfg.gold_task == "synthetic":
            out["gold"] = gold / max(rows, 1)
        return out


def run_ppo(cfg: PPOConfig, tokenizer=None, metrics: MetricsLogger | None = None) -> dict:
    """Train the actor with PPO against the reward model; save actor/ and critic/ under cfg.output_dir."""
    cfg.validate()
    start = time.time()
    dist = init_distributed()
    torch.manual_seed(cfg.seed)
    tokenizer = tokenizer or load_tokenizer(cfg.actor_model_name_or_path)
    metrics = metrics or MetricsLogger(cfg.output_dir, enabled=dist.is_main)
    if not cfg.data:
        raise ValueError("PPO needs --data (pair records: the prompts of step 3's slice are used)")
    examples = load_step_examples(cfg.data, step=3, split=cfg.data_split, seed=cfg.seed)
    eval_fraction = min(0.5, cfg.eval_prompts / max(len(examples), 1)) if cfg.eval_prompts else 0.0
    train_examples, eval_examples = train_eval_split(examples, eval_fraction, cfg.seed)
    train_set = build_prompt_dataset(tokenizer, train_examples, cfg.max_prompt_seq_len)
    eval_set = build_prompt_dataset(tokenizer, eval_examples, cfg.max_prompt_seq_len)
    if len(train_set) == 0:
        raise ValueError(f"PPO: no prompts for step 3 in {cfg.data} with --data-split {cfg.data_split} "
                         f"and --max-prompt-seq-len {cfg.max_prompt_seq_len}")
    loader = make_dataloader(train_set, cfg.per_device_generation_batch_size, shuffle=True, seed=cfg.seed,
                             drop_last=len(train_set) >= cfg.per_device_generation_batch_size)
    eval_loader = make_dataloader(eval_set, cfg.per_device_generation_batch_size, shuffle=False)
    ptx_batches = None
    if cfg.unsupervised_data:
        ptx = build_sft_dataset(tokenizer, load_step_examples(cfg.unsupervised_data, step=1, split="1,0,0"),
                                cfg.max_prompt_seq_len + cfg.max_answer_seq_len)
        ptx_batches = itertools.cycle(make_dataloader(ptx, cfg.per_device_training_batch_size, seed=cfg.seed))

    rounds = len(loader) * cfg.num_train_epochs // cfg.generation_batches
    rounds = min(rounds, cfg.max_steps) if cfg.max_steps else rounds
    minibatches = -(-cfg.per_device_generation_batch_size // cfg.per_device_training_batch_size)
    trainer = PPOTrainer(cfg, tokenizer, rounds * cfg.ppo_epochs * cfg.generation_batches * minibatches, dist.device)
    before = trainer.evaluate(eval_loader) if len(eval_set) else {}
    metrics.log("ppo_eval", 0, **before)

    generator = torch.Generator(device=dist.device).manual_seed(cfg.seed + dist.rank)
    bar = tqdm(total=rounds, desc="step 3 PPO", disable=cfg.disable_tqdm or not dist.is_main)
    step, buffer, history, gen_tokens, gen_seconds = 0, [], [], 0, 0.0
    batches = (b for _ in range(cfg.num_train_epochs) for b in loader)
    for batch in batches:
        batch = to_device(batch, dist.device)
        exp, stats = trainer.rollout(batch, generator)
        gen_tokens, gen_seconds = gen_tokens + stats.new_tokens, gen_seconds + stats.seconds
        record = {"reward": exp.scores.mean().item(), "kl": sequence_kl(exp).mean().item(),
                  "logprob_gap": max_logprob_gap(exp), "answer_len": exp.action_mask.sum(-1).float().mean().item(),
                  "gen_tokens_per_s": stats.new_tokens / max(stats.seconds, 1e-9),
                  "eval_switch_s": stats.eval_switch_s, "relaid_bytes": stats.relaid_bytes,
                  "gathered_bytes": stats.gathered_bytes, "tp_bytes": stats.tp_bytes,
                  "train_switch_s": stats.train_switch_s}
        if cfg.gold_task == "synthetic":
            golds = trainer.gold(exp)
            record["gold"] = sum(golds) / len(golds)
        buffer.append(exp)
        if len(buffer) < cfg.generation_batches:
            continue
        losses = []
        for _ in range(cfg.ppo_epochs):
            for rollout in buffer:
                for mb in rollout.minibatches(cfg.per_device_training_batch_size):
                    losses.append(trainer.train_on(mb, next(ptx_batches) if ptx_batches else None))
        buffer = []
        step += 1
        record.update({k: sum(d[k] for d in losses) / len(losses) for k in losses[0]})
        history.append(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                        gap=f"{record['logprob_gap']:.1e}")
        if step % cfg.log_interval == 0:
            metrics.log("ppo", step, **record)
            if cfg.print_answers and dist.is_main:
                answer = tokenizer.decode(exp.sequences[0, exp.prompt_len:], skip_special_tokens=True)
                print(f"[ppo {step}] {tokenizer.decode(exp.sequences[0, :exp.prompt_len], skip_special_tokens=True)}"
                      f" -> {answer}")
        if step >= rounds:
            break
    bar.close()
    after = trainer.evaluate(eval_loader) if len(eval_set) else {}
    metrics.log("ppo_eval", step, **after)
    save_actor_checkpoint(trainer.actor.module, tokenizer, f"{cfg.output_dir}/actor")
    save_reward_checkpoint(trainer.critic.module, tokenizer, f"{cfg.output_dir}/critic")
    if trainer.ema is not None:
        save_actor_checkpoint(trainer.ema, tokenizer, f"{cfg.output_dir}/actor_ema")
    last = history[-min(5, len(history)):] if history else [{}]
    mean = lambda key: sum(r.get(key, float("nan")) for r in last) / len(last)  # noqa: E731
    return {
        "output_dir": cfg.output_dir, "steps": step, "prompts": len(train_set), "dropped_prompts":
        train_set.num_dropped, "reward_before": before.get("reward"), "reward_after": after.get("reward"),
        "gold_before": before.get("gold"), "gold_after": after.get("gold"), "final_reward": mean("reward"),
        "final_kl": mean("kl"), "max_logprob_gap": max((r["logprob_gap"] for r in history), default=0.0),
        "gen_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9), "seconds": time.time() - start,
    }


def add_ppo_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "",
                 skip: tuple[str, ...] = ()) -> None:
    """Every PPOConfig option as ``--{prefix}name``."""
    add_config_args(parser, PPOConfig, prefix, skip)


def ppo_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> PPOConfig:
    return config_from_args(PPOConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    return step_main(PPOConfig, run_ppo, "Step 3: PPO of the actor against the reward model", argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m rlhf.ppo"))
