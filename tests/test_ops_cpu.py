"""The C++ CPU twins (kernels="cpu") against the torch references, fp32 and bf16, on odd shapes; and the
CUDA backend against the same references on a GPU (marked `gpu`, skipped without one)."""
import pytest
import torch

from hybrid_engine import ops as ops_lib
from hybrid_engine.ops import builder
from tests import op_testing as testing

HAS_CUDA = torch.cuda.is_available()
CASES = [pytest.param(("cpu", "cpu", torch.float32), id="cpu-fp32"),
         pytest.param(("cpu", "cpu", torch.bfloat16), id="cpu-bf16")]
CASES += [pytest.param(("cuda", "cuda", dtype), id=f"cuda-{str(dtype)[6:]}",
                       marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])
          for dtype in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.fixture(params=CASES)
def backend(request):
    name, device, dtype = request.param
    return ops_lib.select(name, device), device, dtype


@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 7, 80), (3, 113, 384)])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_norms(backend, shape, rms, residual):
    ops, device, dtype = backend
    testing.check_norm(ops, device, dtype, shape, rms, residual, bias=shape[-1] != 80, seed=shape[1])


@pytest.mark.parametrize("D,rot", [(48, 48), (80, 40), (80, 80), (48, None)])
@pytest.mark.parametrize("T", [1, 7, 113])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_rotary_kv_append(backend, D, rot, T, group):
    ops, device, dtype = backend
    testing.check_rotary_kv_append(ops, device, dtype, B=2, T=T, H=2 * group, Hkv=2, D=D, rot=rot, seed=T + D)


@pytest.mark.parametrize("D,rot", [(48, 48), (80, 40), (48, None)])
@pytest.mark.parametrize("T", [1, 7, 30])
def test_rotary_kv_append_at_per_row_offsets(backend, D, rot, T):
    ops, device, dtype = backend
    testing.check_rotary_kv_append_rows(ops, device, dtype, B=3, T=T, H=8, Hkv=2, D=D, rot=rot, seed=T + D)


@pytest.mark.parametrize("D", [48, 80])
@pytest.mark.parametrize("T", [1, 7, 40])
@pytest.mark.parametrize("Hkv,group", [(1, 4), (2, 3)])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_attention_at_per_row_offsets(backend, D, T, Hkv, group, window):
    ops, device, dtype = backend
    testing.check_prefill_rows(ops, device, dtype, B=3, H=Hkv * group, Hkv=Hkv, T=T, D=D, window=window, seed=T + D)


@pytest.mark.parametrize("L", [1, 7, 113])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_attention_at_per_row_slots(backend, L, group):
    ops, device, dtype = backend
    testing.check_decode(ops, device, dtype, B=3, H=2 * group, Hkv=2, L=L, D=48, seed=L + group, ragged=True)


@pytest.mark.parametrize("D", [48, 80])
@pytest.mark.parametrize("T", [1, 7, 113])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_attention(backend, D, T, group, window):
    ops, device, dtype = backend
    testing.check_prefill(ops, device, dtype, B=3, H=group, Hkv=1, T=T, D=D, window=window, seed=T * D + group)


@pytest.mark.parametrize("D,T,Hkv,group,window", [(64, 7, 2, 2, None), (128, 33, 3, 4, None), (64, 113, 2, 3, 5),
                                                  (128, 1, 3, 2, None)])
def test_prefill_attention_several_kv_heads(backend, D, T, Hkv, group, window):
    """Query head h reads kv head h // group: with one kv head a wrong kv-head index reads the right data."""
    ops, device, dtype = backend
    testing.check_prefill(ops, device, dtype, B=2, H=Hkv * group, Hkv=Hkv, T=T, D=D, window=window, seed=T + D)


@pytest.mark.parametrize("D,T,Hkv,group,window", [(48, 1, 1, 1, None), (80, 7, 1, 4, None), (40, 113, 2, 3, 5),
                                                  (24, 33, 3, 2, None)])
def test_prefill_attention_softcap(backend, D, T, Hkv, group, window):
    """Gemma 2's attention logit soft-capping (0.9, small enough that most scores pass through tanh's flat part)."""
    ops, device, dtype = backend
    testing.check_prefill(ops, device, dtype, B=3, H=Hkv * group, Hkv=Hkv, T=T, D=D, window=window, seed=T + D,
                          softcap=0.9)


@pytest.mark.parametrize("D,L,group", [(48, 1, 1), (80, 7, 4), (40, 113, 3), (24, 700, 8)])
def test_decode_attention_softcap(backend, D, L, group):
    ops, device, dtype = backend
    testing.check_decode(ops, device, dtype, B=3, H=2 * group, Hkv=2, L=L, D=D, seed=L + D, softcap=0.9)


@pytest.mark.parametrize("D", [48, 80])
@pytest.mark.parametrize("L", [1, 7, 113, 700])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_attention(backend, D, L, group):
    ops, device, dtype = backend
    testing.check_decode(ops, device, dtype, B=3, H=2 * group, Hkv=2, L=L, D=D, seed=L + D + group)


@pytest.mark.parametrize("shape,splits,dim", [((48, 5), (16, 8, 24), 0), ((3, 40, 7), (24, 16), 1),
                                              ((6, 64), (64,), -1)])
@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1), (4, 2)])
def test_tp_pack_unpack(backend, shape, splits, dim, world, rank):
    ops, device, dtype = backend
    testing.check_tp(ops, device, dtype, shape, splits, world, rank, dim)


def test_empty_batch(backend):
    ops, device, dtype = backend
    testing.check_empty_batch(ops, device, dtype)


def test_empty_batch_through_the_raw_extension():
    """The pybind11 functions themselves (ops/specs.py host functions wrap some) with B = 0: empty outputs,
    nothing written."""
    ext = builder.CpuOpsBuilder().load()
    x, w = torch.randn(0, 3, 8), torch.randn(8)
    assert ext.rms_norm(x, w, 1e-6).shape == (0, 3, 8)
    assert [t.shape for t in ext.rms_norm_residual(x, w, 1e-6, x)] == [(0, 3, 8)] * 2
    out, summed = ext.layer_norm(x, w, None, 1e-5, None)
    assert out.shape == (0, 3, 8) and summed is None
    assert [t.shape for t in ext.layer_norm(x, w, w, 1e-5, x)] == [(0, 3, 8)] * 2
    cache = torch.full((2, 2, 6, 8), float("nan"))
    q = ext.rotary_kv_append(torch.randn(0, 1, 4, 8), torch.randn(0, 1, 2, 8), torch.randn(0, 1, 2, 8),
                             torch.randn(0, 1, 8), torch.randn(0, 1, 8), cache, cache, 2)
    assert q.shape == (0, 1, 4, 8) and cache.isnan().all()
    mask = torch.ones(0, 6, dtype=torch.bool)
    assert ext.decode_attention(torch.randn(0, 4, 8), cache, cache, mask, 3, 0.5).shape == (0, 4, 8)
    qkv = torch.randn(3, 0, 4, 5, 8)
    assert ext.prefill_attention(qkv[0], qkv[1, :, :2], qkv[2, :, :2], mask[:, :5], 0.5, None).shape == (0, 4, 5, 8)
    shard = torch.empty(0, 4)
    assert ext.tp_pack(torch.randn(0, 8), shard, 1, 2, [8], 1) is shard


def test_cpu_twins_check_their_inputs():
    ops = ops_lib.select("cpu", "cpu")
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        ops.rms_norm(x.long(), torch.randn(8), 1e-6)
    q = torch.randn(2, 4, 16)
    cache = torch.randn(2, 2, 10, 16)
    with pytest.raises(RuntimeError, match="length must be in"):
        ops.decode_attention(q, cache, cache, torch.ones(2, 10, dtype=torch.bool), 11, 1.0)
    with pytest.raises(RuntimeError, match="key_mask must be bool"):
        ops.decode_attention(q, cache, cache, torch.ones(2, 10), 5, 1.0)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.decode_attention(q.half(), cache, cache, torch.ones(2, 10, dtype=torch.bool), 5, 1.0)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.rotary_kv_append(torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16), None,
                             None, cache, cache, 8)
    with pytest.raises(RuntimeError, match="multiple of world"):
        ops.tp_pack(torch.randn(10, 4), torch.empty(5, 4), 0, 2, (5, 5))


def test_cpu_twins_accept_strided_views():
    """The engine hands over views: q, k, v split from a fused QKV, k_cache[:B, :, :T] for prefill."""
    ops = ops_lib.select("cpu", "cpu")
    B, T, H, D = 2, 5, 4, 16
    qkv = torch.randn(B, T, H, 3, D)  # GPT-NeoX's per-head layout
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    cos, sin = torch.randn(B, T, D), torch.randn(B, T, D)
    caches = [torch.full((3, H, 9, D), float("nan")) for _ in range(4)]
    got = ops.rotary_kv_append(q, k, v, cos, sin, caches[0], caches[1], 0)
    want = ops_lib.reference.rotary_kv_append(q, k, v, cos, sin, caches[2], caches[3], 0)
    torch.testing.assert_close(got, want, **testing.FP32_TOL)
    mask = torch.ones(B, T, dtype=torch.bool)
    args = (got.transpose(1, 2), caches[0][:B, :, :T], caches[1][:B, :, :T], mask, D ** -0.5)
    torch.testing.assert_close(ops.prefill_attention(*args), ops_lib.reference.prefill_attention(*args),
                               **testing.FP32_TOL)
