"""The same GRPO work three ways in one run: TRL's GRPOTrainer with its own generation (`trl`), TRL with
hybrid_engine's adapter (`trl+hybrid_engine`, hybrid_engine/integrations/trl.py) and `rlhf train --algorithm grpo`
(`rlhf`), per step and per phase.

    python benchmarks/vs_trl.py --threads 1 --clock cpu --json vs_trl.json     # a tiny random model, seconds
    python benchmarks/vs_trl.py --model PATH --threads 1 --clock cpu --json F  # e.g. SmolLM2-135M-Instruct

The work: --prompts prompts per step (conversational records of PROMPTS, through the model's chat template) x
--group samples each, answers of up to --new-tokens (temperature 1, stopped at EOS), one optimizer step (AdamW, lr
1e-6) per rollout on all its rows, KL to the reference in the loss with beta --beta (k3), fp32, seed 0; the reward
is a cheap rule on the answer (its word count), so the three runs differ in their engines and loops only. Each run
trains --steps steps after one warm-up step (not counted: model loading, the first step's allocations); the runs
take turns, in ABC then CBA order for --repeats blocks, so load from elsewhere on the machine falls on all alike;
the medians of the steps are printed. Phases: generate (the engine's train/eval switch included), old logp and
ref logp (no-grad forwards of the policy and the reference), reward, actor upd (training forward, backward,
optimizer step) and other (the rest: tokenizing, decoding, advantages, TRL's logging). `rlhf` is the CLI's own
code (rlhf.cli.train.main) with its phase timer switched on; the TRL runs are timed by wrapping their methods.

--trl-head-on-answers is an experiment, not TRL's behaviour: off CUDA/XPU TRL 1.16's fused LM head projects every
position of prompt + answer (trl.trainer.utils: `compact = _use_triton(device)`), in the reference forward and in
the training forward and its backward (which projects again); the option makes it project the answer's positions
only, as it does on GPUs (the same logprobs), to measure what that costs TRL on this CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.rlhf_step import CLOCKS, add_clock_options  # noqa: E402
from rlhf.runtime.checkpoint import atomic_write_bytes  # noqa: E402

RUNS = ("trl", "trl+hybrid_engine", "rlhf")
PHASES = ("generate", "old_logprobs", "ref_logprobs", "reward", "actor_update", "other")
# asks for answers longer than --new-tokens, so most rows run to the cap and the three runs do alike work
PROMPTS = ["Write a long story about a dragon who learns to cook.", "Explain in detail how a bicycle works.",
           "Describe your ideal city, street by street.", "Write a letter to a friend about a trip to the sea.",
           "Explain why the sky is blue, step by step.", "Describe how to plant a vegetable garden.",
           "Tell me the history of the printing press.", "Write a poem about autumn leaves, at least ten lines."]
TINY_WORDS = ("write explain describe tell story about dragon cook bicycle city street letter friend trip sea sky "
              "blue step garden history printing press poem autumn leaves long detail ideal learns how works why "
              "plant vegetable lines least ten me the a to of by in your who at").split()


def word_count(text: str) -> float:
    return min(len(text.split()), 32) / 32


def trl_reward(completions, **kwargs) -> list[float]:
    return [word_count(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


def rlhf_reward(prompts, responses, **fields) -> list[float]:  # --reward-fn benchmarks/vs_trl.py:rlhf_reward
    return [word_count(r) for r in responses]


def tiny_checkpoint(path: str) -> None:
    """A tiny random Llama with the tiny preset's word tokenizer and a one-line chat template, saved to `path`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf.cli.presets import build_word_tokenizer

    tokenizer = build_word_tokenizer(tuple(TINY_WORDS))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


class Steps:
    """Per-step seconds (the run's clock) of each phase; a step runs from the start of its rollout to the end of
    its optimizer step."""

    def __init__(self, clock):
        self.clock, self.steps, self.phases, self.start = clock, [], {}, None

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self.clock()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + self.clock() - start

    def begin(self) -> None:
        self.start, self.phases = self.clock(), {}

    def end(self, extra: dict | None = None) -> None:
        record = {**self.phases, **(extra or {}), "step": self.clock() - self.start}
        record["other"] = record["step"] - sum(v for k, v in record.items() if k in PHASES and k != "other")
        self.steps.append(record)


def run_trl(args, run: str, model_path: str, work: str, clock) -> list[dict]:
    """--steps + 1 steps of TRL's GRPOTrainer (its own generation, or the adapter's): the steps' records."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hybrid_engine.integrations.trl import HybridEngineGRPOTrainer

    if args.trl_head_on_answers:
        import trl.trainer.utils

        trl.trainer.utils._use_triton = lambda device: True  # `compact`: the positions with a label only
    steps = Steps(clock)
    rows = args.prompts * args.group

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.begin()

        def on_pre_optimizer_step(self, *a, **k):
            self.optimizer_start = clock()

        def on_optimizer_step(self, *a, **k):
            steps.phases["actor_update"] = steps.phases.get("actor_update", 0.0) + clock() - self.optimizer_start

        def on_step_end(self, *a, **k):
            steps.end()

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                              for p in (PROMPTS * (rows * (args.steps + 1)))[:args.prompts * (args.steps + 1)]])
    config = GRPOConfig(output_dir=os.path.join(work, run), per_device_train_batch_size=rows,
                        num_generations=args.group, max_completion_length=args.new_tokens, max_steps=args.steps + 1,
                        learning_rate=1e-6, beta=args.beta, loss_type="grpo", temperature=1.0, bf16=False,
                        use_cpu=True, seed=0, report_to=[], save_strategy="no", logging_steps=10**6,
                        disable_tqdm=True, shuffle_dataset=False)
    cls = HybridEngineGRPOTrainer if run == "trl+hybrid_engine" else GRPOTrainer
    extra = {"logprob_audit_every": 10} if cls is HybridEngineGRPOTrainer else {}
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=trl_reward, args=config,
                  train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_path),
                  callbacks=[StepClock()], **extra)

    def timed(name_of, method):
        def call(*a, **k):
            with steps.phase(name_of(*a, **k)):
                return method(*a, **k)
        return call

    generate = timed(lambda *a, **k: "generate", trainer._generate_single_turn)

    def generate_and_count(*a, **k):
        ids, logprobs = generate(*a, **k)
        steps.phases["answer_len"] = sum(map(len, ids)) / len(ids)
        return ids, logprobs

    trainer._generate_single_turn = generate_and_count
    trainer._calculate_rewards = timed(lambda *a, **k: "reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        lambda model, *a, **k: "actor_update" if k.get("compute_entropy") else
        "ref_logprobs" if model is trainer.ref_model else "old_logprobs", trainer._get_per_token_logps_and_entropies)
    trainer.accelerator.backward = timed(lambda *a, **k: "actor_update", trainer.accelerator.backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return steps.steps[1:]


def run_rlhf(args, model_path: str, work: str, clock) -> list[dict]:
    """--steps + 1 rounds of `rlhf train --step 3 --algorithm grpo` (its CLI's main, in this process) with the
    trainer's phase timer on: the steps' records."""
    from rlhf.cli.train import main as train_main
    from rlhf.core.experience import PhaseTimer
    from rlhf.steps import rl_trainer

    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as f:
        for p in (PROMPTS * (args.steps + 1))[:args.prompts * (args.steps + 1)]:
            f.write(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n")
    steps = Steps(clock)
    cls = rl_trainer.RLTrainer
    original = cls.__init__, cls.rollout, cls.train_on

    def init(self, *a, **k):
        original[0](self, *a, **k)
        self.timer = PhaseTimer(enabled=True, clock=clock)

    def rollout(self, *a, **k):
        steps.begin()
        self.timer.pop()
        exp, stats = original[1](self, *a, **k)
        steps.answer_len = exp.action_mask.sum(-1).float().mean().item()
        return exp, stats

    def train_on(self, *a, **k):
        out = original[2](self, *a, **k)
        seconds = self.timer.pop()
        seconds["generate"] = seconds.get("generate", 0.0) + seconds.pop("switch", 0.0)
        steps.phases = seconds
        steps.end({"answer_len": steps.answer_len})
        return out

    cls.__init__, cls.rollout, cls.train_on = init, rollout, train_on
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the CLI's summary
            train_main(["--step", "3", "--algorithm", "grpo", "--actor-model", model_path, "--data", data,
                        "--eval-prompts", "0", "--reward-fn", f"{os.path.abspath(__file__)}:rlhf_reward",
                        "--output-dir", os.path.join(work, "rlhf"), "--overwrite", "--seed", "0",
                        "--per-device-generation-batch-size", str(args.prompts),
                        "--n-samples-per-prompt", str(args.group),
                        "--per-device-training-batch-size", str(args.prompts * args.group),
                        "--max-prompt-seq-len", "256", "--max-answer-seq-len", str(args.new_tokens),
                        "--max-steps", str(args.steps + 1), "--actor-learning-rate", "1e-6", "--kl-loss-coef",
                        str(args.beta), "--temperature", "1.0", "--dtype", "fp32", "--disable-tqdm",
                        "--lr-scheduler-type", "constant", "--num-warmup-steps", "0"])
    finally:
        cls.__init__, cls.rollout, cls.train_on = original
    return steps.steps[1:]


def summarize(records: dict[str, list[dict]]) -> list[dict]:
    """One row per run (in RUNS' order): median step and phase seconds, mean answer length, speedup against the
    first (`trl`)."""
    rows = []
    for run in (r for r in RUNS if r in records):
        steps = records[run]
        row = {"run": run, "steps": len(steps), "step_s": statistics.median(s["step"] for s in steps),
               "answer_len": statistics.mean(s["answer_len"] for s in steps)}
        row["phases_s"] = {p: statistics.median(s.get(p, 0.0) for s in steps) for p in PHASES}
        rows.append(row)
    for row in rows:
        row["speedup"] = rows[0]["step_s"] / row["step_s"]
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'run':<18} {'step s':>8} {'speedup':>8} {'answer':>7} " + " ".join(f"{p:>12}" for p in PHASES))
    for row in rows:
        print(f"{row['run']:<18} {row['step_s']:>8.3f} {row['speedup']:>7.2f}x {row['answer_len']:>7.1f} "
              + " ".join(f"{row['phases_s'][p]:>12.3f}" for p in PHASES), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a Hugging Face checkpoint directory with a chat template (default: a tiny random Llama)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--group", type=int, default=4, help="samples per prompt, GRPO's group (default 4)")
    p.add_argument("--new-tokens", type=int, default=32, help="answer tokens at most (default 32)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient in the loss (default 0.04)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run and block, after a warm-up (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="blocks per run, in ABC/CBA order (default 1)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="runs to time (default all three)")
    p.add_argument("--trl-head-on-answers", action="store_true",
                   help="experiment: TRL's fused LM head projects the answer's positions only, as on GPUs, instead "
                   "of every position (its CPU default); see above")
    add_clock_options(p)
    p.add_argument("--json", default=None, help="also write the rows as a JSON list to this path")
    args = p.parse_args(argv)
    if args.clock == "cpu" and torch.get_num_threads() > 1 and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (CPU seconds of several threads add up)")
    if min(args.prompts, args.group, args.new_tokens, args.steps, args.repeats) < 1 or args.group < 2:
        p.error("--prompts, --new-tokens, --steps, --repeats: expected at least 1; --group: at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    records = {run: [] for run in args.runs}
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as work:
        model_path = args.model
        if model_path is None:
            model_path = os.path.join(work, "tiny")
            tiny_checkpoint(model_path)
        print(f"model: {args.model or 'tiny random Llama'}; {args.prompts} prompts x {args.group} samples, answers "
              f"<= {args.new_tokens} tokens, beta {args.beta}; {torch.get_num_threads()} threads; median of "
              f"{args.steps} x {args.repeats} steps per run, {args.clock} seconds"
              + ("; TRL's LM head on the answers only (experiment)" if args.trl_head_on_answers else ""), flush=True)
        for block in range(args.repeats):
            for run in (args.runs if block % 2 == 0 else args.runs[::-1]):
                torch.manual_seed(0)
                if run == "rlhf":
                    steps = run_rlhf(args, model_path, work, clock)
                else:
                    steps = run_trl(args, run, model_path, work, clock)
                records[run] += steps
                print(f"  {run}: steps of " + ", ".join(f"{s['step']:.2f}" for s in steps) + " s", flush=True)
    rows = summarize(records)
    for row in rows:
        row.update(model=args.model or "tiny", prompts=args.prompts, group=args.group, new_tokens=args.new_tokens,
                   beta=args.beta, threads=torch.get_num_threads(), clock=args.clock,
                   trl_head_on_answers=args.trl_head_on_answers)
    print_rows(rows)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
