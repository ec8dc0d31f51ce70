"""Hybrid engine generation vs Hugging Face `generate`: same model, same weights, same prompts, greedy, one run.

    python benchmarks/throughput.py                       # CPU, ~15M-parameter Llama-style model, batch 1 8 32
    python benchmarks/throughput.py --device cuda --dtype bf16 --model-size 1b --batch-sizes 1 16 64 \
        --prompt-len 256 --new-tokens 256 --json throughput.json
    python benchmarks/throughput.py --model path/to/checkpoint --prompts prompts.jsonl   # your model, your prompts
    python benchmarks/throughput.py --family gemma2 qwen3 --batch-sizes 1 8   # random models of those families
    python benchmarks/throughput.py --family all                # every family of benchmarks/_family_models.py
    python benchmarks/throughput.py --compile --hf-static   # + the compiled engine, + HF's static-cache baseline

Prints a table (the model and its parameter count, tokens/s of each, the speedup, whether both produced identical
tokens) and, on CUDA, the achieved memory bandwidth of a decode step against the H200's ~4.3 TB/s copy ceiling.
`--family` runs a random model of each family named (benchmarks/_family_models.py: one shape, 4.9-7.4M parameters,
with each family's own features), one table per family;
`--model` takes any Hugging Face checkpoint directory of a family the engine supports; `--prompts` a JSONL file
of `{"prompt": "..."}` (one user turn) or `{"messages": [{"role": ..., "content": ...}, ...]}` records, written
with the checkpoint's chat template (a plain `prompt` is used as is without one). Batch b takes the first b
prompts (cycling when there are fewer). Without `--prompts`, prompts are random token ids of --prompt-len.
Both sides always generate --new-tokens per row (EOS does not stop them), so they do the same work.

`--compile` adds the engine with compile=True (the static decode step: inductor, and CUDA graphs on CUDA) beside
the eager engine; its first call, which compiles the step for the batch's bucket, is timed apart (compile s).
`--hf-static` adds Hugging Face's strongest baseline: generate with a static cache, whose decoding forward
transformers compiles itself (mode reduce-overhead: CUDA graphs) on CUDA; on CPU it runs uncompiled.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hybrid_engine  # noqa: E402
from benchmarks._family_models import FAMILY_CONFIGS  # noqa: E402
from rlhf.runtime.checkpoint import atomic_write_bytes  # noqa: E402

SIZES = {
    # ~15.6M parameters: big enough that matmuls matter, small enough for a 2-core CPU
    "15m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
    # ~1.1B parameters, Llama-3.2-1B's shape with a 32k vocabulary
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_BYTES_PER_S = 4.3e12  # H200 device-memory copy ceiling measured on the reference machine (GPU.md)


def build_model(size: str, dtype: torch.dtype, device: str, seq_len: int, family: str | None = None):
    """A random model: the Llama-style one of `size`, or with `family` that family's of _family_models.py."""
    torch.manual_seed(0)
    if family is not None:
        cfg = FAMILY_CONFIGS[family](max(seq_len, 512))
    else:
        cfg = LlamaConfig(**SIZES[size], max_position_embeddings=max(seq_len, 512), bos_token_id=None,
                          eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def load_model(path: str, dtype: torch.dtype, device: str):
    """A checkpoint directory's model, set never to stop at EOS (so HF and the engine generate alike)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"throughput.py: error: --model {path}: not a checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None
    return model.eval()


def read_prompts(path: str, tokenizer) -> list[list[int]]:
    """Token ids of each record of a JSONL file of {"prompt"} or {"messages"}, chat-templated (see the top)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"throughput.py: error: {path}:{number}: not JSON ({err.msg})") from err
            if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
                raise SystemExit(f"throughput.py: error: {path}:{number}: expected an object with 'prompt' or "
                                 "'messages'")
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            if templated:
                rows.append(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                          return_dict=False))
            elif "prompt" in record:
                rows.append(tokenizer(record["prompt"])["input_ids"])
            else:
                raise SystemExit(f"throughput.py: error: {path}:{number}: 'messages' needs a tokenizer with a chat "
                                 "template; this one has none")
    if not rows:
        raise SystemExit(f"throughput.py: error: {path}: no prompts")
    return rows


def decode_step_bytes(model, batch: int, length: int) -> int:
    """Bytes one decode step must read from device memory: every weight except the input embedding table, of
    which only the `batch` rows looked up (the lm_head matrix is read whole, tied to the table or not), and the
    K and V cache of every layer over `length` slots."""
    cfg = model.config
    embedding = model.get_input_embeddings().weight  # (vocab, hidden)
    row_bytes = embedding.shape[1] * embedding.element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied table counted once
    if embedding is not model.get_output_embeddings().weight:  # untied: the table is only looked up
        weight_bytes -= embedding.shape[0] * row_bytes
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * batch * kv_heads * length * head_dim * embedding.element_size()
    return weight_bytes + batch * row_bytes + kv_bytes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, device: str, repeats: int) -> tuple[dict, dict]:
    """Median wall time of each function over `repeats` calls after one warm-up, and its last result.

    The functions take turns within each repeat, so load from elsewhere on the machine falls on both sides
    of a ratio alike.
    """
    outs = {name: fn() for name, fn in fns.items()}
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            outs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def random_prompts(batch: int, prompt_len: int, vocab: int, device: str):
    """Left-padded prompts of lengths spread between half and all of prompt_len."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = (i * prompt_len // 2) // max(batch, 1)
        ids[i, :pad], mask[i, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def left_padded(rows: list[list[int]], batch: int, pad_id: int, device: str):
    """The first `batch` of `rows` (cycling), left padded to the longest: (input_ids, attention_mask), (B, P)."""
    picked = [rows[i % len(rows)] for i in range(batch)]
    width = max(len(r) for r in picked)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(picked):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


def run(args) -> list[dict]:
    """Every model asked for (a checkpoint, each --family, or the random Llama-style one): its rows."""
    dtype = DTYPES[args.dtype]
    if args.model:
        name = os.path.basename(os.path.normpath(args.model))
        return run_model(args, load_model(args.model, dtype, args.device), name)
    seq_len = args.prompt_len + args.new_tokens
    if not args.family:
        return run_model(args, build_model(args.model_size, dtype, args.device, seq_len),
                         f"random Llama-style {args.model_size}")
    rows = []
    for family in args.family:
        rows += run_model(args, build_model(args.model_size, dtype, args.device, seq_len, family), f"random {family}")
    return rows


def run_model(args, model, name: str) -> list[dict]:
    """The engine against Hugging Face generate on `model`, one row per batch size (printed as it comes)."""
    pad_id = 0
    if args.prompts:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        token_rows = read_prompts(args.prompts, tokenizer)
        batches = {b: left_padded(token_rows, b, pad_id, args.device) for b in args.batch_sizes}
    else:
        vocab = model.config.vocab_size
        batches = {b: random_prompts(b, args.prompt_len, vocab, args.device) for b in args.batch_sizes}
    seq_len = max(ids.shape[1] for ids, _ in batches.values()) + args.new_tokens
    n_params = sum(p.numel() for p in model.parameters())
    engine = hybrid_engine.wrap(model, max_seq_len=seq_len, max_batch_size=max(args.batch_sizes),
                                kernels=args.kernels, compile=False).eval()
    compiled = None
    if args.compile:
        compiled = hybrid_engine.wrap(model, max_seq_len=seq_len, max_batch_size=max(args.batch_sizes),
                                      kernels=args.kernels, compile=True).eval()
    print(f"model: {name} ({model.config.model_type}), {n_params / 1e6:.1f}M params, {args.dtype}, {args.device}; "
          f"prompts: {args.prompts or 'random ids'}; kernels: {sorted(set(b for b, _ in engine.ops.choices.values()))}",
          flush=True)
    rows = []
    for batch, (ids, mask) in batches.items():
        prompt_len = ids.shape[1]

        def hf_fn(ids=ids, mask=mask):
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad_id)

        def eng_fn(n=args.new_tokens, ids=ids, mask=mask, engine=engine):
            return engine.generate(ids, mask, max_new_tokens=n, eos_token_id=[])

        fns = {"hf": hf_fn, "engine": eng_fn}
        compile_s = None
        if compiled is not None:
            fns["compiled"] = lambda n=args.new_tokens, ids=ids, mask=mask: eng_fn(n, ids, mask, compiled)
            sync(args.device)
            t = time.perf_counter()
            fns["compiled"]()  # compiles (and on CUDA captures) the step of this batch's bucket
            sync(args.device)
            compile_s = time.perf_counter() - t
        if args.hf_static:
            fns["hf_static"] = lambda ids=ids, mask=mask: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=pad_id, cache_implementation="static")
        with torch.inference_mode():
            secs, outs = timed(fns, args.device, args.repeats)
        hf_s, eng_s, hf_out, eng_out = secs["hf"], secs["engine"], outs["hf"], outs["engine"]
        new = batch * args.new_tokens
        row = dict(model=name, params=n_params, batch_size=batch, prompt_len=prompt_len, new_tokens=args.new_tokens,
                   hf_tokens_per_s=new / hf_s, engine_tokens_per_s=new / eng_s, speedup=hf_s / eng_s,
                   outputs_equal=bool(torch.equal(hf_out, eng_out.sequences)))
        if compiled is not None:
            row.update(compiled_tokens_per_s=new / secs["compiled"], compiled_speedup=hf_s / secs["compiled"],
                       compile_s=compile_s,
                       compiled_equal=bool(torch.equal(hf_out, outs["compiled"].sequences)))
        if args.hf_static:
            row.update(hf_static_tokens_per_s=new / secs["hf_static"],
                       hf_static_equal=bool(torch.equal(hf_out, outs["hf_static"])))
        if args.device == "cuda" and args.new_tokens > 1:
            prefill_s = timed({"prefill": lambda f=eng_fn: f(1)}, args.device, args.repeats)[0]["prefill"]
            step_s = (eng_s - prefill_s) / (args.new_tokens - 1)
            mean_len = prompt_len + args.new_tokens // 2  # the cache length of the average decode step
            row.update(decode_step_ms=step_s * 1e3, decode_bandwidth_fraction=decode_step_bytes(
                model, batch, mean_len) / step_s / PEAK_BYTES_PER_S)
            if compiled is not None:
                # against the same floor as the eager step's (the filled cache), though the compiled step reads all
                # max_seq_len slots (the unfilled ones masked): that extra read is its cost, not part of the floor
                fn = fns["compiled"]
                prefill_s = timed({"prefill": lambda f=fn: f(1)}, args.device, args.repeats)[0]["prefill"]
                step_s = (secs["compiled"] - prefill_s) / (args.new_tokens - 1)
                row.update(compiled_step_ms=step_s * 1e3, compiled_bandwidth_fraction=decode_step_bytes(
                    model, batch, mean_len) / step_s / PEAK_BYTES_PER_S)
        rows.append(row)
        print_row(row, header=len(rows) == 1)
    return rows


def print_row(row: dict, header: bool) -> None:
    """One line per batch size; the compiled engine and HF's static cache, when run, on lines of their own."""
    if header:
        print(f"{'model':<24} {'params':>7} {'batch':>5} {'prompt':>6} {'new':>5} {'run':<16} {'tok/s':>10} "
              f"{'vs HF':>7} {'equal':>5} {'compile s':>9}"
              + (f" {'step ms':>8} {'bw frac':>7}" if "decode_step_ms" in row else ""))
    lead = (f"{row['model'][:24]:<24} {row['params'] / 1e6:>6.1f}M {row['batch_size']:>5} {row['prompt_len']:>6} "
            f"{row['new_tokens']:>5}")
    hf = row["hf_tokens_per_s"]
    runs = [("HF generate", hf, True, None, None, None)]
    if "hf_static_tokens_per_s" in row:
        runs.append(("HF static cache", row["hf_static_tokens_per_s"], row["hf_static_equal"], None, None, None))
    runs.append(("engine eager", row["engine_tokens_per_s"], row["outputs_equal"], None,
                 row.get("decode_step_ms"), row.get("decode_bandwidth_fraction")))
    if "compiled_tokens_per_s" in row:
        runs.append(("engine compiled", row["compiled_tokens_per_s"], row["compiled_equal"], row["compile_s"],
                     row.get("compiled_step_ms"), row.get("compiled_bandwidth_fraction")))
    for name, tok_s, equal, compile_s, step_ms, bw in runs:
        line = (f"{lead} {name:<16} {tok_s:>10.1f} {tok_s / hf:>6.2f}x {str(equal):>5} "
                f"{'' if compile_s is None else f'{compile_s:.1f}':>9}")
        if "decode_step_ms" in row:
            line += f" {'' if step_ms is None else f'{step_ms:.2f}':>8} {'' if bw is None else f'{bw:.2f}':>7}"
        print(line, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run both (default cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights and cache dtype (default fp32 on cpu, bf16 on cuda)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a Hugging Face checkpoint directory to run instead of a random model (any supported family)")
    p.add_argument("--model-size", default="15m", choices=sorted(SIZES),
                   help="without --model: random-initialised Llama-style model, 15m (default) or 1b")
    p.add_argument("--family", nargs="+", default=None, metavar="NAME", choices=["all", *FAMILY_CONFIGS],
                   help="instead: a random model of each family named, or all (benchmarks/_family_models.py): "
                   f"{', '.join(FAMILY_CONFIGS)}")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL of {\"prompt\"} or {\"messages\"} records, chat-templated (needs --model)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes to run (default 1 8 32)")
    p.add_argument("--prompt-len", type=int, default=64,
                   help="random prompts' length, rows left padded up to half (default 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per row, no early stop (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement, median kept (default 3)")
    p.add_argument("--kernels", default=None, help="engine kernels: auto|cuda|triton|cpu|torch (default: "
                   "$HYBRID_ENGINE_KERNELS or auto)")
    p.add_argument("--compile", action="store_true",
                   help="also run the engine with compile=True (the compiled static decode step)")
    p.add_argument("--hf-static", action="store_true",
                   help="also run HF generate with a static cache (compiled by transformers on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows as a JSON list to this path")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.prompts and not args.model:
        p.error("--prompts needs --model (the checkpoint's tokenizer and chat template write them)")
    if args.family and args.model:
        p.error("--family builds a random model: give it or --model, not both")
    if args.family and "all" in args.family:
        args.family = list(FAMILY_CONFIGS)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(rows, indent=2).encode())
    if not all(r["outputs_equal"] and r.get("compiled_equal", True) for r in rows):
        print("WARNING: the engine's tokens differ from Hugging Face's in some rows", file=sys.stderr)
        return 1 if args.dtype == "fp32" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
