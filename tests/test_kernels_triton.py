"""The Triton kernels (kernels="triton") against the torch references.

Without a GPU they run under Triton's interpreter on CPU tensors, in fp32 and fp16 (Triton 3.9's
interpreter gets bf16 arithmetic wrong, so bf16 runs on the GPU only, marked `gpu`). TRITON_INTERPRET is read
when the kernels are decorated, so it is set here, before hybrid_engine.kernels is first imported; it is left
set: on a machine without a GPU nothing else can run Triton kernels anyway.
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("hybrid_engine.kernels")
from hybrid_engine import ops as ops_lib  # noqa: E402
from hybrid_engine.ops import testing  # noqa: E402

if not HAS_CUDA and not kernels.INTERPRETED:
    pytest.skip("hybrid_engine.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
CASES = [pytest.param(("cpu", dtype), id=f"interp-{str(dtype)[6:]}", marks=pytest.mark.skipif(
    HAS_CUDA, reason="interpreter runs only where there is no GPU")) for dtype in (torch.float32, torch.float16)]
CASES += [pytest.param(("cuda", dtype), id=f"cuda-{str(dtype)[6:]}", marks=GPU)
          for dtype in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.fixture(params=CASES)
def backend(request):
    device, dtype = request.param
    return ops_lib.select("triton", device), device, dtype


@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 7, 80), (3, 5, 384)])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_norms(backend, shape, rms, residual):
    ops, device, dtype = backend
    testing.check_norm(ops, device, dtype, shape, rms, residual, bias=shape[-1] != 80, seed=shape[1])


@pytest.mark.parametrize("D,rot,T,group", [(48, 48, 1, 1), (80, 40, 7, 4), (80, 80, 113, 8), (48, None, 7, 8)])
def test_rotary_kv_append(backend, D, rot, T, group):
    ops, device, dtype = backend
    testing.check_rotary_kv_append(ops, device, dtype, B=2, T=T, H=2 * group, Hkv=2, D=D, rot=rot, seed=T + D)


@pytest.mark.parametrize("D,T,group,window", [(48, 1, 1, None), (80, 7, 4, None), (48, 113, 8, None),
                                              (80, 113, 1, 5), (48, 7, 8, 5)])
def test_prefill_attention(backend, D, T, group, window):
    ops, device, dtype = backend
    testing.check_prefill(ops, device, dtype, B=2, H=group, Hkv=1, T=T, D=D, window=window, seed=T * D + group)


@pytest.mark.parametrize("D,L,group,splits", [(48, 1, 1, 0), (80, 7, 4, 0), (48, 113, 8, 0), (80, 700, 4, 0),
                                              (80, 113, 4, 1), (48, 113, 1, 3)])
def test_decode_attention(backend, D, L, group, splits):
    """splits 0: the kernel's own choice (2 and 4 pieces at lengths 113 and 700 interpreted)."""
    ops, device, dtype = backend
    testing.check_decode(ops, device, dtype, B=3, H=2 * group, Hkv=2, L=L, D=D, seed=L + D, num_splits=splits)


@pytest.mark.parametrize("shape,splits,dim,world,rank", [((48, 5), (16, 8, 24), 0, 2, 1),
                                                         ((3, 40, 7), (24, 16), 1, 4, 3)])
def test_tp_pack_unpack(backend, shape, splits, dim, world, rank):
    ops, device, dtype = backend
    testing.check_tp(ops, device, dtype, shape, splits, world, rank, dim)


def test_ops_are_traceable():
    """Each kernel is a torch.library op whose fake implementation gives the output's shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 48, dtype=torch.float16)
        cache = torch.empty(3, 2, 20, 48, dtype=torch.float16)
        out = torch.ops.hybrid_engine.decode_attention(q, cache, cache, torch.ones(3, 20, dtype=torch.bool), 9,
                                                       0.1, 0)
        assert out.shape == (2, 8, 48) and out.dtype == torch.float16
        x = torch.empty(4, 80, dtype=torch.bfloat16)
        out, summed = torch.ops.hybrid_engine.rms_norm_residual(x, torch.empty(80), 1e-6, x)
        assert out.dtype == torch.float32 and summed.dtype == torch.bfloat16
        qq = torch.empty(2, 7, 8, 48)
        kv = torch.empty(2, 7, 2, 48)
        out = torch.ops.hybrid_engine.rotary_kv_append(qq, kv, kv, torch.empty(2, 7, 48), torch.empty(2, 7, 48),
                                                       cache.float(), cache.float(), 3)
        assert out.shape == qq.shape


@pytest.mark.skipif(sys.platform != "linux", reason="Triton runs on Linux")
def test_interpreted_triton_is_never_chosen_automatically():
    assert all(backend != "triton" for backend, _ in ops_lib.backends("auto", "cpu").values())
