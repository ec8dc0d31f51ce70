"""What a full training-state checkpoint costs: its size and save time per model, and the overhead of
``--save-interval 10`` on a whole tiny run (the same run with and without it, interleaved).

    python benchmarks/checkpoint_cost.py                 # tiny preset and ~15M model; 3 interleaved tiny runs each
    python benchmarks/checkpoint_cost.py --runs 0        # sizes and save times only
    python benchmarks/checkpoint_cost.py --json F        # rows as JSON too

A checkpoint is what rlhf/runtime/resume.py writes: DeepSpeed's save_checkpoint of the trained engine (weights, AdamW
state, scheduler) plus the rank's state file. The model rows save an engine after one optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import SIZES  # noqa: E402

from rlhf.cli.presets import get_preset  # noqa: E402
from rlhf.runtime.distributed import init_distributed  # noqa: E402
from rlhf.runtime.engines import ds_config, initialize  # noqa: E402
from rlhf.runtime.resume import Checkpointer, capture_rng  # noqa: E402


def models() -> dict[str, object]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    preset = get_preset("tiny")
    torch.manual_seed(0)
    return {"tiny preset": AutoModelForCausalLM.from_config(preset.model_config(preset.tokenizer())),
            "15m (throughput.py)": AutoModelForCausalLM.from_config(LlamaConfig(**SIZES["15m"], pad_token_id=0))}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_cost(name: str, model, repeats: int) -> dict:
    engine = initialize(model, ds_config(2, 1, 0), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()  # AdamW state exists, as in a checkpoint mid-run
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, "sft", keep=1)
        times = []
        for counter in range(1, repeats + 1):
            start = time.perf_counter()
            path = ckpt.save(counter, {"model": engine}, {"rng": capture_rng()})
            times.append(time.perf_counter() - start)
        size = dir_bytes(path)
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": params, "checkpoint_mb": size / 2**20, "save_s": statistics.median(times)}


def full_run(out: Path, save_interval: int) -> float:
    cmd = [sys.executable, "-m", "rlhf.train", "--output-dir", str(out), "--disable-tqdm"]
    if save_interval:
        cmd += ["--save-interval", str(save_interval)]
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this process's, not the run's
    env = {k: v for k, v in os.environ.items() if k not in launcher} | {"PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="saves timed per model (median)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved full tiny runs with and without "
                        "--save-interval 10 (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()
    rows = [save_cost(name, model, args.repeats) for name, model in models().items()]
    print(f"{'model':<22} {'params':>11} {'checkpoint MB':>14} {'save s':>8}")
    for r in rows:
        print(f"{r['model']:<22} {r['params']:>11,} {r['checkpoint_mb']:>14.1f} {r['save_s']:>8.3f}")
    result = {"saves": rows}
    if args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            plain, saving = [], []
            for i in range(args.runs):
                plain.append(full_run(Path(tmp) / f"plain{i}", 0))
                saving.append(full_run(Path(tmp) / f"save{i}", 10))
        a, b = statistics.median(plain), statistics.median(saving)
        print(f"\nfull tiny run (rlhf train, steps 1-3), median of {args.runs} interleaved: {a:.1f} s by default (a "
              f"checkpoint at the end of each step), {b:.1f} s with --save-interval 10: {100 * (b / a - 1):+.1f}%")
        result["full_run"] = {"plain_s": plain, "save_interval_10_s": saving, "overhead": b / a - 1}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
