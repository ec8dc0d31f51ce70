"""Multi-turn rollouts: the hybrid engine continuing its KV cache against Hugging Face `generate` re-prefilling the
whole conversation each turn (what TRL's tool loop does), same model, same greedy tokens.

    python benchmarks/multiturn.py                              # CPU, ~15M-parameter Llama-style model, batch 8
    python benchmarks/multiturn.py --batch-size 1 8 --turns 4 --max-new-tokens 32 --json
    python benchmarks/multiturn.py --model path/to/checkpoint   # your model (any family the engine serves)

A rollout of --turns turns over a batch of left-padded random prompts (lengths spread between half and all of
--prompt-len): turn 1 generates --max-new-tokens per row; each later turn appends a fixed environment's reply to
every row (deterministic token ids, a different length per row and turn, between --obs-min and --obs-max) and
generates again. Hugging Face re-prefills each row's whole conversation so far (left padded) with `generate`; the
engine keeps every row's cache (generate(keep_cache=True)) and prefills only the reply (continue_rows). EOS does
not stop either side, so both generate the same tokens, asserted equal. tokens/s counts the generated tokens of all
turns over the whole rollout's wall time (median of --repeats, after one warm-up rollout each).

Prints a table; --json prints the rows as JSON instead, with keys batch_size, turns, hf_tok_s, engine_tok_s,
speedup (and hf_s, engine_s, tokens, same_tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from throughput import DTYPES, SIZES, build_model, load_model, random_prompts, timed  # noqa: E402

import hybrid_engine  # noqa: E402


def observation(row: int, turn: int, vocab: int, low: int, high: int) -> list[int]:
    """The fixed environment's reply to `row` at `turn`: token ids of a length in [low, high] set by the row and
    turn, the same on every run."""
    g = torch.Generator().manual_seed(1000 * turn + row)
    length = low + (3 * row + 5 * turn) % (high - low + 1)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def hf_rollout(model, ids, mask, args) -> list[list[int]]:
    """Every turn's new tokens per row, with Hugging Face generate re-prefilling each conversation."""
    vocab = model.config.vocab_size
    convs = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    answers: list[list[int]] = [[] for _ in convs]
    for turn in range(1, args.turns + 1):
        if turn > 1:
            convs = [c + observation(b, turn, vocab, args.obs_min, args.obs_max) for b, c in enumerate(convs)]
        width = max(len(c) for c in convs)
        batch = torch.zeros(len(convs), width, dtype=torch.long)
        attn = torch.zeros_like(batch)
        for b, c in enumerate(convs):
            batch[b, width - len(c):], attn[b, width - len(c):] = torch.tensor(c), 1
        out = model.generate(input_ids=batch.to(ids.device), attention_mask=attn.to(ids.device), do_sample=False,
                             max_new_tokens=args.max_new_tokens, eos_token_id=None, pad_token_id=0)
        for b, new in enumerate(out[:, width:].tolist()):
            convs[b] += new
            answers[b] += new
    return answers


def engine_rollout(engine, ids, mask, vocab: int, args) -> list[list[int]]:
    """The same rollout on the engine: generate(keep_cache=True), then continue_rows each turn."""
    out = engine.generate(ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=[], pad_token_id=0,
                          keep_cache=True)
    answers = out.sequences[:, ids.shape[1]:].tolist()
    rows = list(range(ids.shape[0]))
    for turn in range(2, args.turns + 1):
        replies = [observation(b, turn, vocab, args.obs_min, args.obs_max) for b in rows]
        new = engine.continue_rows(rows, replies, max_new_tokens=args.max_new_tokens, eos_token_id=[],
                                   pad_token_id=0).sequences.tolist()
        answers = [a + n for a, n in zip(answers, new)]
    return answers


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    if args.model:
        model = load_model(args.model, dtype, args.device)
    else:
        model = build_model(args.model_size, dtype, args.device, args.prompt_len)
    vocab = model.config.vocab_size
    max_seq = args.prompt_len + args.turns * args.max_new_tokens + (args.turns - 1) * args.obs_max + 1
    rows = []
    for batch in args.batch_size:
        ids, mask = random_prompts(batch, args.prompt_len, vocab, args.device)
        engine = hybrid_engine.wrap(model, max_seq_len=max_seq, max_batch_size=batch, kernels=args.kernels).eval()
        rollouts = {"hf": lambda ids=ids, mask=mask: hf_rollout(model, ids, mask, args),
                    "engine": lambda ids=ids, mask=mask, engine=engine: engine_rollout(engine, ids, mask, vocab, args)}
        seconds, outs = timed(rollouts, args.device, args.repeats)
        tokens = batch * args.turns * args.max_new_tokens
        same = outs["hf"] == outs["engine"]
        rows.append({"batch_size": batch, "turns": args.turns, "hf_tok_s": round(tokens / seconds["hf"], 1),
                     "engine_tok_s": round(tokens / seconds["engine"], 1),
                     "speedup": round(seconds["hf"] / seconds["engine"], 2), "hf_s": round(seconds["hf"], 3),
                     "engine_s": round(seconds["engine"], 3), "tokens": tokens, "same_tokens": same})
        engine.release_memory()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="multiturn.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, nargs="+", default=[8],
                   help="rows per rollout; several values run one rollout each (default 8)")
    p.add_argument("--turns", type=int, default=4, help="turns per rollout: one generate, then turns - 1 "
                   "continuations (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens generated per row and turn, no early stop (default 32)")
    p.add_argument("--prompt-len", type=int, default=32,
                   help="longest prompt; the rows' lengths spread between half and all of it (default 32)")
    p.add_argument("--obs-min", type=int, default=4, help="shortest environment reply, in tokens (default 4)")
    p.add_argument("--obs-max", type=int, default=20, help="longest environment reply, in tokens (default 20)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a saved Hugging Face checkpoint directory (default: a random model of --model-size)")
    p.add_argument("--model-size", default="15m", choices=sorted(SIZES),
                   help="size of the random Llama-style model when no --model is given (default 15m)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run both (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (default fp32)")
    p.add_argument("--kernels", default=None, help="engine kernels: auto|cuda|triton|cpu|torch (default: "
                   "$HYBRID_ENGINE_KERNELS, else auto)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed rollouts per side, median kept, after one warm-up rollout each (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    if args.turns < 1 or args.max_new_tokens < 1 or min(args.batch_size) < 1 or args.repeats < 1:
        p.error("--turns, --max-new-tokens, --batch-size and --repeats must be at least 1")
    if not 1 <= args.obs_min <= args.obs_max:
        p.error(f"--obs-min {args.obs_min} / --obs-max {args.obs_max}: expected 1 <= obs-min <= obs-max")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'batch':>5} {'turns':>5} {'HF tok/s':>9} {'engine tok/s':>12} {'speedup':>7} {'same tokens':>11}")
        for r in rows:
            print(f"{r['batch_size']:>5} {r['turns']:>5} {r['hf_tok_s']:>9.1f} {r['engine_tok_s']:>12.1f} "
                  f"{r['speedup']:>6.2f}x {str(r['same_tokens']):>11}")
    if not all(r["same_tokens"] for r in rows):
        print("multiturn.py: error: the engine's tokens differ from Hugging Face's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
