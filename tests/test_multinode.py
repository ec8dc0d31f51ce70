"""Runs across two nodes: two network namespaces joined by a veth pair (tests/netns.py), one torchrun agent per
namespace (c10d rendezvous on node 0's address, gloo bound to the veth), so every collective crosses a network
interface. Checked: the same weights as the same world size on one node, the storage rules (a shared output
directory; node-local ones refused at start), a full disk, a lost node and the restarts that follow.
"""
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.netns import IFNAME, TwoNodes, require_netns
from tests.test_resume import records, weights

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
NODE_ENV = dict(ENV, GLOO_SOCKET_IFNAME=IFNAME)  # gloo on the veth (the name exists inside the namespaces only)
PORTS = itertools.count(29400)  # a rendezvous port per launch: a finished one may linger in TIME_WAIT
# the tiny pipeline, every model under ZeRO-3 and generation split over 2 ranks (each node's single rank in 2x1)
ZERO3_TP2 = ["--sft-zero-stage", "3", "--rm-zero-stage", "3", "--actor-zero-stage", "3", "--critic-zero-stage", "3",
             "--inference-tp-size", "2", "--disable-tqdm", "--seed", "7"]
PIPELINE = ["--sft-max-steps", "4", "--rm-max-steps", "2", "--max-steps", "2", "--eval-prompts", "8", *ZERO3_TP2]


def grpo_args(sft_run: Path) -> list[str]:
    """GRPO alone from a finished run's SFT actor, scored by the task's rule; a checkpoint every round."""
    return ["--step", "3", "--algorithm", "grpo", "--actor-model", str(sft_run / "actor"), "--preset", "tiny",
            "--data", str(sft_run / "data" / "pairs.jsonl"), "--data-split", "0,1,1", "--reward-fn", "synthetic",
            "--max-steps", "4", "--eval-prompts", "0", "--save-interval", "1", *ZERO3_TP2]


def torchrun(nodes: TwoNodes, node: int, nproc: int, port: int, *extra: str) -> list[str]:
    """One node's launch line, as on a real cluster: the rendezvous at node 0's address (node 0 hosts its store),
    this node's own address for the workers' store (--local-addr: the hostname resolves to neither)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{nodes[0].addr}:{port}", "--rdzv-id", f"job{port}",
            "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", nodes[node].addr, *extra]


def start_nodes(nodes: TwoNodes, nproc: int, outs: tuple[Path, Path], args: list[str], launcher: tuple = (),
                logs: Path | None = None) -> list[subprocess.Popen]:
    port = next(PORTS)
    procs = []
    for i, out in enumerate(outs):
        cmd = [*torchrun(nodes, i, nproc, port, *launcher), "-m", "rlhf.train", "--output-dir", str(out), *args]
        log = open(logs / f"node{i}.log", "w") if logs else subprocess.DEVNULL  # noqa: SIM115
        procs.append(nodes[i].popen(cmd, cwd=ROOT, env=NODE_ENV, stdout=log, stderr=subprocess.PIPE, text=True))
    return procs


def run_nodes(nodes: TwoNodes, nproc: int, out: Path, args: list[str], outs: tuple[Path, Path] | None = None,
              expect: int = 0) -> tuple[float, list[str]]:
    """Both nodes' launches to their end; (wall seconds, each node's stderr)."""
    start = time.perf_counter()
    procs = start_nodes(nodes, nproc, outs or (out, out), args)
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for i, proc in enumerate(procs):
        assert proc.returncode == expect, f"node {i}: exit {proc.returncode}\n{errs[i][-3000:]}"
    return time.perf_counter() - start, errs


def run_one_node(nproc: int, out: Path, args: list[str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "rlhf.train", "--output-dir", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - start


def assert_same_weights(ours: Path, theirs: Path, models: tuple[str, ...]) -> None:
    for model in models:
        a, b = weights(ours / model), weights(theirs / model)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{model} {name}: max diff {(a[name] - b[name]).abs().max()}"
    assert records(ours) == records(theirs)


@pytest.fixture(scope="module")
def nodes():
    require_netns()
    with TwoNodes() as made:
        yield made


@pytest.fixture(scope="module")
def pipeline_one_node(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_node") / "run"
    return out, run_one_node(2, out, PIPELINE)


def test_pipeline_on_two_nodes_equals_one_node(nodes, pipeline_one_node, tmp_path):
    """SFT, reward model and PPO under ZeRO-3 with generation split over both ranks (one per node): the weights of
    each step and every metric record are those of the two processes on one node, bit for bit."""
    reference, one_s = pipeline_one_node
    two_s, _ = run_nodes(nodes, 1, tmp_path / "run", PIPELINE)
    print(f"pipeline 2 nodes x 1 process: {two_s:.1f} s; 1 node x 2: {one_s:.1f} s")
    assert_same_weights(tmp_path / "run", reference, ("actor", "reward", "ppo/actor"))
