"""Session-wide set-up for the tests.

Without a GPU, the Triton kernels can only run under Triton's interpreter, and TRITON_INTERPRET must be set
before anything imports triton: torch._dynamo (imported by peft, among others) brings triton in, after which
setting it makes interpreted kernels fail ("Cannot call @triton.jit'd outside of the scope of a kernel").
The engine never picks interpreted Triton by itself, so no other test is affected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
