"""The step-3 algorithms, each declared once: which advantage estimator and policy loss it runs, whether it trains
a critic and samples groups (both from its estimator), and the defaults of the options marked "per algorithm".

The CLI's `--algorithm` choices, the per-algorithm help texts, the tiny preset's grouped budgets, the README's
table (`markdown_table`, checked by tests/test_algorithms.py) and benchmarks/algorithms.py's list are all derived
from `ALGORITHMS`. Adding an algorithm is one `declare(...)` here plus its estimator or policy loss (a function
registered in rlhf/core/advantages.py or rlhf/core/losses.py) and its tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.core.advantages import ESTIMATORS
from rlhf.core.losses import LOSS_AGGREGATIONS, POLICY_LOSSES

# The options whose default depends on the algorithm (None on the command line: take the algorithm's)
PER_ALGORITHM = ("n_samples_per_prompt", "kl_ctl", "kl_loss_coef", "loss_agg", "policy_loss", "cliprange",
                 "cliprange_high", "dynamic_sampling", "overlong_buffer")


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm as declared: its parts by name and its per-algorithm defaults."""
    name: str
    estimator: str              # key of rlhf.core.advantages.ESTIMATORS
    policy_loss: str            # key of rlhf.core.losses.POLICY_LOSSES
    n_samples_per_prompt: int   # answers sampled per prompt, kept in consecutive groups
    kl_ctl: float               # KL penalty in the per-token reward
    kl_loss_coef: float         # KL as a loss term
    loss_agg: str               # key of rlhf.core.losses.LOSS_AGGREGATIONS
    advantage: str              # the README table's advantage column: formula and paper
    source: str                 # where the defaults come from
    cliprange: float = 0.2      # ratio (or importance weight) kept >= 1 - cliprange
    cliprange_high: float | None = None  # ... and <= 1 + cliprange_high (None: cliprange)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and sample more prompts (DAPO)
    overlong_buffer: float = 0.0    # soft overlong penalty over this last fraction of the answer budget (DAPO)
    teacher: bool = False       # scores the rollouts with --teacher-model; a reward function is optional

    @property
    def needs_critic(self) -> bool:
        return ESTIMATORS[self.estimator].needs_critic

    @property
    def grouped(self) -> bool:
        return ESTIMATORS[self.estimator].grouped


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def declare(spec: AlgorithmSpec) -> AlgorithmSpec:
    if spec.estimator not in ESTIMATORS or spec.policy_loss not in POLICY_LOSSES or spec.loss_agg not in \
            LOSS_AGGREGATIONS:
        raise ValueError(f"algorithm {spec.name}: unknown estimator {spec.estimator!r} or policy loss "
                         f"{spec.policy_loss!r}")
    ALGORITHMS[spec.name] = spec
    return spec


# Group sizes are small for the CPU preset; the papers use 8-64.
declare(AlgorithmSpec("ppo", "gae", "ppo-clip", 1, 0.1, 0.0, "token-mean",
                      "GAE with a critic (Schulman 2016)", "DeepSpeed-Chat"))
declare(AlgorithmSpec("grpo", "grpo", "ppo-clip", 4, 0.0, 0.04, "seq-mean-token-mean",
                      "`(s - mean_g) / std_g` (DeepSeekMath 2024); `--no-std-normalization`: Dr.GRPO",
                      "DeepSeekMath (KL loss 0.04, k3, sequence mean)"))
declare(AlgorithmSpec("rloo", "rloo", "ppo-clip", 4, 0.05, 0.0, "token-mean",
                      "leave-one-out mean baseline (Ahmadian 2024)", "TRL's RLOO (KL 0.05 in the reward)"))
declare(AlgorithmSpec("reinforce++", "reinforce++", "ppo-clip", 1, 0.01, 0.0, "token-mean",
                      "discounted returns, whitened over the batch (Hu 2025)",
                      "OpenRLHF's REINFORCE++ examples (KL 0.01 in the reward)"))
declare(AlgorithmSpec("reinforce++-baseline", "reinforce++-baseline", "ppo-clip", 4, 0.01, 0.0, "token-mean",
                      "score minus group mean, then as `reinforce++`", "OpenRLHF's REINFORCE++ examples"))
declare(AlgorithmSpec("gspo", "grpo", "gspo", 4, 0.0, 0.0, "seq-mean-token-mean",
                      "as `grpo`; one clipped ratio per sequence (Zheng 2025); `--policy-loss gspo-token`: GSPO-token",
                      "GSPO paper and veRL's GSPO recipe (clip 3e-4 / 4e-4, no KL, sequence mean)",
                      cliprange=3e-4, cliprange_high=4e-4))
declare(AlgorithmSpec("cispo", "grpo", "cispo", 4, 0.0, 0.0, "token-mean",
                      "as `grpo`; REINFORCE with clipped stop-gradient IS weights (MiniMax-M1 2025)",
                      "MiniMax-M1 (no lower bound, no KL, token sum over the batch); eps_high unpublished: 0.28 as "
                      "Trinity-RFT's default", cliprange=1.0, cliprange_high=0.28))
declare(AlgorithmSpec("dapo", "grpo", "ppo-clip", 4, 0.0, 0.0, "token-mean",
                      "as `grpo`, all-equal groups dropped and resampled, soft overlong penalty (Yu 2025)",
                      "DAPO paper (clip 0.2 / 0.28, no KL, token-level loss, overlong buffer 4096 of 20480)",
                      cliprange_high=0.28, dynamic_sampling=True, overlong_buffer=0.2))
declare(AlgorithmSpec("distill", "distill", "ppo-clip", 1, 0.0, 0.0, "token-mean",
                      "on-policy distillation: `logp_teacher - logp` per token, undiscounted (Agarwal 2024, GKD); "
                      "`--reward-fn` adds the centred score", "Thinking Machines 2025 (reverse KL, discount 0, no KL "
                      "to the reference)", teacher=True))


@dataclass(frozen=True)
class Algorithm:
    """This run's algorithm: its declaration with the per-algorithm options resolved (what the trainer reads)."""
    spec: AlgorithmSpec
    n_samples_per_prompt: int
    kl_ctl: float                 # KL penalty in the reward
    kl_loss_coef: float           # KL as a loss term
    kl_estimator: str
    loss_agg: str
    policy_loss: str              # key of rlhf.core.losses.POLICY_LOSSES
    clip: float
    clip_high: float
    std_normalization: bool
    gamma: float
    lam: float
    dynamic_sampling: bool = False
    overlong_buffer: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def estimator(self):
        """The advantage estimator's function: EstimatorInput -> (advantages, returns)."""
        return ESTIMATORS[self.spec.estimator].fn

    @property
    def policy_loss_fn(self):
        """The policy loss's function (rlhf.core.losses.POLICY_LOSSES)."""
        return POLICY_LOSSES[self.policy_loss]

    @property
    def teacher(self) -> bool:
        return self.spec.teacher

    @property
    def needs_critic(self) -> bool:
        return self.spec.needs_critic

    @property
    def grouped(self) -> bool:
        return self.spec.grouped


def resolve(name: str, kl_estimator: str, std_normalization: bool, gamma: float, lam: float,
            **per_algorithm) -> Algorithm:
    """The algorithm `name` with every PER_ALGORITHM option given as None replaced by its declared default
    (cliprange_high, when neither given nor declared, is cliprange)."""
    if name == "dpo":  # a choice of rlhf train's shared --algorithm flag, but no RL step
        raise ValueError("--algorithm dpo has no step 3: it trains on preference pairs with rlhf/steps/dpo.py "
                         "(rlhf train --algorithm dpo runs SFT, then DPO)")
    if name not in ALGORITHMS:
        raise ValueError(f"--algorithm {name}: expected one of {', '.join(ALGORITHMS)}")
    spec = ALGORITHMS[name]
    picked = {k: getattr(spec, k) if per_algorithm.get(k) is None else per_algorithm[k] for k in PER_ALGORITHM}
    if picked["policy_loss"] not in POLICY_LOSSES:
        raise ValueError(f"--policy-loss {picked['policy_loss']}: expected one of {', '.join(POLICY_LOSSES)}")
    clip, clip_high = picked.pop("cliprange"), picked.pop("cliprange_high")
    return Algorithm(spec, kl_estimator=kl_estimator, clip=clip, clip_high=clip if clip_high is None else clip_high,
                     std_normalization=std_normalization, gamma=gamma, lam=lam, **picked)


def per_algorithm_default(option: str) -> str:
    """`(per algorithm: ppo, reinforce++ 1; grpo, rloo, reinforce++-baseline 4)`: an option's declared defaults,
    for its --help text."""
    by_value: dict[object, list[str]] = {}
    for spec in ALGORITHMS.values():
        by_value.setdefault(getattr(spec, option), []).append(spec.name)
    shown = lambda value: f"{value:g}" if isinstance(value, float) else "unset" if value is None else str(value)  # noqa: E731
    return "(per algorithm: " + "; ".join(f"{', '.join(names)} {shown(value)}"
                                          for value, names in by_value.items()) + ")"


def markdown_table() -> str:
    """The README's table of algorithms and their per-algorithm defaults."""
    rows = ["| `--algorithm` | advantage (`rlhf/core/advantages.py`) | policy loss (`rlhf/core/losses.py`), clip | "
            "samples per prompt | KL | loss aggregation |",
            "| --- | --- | --- | --- | --- | --- |"]
    for spec in ALGORITHMS.values():
        kl = (f"loss `--kl-loss-coef {spec.kl_loss_coef:g}`" if spec.kl_loss_coef else
              f"reward penalty `--kl-ctl {spec.kl_ctl:g}`" if spec.kl_ctl else "none")
        clip = f"{spec.cliprange:g}" + (f" / {spec.cliprange_high:g}" if spec.cliprange_high is not None else "")
        extras = (["`--dynamic-sampling`"] if spec.dynamic_sampling else []) + (
            [f"`--overlong-buffer {spec.overlong_buffer:g}`"] if spec.overlong_buffer else []) + (
            ["`--teacher-model`"] if spec.teacher else [])
        loss = f"`{spec.policy_loss}` {clip}" + "".join(f"; {e}" for e in extras)
        rows.append(f"| `{spec.name}`{' (default)' if spec.name == 'ppo' else ''} | {spec.advantage} | {loss} | "
                    f"{spec.n_samples_per_prompt} | {kl} | {spec.loss_agg} |")
    return "\n".join(rows)
