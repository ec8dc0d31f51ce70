"""Step 3's options as typed groups: one per trained model (actor, critic), the rollouts' sampling, the algorithm,
the hybrid engine and the loop. Flags keep DeepSpeed-Chat's flat names (``--actor-learning-rate``,
``--critic-zero-stage``, ``--inference-tp-size``): a group's flags are its fields' names after its prefix, and
code states a config in the same terms, ``config_from_options(RLConfig, actor_learning_rate=1e-3)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from hybrid_engine import SamplingParams
from rlhf.core.algorithms import ALGORITHMS, Algorithm, per_algorithm_default, resolve
from rlhf.core.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from rlhf.core.rewards import RewardFunction
from rlhf.core.rollout_correction import CORRECTIONS
from rlhf.envs import load_environment, load_tools
from rlhf.models import ModelOptions
from rlhf.runtime.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    UNIT,
    Bounds,
    check_bounds,
    group,
    opt,
)

ZERO_STAGES = [0, 1, 2, 3]


@dataclass
class RoleOptions:
    """A model step 3 trains (the actor, or PPO's critic) and its optimizer; flags ``--actor-*``, ``--critic-*``."""
    model_name_or_path: str = opt("outputs/actor", "the {role}'s starting checkpoint")
    learning_rate: float = opt(9.65e-6, "{role} learning rate", bounds=POSITIVE)
    weight_decay: float = opt(0.0, "{role} weight decay", bounds=NON_NEGATIVE)
    zero_stage: int = opt(0, "ZeRO stage of the {role}", choices=ZERO_STAGES)
    gradient_checkpointing: bool = opt(False, "activation checkpointing in the {role}")
    dropout: float | None = opt(None, "override the {role}'s dropout", bounds=PROBABILITY)
    lora_dim: int = opt(0, "LoRA rank of the {role} (0: none)", bounds=NON_NEGATIVE)
    lora_module_name: str = opt("layers.", "LoRA on {role} Linear layers whose name contains this")
    lora_learning_rate: float = opt(5e-4, "learning rate of the {role}'s LoRA weights", bounds=POSITIVE)

    def model_options(self, only_optimize_lora: bool) -> ModelOptions:
        return ModelOptions(dropout=self.dropout, gradient_checkpointing=self.gradient_checkpointing,
                            lora_dim=self.lora_dim, lora_module_name=self.lora_module_name,
                            only_optimize_lora=only_optimize_lora)


@dataclass
class SamplingOptions:
    """How rollouts are sampled; the temperature is also the training forwards' (rollout == training)."""
    max_prompt_seq_len: int = opt(256, "longer prompts are dropped (and counted)", bounds=AT_LEAST_1)
    max_answer_seq_len: int = opt(256, "new tokens per answer", bounds=Bounds(2))  # 1 in prefill, the rest in decode
    temperature: float = opt(1.0, "sampling temperature of rollouts (logprobs use the same)", bounds=POSITIVE)
    top_k: int = opt(0, "sample from the k most likely tokens (0: off)", bounds=NON_NEGATIVE)
    top_p: float = opt(1.0, "nucleus sampling mass (1: off)", bounds=Bounds(0, 1, low_open=True))

    def params(self) -> SamplingParams:
        """The engine's sampling settings (a generator is added per call)."""
        return SamplingParams(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class AlgorithmOptions:
    """What an update computes; None: the algorithm's declared default (rlhf/core/algorithms.py)."""
    algorithm: str = opt("ppo", "RL algorithm (defaults of the fields marked 'per algorithm' follow it); dpo: "
                         "`rlhf train` runs DPO on the preference pairs in place of steps 2-3 (rlhf/steps/dpo.py)",
                         choices=[*ALGORITHMS, "dpo"])
    n_samples_per_prompt: int | None = opt(None, "answers sampled per prompt in one engine call, kept in groups "
                                           + per_algorithm_default("n_samples_per_prompt"), bounds=AT_LEAST_1)
    kl_ctl: float | None = opt(None, "KL penalty coefficient in the per-token reward "
                               + per_algorithm_default("kl_ctl"), bounds=NON_NEGATIVE)
    kl_loss_coef: float | None = opt(None, "KL as a loss term instead " + per_algorithm_default("kl_loss_coef"),
                                     bounds=NON_NEGATIVE)
    kl_estimator: str = opt("k3", "estimator of the KL loss term", choices=list(KL_ESTIMATORS))
    loss_agg: str | None = opt(None, "policy loss aggregation " + per_algorithm_default("loss_agg")
                               + "; Dr.GRPO: seq-mean-token-sum-norm", choices=list(LOSS_AGGREGATIONS))
    std_normalization: bool = opt(True, "grpo: divide advantages by the group's std (--no-std-normalization: "
                                  "Dr.GRPO)")
    clip_reward_value: float = opt(5.0, "reward-model scores are clipped to [-c, c]", bounds=POSITIVE)
    policy_loss: str | None = opt(None, "policy loss " + per_algorithm_default("policy_loss"),
                                  choices=list(POLICY_LOSSES))
    # the ratio (CISPO: the importance weight) is kept in [1 - eps, 1 + eps_high]
    cliprange: float | None = opt(None, "policy ratio clip epsilon " + per_algorithm_default("cliprange"),
                                  bounds=Bounds(0, 1, low_open=True))
    cliprange_high: float | None = opt(None, "upper ratio clip epsilon (DAPO's clip-higher; None: --cliprange) "
                                       + per_algorithm_default("cliprange_high"), bounds=POSITIVE)
    cliprange_value: float = opt(0.2, "value clip epsilon", bounds=POSITIVE)
    gamma: float = opt(1.0, "GAE discount", bounds=UNIT)
    lam: float = opt(0.95, "GAE lambda", bounds=UNIT)
    enable_ema: bool = opt(False, "keep an exponential moving average of the actor (saved as actor_ema/)")
    ema_decay: float = opt(0.992, "EMA decay", bounds=UNIT)
    unsup_coef: float = opt(27.8, "weight of the PTX loss", bounds=NON_NEGATIVE)
    dynamic_sampling: bool | None = opt(None, "drop groups whose rewards are all equal and roll out more prompts until "
                                        "the batch is full (DAPO) " + per_algorithm_default("dynamic_sampling"))
    max_extra_rollouts: int = opt(4, "dynamic sampling: extra rollouts per round at most; a round still short "
                                  "trains on the groups it kept", bounds=NON_NEGATIVE)
    overlong_buffer: float | None = opt(None, "soft overlong penalty (DAPO): over the last fraction of "
                                        "--max-answer-seq-len the score falls linearly to -factor (0: off) "
                                        + per_algorithm_default("overlong_buffer"), bounds=Bounds(0, 1, high_open=True))
    overlong_penalty_factor: float = opt(1.0, "the soft overlong penalty at --max-answer-seq-len", bounds=NON_NEGATIVE)
    overlong_filtering: bool = opt(False, "DAPO's overlong filtering: answers cut at --max-answer-seq-len (no EOS) "
                                   "take no part in the loss")
    rollout_correction: str = opt("none", "weights on the policy loss for the rollout/training logprob gap: tis "
                                  "(token, truncated at the cap), mis (sequence, masked above the cap), icepop (token, "
                                  "masked outside [low, high]); needs the actor's training forward each rollout",
                                  choices=["none", *CORRECTIONS])
    rollout_correction_cap: float = opt(2.0, "tis / mis cap on p_train / p_rollout", bounds=POSITIVE)
    rollout_correction_low: float = opt(0.5, "icepop: lower bound of p_train / p_rollout", bounds=NON_NEGATIVE)
    rollout_correction_high: float = opt(5.0, "icepop: upper bound of p_train / p_rollout", bounds=POSITIVE)

    def resolve(self) -> Algorithm:
        """This run's algorithm with its per-algorithm defaults filled where an option was left None."""
        return resolve(self.algorithm, self.kl_estimator, self.std_normalization, self.gamma, self.lam,
                       n_samples_per_prompt=self.n_samples_per_prompt, kl_ctl=self.kl_ctl,
                       kl_loss_coef=self.kl_loss_coef, loss_agg=self.loss_agg, policy_loss=self.policy_loss,
                       cliprange=self.cliprange, cliprange_high=self.cliprange_high,
                       dynamic_sampling=self.dynamic_sampling, overlong_buffer=self.overlong_buffer)


@dataclass
class EnvOptions:
    """Multi-turn rollouts (rlhf/envs): an environment or tools answer the model's turns."""
    environment: str | None = opt(None, "multi-turn environment: 'calculator', 'path/file.py:Class' or "
                                  "'package.module:Class' (rlhf/envs/base.py)")
    tools: str | None = opt(None, "tools the model may call, 'path/file.py:fn,fn2' or 'module:fn' (Hermes "
                            "<tool_call> format; rlhf/envs/tools.py); the reward function scores the final answer")
    max_turns: int = opt(4, "model turns per trajectory at most", bounds=AT_LEAST_1)
    max_total_tokens: int = opt(1024, "tokens after the prompt per trajectory (model turns and observations); "
                                "--max-answer-seq-len is each turn's", bounds=Bounds(2))
    tool_timeout: float = opt(10.0, "seconds a tool call or an environment step may take", bounds=POSITIVE)
    max_env_errors: int = opt(10, "stop after this many rows whose environment or tool failed", bounds=NON_NEGATIVE)
    log_rollouts: bool = opt(False, "write every trajectory (turns as text and ids, roles, logprobs, rewards) to "
                             "OUTPUT_DIR/rollouts.jsonl")

    @property
    def multi_turn(self) -> bool:
        return self.environment is not None or self.tools is not None


@dataclass
class EngineOptions:
    """The hybrid engine that generates the rollouts."""
    enable_hybrid_engine: bool = opt(True, "generate with the hybrid engine (off: Hugging Face generate via the "
                                     "engine's fallback)")
    release_inference_cache: bool = opt(False, "free the KV cache after every rollout")
    inference_tp_size: int = opt(1, "tensor-parallel degree of generation (needs actor ZeRO-3)", bounds=AT_LEAST_1)
    unpin_actor_parameters: bool = opt(False, "ZeRO-3: gather the actor's layers during each generation forward "
                                       "instead of once per rollout (slower, less memory)")
    tp_gather_partition_size: int = opt(8, "ZeRO-3: actor layers gathered at a time (0: all at once)",
                                        bounds=NON_NEGATIVE)
    kernels: str | None = opt(None, "hybrid-engine kernels: auto|cuda|triton|cpu|torch")
    reuse_rollout_logprobs: bool | None = opt(None, "PPO's old logprobs are those the engine reported while "
                                              "generating (one actor forward less per rollout); refused for an "
                                              "actor with dropout (default: on when the actor has none)")
    logprob_audit_interval: int = opt(10, "with reused rollout logprobs: every K-th rollout (the first included) "
                                      "runs the actor's training forward anyway and logs logprob_gap (0: never)",
                                      bounds=NON_NEGATIVE)
    # Off by default: on CPU it costs what the training forward costs (benchmarks/rlhf_step.py, 1.00x) and holds
    # a second KV cache and fused copies of the reference's layers; the GPU check says whether it pays there.
    score_reference_with_engine: bool = opt(False, "the reference model's logprobs from an engine's prefill-only "
                                            "forward (HybridEngine.score) instead of its training forward; not "
                                            "under actor ZeRO-3")


@dataclass
class LoopOptions:
    """Batches, rounds and schedule of the step-3 loop, its evaluation and logging."""
    per_device_generation_batch_size: int = opt(16, "prompts per rollout per device", bounds=AT_LEAST_1)
    per_device_training_batch_size: int = opt(16, "rows (answers) per minibatch per device", bounds=AT_LEAST_1)
    # Rows sorted by length and cut into micro-batches of at most this many tokens (rows x longest row), each
    # trimmed to its longest row: the same losses and update as one padded forward (gradients accumulated with each
    # micro-batch's share of the loss), without computing the padding. 1024: on CPU, with answers of mixed length,
    # the training phases of a round took 1.4-1.7x less than padded at 1024 and about the same at 4096 (a budget the
    # whole 16-row batch fits in); benchmarks/RESULTS.md, "Forwards without padding". On a GPU a larger budget fills
    # the device better; it also bounds a forward's activation memory.
    max_tokens_per_microbatch: int = opt(1024, "training forwards (actor, reference, critic, reward model) and the "
                                         "backward by micro-batches of at most this many tokens, rows sorted by "
                                         "length and trimmed to the micro-batch's longest; same losses and update "
                                         "as the padded minibatch (0: one padded forward per minibatch)",
                                         bounds=NON_NEGATIVE)
    pack_sequences: bool = opt(False, "pack each micro-batch's rows into one row, positions restarting per "
                               "sequence (per-sequence attention: varlen flash attention with flash_attention_2, a "
                               "block-diagonal mask with sdpa/eager); llama, mistral, qwen2, qwen3 models")
    generation_batches: int = opt(1, "rollouts collected before each round of PPO updates", bounds=AT_LEAST_1)
    ppo_epochs: int = opt(1, "passes over the collected rollouts per round", bounds=AT_LEAST_1)
    num_train_epochs: int = opt(1, "passes over the prompts", bounds=AT_LEAST_1)
    max_steps: int = opt(0, "stop after this many PPO rounds (0: all prompts)", bounds=NON_NEGATIVE)
    lr_scheduler_type: str = opt("cosine", "learning-rate schedule", choices=["linear", "cosine", "constant",
                                                                               "constant_with_warmup"])
    num_warmup_steps: int = opt(100, "optimizer steps of linear warmup", bounds=NON_NEGATIVE)
    warmup_ratio: float | None = opt(None, "linear warmup over this fraction of the run's optimizer steps, in place "
                                     "of --num-warmup-steps (default: use the steps)", bounds=UNIT)
    eval_prompts: int = opt(256, "prompts of --data held out and evaluated before and after training (without "
                            "--eval-data)", bounds=NON_NEGATIVE)
    eval_n_samples: int = opt(4, "sampled answers per held-out prompt (mean reward, pass@k; the greedy answer is "
                              "extra)", bounds=AT_LEAST_1)
    eval_pass_threshold: float = opt(1.0, "a held-out answer passes (pass@k) when its reward is at least this")
    print_answers: bool = opt(False, "print a prompt and its answer every log interval")
    log_interval: int = opt(1, "PPO rounds between metrics.jsonl records", bounds=AT_LEAST_1)


@dataclass
class RLConfig:
    """Step-3 options; DeepSpeed-Chat's step-3 names and defaults unless noted."""
    actor: RoleOptions = group(RoleOptions, "actor_", helps={
        "model_name_or_path": "the SFT actor (step 1's output)",
        "zero_stage": "ZeRO stage of the actor (the reference model: 3 if this is 3, else 0)",
        "dropout": "override the actor's dropout (default: keep the model's)"})
    critic: RoleOptions = group(RoleOptions, "critic_", helps={
        "model_name_or_path": "the reward model (step 2's output); PPO's critic starts from it (with --reward-fn a "
                              "causal LM will do: its backbone and a new value head); unused with --reward-fn and a "
                              "critic-free algorithm",
        "zero_stage": "ZeRO stage of the critic (the reward model: 3 if this is 3, else 0)"},
        model_name_or_path="outputs/reward", learning_rate=5e-6)
    data: list[str] = opt([], "prompt sources, each PATH or PATH:WEIGHT (pair records; step 3's slice is used)")
    data_split: str = opt("2,4,4", "proportions of each pair source for steps 1,2,3")
    eval_data: list[str] = opt([], "held-out prompt sources evaluated before and after training, whole (default: "
                               "--eval-prompts of --data)", metavar="PATH")
    unsupervised_data: list[str] = opt([], "pre-training (PTX) data: prompt/response records, LM loss on them")
    output_dir: str = opt("outputs/ppo", "where actor/, critic/ (PPO) and actor_ema/ are written")
    reward_fn: str | None = opt(None, "score answers with a function instead of the reward model: 'synthetic', "
                                "'path/file.py:function' or 'package.module:function' (rlhf/core/rewards.py)")
    teacher_model: str | None = opt(None, "--algorithm distill: the teacher that scores the student's sampled tokens "
                                    "(same tokenizer; prefill only, through the engine)")
    algo: AlgorithmOptions = group(AlgorithmOptions)
    sampling: SamplingOptions = group(SamplingOptions)
    loop: LoopOptions = group(LoopOptions)
    engine: EngineOptions = group(EngineOptions)
    env: EnvOptions = group(EnvOptions)
    dtype: str = opt("fp32", "training precision of every model", choices=["fp32", "bf16", "fp16"])
    offload: bool = opt(False, "offload actor/critic optimizer state to CPU")
    offload_reference_model: bool = opt(False, "offload the reference model's parameters (ZeRO-3) to CPU")
    offload_reward_model: bool = opt(False, "offload the reward model's parameters (ZeRO-3) to CPU")
    only_optimize_lora: bool = opt(False, "train only the LoRA weights")
    gold_task: str = opt("none", "score answers with a rule too: 'synthetic' (the built-in task) or 'none'",
                         choices=["none", "synthetic"])
    seed: int = opt(1234, "seed of data order and sampling")
    disable_tqdm: bool = opt(False, "no progress bars: one line per logged step instead")

    def validate(self) -> Algorithm:
        """Check the options together (one line for the first problem); returns the resolved algorithm."""
        check_bounds(self)
        if self.engine.inference_tp_size > 1 and self.actor.zero_stage != 3:
            raise ValueError("--inference-tp-size > 1 requires --actor-zero-stage 3 (as DeepSpeed-Chat)")
        algo = self.algo.resolve()
        if algo.teacher and self.teacher_model is None:
            raise ValueError(f"--algorithm {algo.name} needs --teacher-model PATH (the model whose logprobs of the "
                             "student's tokens are the signal)")
        if self.teacher_model is not None and not algo.teacher:
            raise ValueError(f"--teacher-model is read by --algorithm distill only, not {algo.name}")
        if algo.dynamic_sampling and not algo.grouped:
            raise ValueError(f"--dynamic-sampling drops groups of equal rewards: --algorithm {algo.name} samples no "
                             "groups")
        if self.algo.rollout_correction != "none" and self.engine.reuse_rollout_logprobs:
            raise ValueError(f"--rollout-correction {self.algo.rollout_correction} weighs the rollout's logprobs "
                             "against the training forward's: drop --reuse-rollout-logprobs")
        if algo.grouped and algo.n_samples_per_prompt < 2:
            raise ValueError(f"--algorithm {algo.name} compares the answers to one prompt: "
                             f"--n-samples-per-prompt {algo.n_samples_per_prompt}, expected at least 2")
        if self.reward_fn is not None:
            RewardFunction(self.reward_fn)  # an import failure ends the run before any model is loaded
        if self.env.environment is not None and self.env.tools is not None:
            raise ValueError("give --environment or --tools, not both (an environment class lists its own tools)")
        if self.env.tools is not None and self.reward_fn is None:
            raise ValueError("--tools needs --reward-fn FILE.py:FUNCTION to score the final answers")
        if self.env.multi_turn and self.env.max_total_tokens < self.sampling.max_answer_seq_len:
            raise ValueError(f"--max-total-tokens {self.env.max_total_tokens} is less than one turn's "
                             f"--max-answer-seq-len {self.sampling.max_answer_seq_len}")
        if self.env.environment is not None:
            load_environment(self.env.environment)
        if self.env.tools is not None:
            load_tools(self.env.tools)
        return algo
