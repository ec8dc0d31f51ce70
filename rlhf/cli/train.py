"""The end-to-end command: ``rlhf train`` = ``python -m rlhf.train`` (rlhf/train.py starts this module).

    rlhf train                                   # the tiny preset on the synthetic task, steps 1-3, on CPU
    rlhf train --step 1 2 --actor-model facebook/opt-125m --data pairs.jsonl:2 hh.jsonl:1 --data-split 2,4,4
    deepspeed --num_gpus 8 --module rlhf.train --actor-model ... --sft-zero-stage 3

Layout of ``--output-dir``: ``actor/`` (step 1), ``reward/`` (step 2), ``ppo/`` (step 3; ``grpo/``, ``rloo/``, ...
for the other algorithms), ``dpo/`` (``--algorithm dpo``: DPO in place of steps 2 and 3), ``data/`` (the
synthetic task's files when no ``--data`` is given), ``metrics.jsonl`` and ``training_curves.png``.
Step options carry a prefix: ``--sft-learning-rate``, ``--rm-zero-stage``, ``--dpo-beta``, and step 3's options.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from rlhf.cli.presets import PRESETS, Preset, apply_budget, get_preset
from rlhf.core.algorithms import ALGORITHMS
from rlhf.core.rewards import RewardFunction
from rlhf.data import Example, build_prompt_dataset, load_step_examples
from rlhf.data.synthetic import gold_scores, write_synthetic_data
from rlhf.models import load_tokenizer, require_checkpoint, require_model_source, require_tokenizer_source
from rlhf.runtime.checkpoint import atomic_write_bytes
from rlhf.runtime.cluster import group_restarts, require_shared_dir
from rlhf.runtime.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    ArgumentParser,
    add_config_args,
    add_launcher_args,
    apply_config_file,
    bounded,
    config_file_text,
    read_config_file,
    require_output_dir,
    set_option,
)
from rlhf.runtime.distributed import barrier, init_distributed, make_dataloader
from rlhf.runtime.guards import StopSignal
from rlhf.runtime.metrics import MetricsLogger, plot
from rlhf.runtime.process import run_cli
from rlhf.runtime.resume import RunControl, StepRunner, open_run
from rlhf.steps.dpo import DPOConfig, add_dpo_args, dpo_config_from_args, run_dpo
from rlhf.steps.eval import format_result
from rlhf.steps.reward import RewardConfig, reward_config_from_args, run_reward
from rlhf.steps.rl import rl_config_from_args, run_ppo
from rlhf.steps.rl_config import RLConfig
from rlhf.steps.sft import SFTConfig, run_sft, sft_config_from_args

# Set once for the whole run rather than per step.
SHARED = ("model_name_or_path", "tokenizer_name_or_path", "data", "data_split", "output_dir", "metrics_dir", "seed",
          "max_seq_len", "disable_tqdm")
SFT_PREFIX, RM_PREFIX, DPO_PREFIX = "sft-", "rm-", "dpo-"
CONFIG_FILE = "config.yaml"  # every run's options, as --config reads them


def preset_defaults(preset: Preset | None) -> tuple[SFTConfig, RewardConfig, DPOConfig]:
    """Step configs whose defaults come from the preset (DeepSpeed-Chat's, and the DPO paper's, without one)."""
    sft, reward, dpo = SFTConfig(), RewardConfig(), DPOConfig()
    if preset is None:
        return sft, reward, dpo
    return apply_budget(sft, preset.sft), apply_budget(reward, preset.reward), apply_budget(dpo, preset.dpo)


# Step-3 options `rlhf train` sets for all steps (or derives from the step-1/2 outputs), so not flags of PPO's own.
PPO_SHARED = ("actor_model_name_or_path", "critic_model_name_or_path", "data", "data_split", "output_dir", "seed",
              "disable_tqdm")


def ppo_defaults(preset: Preset | None, algorithm: str = "ppo") -> RLConfig:
    """RLConfig whose defaults come from the preset's step-3 budget for ``algorithm`` (DeepSpeed-Chat's
    defaults without a preset)."""
    cfg = RLConfig()
    if preset is not None:
        apply_budget(cfg, preset.ppo)
        for name, value in preset.algorithm_overrides.get(algorithm, {}).items():
            set_option(cfg, name, value)
    return cfg


def add_step3_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, preset: Preset | None,
                   algorithm: str = "ppo") -> None:
    """Step-3 options under DeepSpeed-Chat's names (``--actor-zero-stage``, ``--inference-tp-size``, ...)."""
    add_config_args(parser, RLConfig, "", PPO_SHARED, ppo_defaults(preset, algorithm))


def sft_model(args: argparse.Namespace, paths: dict[str, str]) -> str:
    """The SFT model the later steps start from: step 1's output when this run trains it, else ``--actor-model``,
    else ``OUTPUT_DIR/actor`` (as DeepSpeed-Chat's step-3 script takes it)."""
    return paths["actor"] if 1 in args.step else args.actor_model or paths["actor"]


def require_sft_model(args: argparse.Namespace, path: str) -> None:
    """One line unless ``path`` is made by this run's step 1 or is already a checkpoint."""
    if 1 not in args.step:
        require_checkpoint(path, "give --actor-model a step-1 (SFT) checkpoint, or run --step 1 first")


def step3_config(args: argparse.Namespace, paths: dict[str, str]) -> RLConfig:
    """Step 3's config, validated. The actor is ``sft_model``; the reward model is step 2's output when this run
    trains it, else ``--reward-model``, else ``OUTPUT_DIR/reward``; those not made by this run must be
    checkpoints."""
    actor = sft_model(args, paths)
    reward = paths["reward"] if 2 in args.step else args.reward_model or paths["reward"]
    self_scored = args.reward_fn is not None or args.environment is not None  # no reward model needed
    no_reward_model = self_scored and args.reward_model is None and 2 not in args.step
    if no_reward_model:
        reward = actor  # PPO's critic starts from the actor's backbone with a new value head
    cfg = rl_config_from_args(args, "", actor_model_name_or_path=actor, critic_model_name_or_path=reward,
                              data=args.data, data_split=args.data_split, output_dir=paths["rl"], seed=args.seed,
                              disable_tqdm=args.disable_tqdm)
    algo = cfg.validate()
    require_sft_model(args, actor)
    scored_by_model = (cfg.reward_fn is None and cfg.env.environment is None
                       and not (algo.teacher and args.reward_model is None))
    if not no_reward_model and 2 not in args.step and (scored_by_model or algo.needs_critic):
        # named both ways of scoring, whatever the algorithm: a new user of GRPO looks for --reward-fn
        require_checkpoint(reward, "give --reward-model a step-2 checkpoint or --reward-fn FILE.py:FUNCTION, or run "
                           "--step 2 first", reward=True)
    require_tp_split(args, cfg)
    return cfg


def require_tp_split(args: argparse.Namespace, cfg: RLConfig) -> None:
    """One line, before any step runs, unless --inference-tp-size splits the actor's attention heads (those of
    the checkpoint step 3 reads, or of the model step 1 starts from: --actor-model, else the preset's) and this
    run's processes into TP groups."""
    from transformers import AutoConfig

    from hybrid_engine.parallel import check_tp_family, check_tp_heads

    if cfg.engine.inference_tp_size <= 1:
        return
    source = args.actor_model if 1 in args.step else cfg.actor.model_name_or_path
    heads, what = None, ""
    if source is None:
        name = args.preset or "tiny"
        if name in PRESETS:
            heads, what = get_preset(name).model["num_attention_heads"], f"the {name} preset's model"
    else:
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError):  # a hub id out of reach: the engine checks when step 3 wraps the actor
            config = None
        if config is not None:
            try:
                check_tp_family(config.model_type, cfg.engine.inference_tp_size)
            except NotImplementedError as err:  # the CLI's one-line errors are ValueErrors
                raise ValueError(f"--inference-tp-size {cfg.engine.inference_tp_size}: {source}: {err}") from err
            heads, what = config.num_attention_heads, source
    if heads is not None:
        check_tp_heads(heads, cfg.engine.inference_tp_size, what)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % cfg.engine.inference_tp_size:
        tp = cfg.engine.inference_tp_size
        raise ValueError(f"--inference-tp-size {tp}: this run has {world} process(es), which do not form groups of "
                         f"{tp} (launch a multiple of it: torchrun --nproc-per-node {tp} -m rlhf.train ...)")


def choose_reward_fn(args: argparse.Namespace, synthetic: bool) -> None:
    """Critic-free algorithms on the built-in task score with its rule unless a reward model is named; a reward
    function (or an environment's rewards) replaces the reward model, so step 2 is skipped."""
    needs_critic = args.algorithm in ALGORITHMS and ALGORITHMS[args.algorithm].needs_critic  # dpo: no RL step
    teacher = args.algorithm in ALGORITHMS and ALGORITHMS[args.algorithm].teacher  # distill: reward optional
    environment = args.environment is not None  # its own rewards
    if (args.reward_fn is None and synthetic and not needs_critic and not teacher and not environment
            and args.reward_model is None):
        args.reward_fn = "synthetic"
    if args.reward_fn is not None or environment or (teacher and args.reward_model is None):
        args.step = [s for s in args.step if s != 2]


def dpo_config(args: argparse.Namespace, paths: dict[str, str], **shared) -> DPOConfig:
    """DPO's config, validated. The policy and its frozen reference start from ``sft_model``."""
    actor = sft_model(args, paths)
    cfg = dpo_config_from_args(args, DPO_PREFIX, model_name_or_path=actor, output_dir=paths["dpo"], **shared)
    cfg.validate()
    require_sft_model(args, actor)
    return cfg


def dpo_step(cfg: DPOConfig, tokenizer, metrics: MetricsLogger, gold: bool, control: RunControl | None = None) -> dict:
    """DPO; with ``gold`` (the built-in task) also the gold score of answers sampled from the SFT model and from
    the DPO policy, on the same held-out step-3 prompts with the same seed, as step 3 reports it."""
    summary = run_dpo(cfg, tokenizer=tokenizer, metrics=metrics, control=control)
    if gold:
        summary["gold_before"] = sft_gold_baseline(cfg.model_name_or_path, tokenizer, cfg.data, cfg.data_split,
                                                   cfg.seed)
        summary["gold_after"] = sft_gold_baseline(cfg.output_dir, tokenizer, cfg.data, cfg.data_split, cfg.seed)
        metrics.log("dpo_eval", 0, gold=summary["gold_before"])
        metrics.log("dpo_eval", summary["steps"], gold=summary["gold_after"])
    return summary


def build_parser(preset: Preset | None, algorithm: str = "ppo") -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="rlhf train", description="RLHF in three steps: SFT, reward model, PPO "
                                     "(or GRPO, RLOO, REINFORCE++ against a reward function). "
                                     "Without arguments: the tiny preset on the built-in synthetic task.")
    add_launcher_args(parser)
    parser.add_argument("--step", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                        help="steps to run (default: 1 2 3)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="options as YAML, a mapping of option names (actor-learning-rate or "
                        "actor_learning_rate) to values; flags given here override it. Every run writes "
                        "OUTPUT_DIR/config.yaml, and --config OUTPUT_DIR/config.yaml runs it again")
    parser.add_argument("--preset", choices=[*PRESETS, "none"], default=None,
                        help="named model + budget preset (default: tiny, or none when --actor-model is given)")
    parser.add_argument("--actor-model", default=None,
                        help="HF id or path of the step-1 model (default: preset); with --step 3 but not 1: the "
                        "SFT checkpoint PPO trains (default: OUTPUT_DIR/actor)")
    parser.add_argument("--reward-model", default=None,
                        help="HF id or path of the step-2 backbone (default: --actor-model, or the preset); with "
                        "--step 3 but not 2: the trained reward model (default: OUTPUT_DIR/reward)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer id or path (default: the actor's; with the preset's new model, the preset's "
                        "word tokenizer, and a given one sets that model's vocabulary)")
    parser.add_argument("--data", nargs="+", default=[], metavar="PATH[:WEIGHT]",
                        help="data sources; none: the built-in synthetic task")
    parser.add_argument("--data-split", default=None,
                        help="per-step proportions of pair sources (default: 2,4,4, or the preset's)")
    parser.add_argument("--output-dir", default="outputs/run", help="run directory (default: outputs/run)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of splits, shuffles and initialisation")
    parser.add_argument("--max-seq-len", type=bounded(int, AT_LEAST_1), default=None,
                        help="max prompt+answer tokens for steps 1-2 (default: 512, or the preset's)")
    parser.add_argument("--disable-tqdm", action="store_true",
                        help="no progress bars: one line per logged step instead")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir: finished steps are skipped, the step it was in goes "
                        "on from its newest checkpoint (OUTPUT_DIR/checkpoints) with the same data order and RNG "
                        "streams, so the result is the one an uninterrupted run gives")
    parser.add_argument("--overwrite", action="store_true",
                        help="start this run's steps over in an --output-dir that already holds them (their "
                        "checkpoints and metrics records are removed)")
    parser.add_argument("--save-interval", type=bounded(int, NON_NEGATIVE), default=0, metavar="N",
                        help="write a checkpoint of the whole training state every N optimizer steps (steps 1-2, "
                        "DPO) or rounds (step 3); 0: only at the end of each step. SIGTERM/SIGINT always write one")
    parser.add_argument("--keep-checkpoints", type=bounded(int, AT_LEAST_1), default=2, metavar="K",
                        help="checkpoints kept while a step runs, the newest (default: 2); a finished step removes its "
                        "own (its model is saved, and --resume skips it)")
    parser.add_argument("--max-nonfinite-steps", type=bounded(int, AT_LEAST_1), default=5, metavar="K",
                        help="updates in a row skipped for a non-finite loss, reward or advantage before the run "
                        "stops with an error (default: 5)")
    parser.add_argument("--report-to", default="none", metavar="NAMES",
                        help="also send every metric to these, comma-separated: tensorboard (OUTPUT_DIR/tensorboard), "
                        "wandb (OUTPUT_DIR/wandb; WANDB_MODE=offline keeps it local); default: none (metrics.jsonl)")
    sft_defaults, rm_defaults, dpo_defaults = preset_defaults(preset)
    add_config_args(parser.add_argument_group("step 1: supervised fine-tuning"), SFTConfig, SFT_PREFIX, SHARED,
                    sft_defaults)
    add_config_args(parser.add_argument_group("step 2: reward model"), RewardConfig, RM_PREFIX, SHARED,
                    rm_defaults)
    add_dpo_args(parser.add_argument_group("DPO (--algorithm dpo: SFT, then DPO on the pairs in place of steps 2 "
                                           "and 3)"), DPO_PREFIX, SHARED, dpo_defaults)
    add_step3_args(parser.add_argument_group("step 3: reinforcement learning (PPO and the critic-free algorithms)"),
                   preset, algorithm)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Preset | None]:
    """Two passes: the preset and the algorithm (from the flags, else the --config file) choose the defaults of the
    full parser; the config file's options replace those defaults, and the flags given replace both."""
    first_parser = build_parser(None)
    first, _ = first_parser.parse_known_args(argv)
    from_file = read_config_file(first.config) if first.config else {}
    if from_file:
        apply_config_file(first_parser, from_file, first.config)
        first, _ = first_parser.parse_known_args(argv)
    name = first.preset or ("none" if first.actor_model else "tiny")
    preset = None if name == "none" else get_preset(name)
    parser = build_parser(preset, first.algorithm)
    if from_file:
        apply_config_file(parser, from_file, first.config)
    args = parser.parse_args(argv)
    args.config_text = config_file_text(parser, args)  # as parsed, before main() fills in what it derives
    return args, preset


def sample_gold_score(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 32,
                      seed: int = 0, temperature: float = 1.0) -> float:
    """Mean synthetic-task gold score of answers sampled with ``model.generate`` (the PPO baseline)."""
    dataset = build_prompt_dataset(tokenizer, [Example(p, "") for p in prompts], max_prompt_len=10**6)
    torch.manual_seed(seed)
    model.eval()
    scores: list[float] = []
    for start, batch in zip(range(0, len(dataset), batch_size), make_dataloader(dataset, batch_size, shuffle=False)):
        with torch.no_grad():
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        scores += gold_scores(dataset.prompts[start:start + len(answers)], answers)
    return sum(scores) / max(len(scores), 1)


def format_summary(summary: dict) -> str:
    """The one-screen report printed at the end of a run."""
    lines = ["", "=" * 64, "RLHF run summary", "=" * 64]
    for section, values in summary.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:  # e.g. gold scores when the data has no gold rule
                continue
            shown = format_result(value) if isinstance(value, dict) and "pass_at_k" in value else str(value)
            if isinstance(value, float):  # small quantities (the logprob gap) keep their digits
                shown = f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
            lines.append(f"  {key:<28} {shown}")
    lines.append("=" * 64)
    return "\n".join(lines)


def require_paths(args: argparse.Namespace) -> None:
    """One line, before anything is written, for an output dir that cannot be one, and for a model or tokenizer
    path this run reads that is not a checkpoint (checkpoints of earlier steps: ``step3_config``, ``dpo_config``)."""
    require_output_dir(args.output_dir)
    if args.actor_model and 1 in args.step:
        require_model_source(args.actor_model, "--actor-model")
    if args.reward_model and 2 in args.step:
        require_model_source(args.reward_model, "--reward-model")
    if args.tokenizer:
        require_tokenizer_source(args.tokenizer, "--tokenizer")


def main(argv: list[str] | None = None) -> dict:
    args, preset = parse_args(argv)
    start = time.time()
    require_paths(args)
    out = Path(args.output_dir)
    # step 3's output is named after its algorithm (ppo/, grpo/, ...), as its metrics and checkpoints are
    paths = {"actor": str(out / "actor"), "reward": str(out / "reward"), "rl": str(out / args.algorithm),
             "dpo": str(out / "dpo")}
    synthetic = not args.data
    with_dpo = args.algorithm == "dpo" and bool({2, 3} & set(args.step))
    if args.algorithm == "dpo":  # DPO trains on the pairs in place of steps 2 and 3: no reward model, no RL step
        args.step = [s for s in args.step if s == 1]
        if with_dpo:
            dpo_config(args, paths)  # a bad option or missing checkpoint ends the run before any step starts
    else:
        choose_reward_fn(args, synthetic)
    if 3 in args.step:
        step3_config(args, paths)  # a bad option or missing checkpoint ends the run before any step starts
        if args.reward_fn is not None and not synthetic:  # so does a record without a field the function takes
            RewardFunction(args.reward_fn).check_fields(
                load_step_examples(args.data, step=3, split=args.data_split or "2,4,4", seed=args.seed))
    if synthetic and preset is None:
        raise ValueError("--data is required without a preset (the synthetic task needs the preset's tokenizer)")
    # each step's name in metrics.jsonl, run_state.json and checkpoints/, and its final output
    names = {1: "sft", 2: "reward", 3: args.algorithm, "dpo": "dpo"}
    outputs = {"sft": paths["actor"], "reward": paths["reward"], args.algorithm: paths["rl"], "dpo": paths["dpo"]}
    out.mkdir(parents=True, exist_ok=True)
    dist = init_distributed(timeout_s=args.collective_timeout)
    if dist.world_size > 1:
        require_shared_dir(out, dist.rank, dist.world_size)
        resume_after_restart(args, dist.is_main)
    metrics = MetricsLogger(out, enabled=dist.is_main, report_to=args.report_to)
    run = open_run(out, [names[s] for s in args.step] + (["dpo"] if with_dpo else []), outputs, args.resume,
                   args.overwrite, metrics.path, dist.is_main)
    if dist.is_main:
        atomic_write_bytes(out / CONFIG_FILE, args.config_text.encode())
    data = args.data
    if synthetic:
        if dist.is_main:  # one writer; the others wait, then read the same files
            write_synthetic_data(out / "data", preset.synthetic_sft, preset.synthetic_pairs, seed=args.seed)
        barrier()
        data = [str(out / "data" / "sft.jsonl"), str(out / "data" / "pairs.jsonl")]
    data_split = args.data_split or (preset.data_split if preset is not None and synthetic else "2,4,4")
    max_seq_len = args.max_seq_len or (preset.max_seq_len if preset is not None else 512)
    paths["data"] = json.dumps(data)
    args.data, args.data_split = data, data_split
    if synthetic:  # the built-in task has a rule to score answers by: PPO reports it before and after
        args.gold_task = "synthetic"

    use_preset_model = args.actor_model is None and preset is not None
    if use_preset_model:
        # the preset's word tokenizer, or the one given, whose vocabulary the new model then takes
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer") if args.tokenizer else preset.tokenizer()
        model_config = preset.model_config(tokenizer)
    else:
        tokenizer = load_tokenizer(args.tokenizer or args.actor_model or paths["actor"])
        model_config = None
    shared = dict(data=data, data_split=data_split, seed=args.seed, max_seq_len=max_seq_len,
                  disable_tqdm=args.disable_tqdm, metrics_dir=str(out), tokenizer_name_or_path=args.tokenizer)

    def sft(control: RunControl) -> dict:
        cfg = sft_config_from_args(args, SFT_PREFIX, model_name_or_path=args.actor_model,
                                   output_dir=paths["actor"], **shared)
        done = run_sft(cfg, model_config=model_config, tokenizer=tokenizer, metrics=metrics, control=control)
        if synthetic and dist.is_main and 3 not in args.step and not with_dpo:  # else measured before and after
            done["gold_score (sampled)"] = sft_gold_baseline(paths["actor"], tokenizer, data, data_split, args.seed)
        return done

    def reward(control: RunControl) -> dict:
        cfg = reward_config_from_args(args, RM_PREFIX, model_name_or_path=args.reward_model or args.actor_model,
                                      output_dir=paths["reward"], **shared)
        return run_reward(cfg, model_config=model_config, tokenizer=tokenizer, metrics=metrics, control=control)

    def rl(control: RunControl) -> dict:
        return run_ppo(step3_config(args, paths), tokenizer=tokenizer, metrics=metrics, control=control)

    def dpo(control: RunControl) -> dict:
        return dpo_step(dpo_config(args, paths, **shared), tokenizer, metrics, synthetic and dist.is_main, control)

    resume_hint = resume_command(sys.argv[1:] if argv is None else argv)
    with StopSignal() as stop, metrics:
        steps = StepRunner(run, out, args, stop, metrics.path if dist.is_main else None, dist.is_main, resume_hint)
        for number, title, train in ((1, "step 1: SFT", sft), (2, "step 2: reward model", reward),
                                     (3, f"step 3: {args.algorithm.upper()}", rl)):
            if number in args.step:
                steps(names[number], title, train)
        if with_dpo:
            steps("dpo", "DPO", dpo)
    summary = steps.summary
    if not dist.is_main:
        return summary
    plot(out, reward_source="reward function" if args.reward_fn else "reward model")
    summary["run"] = {"output_dir": str(out), "seconds": time.time() - start}
    print(format_summary(summary), flush=True)
    return summary


def resume_after_restart(args: argparse.Namespace, is_main: bool) -> None:
    """A group that torchrun (--max-restarts) started again after a failure continues from the newest checkpoint
    (--resume) without being told; the first attempt already started over what --overwrite asked. Collective."""
    restarts = group_restarts()
    if restarts and not args.resume:
        if is_main:
            print(f"rlhf train: restart {restarts} of the group (torchrun --max-restarts): resuming from the newest "
                  f"checkpoint in {args.output_dir}", file=sys.stderr, flush=True)
        args.resume, args.overwrite = True, False


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: ``rlhf train ARGS --resume``, or under torchrun with this run's
    process count (a checkpoint resumes only with the number of processes that saved it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = ["rlhf", "train"]
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = ["--nnodes", str(world // local)] if world > local else []
        launch = ["torchrun", *nodes, "--nproc-per-node", str(local), "-m", "rlhf.train"]
    return shlex.join([*launch, *argv, *([] if "--resume" in argv else ["--resume"])])


def sft_gold_baseline(actor_path: str, tokenizer, data: list[str], data_split: str, seed: int, n: int = 128) -> float:
    """Gold score of the saved SFT actor on ``n`` step-3 prompts: the number PPO should beat."""
    from transformers import AutoModelForCausalLM

    prompts = [e.prompt for e in load_step_examples(data, step=3, split=data_split, seed=seed)[:n]]
    model = AutoModelForCausalLM.from_pretrained(actor_path)
    return sample_gold_score(model, tokenizer, prompts, seed=seed)


if __name__ == "__main__":
    sys.exit(run_cli(main, "rlhf train"))
