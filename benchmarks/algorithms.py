"""Every step-3 algorithm on the tiny preset's built-in task: seconds per round, the held-out sampled gold score
before and after, and the largest rollout/training logprob gap, per seed (tests/test_algorithms.py asserts
the same runs).

    python benchmarks/algorithms.py                       # ppo grpo rloo reinforce++ reinforce++-baseline, seeds 1 2
    python benchmarks/algorithms.py --algorithms grpo --seeds 1 --rounds 30 --json algos.json

Step 1 (SFT) runs once into --work-dir; each algorithm then runs `rlhf train --algorithm A --reward-fn synthetic
--step 3` from that SFT model.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

ALGORITHMS = ["ppo", "grpo", "rloo", "reinforce++", "reinforce++-baseline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS, help="algorithms to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="seeds of step 3")
    parser.add_argument("--rounds", type=int, default=60, help="step-3 rounds per run (default: 60)")
    parser.add_argument("--work-dir", default=None, help="where step 1 and the runs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()

    from rlhf.train import main as train_main

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
                    "--seed", str(seed), "--output-dir", str(out), "--disable-tqdm"]
            start = time.perf_counter()
            with mock.patch("rlhf.train.plot", lambda out: None), mock.patch("builtins.print"):
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


if __name__ == "__main__":
    main()
