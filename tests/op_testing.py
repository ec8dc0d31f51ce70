"""Checks of one backend's ops against the torch references, shared by the CPU, Triton and CUDA tests.

Every check draws fresh random data (never zeros), poisons what the op writes (caches, TP buffers, and
the allocator's free memory before ops that allocate their output) with NaN, and compares:
  * fp32: to the fp32 reference within `FP32_TOL`;
  * bf16 / fp16: the error against the fp32 reference is at most 2x the error of PyTorch's own
    low-precision run of the reference (plus 1e-6 for results both get exactly right).
"""
from __future__ import annotations

import torch

from hybrid_engine.ops import reference

FP32_TOL = {"atol": 2e-5, "rtol": 1e-5}


def _rand(*shape, device, dtype=torch.float32, gen=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def poison_allocator(device, nbytes: int = 1 << 22) -> None:
    """Fill then free a NaN block, so an output allocated next likely starts as NaN rather than zeros."""
    torch.full((nbytes // 4,), float("nan"), device=device).sum()


def assert_matches(name: str, out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor | None) -> None:
    """out (any dtype) against the fp32 reference; in low precision bounded by 2x torch's own error."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref32, **FP32_TOL, equal_nan=True, msg=lambda m: f"{name}: {m}")
        return
    nan = ref32.isnan()
    assert torch.equal(out.isnan(), nan), f"{name}: NaN where the reference has none (or the reverse)"
    err = (out.float() - ref32).masked_fill(nan, 0).abs().max().item()
    base = (ref_lowp.float() - ref32).masked_fill(nan, 0).abs().max().item()
    assert err <= 2 * base + 1e-6, f"{name}: {out.dtype} error {err:.3g} > 2x torch's own {base:.3g}"


def _lowp(t: torch.Tensor | None, dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def check_norm(ops, device, dtype, shape, rms: bool, residual: bool, bias: bool = True, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x, res = _rand(*shape, device=device, gen=gen), _rand(*shape, device=device, gen=gen)
    w, b = _rand(N, device=device, gen=gen), _rand(N, device=device, gen=gen)
    args32 = (x, w, 1e-6) if rms else (x, w, b if bias else None, 1e-5)
    argsl = tuple(_lowp(a, dtype) if isinstance(a, torch.Tensor) else a for a in args32)
    fn, ref = (ops.rms_norm, reference.rms_norm) if rms else (ops.layer_norm, reference.layer_norm)
    kw32 = {"residual": res} if residual else {}
    kwl = {"residual": res.to(dtype)} if residual else {}
    poison_allocator(device)
    out = fn(*argsl, **kwl)
    want32, wantl = ref(*args32, **kw32), ref(*argsl, **kwl)
    if residual:
        assert_matches("norm out", out[0], want32[0], wantl[0])
        assert_matches("norm x + residual", out[1], want32[1], wantl[1])
    else:
        assert_matches("norm out", out, want32, wantl)


def check_rotary_kv_append(ops, device, dtype, B, T, H, Hkv, D, rot: int | None, seed: int = 0) -> None:
    """rot: rotary_dim (None: no rotary). Caches hold B + 1 rows and T + 6 slots, written at start=3."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_rand(B, T, h, D, device=device, gen=gen) for h in (H, Hkv, Hkv))
    cos = sin = None
    if rot:
        angles = _rand(B, T, rot // 2, device=device, gen=gen) * 3
        cos = torch.cat([angles.cos()] * 2, dim=-1) * 1.1  # (B, T, rot), scaled as some ropes are
        sin = torch.cat([angles.sin()] * 2, dim=-1) * 1.1
    start, S = 3, T + 6

    def run(fn, cast):
        k_cache = torch.full((B + 1, Hkv, S, D), float("nan"), device=device, dtype=cast)
        v_cache = torch.full_like(k_cache, float("nan"))
        q_out = fn(q.to(cast), k.to(cast), v.to(cast), _lowp(cos, cast), _lowp(sin, cast), k_cache, v_cache, start)
        return q_out, k_cache, v_cache

    poison_allocator(device)
    got = run(ops.rotary_kv_append, dtype)
    want32 = run(reference.rotary_kv_append, torch.float32)
    wantl = run(reference.rotary_kv_append, dtype)
    for name, g, w32, wl in zip(("q", "k_cache", "v_cache"), got, want32, wantl):
        assert_matches(f"rotary_kv_append {name}", g, w32, wl)


def check_rotary_kv_append_rows(ops, device, dtype, B, T, H, Hkv, D, rot: int | None, seed: int = 0) -> None:
    """Per-row offsets (continued rows): row b writes at start + row_start[b]; the last row's block runs past the
    cache's end, whose slots must be skipped (not written, no error). Caches hold B + 1 rows and T + 6 slots."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_rand(B, T, h, D, device=device, gen=gen) for h in (H, Hkv, Hkv))
    cos = sin = None
    if rot:
        angles = _rand(B, T, rot // 2, device=device, gen=gen) * 3
        cos = torch.cat([angles.cos()] * 2, dim=-1)
        sin = torch.cat([angles.sin()] * 2, dim=-1)
    start, S = 1, T + 6
    row_start = torch.randint(0, 6, (B,), generator=gen)
    row_start[-1] = S - start - max(1, T // 2)  # its last slots fall past S_max
    row_start = row_start.to(device)

    def run(fn, cast):
        k_cache = torch.full((B + 1, Hkv, S, D), float("nan"), device=device, dtype=cast)
        v_cache = torch.full_like(k_cache, float("nan"))
        q_out = fn(q.to(cast), k.to(cast), v.to(cast), _lowp(cos, cast), _lowp(sin, cast), k_cache, v_cache, start,
                   row_start)
        return q_out, k_cache, v_cache

    poison_allocator(device)
    got = run(ops.rotary_kv_append, dtype)
    want32 = run(reference.rotary_kv_append, torch.float32)
    wantl = run(reference.rotary_kv_append, dtype)
    assert want32[1][-1].isnan().all(), "the reference wrote a row past B"
    for name, g, w32, wl in zip(("q", "k_cache", "v_cache"), got, want32, wantl):
        assert_matches(f"rotary_kv_append(row_start) {name}", g, w32, wl)


def check_prefill_rows(ops, device, dtype, B, H, Hkv, T, D, window: int | None = None, seed: int = 0) -> None:
    """A block of T queries per row at its own offset q_start[b] after that row's cached keys (continued rows):
    keys are the first Tk slots of a cache, real from the row's left pad to the end of its block (a right-padded
    block's pads, and everything after, not real); one row's block runs past Tk (its pads past the keys given)."""
    gen = torch.Generator().manual_seed(seed)
    Tk = T + 9
    q = _rand(B, H, T, D, device=device, gen=gen)
    k, v = (_rand(B, Hkv, Tk, D, device=device, gen=gen) for _ in range(2))
    q_start = torch.randint(1, 9, (B,), generator=gen)
    q_start[-1] = Tk - max(1, T // 2)  # past the keys: its last queries have no key of their own
    lengths = torch.randint(1, T + 1, (B,), generator=gen).minimum(Tk - q_start)   # real queries per row
    slots = torch.arange(Tk)
    pads = torch.randint(0, 2, (B,), generator=gen)
    mask = (slots[None] >= pads[:, None]) & (slots[None] < (q_start + lengths)[:, None])
    mask, q_start = mask.to(device), q_start.to(device)
    scale = D ** -0.5
    poison_allocator(device)
    out = ops.prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale, window, q_start=q_start)
    want32 = reference.prefill_attention(q, k, v, mask, scale, window, q_start=q_start)
    wantl = reference.prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale, window, q_start=q_start)
    assert_matches("prefill_attention(q_start)", out, want32, wantl)


def left_padded_mask(B: int, S: int, real: int, device, gen) -> torch.Tensor:
    """(B, S) bool: row b has its last `real - pads_b` slots of the first `real` real, pads_b < real."""
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        pads = int(torch.randint(0, max(1, real // 2 + 1), (1,), generator=gen)) if b else 0  # row 0 unpadded
        mask[b, pads:real] = True
    return mask.to(device)


def assert_softcap_bites(name: str, capped: torch.Tensor, uncapped: torch.Tensor) -> None:
    """Soft-capping must change the reference's output, or a kernel that ignores it would pass."""
    moved = (capped - uncapped).nan_to_num().abs().max().item()
    assert moved > 1e-2, f"{name}: softcap moved the reference by {moved:.1e} only: a weak test"


def check_prefill(ops, device, dtype, B, H, Hkv, T, D, window: int | None = None, seed: int = 0,
                  softcap: float = 0.0) -> None:
    """softcap > 0: scores soft-capped (scale 2/sqrt(D) spreads them past it: both branches of a tanh are run)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_rand(B, h, T, D, device=device, gen=gen) for h in (H, Hkv, Hkv))
    mask = left_padded_mask(B, T, T, device, gen)
    scale = (2.0 if softcap else 1.0) * D ** -0.5
    poison_allocator(device)
    out = ops.prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale, window, softcap=softcap)
    want32 = reference.prefill_attention(q, k, v, mask, scale, window, softcap=softcap)
    wantl = reference.prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale, window, softcap=softcap)
    if softcap and T > 1:
        assert_softcap_bites("prefill_attention", want32, reference.prefill_attention(q, k, v, mask, scale, window))
    assert_matches("prefill_attention", out, want32, wantl)


def check_decode(ops, device, dtype, B, H, Hkv, L, D, seed: int = 0, softcap: float = 0.0, ragged: bool = False,
                 **kwargs) -> None:
    """Caches of B + 1 rows and L + 5 slots (the slots past `length` hold NaN: they must not be read). softcap > 0:
    scores soft-capped, at twice the usual scale so that they reach past it. ragged: each row's real slots end at
    its own slot (continued rows at per-row slots), the slots after it masked."""
    gen = torch.Generator().manual_seed(seed)
    q = _rand(B, H, D, device=device, gen=gen)
    k_cache = torch.full((B + 1, Hkv, L + 5, D), float("nan"), device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[:, :, :L] = _rand(B + 1, Hkv, L, D, device=device, gen=gen)
    v_cache[:, :, :L] = _rand(B + 1, Hkv, L, D, device=device, gen=gen)
    mask = left_padded_mask(B, L + 5, L, device, gen)
    if ragged:
        ends = torch.randint(1, L + 1, (B,), generator=gen).to(device)
        ends[0] = L
        mask &= torch.arange(L + 5, device=device)[None] < ends[:, None]
        mask[torch.arange(B, device=device), ends - 1] = True  # the row's own new token is always real
    scale = (2.0 if softcap else 1.0) * D ** -0.5
    if softcap:
        kwargs["softcap"] = softcap
    poison_allocator(device)
    out = ops.decode_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), mask, L, scale, **kwargs)
    want32 = reference.decode_attention(q, k_cache, v_cache, mask, L, scale, softcap)
    wantl = reference.decode_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), mask, L, scale, softcap)
    if softcap and L > 1:
        assert_softcap_bites("decode_attention", want32, reference.decode_attention(q, k_cache, v_cache, mask, L,
                                                                                    scale))
    assert_matches("decode_attention", out, want32, wantl)


def check_tp(ops, device, dtype, shape, splits, world, rank, dim, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    full = _rand(*shape, device=device, gen=gen).to(dtype)
    shard_shape = list(shape)
    shard_shape[dim] = sum(s // world for s in splits)
    shard = torch.full(shard_shape, float("nan"), device=device, dtype=dtype)
    got = ops.tp_pack(full, shard, rank, world, splits, dim)
    want = reference.tp_pack(full, torch.empty_like(shard), rank, world, splits, dim)
    assert got is shard and torch.equal(shard, want), "tp_pack"
    src = _rand(*shard_shape, device=device, gen=gen).to(dtype)
    back = torch.full_like(full, float("nan"))
    back_ref = back.clone()
    got = ops.tp_unpack(src, back, rank, world, splits, dim)
    reference.tp_unpack(src, back_ref, rank, world, splits, dim)
    assert got is back, "tp_unpack must return `full`"
    untouched = back_ref.isnan()
    assert torch.equal(back.isnan(), untouched), "tp_unpack wrote outside rank's parts (or missed some)"
    assert torch.equal(back[~untouched], back_ref[~untouched]), "tp_unpack values"


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def check_empty_batch(ops, device, dtype) -> None:
    """Every op with a batch of 0 rows returns what the reference returns for it (empty outputs of the same
    shapes and dtypes) and writes nothing: no launch, no division by the batch (the CUDA decode's split count
    divided by B * Hkv)."""
    gen = torch.Generator().manual_seed(0)
    H, Hkv, T, S, D, N = 4, 2, 5, 9, 16, 24

    def r(*shape):
        return _rand(*shape, device=device, gen=gen).to(dtype)

    x, w, b = r(0, 3, N), r(N), r(N)
    k_cache, v_cache = r(2, Hkv, S, D), r(2, Hkv, S, D)
    no_rows = torch.ones(0, S, dtype=torch.bool, device=device)
    calls = {
        "rms_norm": ("rms_norm", (x, w, 1e-6)),
        "rms_norm+residual": ("rms_norm", (x, w, 1e-6, x)),
        "layer_norm": ("layer_norm", (x, w, b, 1e-5)),
        "layer_norm+residual": ("layer_norm", (x, w, b, 1e-5, x)),
        "prefill_attention": ("prefill_attention", (r(0, H, T, D), r(0, Hkv, T, D), r(0, Hkv, T, D),
                                                    no_rows[:, :T], D ** -0.5)),
        "decode_attention": ("decode_attention", (r(0, H, D), k_cache, v_cache, no_rows, 5, D ** -0.5)),
    }
    for label, (name, args) in calls.items():
        got, want = (_outputs(getattr(impl, name)(*args)) for impl in (ops, reference))
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want], f"{label} with B=0"
    q, k, v = r(0, 1, H, D), r(0, 1, Hkv, D), r(0, 1, Hkv, D)
    cos, sin = r(0, 1, D), r(0, 1, D)
    caches = torch.full((2, 2, Hkv, S, D), float("nan"), device=device, dtype=dtype)
    q_out = ops.rotary_kv_append(q, k, v, cos, sin, caches[0], caches[1], 3)
    assert q_out.shape == q.shape and caches.isnan().all(), "rotary_kv_append with B=0 wrote to the cache"
    full, shard = r(0, 48), torch.full((0, 24), float("nan"), device=device, dtype=dtype)
    assert ops.tp_pack(full, shard, 1, 2, (16, 32), 1) is shard, "tp_pack with 0 rows must return `shard`"
    assert ops.tp_unpack(shard, full, 1, 2, (16, 32), 1) is full, "tp_unpack with 0 rows must return `full`"
