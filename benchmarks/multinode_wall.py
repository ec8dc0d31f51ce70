"""Wall time of a run across two nodes against the same number of processes on one node.

    python benchmarks/multinode_wall.py [--repeats 1]      # root: makes two network namespaces (tests/netns.py)

GRPO under ZeRO-3 with --inference-tp-size 2 (tests/test_multinode.py's run, 4 rounds from a 4-step SFT actor),
on 2 nodes x P processes and on 1 node x 2P, for P = 1 and 2, interleaved ABBA (one, two, two, one per repeat) so
a change in the machine's load falls on both alike. Each launch's wall time includes starting its processes;
the nodes are namespaces of one host joined by a veth pair, so this measures what crossing a network stack
costs, not a real network's bandwidth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns import TwoNodes  # noqa: E402
from tests.test_multinode import ENV, grpo_args, run_nodes, run_one_node  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="ABBA repeats per process count (default: 1)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp, TwoNodes() as nodes:
        tmp = Path(tmp)
        sft = tmp / "sft"
        subprocess.run([sys.executable, "-m", "rlhf.train", "--output-dir", str(sft), "--step", "1",
                        "--sft-max-steps", "4", "--disable-tqdm"], cwd=ROOT, env=ENV, check=True,
                       capture_output=True)
        run_args = grpo_args(sft)
        for nproc in (1, 2):
            one, two = [], []
            for r in range(args.repeats):
                for which in ("one", "two", "two", "one"):
                    out = tmp / f"{which}{nproc}_{r}_{len(one) + len(two)}"
                    if which == "one":
                        one.append(run_one_node(2 * nproc, out, run_args))
                    else:
                        two.append(run_nodes(nodes, nproc, out, run_args)[0])
            a, b = statistics.mean(one), statistics.mean(two)
            print(f"GRPO 2 nodes x {nproc}: {' '.join(f'{t:.1f}' for t in two)} s (mean {b:.1f}); 1 node x "
                  f"{2 * nproc}: {' '.join(f'{t:.1f}' for t in one)} s (mean {a:.1f}); two/one {b / a:.2f}",
                  flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
