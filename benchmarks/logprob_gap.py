"""Rollout against training-forward logprobs: how far the engine's generate() logprobs are from Hugging Face's
forward over the same sequences (what PPO logs as `logprob_gap`), and where the gap comes from.

    python benchmarks/logprob_gap.py                   # SmolLM2-135M-Instruct (tests/real_model.py), fp32 and bf16
    python benchmarks/logprob_gap.py --toy             # the tiny configs of the exactness tests instead
    python benchmarks/logprob_gap.py --model PATH --dtypes fp32 --new-tokens 64

Every row is the largest (and mean) |logprob - HF forward's| over the answer tokens of the same rollouts:
  engine decode   generate() under each kernel backend, with and without the oneDNN-packed weights;
  engine prefill  the engine's forward over the whole sequence at once: the training forward's shapes, so only
                  the kernels differ, not the order in which the tokens are computed;
  HF decode       Hugging Face's own forward one token at a time over its KV cache (what HF generate computes):
                  the gap that incremental decoding has by itself, whoever's code runs it;
  prefill torch + cpu OP (with --per-op)  the torch kernels with one op swapped for its C++ twin: what each
                  C++ kernel's own summation order adds.
In bf16 each row also gives its error against an fp32 forward of the same weights, next to HF's bf16 forward's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hybrid_engine  # noqa: E402
import hybrid_engine.ops as ops_lib  # noqa: E402
from rlhf.core.experience import action_logprobs  # noqa: E402  the training forward PPO compares against
from tests.hf_models import CONFIGS, left_padded_prompts, tiny_model  # noqa: E402
from tests.real_model import QUESTIONS, chat_batch, real_model_dir  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (kernels, pack_weights); "auto" is the default: the C++ ops but torch's SDPA for prefill attention
VARIANTS = [("auto", True), ("cpu", True), ("cpu", False), ("torch", True), ("torch", False)]
C_OPS = ("rms_norm", "rotary_kv_append", "prefill_attention")  # the ops a prefill runs


@torch.no_grad()
def hf_decode_logprobs(model, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """Hugging Face's forward over the prompt, then one token at a time over its KV cache: (B, N)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                # (B, P + N)
    out = model(input_ids=sequences[:, :prompt_len], attention_mask=attention_mask[:, :prompt_len],
                position_ids=positions[:, :prompt_len], use_cache=True)
    logits = [out.logits[:, -1]]
    for t in range(prompt_len, sequences.shape[1] - 1):
        out = model(input_ids=sequences[:, t:t + 1], attention_mask=attention_mask[:, :t + 1],
                    position_ids=positions[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
    return hybrid_engine.token_logprobs(torch.stack(logits, dim=1), sequences[:, prompt_len:])  # (B, N)


def gap(logprobs: torch.Tensor, reference: torch.Tensor, action_mask: torch.Tensor) -> tuple[float, float]:
    diff = (logprobs - reference).abs()[action_mask]
    return diff.max().item(), diff.mean().item()


def measure(model, reference, ids, mask, new_tokens: int, eos, pad: int, sample: bool, per_op: bool = False
            ) -> list[dict]:
    """Rows for one model (in its dtype); `reference` is the same weights in fp32 (or None for an fp32 model)."""
    rows = []
    for kernels, pack in VARIANTS:
        engine = hybrid_engine.wrap(model, max_seq_len=ids.shape[1] + new_tokens, max_batch_size=ids.shape[0],
                                    kernels=kernels, pack_weights=pack).eval()
        out = engine.generate(ids, mask, max_new_tokens=new_tokens, do_sample=sample, eos_token_id=eos,
                              pad_token_id=pad, generator=torch.Generator().manual_seed(0))
        P, action = ids.shape[1], out.action_mask
        full_mask = torch.cat([mask, action.to(mask.dtype)], dim=1)                # (B, P + N), as PPO builds it
        with torch.no_grad():
            train = action_logprobs(model, out.sequences, full_mask, P)           # (B, N)
            exact = action_logprobs(reference, out.sequences, full_mask, P) if reference is not None else None
        found = {f"engine decode {kernels} {'packed' if pack else 'plain'}": out.logprobs,
                 f"engine prefill {kernels}": engine.score(out.sequences, full_mask, prompt_len=P)}
        if kernels == "cpu" and pack:  # HF's rows depend on the sequences only: once is enough
            found["HF decode"] = hf_decode_logprobs(model, out.sequences, full_mask, P)
            found["HF forward"] = train
        if kernels == "torch" and not pack and per_op:
            torch_ops, cpu_ops = ops_lib.select("torch", "cpu"), ops_lib.select("cpu", "cpu")
            for op in C_OPS:
                engine.inference.ops = dataclasses.replace(torch_ops, **{op: getattr(cpu_ops, op)})
                found[f"prefill torch + cpu {op}"] = engine.score(out.sequences, full_mask, prompt_len=P)
        for name, logprobs in found.items():
            if name.startswith("engine prefill") and not pack:
                continue  # a prefill of more than PACKED_MAX_ROWS rows never reads the packed copies
            row = {"path": name, "tokens": int(action.sum())}
            row["max_gap"], row["mean_gap"] = gap(logprobs, train, action)
            if exact is not None:
                row["max_err_vs_fp32"], row["mean_err_vs_fp32"] = gap(logprobs, exact, action)
            rows.append(row)
        engine.release_memory()
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    bf16 = "max_err_vs_fp32" in rows[0]
    print(f"\n{title}")
    print(f"{'path':<38} {'tokens':>6} {'max gap':>9} {'mean gap':>9}" + (" {:>11} {:>11}".format(
        "max err f32", "mean err f32") if bf16 else ""))
    for r in rows:
        line = f"{r['path']:<38} {r['tokens']:>6} {r['max_gap']:>9.2e} {r['mean_gap']:>9.2e}"
        if bf16:
            line += f" {r['max_err_vs_fp32']:>11.2e} {r['mean_err_vs_fp32']:>11.2e}"
        print(line, flush=True)


def real_model(args) -> None:
    path = args.model or str(real_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids, mask = chat_batch(tokenizer, QUESTIONS)
    reference = None
    for dtype_name in args.dtypes:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name]).eval()
        if dtype_name != "fp32":
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name]).float().eval()
        for sample in (False, True):
            rows = measure(model, reference, ids, mask, args.new_tokens, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, sample, args.per_op)
            print_rows(f"{os.path.basename(path.rstrip('/'))} {dtype_name}, {'sampled (T=1)' if sample else 'greedy'}"
                       f", batch {len(ids)}, up to {args.new_tokens} new tokens, EOS stop", rows)


def toy_models(args) -> None:
    import tempfile
    from pathlib import Path

    for dtype_name in args.dtypes:
        worst: dict[str, list[float]] = {}
        for name in sorted(CONFIGS):
            with tempfile.TemporaryDirectory() as tmp:
                model = tiny_model(name, Path(tmp), dtype=DTYPES[dtype_name])
                reference = tiny_model(name, Path(tmp), dtype=DTYPES[dtype_name]).float() if dtype_name != "fp32" \
                    else None
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            ids, mask = left_padded_prompts([7, 3, 5, 1], pad)
            for row in measure(model, reference, ids, mask, 12, [], pad, sample=False):
                w = worst.setdefault(row["path"], [0.0] * 2)
                w[0] = max(w[0], row["max_gap"])
                w[1] = max(w[1], row.get("max_err_vs_fp32", 0.0))
        print(f"\ntoy configs ({', '.join(sorted(CONFIGS))}) {dtype_name}: worst over the configs, 4 rows x 12 greedy "
              "tokens")
        for path, (max_gap, max_err) in worst.items():
            print(f"{path:<38} max gap {max_gap:.2e}" + (f"  max err vs fp32 {max_err:.2e}" if max_err else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a Llama-family checkpoint directory with a chat template (default: "
                   "SmolLM2-135M-Instruct, converted on first use)")
    p.add_argument("--toy", action="store_true", help="measure the tiny configs of tests/hf_models.py instead")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--new-tokens", type=int, default=24, help="answer budget (default 24)")
    p.add_argument("--per-op", action="store_true", help="also swap each prefill op's C++ twin into the torch "
                   "kernels, one at a time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    toy_models(args) if args.toy else real_model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
