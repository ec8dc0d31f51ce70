"""Every step-3 algorithm on the tiny preset's built-in task: seconds per round, the held-out sampled gold score
before and after, and the largest rollout/training logprob gap of any round (each round audited), per seed
(tests/test_algorithms.py asserts the same runs).

    python benchmarks/algorithms.py                       # every declared algorithm, seeds 1 2
    python benchmarks/algorithms.py --algorithms grpo --seeds 1 --rounds 30 --json algos.json
    python benchmarks/algorithms.py --algorithms rloo --seeds 1 --explain-gaps 1e-5

--explain-gaps G: for every round whose gap exceeds G, the token with the largest gap is scored by the actor
in float64 too, and both fp32 logprobs (the engine's rollout, Hugging Face's training forward) are printed with
their distance from that value: which side's rounding the gap is.

Step 1 (SFT) runs once into --work-dir; each algorithm then runs `rlhf train --algorithm A --reward-fn synthetic
--step 3` from that SFT model.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from rlhf.core.algorithms import ALGORITHMS  # noqa: E402  every declared algorithm

show = print  # builtins.print is muted during the runs


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS),
                        help="algorithms to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="seeds of step 3")
    parser.add_argument("--rounds", type=int, default=60, help="step-3 rounds per run (default: 60)")
    parser.add_argument("--work-dir", default=None, help="where step 1 and the runs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--explain-gaps", type=float, default=None, metavar="G",
                        help="compare rounds with a gap above G against a float64 forward of the actor")
    args = parser.parse_args()

    from rlhf.cli.train import main as train_main

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="algorithms_"))
    sft = work / "sft"
    if not (sft / "actor" / "config.json").exists():
        train_main(["--step", "1", "--output-dir", str(sft), "--disable-tqdm"])
    rows = []
    for algorithm in args.algorithms:
        for seed in args.seeds:
            out = work / f"{algorithm}_{seed}"
            argv = ["--preset", "tiny", "--algorithm", algorithm, "--reward-fn", "synthetic", "--step", "3",
                    "--actor-model", str(sft / "actor"), "--data", str(sft / "data" / "pairs.jsonl"),
                    "--data-split", "0,1,1", "--gold-task", "synthetic", "--max-steps", str(args.rounds),
                    "--seed", str(seed), "--logprob-audit-interval", "1", "--output-dir", str(out), "--overwrite",
                    "--disable-tqdm"]
            if ALGORITHMS[algorithm].teacher:  # distill's teacher: this seed's PPO actor (trained first if absent)
                teacher = work / f"ppo_{seed}" / "ppo" / "actor"
                if not (teacher / "config.json").exists():
                    with mock.patch("rlhf.cli.train.plot", lambda out, **kwargs: None), mock.patch("builtins.print"):
                        train_main([*argv[:argv.index("--algorithm")], "--algorithm", "ppo",
                                    *argv[argv.index("--algorithm") + 2:-4], "--output-dir", str(work / f"ppo_{seed}"),
                                    "--overwrite", "--disable-tqdm"])
                argv += ["--teacher-model", str(teacher)]
            start = time.perf_counter()
            explain = explain_gaps(args.explain_gaps) if args.explain_gaps else contextlib.nullcontext()
            with mock.patch("rlhf.cli.train.plot", lambda out, **kwargs: None), mock.patch("builtins.print"), explain:
                summary = next(v for k, v in train_main(argv).items() if k.startswith("step 3"))
            seconds = time.perf_counter() - start
            rows.append({"algorithm": algorithm, "seed": seed, "rounds": summary["steps"],
                         "s_per_round": summary["seconds"] / max(summary["steps"], 1), "run_s": seconds,
                         "gold_before": summary["gold_before"], "gold_after": summary["gold_after"],
                         "max_logprob_gap": summary["max_logprob_gap"]})
            r = rows[-1]
            print(f"{algorithm:<21} seed {seed}  {r['rounds']:3d} rounds  {r['s_per_round']:6.3f} s/round  "
                  f"gold {r['gold_before']:.3f} -> {r['gold_after']:.3f} ({r['gold_after'] - r['gold_before']:+.3f})"
                  f"  max gap {r['max_logprob_gap']:.1e}  run {seconds:5.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def explain_gaps(threshold: float):
    """Patch RLTrainer.rollout: after a rollout whose audited gap exceeds `threshold`, score its worst token with
    a float64 copy of the actor and print the engine's and Hugging Face's distance from it."""
    from rlhf.core.experience import action_logprobs
    from rlhf.steps.rl_trainer import RLTrainer

    rollout = RLTrainer.rollout

    def explained(self, *a, **k):
        exp, stats = rollout(self, *a, **k)
        if stats.logprob_gap is not None and stats.logprob_gap > threshold:
            seq, mask, P = exp.sequences, exp.attention_mask, exp.prompt_len
            actor = self.actor.module
            with torch.no_grad():
                fp32 = action_logprobs(actor.eval(), seq, mask, P, self.sampling.temperature)
                fp64 = action_logprobs(copy.deepcopy(actor).double(), seq, mask, P, self.sampling.temperature)
            actor.train()
            gap = (exp.rollout_logprobs - fp32).abs().masked_fill(~exp.action_mask, 0.0)
            i, t = divmod(int(gap.argmax()), gap.shape[1])
            engine, hf, exact = (float(x[i, t]) for x in (exp.rollout_logprobs, fp32, fp64))
            on = exp.action_mask
            worst = [float(((x - fp64).abs() * on).max()) for x in (exp.rollout_logprobs, fp32)]
            show(f"  round {self.rollouts}: gap {stats.logprob_gap:.2e} at row {i} token {t}: float64 {exact:.9f}, "
                 f"engine {engine:.9f} ({abs(engine - exact):.1e} off), HF forward {hf:.9f} ({abs(hf - exact):.1e} "
                 f"off); largest error against float64 over the rollout: engine {worst[0]:.1e}, HF forward "
                 f"{worst[1]:.1e}", flush=True)
        return exp, stats

    return mock.patch.object(RLTrainer, "rollout", explained)


if __name__ == "__main__":
    main()
