"""Each op under each backend that loads here, against the torch reference timed in the same run.

    python benchmarks/kernel_speed.py                          # CPU, fp32, decode shapes of the default 15M model
    python benchmarks/kernel_speed.py --engine                 # ... and the engine's decode step per backend
    python benchmarks/kernel_speed.py --device cuda --dtype bf16 --batch 64 --heads 32 --kv-heads 8 --head-dim 64 \
        --hidden 2048 --cache-len 512

Shapes default to the throughput benchmark's model at batch 8 (hidden 384, 6 heads of 64, 2 kv heads; a
cache of 128 slots, a 64-token prompt). CPU times: median of `--repeats` rounds of back-to-back calls, each
round timed with perf_counter; GPU: triton.testing.do_bench (median, after warm-up). Ratios are torch's time
over the backend's (>1 is faster). Inputs are random, never zeros.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hybrid_engine import ops as ops_lib  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_cases(a, device, dtype) -> dict:
    """{op label: (op name, args)} at the requested shapes; caches and TP buffers preallocated once."""
    B, H, Hkv, D, L, T, N = a.batch, a.heads, a.kv_heads, a.head_dim, a.cache_len, a.prompt_len, a.hidden

    def r(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    x, res, w, b = r(B, 1, N), r(B, 1, N), r(N), r(N)
    k_cache, v_cache = r(B, Hkv, L + 1, D), r(B, Hkv, L + 1, D)
    mask = torch.ones(B, L + 1, dtype=torch.bool, device=device)
    mask[: B // 2, : L // 4] = False  # half the rows left padded
    angles = torch.randn(B, 1, D // 2, device=device)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    qkv_rows = (H + 2 * Hkv) * D
    full = r(qkv_rows, N)
    shard = torch.empty(qkv_rows // 2, N, device=device, dtype=dtype)
    pmask = mask[:, :T].clone()
    return {
        "rms_norm+residual": ("rms_norm", (x, w, 1e-6, res)),
        "layer_norm+residual": ("layer_norm", (x, w, b, 1e-5, res)),
        "rotary_kv_append T=1": ("rotary_kv_append", (r(B, 1, H, D), r(B, 1, Hkv, D), r(B, 1, Hkv, D), cos, sin,
                                                      k_cache, v_cache, L)),
        f"decode_attention L={L}": ("decode_attention", (r(B, H, D), k_cache, v_cache, mask, L, D ** -0.5)),
        f"prefill_attention T={T}": ("prefill_attention", (r(B, H, T, D), r(B, Hkv, T, D), r(B, Hkv, T, D), pmask,
                                                           D ** -0.5)),
        "tp_pack qkv world=2": ("tp_pack", (full, shard, 1, 2, (H * D, Hkv * D, Hkv * D), 0)),
    }


def time_cpu(fn, args, repeats: int, calls: int) -> float:
    for _ in range(calls):
        fn(*args)
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        rounds.append((time.perf_counter() - t0) / calls)
    return statistics.median(rounds)


def time_cuda(fn, args) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*args), return_mode="median") * 1e-3


def available_backends(device: str) -> list[str]:
    names = []
    for name in ("torch", "cpu", "triton", "cuda"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ops_lib.select(name, device)
            names.append(name)
        except ops_lib.BackendError as err:
            print(f"# {name}: not available ({err})")
    return names


def engine_decode(a, backends: list[str]) -> None:
    """The engine's decode (generate N tokens minus generate 1) under each CPU-side backend, interleaved in one
    run with the throughput benchmark's model and prompts, so load elsewhere falls on every side alike."""
    from throughput import build_model, prompts, timed

    import hybrid_engine

    seq_len = a.prompt_len + a.new_tokens
    model = build_model(a.model_size, DTYPES[a.dtype], a.device, seq_len)
    ids, mask = prompts(a.batch, a.prompt_len, model.config.vocab_size, a.device)
    fns = {}
    for backend in backends:
        engine = hybrid_engine.wrap(model, max_seq_len=seq_len, max_batch_size=a.batch, kernels=backend).eval()
        for n in (1, a.new_tokens):
            fns[(backend, n)] = (lambda e=engine, n=n: e.generate(ids, mask, max_new_tokens=n, eos_token_id=[]))
    with torch.inference_mode():
        secs, outs = timed(fns, a.device, a.repeats)
    base = outs[("torch", a.new_tokens)].sequences
    torch_step = (secs[("torch", a.new_tokens)] - secs[("torch", 1)]) / (a.new_tokens - 1)
    print(f"engine decode, {a.model_size} model, batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens")
    print(f"{'backend':<9}{'step ms':>9}{'vs torch':>10}  tokens equal to torch's")
    for backend in backends:
        step = (secs[(backend, a.new_tokens)] - secs[(backend, 1)]) / (a.new_tokens - 1)
        same = torch.equal(outs[(backend, a.new_tokens)].sequences, base)
        print(f"{backend:<9}{step * 1e3:>9.2f}{torch_step / step:>9.2f}x  {same}")


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--cache-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement, median kept (CPU)")
    p.add_argument("--calls", type=int, default=200, help="calls per timed round (CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--engine", action="store_true", help="also time the engine's decode under each backend")
    p.add_argument("--model-size", default="15m", help="throughput.py's model for --engine (default 15m)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row for --engine")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = DTYPES[a.dtype]
    backends = available_backends(a.device)
    cases = make_cases(a, a.device, dtype)
    print(f"device {a.device}, {a.dtype}, threads {torch.get_num_threads()}; B={a.batch} H={a.heads} "
          f"Hkv={a.kv_heads} D={a.head_dim} hidden={a.hidden} cache={a.cache_len} prompt={a.prompt_len}")
    print(f"{'op':<26}{'backend':<9}{'impl':<8}{'time us':>10}{'vs torch':>10}")
    for label, (name, args) in cases.items():
        base = None
        for backend in backends:
            chosen = ops_lib.select(backend, a.device)
            impl = chosen.choices[name][0]
            fn = getattr(chosen, name)
            t = time_cuda(fn, args) if a.device == "cuda" else time_cpu(fn, args, a.repeats, a.calls)
            base = t if backend == "torch" else base
            print(f"{label:<26}{backend:<9}{impl:<8}{t * 1e6:>10.1f}{base / t:>9.2f}x")
    if a.engine:
        engine_decode(a, [b for b in backends if b != "triton" or a.device == "cuda"])


if __name__ == "__main__":
    main()
