"""What every Triton kernel host function shares: the interpreter switch and block-size helpers."""
import os

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch.library import wrap_triton

# Decided when the kernels are decorated (triton reads TRITON_INTERPRET in @triton.jit): set it before
# importing hybrid_engine.kernels to run the kernels on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel computes in fp32 right after tl.load.

    Always under the interpreter (Triton 3.9's interpreter gets bf16 arithmetic and bf16 tl.dot wrong; a bf16
    dot was off by ~1e11) and for fp32 inputs (whose dots must be exact IEEE, not TF32: logprobs are held to
    1e-5). On a GPU, bf16/fp16 dots run on tensor cores with fp32 accumulation.
    """
    return INTERPRETED or dtype == torch.float32


def block(n: int, least: int = 16) -> int:
    """The power-of-two block covering n, at least `least` (tl.dot needs 16 in each dim)."""
    return max(least, triton.next_power_of_2(n))


def check(cond: bool, op: str, what: str) -> None:
    if not cond:
        raise ValueError(f"hybrid_engine.kernels.{op}: {what}")


def launch(kernel, grid):
    """`wrap_triton(kernel)[grid]`: traceable by torch.compile. Interpreted kernels are plain Python, which
    wrap_triton passes through untraced, so under fake tensors (the fake implementation of every op is its host
    function run on them) the launch is skipped here: only output shapes and dtypes are wanted then."""
    run = wrap_triton(kernel)[grid]
    if not INTERPRETED:
        return run

    def run_unless_fake(*args, **kwargs):
        if not any(isinstance(a, FakeTensor) for a in args):
            run(*args, **kwargs)

    return run_unless_fake
