"""One step-3 round with the hybrid engine against the same round with Hugging Face `generate` for the rollouts
(DeepSpeed-Chat's end-to-end comparison), phase by phase, for PPO and GRPO: same models, same prompts, one run.

    python benchmarks/rlhf_step.py --threads 1 --json step.json     # CPU, ~15M Llama-style model, ppo and grpo
    python benchmarks/rlhf_step.py --threads 1 --clock cpu          # the same in CPU seconds (a shared CPU)
    python benchmarks/rlhf_step.py --threads 1 --clock cpu --eos-ids 128   # answers of mixed length
    python benchmarks/rlhf_step.py --device cuda --dtype bf16 --model-size 1b --json step.json
    python benchmarks/rlhf_step.py --model PATH                     # your checkpoint (actor, reference, critic, RM)

Both sides are the real step-3 trainer (rlhf/steps/rl_trainer.py: RLTrainer.rollout, then train_on per minibatch), with
its phase timer on:
  hf      --no-enable-hybrid-engine --no-reuse-rollout-logprobs --no-score-reference-with-engine: Hugging Face
          generate, then a training forward for each of the actor's old logprobs and the reference's logprobs
          (DeepSpeed-Chat's HF baseline);
  engine  --reuse-rollout-logprobs --score-reference-with-engine: the hybrid engine generates, its rollout
          logprobs are PPO's old logprobs, the reference is scored by the engine's prefill-only forward
          (HybridEngine.score; off by default, as on CPU it costs what the training forward costs);
  budget  the engine with the trainer's defaults for the training forwards: --max-tokens-per-microbatch
          --max-tokens (rows sorted by length, each micro-batch trimmed to its longest row; the reference on its
          training forward, micro-batched too);
  packed  budget with --pack-sequences (each micro-batch's rows in one row, positions restarting per sequence).
The reward model and the critic start from the actor's checkpoint with a random value head (a score is a score).
A round is one rollout of --batch-size rows (GRPO: --batch-size / 4 prompts x 4 samples) and one actor (and
critic) step on all of them. By default every answer is --new-tokens long (no EOS stop), so the sides do the same
work whatever they sample; --eos-ids N gives answers of mixed length (N token ids end an answer), and the engine
sides then sample the same answers (same weights, same seed, updates equal to fp32 rounding) while the hf side
samples its own (Hugging Face generate draws its random numbers differently): the `ans len` column shows each
side's median mean answer length. Each side runs one warm-up round, then the sides take turns for --repeats rounds
(in ABBA order), so load from elsewhere on the machine falls on all alike; medians are printed. The engine's audit
of the reused logprobs (every 10th rollout, the first included) falls in the warm-up round; it costs one
`old logp` of the hf side per 10 rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import throughput  # noqa: E402
from rlhf.core.experience import PhaseTimer  # noqa: E402
from rlhf.models import create_reward_model, save_reward_model  # noqa: E402
from rlhf.runtime.checkpoint import atomic_write_bytes  # noqa: E402
from rlhf.runtime.config import config_from_options  # noqa: E402
from rlhf.runtime.distributed import init_distributed  # noqa: E402
from rlhf.runtime.process import end_process  # noqa: E402
from rlhf.steps.rl_config import RLConfig  # noqa: E402
from rlhf.steps.rl_trainer import RLTrainer  # noqa: E402

PADDED = dict(max_tokens_per_microbatch=0, pack_sequences=False)
SIDES = {  # RLConfig options of each side (budget and packed: their --max-tokens-per-microbatch is --max-tokens)
    "hf": dict(enable_hybrid_engine=False, reuse_rollout_logprobs=False, score_reference_with_engine=False, **PADDED),
    "engine": dict(enable_hybrid_engine=True, reuse_rollout_logprobs=True, score_reference_with_engine=True, **PADDED),
    "budget": dict(enable_hybrid_engine=True, reuse_rollout_logprobs=True, score_reference_with_engine=False,
                   pack_sequences=False),
    "packed": dict(enable_hybrid_engine=True, reuse_rollout_logprobs=True, score_reference_with_engine=False,
                   pack_sequences=True),
}
# the trainer's phase names, in the order of a round, with their column titles
PHASES = {"generate": "generate", "switch": "switch", "old_logprobs": "old logp", "ref_logprobs": "ref logp",
          "reward": "reward", "values": "values", "actor_update": "actor upd", "critic_update": "critic upd",
          "other": "other"}
SAMPLES = {"ppo": 1, "grpo": 4}  # rows per prompt (ALGORITHMS' defaults in rlhf/steps/rl.py)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_options(p: argparse.ArgumentParser) -> None:
    """--threads and --clock, as every benchmark that times phases with a PhaseTimer takes them."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall seconds (default), or this process's CPU seconds: on a CPU shared with other jobs and "
                   "--threads 1, the work each phase did, whatever else runs")


def prepare_models(args, work: str) -> tuple[str, str, str, int, int]:
    """The actor checkpoint (--model, else a random --model-size one saved into `work`) and a reward model from
    its backbone; returns (actor dir, reward dir, model name, parameters, vocabulary size)."""
    if args.model:
        model = throughput.load_model(args.model, torch.float32, "cpu")
        actor_dir, name = args.model, os.path.basename(os.path.normpath(args.model))
    else:
        model = throughput.build_model(args.model_size, torch.float32, "cpu", args.prompt_len + args.new_tokens)
        actor_dir, name = os.path.join(work, "actor"), f"random Llama-style {args.model_size}"
        model.save_pretrained(actor_dir)
    reward_dir = os.path.join(work, "reward")
    torch.manual_seed(1)
    save_reward_model(create_reward_model(actor_dir), None, reward_dir)
    return actor_dir, reward_dir, name, sum(p.numel() for p in model.parameters()), model.config.vocab_size


def prompt_batch(args, vocab: int, prompts: int, device) -> dict:
    """`prompts` left-padded prompts: --prompts' records through the chat template, else random ids."""
    if args.prompts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        ids, mask = throughput.left_padded(throughput.read_prompts(args.prompts, tokenizer), prompts, pad, device)
    else:
        ids, mask = throughput.random_prompts(prompts, args.prompt_len, vocab, device)
    return {"input_ids": ids, "attention_mask": mask}


def timed_round(trainer: RLTrainer, batch: dict, generator: torch.Generator, device: str) -> dict:
    """One rollout and one pass of updates over it: seconds (the timer's clock) of the round and of each phase."""
    rows = batch["input_ids"].shape[0]
    trainer.timer.pop()
    throughput.sync(device)
    clock = trainer.timer.clock
    start = clock()
    exp, _ = trainer.rollout(batch, [""] * rows, [{}] * rows, generator)
    for minibatch in exp.minibatches(trainer.cfg.loop.per_device_training_batch_size):
        trainer.train_on(minibatch)
    throughput.sync(device)
    seconds = trainer.timer.pop()
    seconds["round"] = clock() - start
    seconds["other"] = seconds["round"] - sum(v for k, v in seconds.items() if k != "round")  # advantages, ...
    seconds["answer_len"] = exp.action_mask.sum(-1).float().mean().item()  # tokens, not seconds: the work done
    return seconds


def run_algorithm(args, algorithm: str, actor_dir: str, reward_dir: str, vocab: int, dist) -> dict:
    rows = args.batch_size
    n = SAMPLES[algorithm]
    if rows % n:
        raise SystemExit(f"rlhf_step.py: error: --batch-size {rows}: {algorithm} needs a multiple of {n}")
    batch = prompt_batch(args, vocab, rows // n, dist.device)
    prompt_len = batch["input_ids"].shape[1]
    trainers, sides = {}, {side: SIDES[side] for side in args.sides}
    for side, fields in sides.items():
        fields = {"max_tokens_per_microbatch": args.max_tokens, **fields}
        cfg = config_from_options(RLConfig, actor_model_name_or_path=actor_dir, critic_model_name_or_path=reward_dir,
                                  algorithm=algorithm, per_device_generation_batch_size=rows // n,
                                  per_device_training_batch_size=rows, max_prompt_seq_len=prompt_len,
                                  max_answer_seq_len=args.new_tokens, num_warmup_steps=0, dtype=args.dtype,
                                  kernels=args.kernels, top_k=args.top_k, disable_tqdm=True, **fields)
        cfg.validate()
        torch.manual_seed(0)
        # --eos-ids 0: eos [], never stop early
        eos = list(range(3, 3 + args.eos_ids))
        trainers[side] = RLTrainer(cfg, SimpleNamespace(eos_token_id=eos, pad_token_id=0), total_steps=100,
                                   device=dist.device, reward_fn=None)
        trainers[side].timer = PhaseTimer(enabled=True, clock=CLOCKS[args.clock])
    generators = {side: torch.Generator(device=dist.device).manual_seed(7) for side in sides}
    times = {side: [] for side in sides}
    for repeat in range(args.repeats + 1):  # the first is the warm-up
        order = list(sides) if repeat % 2 else list(sides)[::-1]  # ABBA: neither side always runs first
        for side in order:
            seconds = timed_round(trainers[side], batch, generators[side], args.device)
            if repeat:
                times[side].append(seconds)
    median = {side: {k: statistics.median(r.get(k, 0.0) for r in runs) for k in ["round", "answer_len", *PHASES]}
              for side, runs in times.items()}
    row = dict(algorithm=algorithm, rows=rows, prompt_len=prompt_len, new_tokens=args.new_tokens,
               eos_ids=args.eos_ids, max_tokens=args.max_tokens, sides=list(sides))
    for side in sides:
        row[f"{side}_round_s"] = median[side]["round"]
        row[f"{side}_answer_len"] = median[side]["answer_len"]
        row[f"{side}_phases_s"] = {k: median[side][k] for k in PHASES}
        if side != "hf" and "hf" in sides:
            row[f"{side}_speedup"] = median["hf"]["round"] / median[side]["round"]
    return row


def print_rows(rows: list[dict]) -> None:
    """Each side's median round and phases, then each side's speedup over the first side (hf), per phase."""
    print(f"{'algorithm':<9} {'side':<8} {'ans len':>7} {'round s':>8} "
          + " ".join(f"{t:>10}" for t in PHASES.values()))
    for row in rows:
        sides = row["sides"]
        for side in sides:
            phases = row[f"{side}_phases_s"]
            print(f"{row['algorithm']:<9} {side:<8} {row[f'{side}_answer_len']:>7.1f} {row[f'{side}_round_s']:>8.3f} "
                  + " ".join(f"{phases[k]:>10.3f}" for k in PHASES))
        base = sides[0]
        for side in sides[1:]:
            hf, eng = row[f"{base}_phases_s"], row[f"{side}_phases_s"]
            ratios = " ".join(f"{hf[k] / eng[k]:>9.2f}x" if eng[k] > 1e-3 and hf[k] > 1e-3 else f"{'-':>10}"
                              for k in PHASES)
            speedup = row[f"{base}_round_s"] / row[f"{side}_round_s"]
            print(f"{row['algorithm']:<9} {side[:6] + '/' + base[:1]:<8} {'':>7} {speedup:>7.2f}x {ratios}",
                  flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(throughput.DTYPES),
                   help="training precision of every model (default fp32 on cpu, bf16 on cuda)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a Hugging Face checkpoint directory to start every model from instead of a random one")
    p.add_argument("--model-size", default="15m", choices=sorted(throughput.SIZES),
                   help="without --model: random-initialised Llama-style model, 15m (default) or 1b")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL of {\"prompt\"} or {\"messages\"} records, chat-templated (needs --model)")
    p.add_argument("--algorithms", nargs="+", default=["ppo", "grpo"], choices=sorted(SAMPLES),
                   help="algorithms to run (default ppo grpo)")
    p.add_argument("--batch-size", type=int, default=16, help="rollout rows per round, samples included (default 16)")
    p.add_argument("--prompt-len", type=int, default=64,
                   help="random prompts' length, rows left padded up to half (default 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="answer tokens per row at most (default 128)")
    p.add_argument("--eos-ids", type=int, default=0,
                   help="this many token ids (3, 4, ...) end an answer: the random model samples nearly uniformly, so "
                   "an answer stops after each token with probability about N / vocabulary, answers of mixed length "
                   "(128 of 8,192: about 1 in 64); default 0, no EOS, every answer --new-tokens long")
    p.add_argument("--top-k", type=int, default=0,
                   help="rollouts sample from the k most likely tokens (default 0: all); 1 is greedy, where every side "
                   "generates the same answers (Hugging Face generate's and the engine's greedy tokens are equal); "
                   "on the random model greedy answers loop without reaching an EOS id: mixed lengths need sampling")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES),
                   help="sides to run, the first the baseline of the speedups (default: all): hf, engine (padded "
                   "training forwards), budget (the engine with --max-tokens micro-batches, the reference on its "
                   "training forward), packed (budget with --pack-sequences)")
    p.add_argument("--max-tokens", type=int, default=RLConfig().loop.max_tokens_per_microbatch,
                   help="budget and packed sides' --max-tokens-per-microbatch (default: the trainer's default)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per side, median kept (default 5)")
    p.add_argument("--kernels", default=None, help="engine kernels: auto|cuda|triton|cpu|torch (default: "
                   "$HYBRID_ENGINE_KERNELS or auto)")
    add_clock_options(p)
    p.add_argument("--json", default=None, help="also write the rows as a JSON list to this path")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.prompts and not args.model:
        p.error("--prompts needs --model (the checkpoint's tokenizer and chat template write them)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.clock == "cpu" and (args.device == "cuda" or torch.get_num_threads() > 1 and args.threads != 1):
        p.error("--clock cpu needs --device cpu and --threads 1 (CPU seconds of several threads add up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed()
    with tempfile.TemporaryDirectory(prefix="rlhf_step_") as work:
        actor_dir, reward_dir, name, params, vocab = prepare_models(args, work)
        print(f"model: {name}, {params / 1e6:.1f}M params, {args.dtype}, {args.device}, {torch.get_num_threads()} "
              f"threads; {args.batch_size} rows, prompt {args.prompts or args.prompt_len}, answer {args.new_tokens}; "
              f"median of {args.repeats} interleaved rounds, {args.clock} seconds", flush=True)
        rows = [run_algorithm(args, algorithm, actor_dir, reward_dir, vocab, dist) for algorithm in args.algorithms]
    for row in rows:
        row.update(model=name, params=params, device=args.device, dtype=args.dtype, threads=torch.get_num_threads(),
                   repeats=args.repeats, clock=args.clock)
    print_rows(rows)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(end_process(main()))
