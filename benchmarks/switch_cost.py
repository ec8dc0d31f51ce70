"""Cost of the hybrid engine's mode switches: time and bytes of eval() (ZeRO-3 gather, re-lay, LoRA merge,
TP slicing) and train() (release), on the throughput benchmark's default model (SIZES["15m"]), fp32, CPU.

    python benchmarks/switch_cost.py                  # single process rows, then 2-process DeepSpeed rows
    python benchmarks/switch_cost.py --no-distributed --json switch.json

Every row: median over `--repeats` eval()/train() pairs after a warm-up rollout, rank 0's numbers for
the multi-process rows (launched with torch.multiprocessing, gloo). `gen tok/s` is one greedy rollout
(batch 4, prompt 32, 32 new tokens) after the switch: it shows what streamed ZeRO-3 costs per token.
The LoRA rows also time the alternative to merging: the low-rank product applied in every forward.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hybrid_engine  # noqa: E402
from benchmarks.throughput import build_model, random_prompts  # noqa: E402
from rlhf.runtime.checkpoint import atomic_write_bytes  # noqa: E402

BATCH, PROMPT, NEW = 4, 32, 32
LORA_RANK = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 1e6


def lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=16, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return peft_model


def rollout(engine, vocab: int) -> float:
    """Tokens per second of one greedy rollout."""
    ids, mask = random_prompts(BATCH, PROMPT, vocab, "cpu")
    t = time.perf_counter()
    engine.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    return BATCH * NEW / (time.perf_counter() - t)


def measure(name: str, engine, vocab: int, repeats: int) -> dict:
    engine.eval()
    rollout(engine, vocab)  # warm-up: buffers, cache, kernels
    engine.train()
    evals, trains, tok_s = [], [], []
    for _ in range(repeats):
        engine.eval()
        evals.append(engine.last_switch)
        tok_s.append(rollout(engine, vocab))
        engine.train()
        trains.append(engine.last_train_switch)

    def med(xs, key):
        return statistics.median(getattr(x, key) for x in xs)

    last = evals[-1]
    return dict(mode=name, eval_ms=med(evals, "seconds") * 1e3, gather_ms=med(evals, "gather_s") * 1e3,
                relay_ms=med(evals, "relay_s") * 1e3, pack_ms=med(evals, "pack_s") * 1e3,
                tp_ms=med(evals, "tp_s") * 1e3,
                gathered_mb=last.gathered_bytes / MB, relaid_mb=last.relaid_bytes / MB, tp_mb=last.tp_bytes / MB,
                train_ms=med(trains, "seconds") * 1e3, gen_tok_s=statistics.median(tok_s))


class LowRankLinear:
    """base(x) + B(A x): LoRA applied in the forward instead of merged (for timing; rank LORA_RANK)."""

    def __init__(self, base, rank: int):
        self.base = base
        out_features = base.weight.shape[1 if base.transposed else 0]
        in_features = base.weight.shape[0 if base.transposed else 1]
        self.a = torch.randn(rank, in_features) * 0.02
        self.b = torch.randn(out_features, rank) * 0.02

    def __call__(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


def lora_in_forward_tok_s(engine, vocab: int, repeats: int) -> float:
    """Rollout tokens/s when every projection adds its low-rank product instead of reading merged weights."""
    engine.eval()
    for layer in engine.inference.w.layers:
        for name in ("qkv", "o", "up", "down"):
            setattr(layer, name, LowRankLinear(getattr(layer, name), LORA_RANK))
    rollout(engine, vocab)
    return statistics.median(rollout(engine, vocab) for _ in range(repeats))


def single_process_rows(repeats: int) -> list[dict]:
    model = build_model("15m", torch.float32, "cpu", PROMPT + NEW)
    vocab = model.config.vocab_size
    rows = [measure("1 proc", hybrid_engine.wrap(model, max_seq_len=PROMPT + NEW, max_batch_size=BATCH), vocab,
                    repeats)]
    base_tok_s = lora_in_forward_tok_s(hybrid_engine.wrap(copy.deepcopy(model), max_seq_len=PROMPT + NEW,
                                                          max_batch_size=BATCH), vocab, repeats)
    peft_model = lora(model)
    row = measure("1 proc LoRA merge", hybrid_engine.wrap(peft_model, max_seq_len=PROMPT + NEW,
                                                          max_batch_size=BATCH), vocab, repeats)
    rows.append(row)
    rows.append(dict(mode="1 proc LoRA in fwd", eval_ms=rows[0]["eval_ms"], gather_ms=0.0, relay_ms=rows[0]["relay_ms"],
                     pack_ms=rows[0]["pack_ms"], tp_ms=0.0, gathered_mb=0.0, relaid_mb=rows[0]["relaid_mb"], tp_mb=0.0,
                     train_ms=rows[0]["train_ms"], gen_tok_s=base_tok_s))
    return rows


# -- multi-process rows --------------------------------------------------------------------------------
SCENARIOS = {  # name: (ZeRO stage, engine options, LoRA)
    "2 proc ZeRO-3 pinned": (3, dict(), False),
    "2 proc ZeRO-3 streamed": (3, dict(pin_parameters=False, gather_partition_size=2), False),
    "2 proc ZeRO-3 LoRA": (3, dict(), True),
    "2 proc ZeRO-3 tp2": (3, dict(tp_size=2, gather_partition_size=2), False),
    "2 proc ZeRO-2 tp2": (2, dict(tp_size=2), False),
}


def worker(rank: int, port: int, out: str, repeats: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    from rlhf.runtime.distributed import init_distributed
    from rlhf.runtime.engines import ds_config

    init_distributed("gloo")
    rows = []
    for name, (stage, options, with_lora) in SCENARIOS.items():
        model = build_model("15m", torch.float32, "cpu", PROMPT + NEW)
        if with_lora:
            model = lora(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ds, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(BATCH, 1, stage))
        engine = hybrid_engine.wrap(ds, max_seq_len=PROMPT + NEW, max_batch_size=BATCH, **options)
        rows.append(measure(name, engine, 8192, repeats))
        engine.release_memory()
        del engine, ds, opt, model
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    from rlhf.runtime.process import end_process

    end_process(0)


def distributed_rows(repeats: int) -> list[dict]:
    out = os.path.join(tempfile.mkdtemp(), "rows.json")
    mp.spawn(worker, args=(29700 + os.getpid() % 200, out, repeats), nprocs=2, join=True)
    with open(out) as f:
        return json.load(f)


COLUMNS = [("mode", "{:<24}"), ("eval_ms", "{:>8.1f}"), ("gather_ms", "{:>9.1f}"), ("relay_ms", "{:>8.1f}"),
           ("pack_ms", "{:>7.1f}"), ("tp_ms", "{:>6.1f}"), ("gathered_mb", "{:>11.1f}"), ("relaid_mb", "{:>9.1f}"),
           ("tp_mb", "{:>6.1f}"),
           ("train_ms", "{:>8.1f}"), ("gen_tok_s", "{:>9.0f}")]


def print_table(rows: list[dict]) -> None:
    widths = [24 if name == "mode" else len(fmt.format(0)) for name, fmt in COLUMNS]
    print(" ".join(f"{name:<{w}}" if name == "mode" else f"{name:>{w}}" for (name, _), w in zip(COLUMNS, widths)))
    for row in rows:
        print(" ".join(fmt.format(row[name]) for name, fmt in COLUMNS), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="eval()/train() pairs timed per row, median kept")
    p.add_argument("--no-distributed", action="store_true", help="only the single-process rows")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the single-process rows (default 1, "
                   "as each of the 2-process ranks: comparable rows, and stable on a busy 2-core machine)")
    p.add_argument("--json", default=None, help="also write the rows as a JSON list to this path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = single_process_rows(args.repeats)
    if not args.no_distributed:
        rows += distributed_rows(args.repeats)
    print(f"model: benchmarks/throughput.py SIZES['15m'], fp32, CPU; rollout batch {BATCH}, prompt {PROMPT}, "
          f"{NEW} new tokens; LoRA rank {LORA_RANK} on {len(LORA_TARGETS)} projections per layer")
    print_table(rows)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
