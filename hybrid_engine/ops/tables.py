"""One dispatch table per op: which backends have a kernel for it, and the order `kernels="auto"` tries them on
each device, with the evidence where the order is not simply fastest-first.

Adding an op: its reference in reference.py, its entry here, its kernel in each backend that has one (and the
backend's host function), its tests. An op a backend lacks is simply absent from its table: an explicit
request for that backend serves the op from the op's own auto order (the CUDA backend has no norm or prefill
kernel, so under kernels="cuda" those come from Triton, else torch), and says so in `ops.backends()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FASTEST_FIRST = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}  # interpreted Triton: never auto


@dataclass(frozen=True)
class OpTable:
    name: str
    backends: tuple[str, ...]                                   # backends with a kernel (torch: the reference)
    auto: dict[str, tuple[str, ...]] = field(default_factory=dict)  # device -> order, where not FASTEST_FIRST
    why: dict[str, str] = field(default_factory=dict)           # device -> the evidence for that order

    def order(self, device: str) -> tuple[str, ...]:
        """The backends auto tries for this op on `device`, first to last (only those with a kernel)."""
        order = self.auto.get(device, FASTEST_FIRST.get(device, ("torch",)))
        return tuple(b for b in order if b in self.backends)

    def reason(self, device: str) -> str:
        return self.why.get(device, "fastest that loads")


TABLES = (
    # RMSNorm [after a residual add]: kernels/norms.py, csrc/cpu/norm.cpp
    OpTable("rms_norm", ("triton", "cpu", "torch")),
    # LayerNorm [after a residual add]: kernels/norms.py, csrc/cpu/norm.cpp
    OpTable("layer_norm", ("triton", "cpu", "torch")),
    # rotary on q, k and the KV-cache write: csrc/attention (CUDA), kernels/rotary.py, csrc/cpu/rotary.cpp
    OpTable("rotary_kv_append", ("cuda", "triton", "cpu", "torch")),
    # causal attention over a left-padded prompt: kernels/attention.py, csrc/cpu/attention.cpp
    OpTable("prefill_attention", ("triton", "cpu", "torch"),
            # benchmarks/kernel_speed.py: torch's SDPA flash kernel beats the C++ prefill at T=64 (1632 vs 1990 us)
            auto={"cpu": ("torch", "cpu")}, why={"cpu": "measured faster on cpu (benchmarks/kernel_speed.py)"}),
    # one query per row against the KV cache: csrc/attention, kernels/attention.py, csrc/cpu/attention.cpp
    OpTable("decode_attention", ("cuda", "triton", "cpu", "torch"),
            # Unmeasured: the CUDA kernel's inner loop handles one key per warp iteration, the Triton one a 64-key
            # tile per tl.dot, and no run of benchmarks/kernel_speed.py on a GPU shows the CUDA kernel faster. Until one
            # does, auto takes Triton's.
            auto={"cuda": ("triton", "cuda", "torch")},
            why={"cuda": "Triton's tiled kernel until benchmarks/kernel_speed.py shows the CUDA one faster"}),
    # tensor-parallel shard copies: csrc/tensor_parallel, kernels/tensor_parallel.py, csrc/cpu/tensor_parallel.cpp
    OpTable("tp_pack", ("cuda", "triton", "cpu", "torch")),
    OpTable("tp_unpack", ("cuda", "triton", "cpu", "torch")),
)
