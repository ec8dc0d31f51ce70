"""Tensor-parallel weight pack/unpack in Triton: one strided 2-D copy per segment of a fused weight."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import check, launch


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, rows, cols, src_stride, dst_stride, BLOCK: tl.constexpr):
    """dst[r, c] = src[r, c] for a (rows, cols) block of two row-major tensors with the given row strides."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = c < cols
    tl.store(dst_ptr + r * dst_stride + c, tl.load(src_ptr + r * src_stride + c, mask=live), mask=live)


def _tp_copy(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, splits: list[int], dim: int,
             to_shard: bool) -> None:
    check(full.is_contiguous() and shard.is_contiguous() and full.dtype == shard.dtype, "tp_pack",
          "full and shard must be contiguous and of one dtype")
    dim = dim % full.dim()
    check(sum(splits) == full.shape[dim] and all(s % world == 0 for s in splits) and 0 <= rank < world,
          "tp_pack", f"splits {splits} must sum to {full.shape[dim]} and divide by world {world}; rank {rank}")
    shard_dim = sum(s // world for s in splits)
    want = full.shape[:dim] + (shard_dim,) + full.shape[dim + 1:]
    check(shard.shape == want, "tp_pack", f"shard must be {tuple(want)}, got {tuple(shard.shape)}")
    outer = full.shape[:dim].numel()
    inner = full.shape[dim + 1:].numel()
    off = out = 0
    for size in splits:
        part = size // world
        cols = part * inner
        if outer and cols:
            f = full.view(-1)[(off + rank * part) * inner:]  # (outer, ...) rows of sum(splits) * inner
            s = shard.view(-1)[out * inner:]
            src, dst = (f, s) if to_shard else (s, f)
            src_stride, dst_stride = (sum(splits) * inner, shard_dim * inner)[:: 1 if to_shard else -1]
            launch(_copy_kernel, (outer, triton.cdiv(cols, 1024)))(src, dst, outer, cols, src_stride,
                                                                        dst_stride, BLOCK=1024)
        off += size
        out += part


@triton_op("hybrid_engine::tp_pack", mutates_args=("shard",))
def tp_pack_op(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, splits: list[int],
               dim: int = 0) -> None:
    _tp_copy(full, shard, rank, world, splits, dim, True)


@triton_op("hybrid_engine::tp_unpack", mutates_args=("full",))
def tp_unpack_op(shard: torch.Tensor, full: torch.Tensor, rank: int, world: int, splits: list[int],
                 dim: int = 0) -> None:
    _tp_copy(full, shard, rank, world, splits, dim, False)


def tp_pack(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, splits: tuple[int, ...],
            dim: int = 0) -> torch.Tensor:
    """reference.tp_pack: rank's part of every segment of `full` into `shard`. Returns `shard`."""
    torch.ops.hybrid_engine.tp_pack(full, shard, rank, world, list(splits), dim)
    return shard


def tp_unpack(shard: torch.Tensor, full: torch.Tensor, rank: int, world: int, splits: tuple[int, ...],
              dim: int = 0) -> torch.Tensor:
    """reference.tp_unpack: `shard` back into rank's part of every segment of `full`. Returns `full`."""
    torch.ops.hybrid_engine.tp_unpack(shard, full, rank, world, list(splits), dim)
    return full
