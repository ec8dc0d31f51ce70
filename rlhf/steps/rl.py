"""Step 3: reinforcement learning of the actor, rollouts through the hybrid engine. One loop for every
algorithm (rlhf/steps/rl_trainer.py): rollout -> rewards -> advantages -> update.

    python -m rlhf.steps.rl --actor-model-name-or-path out/actor --critic-model-name-or-path out/reward \
        --data pairs.jsonl --output-dir out/ppo
    python -m rlhf.steps.rl --algorithm grpo --reward-fn synthetic --actor-model-name-or-path out/actor ...

`--algorithm ppo` is DeepSpeed-Chat's PPO: per-token reward -kl_ctl * (logp - logp_ref) with the clipped reward
score added at the last answer token, GAE (gamma 1, lambda 0.95) with a critic, clipped policy surrogate and
clipped value loss (0.2 each), `ppo_epochs` passes over `generation_batches` rollouts, an optional EMA of the
actor and an optional pre-training (PTX) loss. `grpo`, `rloo`, `reinforce++` and `reinforce++-baseline` are
critic-free: `--n-samples-per-prompt` answers per prompt, an advantage estimator from rlhf/core/advantages.py, KL as a
reward penalty or a loss term. Rewards come from the reward model or from `--reward-fn` (rlhf/core/rewards.py).
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

import torch

from rlhf.core.advantages import ESTIMATORS
from rlhf.core.experience import sequence_kl
from rlhf.core.rewards import RewardFunction
from rlhf.data import build_prompt_dataset, build_sft_dataset, load_step_examples, make_dataloader, train_eval_split
from rlhf.data.synthetic import gold_scores
from rlhf.models import load_tokenizer, require_checkpoint, require_model_source
from rlhf.runtime.checkpoint import save_actor_checkpoint, save_reward_checkpoint
from rlhf.runtime.config import check_bounds, config_from_args, opt, step_main
from rlhf.runtime.distributed import init_distributed, to_device
from rlhf.runtime.loop import Batches, run_loop
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.process import run_cli
from rlhf.runtime.resume import RunControl
from rlhf.steps.rl_trainer import GoldFn, RLTrainer, records


@dataclass(frozen=True)
class Algorithm:
    """The resolved settings of one RL algorithm: what `train_on` and the estimators read."""
    name: str
    estimator: str                # key of rlhf.core.advantages.ESTIMATORS
    n_samples_per_prompt: int
    kl_ctl: float                 # KL penalty in the reward
    kl_loss_coef: float           # KL as a loss term
    kl_estimator: str
    loss_agg: str
    clip: float
    clip_high: float
    std_normalization: bool
    gamma: float
    lam: float

    @property
    def needs_critic(self) -> bool:
        return ESTIMATORS[self.estimator].needs_critic


# Per-algorithm defaults, from the papers and the peers: DeepSpeed-Chat (ppo); DeepSeekMath (grpo: 0.04, k3,
# sequence mean); TRL's RLOO (KL 0.05 in the reward); OpenRLHF's REINFORCE++ examples (KL 0.01 in the reward).
# Group sizes are small for the CPU preset; the papers use 8-64.
ALGORITHMS = {
    "ppo": dict(estimator="gae", n_samples_per_prompt=1, kl_ctl=0.1, kl_loss_coef=0.0, loss_agg="token-mean"),
    "grpo": dict(estimator="grpo", n_samples_per_prompt=4, kl_ctl=0.0, kl_loss_coef=0.04,
                 loss_agg="seq-mean-token-mean"),
    "rloo": dict(estimator="rloo", n_samples_per_prompt=4, kl_ctl=0.05, kl_loss_coef=0.0, loss_agg="token-mean"),
    "reinforce++": dict(estimator="reinforce++", n_samples_per_prompt=1, kl_ctl=0.01, kl_loss_coef=0.0,
                        loss_agg="token-mean"),
    "reinforce++-baseline": dict(estimator="reinforce++-baseline", n_samples_per_prompt=4, kl_ctl=0.01,
                                 kl_loss_coef=0.0, loss_agg="token-mean"),
}


@dataclass
class PPOConfig:
    """Step-3 options; DeepSpeed-Chat's step-3 names and defaults unless noted."""
    actor_model_name_or_path: str = opt("outputs/actor", "the SFT actor (step 1's output)")
    critic_model_name_or_path: str = opt("outputs/reward", "the reward model (step 2's output); PPO's critic "
                                         "starts from it (with --reward-fn a causal LM will do: its backbone and a "
                                         "new value head); unused with --reward-fn and a critic-free algorithm")
    data: list[str] = opt([], "prompt sources, each PATH or PATH:WEIGHT (pair records; step 3's slice is used)")
    data_split: str = opt("2,4,4", "proportions of each pair source for steps 1,2,3")
    unsupervised_data: list[str] = opt([], "pre-training (PTX) data: prompt/response records, LM loss on them")
    unsup_coef: float = opt(27.8, "weight of the PTX loss")
    output_dir: str = opt("outputs/ppo", "where actor/, critic/ (PPO) and actor_ema/ are written")
    per_device_generation_batch_size: int = opt(16, "prompts per rollout per device")
    per_device_training_batch_size: int = opt(16, "rows (answers) per minibatch per device")
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
    algorithm: str = opt("ppo", "RL algorithm (defaults of the fields marked 'per algorithm' follow it); dpo: "
                         "`rlhf train` runs DPO on the preference pairs in place of steps 2-3 (rlhf/steps/dpo.py)",
                         choices=["ppo", "grpo", "rloo", "reinforce++", "reinforce++-baseline", "dpo"])
    reward_fn: str | None = opt(None, "score answers with a function instead of the reward model: 'synthetic', "
                                "'path/file.py:function' or 'package.module:function' (rlhf/core/rewards.py)")
    n_samples_per_prompt: int | None = opt(None, "answers sampled per prompt in one engine call, kept in groups "
                                           "(per algorithm: ppo, reinforce++ 1; grpo, rloo, reinforce++-baseline 4)")
    kl_ctl: float | None = opt(None, "KL penalty coefficient in the per-token reward (per algorithm: ppo 0.1, "
                               "rloo 0.05, reinforce++(-baseline) 0.01, grpo 0)")
    kl_loss_coef: float | None = opt(None, "KL as a loss term instead (per algorithm: grpo 0.04, others 0)")
    kl_estimator: str = opt("k3", "estimator of the KL loss term", choices=["k1", "k2", "k3"])
    loss_agg: str | None = opt(None, "policy loss aggregation (per algorithm: grpo seq-mean-token-mean, others "
                               "token-mean; Dr.GRPO: seq-mean-token-sum-norm)",
                               choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    std_normalization: bool = opt(True, "grpo: divide advantages by the group's std (--no-std-normalization: "
                                  "Dr.GRPO)")
    clip_reward_value: float = opt(5.0, "reward-model scores are clipped to [-c, c]")
    cliprange: float = opt(0.2, "policy ratio clip epsilon")
    cliprange_high: float | None = opt(None, "upper ratio clip epsilon (DAPO's clip-higher; default: --cliprange)")
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
    reuse_rollout_logprobs: bool | None = opt(None, "PPO's old logprobs are those the engine reported while "
                                              "generating (one actor forward less per rollout); refused for an "
                                              "actor with dropout (default: on when the actor has none)")
    logprob_audit_interval: int = opt(10, "with reused rollout logprobs: every K-th rollout (the first included) "
                                      "runs the actor's training forward anyway and logs logprob_gap (0: never)")
    # Off by default: on CPU it costs what the training forward costs (benchmarks/rlhf_step.py, 1.00x) and holds
    # a second KV cache and fused copies of the reference's layers; the GPU check says whether it pays there.
    score_reference_with_engine: bool = opt(False, "the reference model's logprobs from an engine's prefill-only "
                                            "forward (HybridEngine.score) instead of its training forward; not "
                                            "under actor ZeRO-3")
    gold_task: str = opt("none", "score answers with a rule too: 'synthetic' (the built-in task) or 'none'",
                         choices=["none", "synthetic"])
    eval_prompts: int = opt(256, "held-out prompts scored before and after PPO")
    print_answers: bool = opt(False, "print a prompt and its answer every log interval")
    log_interval: int = opt(1, "PPO rounds between metrics.jsonl records")
    seed: int = opt(1234, "seed of data order and sampling")
    disable_tqdm: bool = opt(False, "no progress bars")

    def algo(self) -> Algorithm:
        """This run's algorithm with its per-algorithm defaults filled where a field was left None."""
        if self.algorithm == "dpo":  # a choice of the shared --algorithm flag, but no RL step
            raise ValueError("--algorithm dpo has no step 3: it trains on preference pairs with rlhf/steps/dpo.py "
                             "(rlhf train --algorithm dpo runs SFT, then DPO)")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm {self.algorithm}: expected one of {', '.join(ALGORITHMS)}")
        defaults = ALGORITHMS[self.algorithm]
        pick = lambda name: defaults[name] if getattr(self, name) is None else getattr(self, name)  # noqa: E731
        return Algorithm(self.algorithm, defaults["estimator"], pick("n_samples_per_prompt"), pick("kl_ctl"),
                         pick("kl_loss_coef"), self.kl_estimator, pick("loss_agg"), self.cliprange,
                         self.cliprange if self.cliprange_high is None else self.cliprange_high,
                         self.std_normalization, self.gamma, self.lam)

    def validate(self) -> None:
        check_bounds(self)
        if self.inference_tp_size > 1 and self.actor_zero_stage != 3:
            raise ValueError("--inference-tp-size > 1 requires --actor-zero-stage 3 (as DeepSpeed-Chat)")
        algo = self.algo()
        if ESTIMATORS[algo.estimator].grouped and algo.n_samples_per_prompt < 2:
            raise ValueError(f"--algorithm {algo.name} compares the answers to one prompt: "
                             f"--n-samples-per-prompt {algo.n_samples_per_prompt}, expected at least 2")
        if self.reward_fn is not None:
            RewardFunction(self.reward_fn)  # an import failure ends the run before any model is loaded


def require_step3_models(cfg: PPOConfig, algo: Algorithm) -> None:
    """One line, before any model is loaded, unless the actor is a model and the reward model (without a reward
    function) a step-2 checkpoint with its value head; with a reward function PPO's critic starts from any model."""
    require_model_source(cfg.actor_model_name_or_path, "--actor-model-name-or-path")
    if cfg.reward_fn is None:
        require_checkpoint(cfg.critic_model_name_or_path, "--critic-model-name-or-path expects step 2's output",
                           reward=True)
    elif algo.needs_critic:
        require_model_source(cfg.critic_model_name_or_path, "--critic-model-name-or-path")


@dataclass
class PromptData:
    """Step 3's prompts: the training and held-out sets with their loaders, and the PTX batches (None without
    --unsupervised-data)."""
    train_set: object
    eval_set: object
    loader: object
    eval_loader: object
    ptx_batches: object | None


def prompt_data(cfg: PPOConfig, tokenizer) -> PromptData:
    """Step 3's slice of cfg.data as prompts, a held-out share of at most cfg.eval_prompts, and the PTX data."""
    if not cfg.data:
        raise ValueError("step 3 needs --data (pair records: the prompts of step 3's slice are used)")
    examples = load_step_examples(cfg.data, step=3, split=cfg.data_split, seed=cfg.seed)
    eval_fraction = min(0.5, cfg.eval_prompts / max(len(examples), 1)) if cfg.eval_prompts else 0.0
    train_examples, eval_examples = train_eval_split(examples, eval_fraction, cfg.seed)
    train_set = build_prompt_dataset(tokenizer, train_examples, cfg.max_prompt_seq_len)
    eval_set = build_prompt_dataset(tokenizer, eval_examples, cfg.max_prompt_seq_len)
    if len(train_set) == 0:
        raise ValueError(f"step 3: no prompts in {cfg.data} with --data-split {cfg.data_split} "
                         f"and --max-prompt-seq-len {cfg.max_prompt_seq_len}")
    loader = make_dataloader(train_set, cfg.per_device_generation_batch_size, shuffle=True, seed=cfg.seed,
                             drop_last=len(train_set) >= cfg.per_device_generation_batch_size)
    eval_loader = make_dataloader(eval_set, cfg.per_device_generation_batch_size, shuffle=False)
    ptx_batches = None
    if cfg.unsupervised_data:
        ptx = build_sft_dataset(tokenizer, load_step_examples(cfg.unsupervised_data, step=1, split="1,0,0"),
                                cfg.max_prompt_seq_len + cfg.max_answer_seq_len)
        ptx_batches = itertools.cycle(make_dataloader(ptx, cfg.per_device_training_batch_size, seed=cfg.seed))
    return PromptData(train_set, eval_set, loader, eval_loader, ptx_batches)


@dataclass
class Tally:
    """What step 3 counts besides the loop's position; a checkpoint holds it."""
    ptx: int = 0           # PTX batches drawn
    history: list = field(default_factory=list)  # each round's record
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    before: dict = field(default_factory=dict)   # the held-out evaluation before training


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
    if gold_fn is not None:
        n = trainer.algo.n_samples_per_prompt
        golds = gold_fn([p for p in prompts for _ in range(n)], trainer.answers(exp))
        record["gold"] = sum(golds) / len(golds)
    return record


def fit(trainer: RLTrainer, data: PromptData, cfg: PPOConfig, rounds: int, tally: Tally, generator: torch.Generator,
        metrics: MetricsLogger, control: RunControl, resumed: dict | None, gold_fn: GoldFn | None,
        device: torch.device, is_main: bool) -> int:
    """`rounds` rounds of the loop (rlhf/runtime/loop.py) over the prompt batches, from `resumed` (a checkpoint's
    state, `tally` and the trainer already restored from it) if given: rollout -> rewards -> advantages
    (RLTrainer.rollout) of each batch, and once `cfg.generation_batches` rollouts are buffered, `cfg.ppo_epochs`
    passes of updates (RLTrainer.train_on) over their minibatches: one round. Returns the rounds done."""
    name = trainer.algo.name
    buffer = []  # the rollouts of the round in progress

    def update(batch, step: int) -> list[dict] | None:
        trainer.round = step
        batch = to_device(batch, device)
        prompts, fields = records(data.train_set, batch)
        exp, stats = trainer.rollout(batch, prompts, fields, generator)
        tally.gen_tokens, tally.gen_seconds = tally.gen_tokens + stats.new_tokens, tally.gen_seconds + stats.seconds
        if not trainer.guard.ok(step, reward=exp.scores, advantage=exp.advantages):
            return None  # this rollout is not trained on
        record = round_record(exp, stats, prompts, trainer, gold_fn)
        buffer.append(exp)
        if len(buffer) < cfg.generation_batches:
            return None
        losses = []
        for _ in range(cfg.ppo_epochs):
            for rollout in buffer:
                for mb in rollout.minibatches(cfg.per_device_training_batch_size):
                    ptx = next(data.ptx_batches) if data.ptx_batches else None
                    tally.ptx += ptx is not None
                    losses.append(trainer.train_on(mb, ptx))
        buffer.clear()
        record.update({k: sum(d[k] for d in losses) / len(losses) for k in losses[0]})
        tally.history.append(record)
        if cfg.print_answers and is_main and step % cfg.log_interval == 0:
            print(f"[{name} {step}] {prompts[0]} -> {trainer.answers(exp)[0]}")
        return [record]

    def postfix(record: dict) -> dict:
        return {"reward": f"{record['reward']:.3f}", "kl": f"{record['kl']:.3f}",
                **({"gap": f"{record['logprob_gap']:.1e}"} if "logprob_gap" in record else {})}

    # a round's record is its own (its rollout's reward, its updates' losses), logged every log_interval rounds
    steps, _ = run_loop(update, Batches(data.loader, cfg.num_train_epochs), rounds, name=name, desc=f"step 3 {name}",
                        metrics=metrics, control=control, engines=trainer.engines(), guard=trainer.guard,
                        resumed=resumed, log_interval=cfg.log_interval, show_bar=not cfg.disable_tqdm and is_main,
                        saved=lambda: {**dataclasses.asdict(tally), "trainer": trainer.state()},
                        generators={"sampling": generator}, summarize=lambda window: window[-1], log_last=False,
                        postfix=postfix)
    return steps


def run_ppo(cfg: PPOConfig, tokenizer=None, metrics: MetricsLogger | None = None,
            gold_fn: GoldFn | None = None, control: RunControl | None = None) -> dict:
    """Train the actor with `cfg.algorithm`; save actor/ (and critic/ for PPO, actor_ema/) under cfg.output_dir.
    `gold_fn` (prompts, answers) -> scores is a rule to report before and after (cfg.gold_task names the
    built-in one)."""
    cfg.validate()
    algo = cfg.algo()
    require_step3_models(cfg, algo)
    start = time.time()
    dist = init_distributed()
    torch.manual_seed(cfg.seed)
    tokenizer = tokenizer or load_tokenizer(cfg.actor_model_name_or_path)
    metrics = metrics or MetricsLogger(cfg.output_dir, enabled=dist.is_main)
    reward_fn = RewardFunction(cfg.reward_fn) if cfg.reward_fn else None
    if gold_fn is None and cfg.gold_task == "synthetic":
        gold_fn = gold_scores
    data = prompt_data(cfg, tokenizer)

    rounds = len(data.loader) * cfg.num_train_epochs // cfg.generation_batches
    rounds = min(rounds, cfg.max_steps) if cfg.max_steps else rounds
    minibatches = -(-cfg.per_device_generation_batch_size * algo.n_samples_per_prompt
                    // cfg.per_device_training_batch_size)
    control = control or RunControl()
    trainer = RLTrainer(cfg, tokenizer, rounds * cfg.ppo_epochs * cfg.generation_batches * minibatches, dist.device,
                        reward_fn, control.max_nonfinite_steps)
    tally = Tally()
    resumed = control.load(trainer.engines())
    if resumed is None:
        tally.before = trainer.evaluate(data.eval_loader, data.eval_set, gold_fn) if len(data.eval_set) else {}
        metrics.log(f"{algo.name}_eval", 0, **tally.before)
    else:  # step 3's own state, as fit saved it (the loop replays the prompt order and the RNG streams)
        tally = Tally(**{f.name: resumed["saved"][f.name] for f in dataclasses.fields(Tally)})
        for _ in range(tally.ptx):
            next(data.ptx_batches)
        trainer.load_state(resumed["saved"]["trainer"])
    generator = torch.Generator(device=dist.device).manual_seed(cfg.seed + dist.rank)
    steps = fit(trainer, data, cfg, rounds, tally, generator, metrics, control, resumed, gold_fn, dist.device,
                dist.is_main)

    after = trainer.evaluate(data.eval_loader, data.eval_set, gold_fn) if len(data.eval_set) else {}
    metrics.log(f"{algo.name}_eval", steps, **after)
    save_actor_checkpoint(trainer.actor.module, tokenizer, f"{cfg.output_dir}/actor")
    if trainer.critic is not None:
        save_reward_checkpoint(trainer.critic.module, tokenizer, f"{cfg.output_dir}/critic")
    if trainer.ema is not None:
        save_actor_checkpoint(trainer.ema, tokenizer, f"{cfg.output_dir}/actor_ema")
    return summary(trainer, data, steps, tally, after, cfg.output_dir, time.time() - start)


def summary(trainer: RLTrainer, data: PromptData, steps: int, tally: Tally, after: dict, output_dir: str,
            seconds: float) -> dict:
    """The run's summary: held-out reward (and gold) before and after, the last rounds' means, the largest
    logprob gap, skipped updates."""
    last = tally.history[-min(5, len(tally.history)):] if tally.history else [{}]
    mean = lambda key: sum(r.get(key, float("nan")) for r in last) / len(last)  # noqa: E731
    return {
        "algorithm": trainer.algo.name, "output_dir": output_dir, "steps": steps,
        "prompts": len(data.train_set), "dropped_prompts": data.train_set.num_dropped,
        "reward_before": tally.before.get("reward"), "reward_after": after.get("reward"),
        "gold_before": tally.before.get("gold"), "gold_after": after.get("gold"),
        "final_reward": mean("reward"), "final_kl": mean("kl"),
        "max_logprob_gap": max((r["logprob_gap"] for r in tally.history if "logprob_gap" in r), default=0.0),
        "gen_tokens_per_s": tally.gen_tokens / max(tally.gen_seconds, 1e-9),
        "nonfinite_skipped": trainer.guard.skipped,
        "deepspeed_skipped_steps": sum(e.skipped_steps for e in trainer.engines().values()),
        "seconds": seconds,
    }


def ppo_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> PPOConfig:
    return config_from_args(PPOConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    return step_main(PPOConfig, run_ppo, "Step 3: RL of the actor (PPO, GRPO, RLOO, REINFORCE++) against the reward "
                     "model or a reward function", argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m rlhf.steps.rl"))
