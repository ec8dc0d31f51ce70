"""The Triton kernels (kernels="triton") against the torch references.

Where the session runs Triton interpreted (no GPU: tests/conftest.py sets TRITON_INTERPRET), the `interp` cases
run the kernels on CPU tensors, in fp32 and fp16 (Triton 3.9's interpreter gets bf16 arithmetic wrong, so bf16
runs on the GPU only); where it runs them compiled (a GPU), the `cuda` cases, marked `gpu`, do. Each kind is
skipped, with the reason, where the other runs (tests/README.md).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("hybrid_engine.kernels")
from hybrid_engine import ops as ops_lib  # noqa: E402
from hybrid_engine.kernels import attention  # noqa: E402
from tests import op_testing as testing  # noqa: E402

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
       pytest.mark.skipif(kernels.INTERPRETED, reason="TRITON_INTERPRET is set: the kernels are not compiled")]
CASES = [pytest.param(("cpu", dtype), id=f"interp-{str(dtype)[6:]}", marks=pytest.mark.triton_cpu)
         for dtype in (torch.float32, torch.float16)]
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


@pytest.mark.parametrize("D,T,Hkv,group,window", [(64, 7, 2, 2, None), (128, 33, 3, 4, None), (64, 40, 2, 3, 5),
                                                  (256, 37, 2, 2, None)])
def test_prefill_attention_several_kv_heads(backend, D, T, Hkv, group, window):
    """Query head h reads kv head h // group (one kv head hides a wrong index); head dim 256 runs fp32's
    smallest tiles (32x16, tile_sizes) over several key blocks."""
    ops, device, dtype = backend
    testing.check_prefill(ops, device, dtype, B=2, H=Hkv * group, Hkv=Hkv, T=T, D=D, window=window, seed=T + D)


@pytest.mark.parametrize("D,rot,T", [(48, 48, 1), (80, 40, 7), (48, None, 7)])
def test_rotary_kv_append_at_per_row_offsets(backend, D, rot, T):
    ops, device, dtype = backend
    testing.check_rotary_kv_append_rows(ops, device, dtype, B=3, T=T, H=8, Hkv=2, D=D, rot=rot, seed=T + D)


@pytest.mark.parametrize("D,T,Hkv,group,window", [(48, 1, 1, 4, None), (48, 7, 2, 3, None), (64, 40, 2, 3, 5),
                                                  (80, 40, 1, 4, None)])
def test_prefill_attention_at_per_row_offsets(backend, D, T, Hkv, group, window):
    """Each row's queries at its own offset after its cached keys (continued rows), one row's block past them."""
    ops, device, dtype = backend
    testing.check_prefill_rows(ops, device, dtype, B=3, H=Hkv * group, Hkv=Hkv, T=T, D=D, window=window, seed=T)


@pytest.mark.parametrize("L,splits", [(7, 0), (113, 0), (113, 3)])
def test_decode_attention_at_per_row_slots(backend, L, splits):
    ops, device, dtype = backend
    testing.check_decode(ops, device, dtype, B=3, H=8, Hkv=2, L=L, D=48, seed=L, ragged=True, num_splits=splits)


@pytest.mark.parametrize("D,L,group,splits", [(48, 1, 1, 0), (80, 7, 4, 0), (48, 113, 8, 0), (80, 700, 4, 0),
                                              (80, 113, 4, 1), (48, 113, 1, 3), (256, 70, 2, 0), (256, 700, 2, 40)])
def test_decode_attention(backend, D, L, group, splits):
    """splits 0: the kernel's own choice (2 and 4 pieces at lengths 113 and 700 interpreted); 40 asked at length
    700 gives 22 pieces of 32 slots (interpreted, and fp32 on a GPU): two steps of the reduce kernel's 16."""
    ops, device, dtype = backend
    testing.check_decode(ops, device, dtype, B=3, H=2 * group, Hkv=2, L=L, D=D, seed=L + D, num_splits=splits)


@pytest.mark.parametrize("D,T,Hkv,group,window", [(48, 7, 1, 4, None), (40, 37, 2, 3, 5)])
def test_prefill_attention_softcap(backend, D, T, Hkv, group, window):
    """Gemma 2's attention logit soft-capping, on odd head dims, GQA and a window (tiny shapes: interpreted)."""
    ops, device, dtype = backend
    testing.check_prefill(ops, device, dtype, B=2, H=Hkv * group, Hkv=Hkv, T=T, D=D, window=window, seed=T + D,
                          softcap=0.9)


@pytest.mark.parametrize("D,L,group,splits", [(24, 7, 3, 0), (40, 113, 4, 3)])
def test_decode_attention_softcap(backend, D, L, group, splits):
    """Soft-capped decode, one piece and three (each piece's max and sum are of the capped scores)."""
    ops, device, dtype = backend
    testing.check_decode(ops, device, dtype, B=3, H=2 * group, Hkv=2, L=L, D=D, seed=L + D, softcap=0.9,
                         num_splits=splits)


@pytest.mark.parametrize("shape,splits,dim,world,rank", [((48, 5), (16, 8, 24), 0, 2, 1),
                                                         ((3, 40, 7), (24, 16), 1, 4, 3)])
def test_tp_pack_unpack(backend, shape, splits, dim, world, rank):
    ops, device, dtype = backend
    testing.check_tp(ops, device, dtype, shape, splits, world, rank, dim)


def test_empty_batch(backend):
    ops, device, dtype = backend
    testing.check_empty_batch(ops, device, dtype)


# (dtype, head dim, decode group or None for prefill) -> (tiles, smem_bytes) worked out by hand from smem_bytes'
# formula: elem * BLOCK_D * (BLOCK_M + 2 * 2 * BLOCK_N) + 4 * BLOCK_M * BLOCK_N.
TILES = {
    (torch.float32, 256, None): ((32, 16, 256), 4 * 256 * (32 + 64) + 4 * 32 * 16),  # 100352
    (torch.bfloat16, 256, None): ((32, 64, 256), 2 * 256 * (32 + 256) + 4 * 32 * 64),  # 155648
    (torch.float32, 128, None): ((32, 64, 128), 4 * 128 * (32 + 256) + 4 * 32 * 64),  # 155648
    (torch.bfloat16, 128, None): ((64, 64, 128), 2 * 128 * (64 + 256) + 4 * 64 * 64),  # 98304
    (torch.float16, 48, None): ((64, 64, 64), 2 * 64 * (64 + 256) + 4 * 64 * 64),  # 57344
    (torch.float32, 256, 4): ((16, 32, 256), 4 * 256 * (16 + 128) + 4 * 16 * 32),  # 149504
    (torch.bfloat16, 256, 8): ((16, 64, 256), 2 * 256 * (16 + 256) + 4 * 16 * 64),  # 143360
    (torch.float32, 80, 8): ((16, 64, 128), 4 * 128 * (16 + 256) + 4 * 16 * 64),  # 143360
}


@pytest.mark.parametrize("key", TILES, ids=lambda k: f"{str(k[0])[6:]}-D{k[1]}-{'decode' if k[2] else 'prefill'}")
def test_attention_tiles_fit_shared_memory(key):
    """fp32 at head dim 256 once took 32x64 tiles, 296 KB of shared memory: past an H100's 227 KB."""
    tiles, nbytes = TILES[key]
    dtype, head_dim, group = key
    assert attention.tile_sizes(dtype, head_dim, group) == tiles
    assert attention.smem_bytes(*tiles, dtype) == nbytes
    assert nbytes <= 163 * 1024 < 227 * 1024  # an A100's limit, and an H100/H200's


# Compiles the attention kernels for sm_80 without a GPU (Triton ships ptxas) and prints their shared memory.
_COMPILE = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybrid_engine.kernels import attention as A
dtype, D, G = torch.float32, 256, 4
ptrs = lambda names: {n: "*fp32" for n in names.split()}
ints = lambda names, ty="i32": {n: ty for n in names.split()}
consts = lambda **c: ({n: "constexpr" for n in c}, c)
bm, bn, bd = A.tile_sizes(dtype, D)
sig, c = consts(HAS_WINDOW=False, Q_START=False, UPCAST=True, SOFTCAP=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
prefill = (A._prefill_kernel, {**ptrs("q_ptr k_ptr v_ptr"), "mask_ptr": "*u8", "o_ptr": "*fp32", "qs_ptr": "*i64",
           **ints("T TK H G D"), "scale": "fp32", "window": "i32", "softcap": "fp32",
           **ints("sq_b sq_h sq_t sk_b sk_h sk_t sv_b sv_h sv_t sm_b", "i64"), **sig}, c)
bg, bn, bd = A.tile_sizes(dtype, D, G)
sig, c = consts(UPCAST=True, SOFTCAP=True, BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=bd)
decode = (A._decode_kernel, {**ptrs("q_ptr k_ptr v_ptr"), "mask_ptr": "*u8", **ptrs("o_ptr part_ptr ml_ptr"),
          **ints("length chunk splits H G D"), "scale": "fp32", "softcap": "fp32",
          **ints("sq_b sq_h sk_b sk_h sk_s sv_b sv_h sv_s sm_b", "i64"), **sig}, c)
sig, c = consts(BLOCK_S=16, BLOCK_D=bd)
reduce = (A._decode_reduce_kernel, {**ptrs("part_ptr ml_ptr o_ptr"), **ints("D splits"), **sig}, c)
shared = {}
for name, (fn, signature, constexprs) in {"prefill": prefill, "decode": decode, "reduce": reduce}.items():
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 80, 32),
                            options={"num_stages": A.NUM_STAGES, "num_warps": 4})
    shared[name] = kernel.metadata.shared
print(json.dumps(shared))
"""


def test_fp32_head_dim_256_compiles_within_an_a100s_shared_memory(tmp_path):
    """The real compiler's count, not the estimate: the fp32 head-dim-256 kernels built for sm_80 (the run-time
    split count among the decode kernels' arguments) need at most the 163 KB an A100 gives a block."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    if run.returncode and "ptxas" in run.stderr:
        pytest.skip(f"Triton cannot build for sm_80 here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-2000:]
    shared = json.loads(run.stdout.strip().splitlines()[-1])
    assert shared["prefill"] <= 163 * 1024 and shared["decode"] <= 163 * 1024, shared


@pytest.mark.triton_cpu
def test_ops_are_traceable():
    """Each kernel is a torch.library op whose fake implementation gives the output's shape and dtype (on fake
    CPU tensors: the decode's split choice asks a CUDA device for its SM count unless interpreted)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 48, dtype=torch.float16)
        cache = torch.empty(3, 2, 20, 48, dtype=torch.float16)
        out = torch.ops.hybrid_engine.decode_attention(q, cache, cache, torch.ones(3, 20, dtype=torch.bool), 9,
                                                       0.1, 0.0, 0)
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
