"""Triton kernels of the inference path, each a `torch.library.triton_op` (so torch.compile traces through
them; the fake implementation is the host function run on fake tensors) with a host function of the
signature in hybrid_engine/ops/reference.py.

Importing this package decorates the kernels: set TRITON_INTERPRET=1 before it to run them on CPU tensors.
"""
from ._common import INTERPRETED
from .attention import decode_attention, prefill_attention
from .norms import layer_norm, rms_norm
from .rotary import rotary_kv_append
from .tensor_parallel import tp_pack, tp_unpack

__all__ = ["INTERPRETED", "decode_attention", "layer_norm", "prefill_attention", "rms_norm", "rotary_kv_append",
           "tp_pack", "tp_unpack"]
