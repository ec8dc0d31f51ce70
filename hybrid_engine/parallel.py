"""Tensor parallelism for generation over torch.distributed (NCCL on GPUs, gloo on CPU).

Applied after the model is described, as gpt-fast does: the family code knows nothing of it. Each rank of a
TP group of k keeps 1/k of every block:

  qkv   column-parallel: H/k query heads and their key/value heads. Grouped-query kv heads are split when
        k divides their count; otherwise each rank keeps the kv heads its query heads read (replicated).
  o     row-parallel: the matching H/k * D input columns; partial outputs are all-reduced, then the bias.
  up    column-parallel: I/k rows of each of [gate; up] (gated) or of the first projection.
  down  row-parallel: I/k input columns, all-reduced.
  experts (mixture of experts) each expert's I split as up/down are: I/k rows of its [gate; up], I/k columns of its
        down; the router stays whole, so every rank routes every token alike, and the weighted sum of the
        experts' partial outputs is all-reduced once (a shared expert, Qwen2-MoE, is up/down: one more).

Two all-reduces per block (after o and after down); embedding, norms and head stay whole on every rank, so
every rank computes the same logits and, with the same generator state, samples the same tokens. The
shards live in buffers allocated on the first eval() and refilled in place (the `tp_pack` op) on later ones.

As DeepSpeed-Chat does, `generate` on a TP group first all-gathers the prompts of its ranks (left padded to
a common length), generates once for all of them and hands each rank back its own rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .generation import GenerationOutput
from .models.base import LayerWeights, Linear, ModelWeights, Norm
from .models.moe import Experts


@dataclass
class RowParallelLinear(Linear):
    """A Linear whose input features are split across the group: local product, all-reduce, then the bias."""
    group: object = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight if self.transposed else F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


@dataclass
class RowParallelExperts(Experts):
    """Routed experts whose intermediate width is split across the group: the partial sum, all-reduced."""
    group: object = None

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=self.group)
        return out


def tp_group(tp_size: int, group=None):
    """The process group of this rank's TP group: `group` if given, else consecutive blocks of tp_size ranks
    of the world (the whole world when tp_size equals it). Every rank must call this (new_group is
    collective)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"tp_size={tp_size}: torch.distributed is not initialised (init_process_group with "
                           "nccl on GPUs or gloo on CPU, or use the deepspeed / torchrun launchers)")
    if group is not None:
        if dist.get_world_size(group) != tp_size:
            raise ValueError(f"tp_size={tp_size} but the given group has {dist.get_world_size(group)} ranks")
        return group
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world}")
    if tp_size == world:
        return dist.group.WORLD
    mine = None
    for start in range(0, world, tp_size):
        g = dist.new_group(list(range(start, start + tp_size)))
        if start <= dist.get_rank() < start + tp_size:
            mine = g
    return mine


# Families whose inference path tensor parallelism cannot split, and why: refused by wrap(tp_size > 1) and by
# `rlhf train --inference-tp-size` before anything runs. (shard_layer refuses the Architecture behind each too.)
TP_REFUSED = {
    # an RMSNorm over all H*D features of q (and of k) needs the sum of squares of every rank's heads; serving it
    # would take an all-reduce inside the norm, which the rms_norm op does not have
    "olmo2": "its q/k norms are RMSNorms over the whole q and k projections (all heads' features), which tensor "
             "parallelism splits across ranks",
}


def check_tp_family(model_type: str, tp_size: int) -> None:
    """One-line NotImplementedError when ``tp_size`` > 1 and the family is one TP cannot serve."""
    if tp_size > 1 and model_type in TP_REFUSED:
        raise NotImplementedError(f"tensor parallelism (tp_size={tp_size}) cannot serve {model_type!r}: "
                                  f"{TP_REFUSED[model_type]}; use tp_size=1")


def check_tp_heads(num_heads: int, tp_size: int, what: str = "the model") -> None:
    """One-line ValueError unless ``tp_size`` ranks can share ``num_heads`` query heads equally."""
    if tp_size > 1 and num_heads % tp_size:
        fits = ", ".join(str(k) for k in range(1, num_heads + 1) if num_heads % k == 0)
        raise ValueError(f"tensor parallelism over {tp_size} ranks: {what} has {num_heads} attention heads, which "
                         f"do not split into {tp_size} equal parts (tp sizes that do: {fits})")


def head_split(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[int, list[int]]:
    """(query heads per rank, the kv heads this rank keeps, in order). Query heads are split in contiguous
    blocks; kv heads too when `world` divides their count, else each rank keeps those its queries read."""
    check_tp_heads(num_heads, world)
    local = num_heads // world
    if num_kv_heads % world == 0:
        per = num_kv_heads // world
        return local, list(range(rank * per, (rank + 1) * per))
    group = num_heads // num_kv_heads               # query heads per kv head
    first = rank * local
    if group % local == 0:                         # all of this rank's queries read one kv head
        return local, [first // group]
    return local, [h // group for h in range(first, first + local)]   # one kv head per local query head


class TensorParallel:
    """This rank's shards of the inference weights, and the prompt exchange of its TP group."""

    def __init__(self, tp_size: int, group, ops):
        self.group = tp_group(tp_size, group)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.root = dist.get_global_rank(self.group, 0) if self.group is not dist.group.WORLD else 0
        self.ops = ops
        self.shards: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.shards.values())

    def release(self) -> None:
        self.shards.clear()

    # -- weights ---------------------------------------------------------------------------------
    def _buffer(self, key: str, like: torch.Tensor, shape) -> torch.Tensor:
        buf = self.shards.get(key)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.shards[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _pack(self, key: str, full: torch.Tensor, splits: tuple[int, ...], dim: int) -> torch.Tensor:
        """This rank's part of every segment `splits` of `full` along `dim`, via the tp_pack op."""
        shape = list(full.shape)
        shape[dim] = sum(s // self.world for s in splits)
        return self.ops.tp_pack(full, self._buffer(key, full, shape), self.rank, self.world, splits, dim)

    def _select(self, key: str, full: torch.Tensor, index: list[int], dim: int) -> torch.Tensor:
        """Rows (or columns) `index` of `full`: replicated kv heads, which no equal split describes."""
        shape = list(full.shape)
        shape[dim] = len(index)
        idx = torch.tensor(index, device=full.device)
        return torch.index_select(full, dim, idx, out=self._buffer(key, full, shape))

    def _copy_norm(self, key: str, norm: Norm) -> Norm:
        weight = self._buffer(key + ".weight", norm.weight, norm.weight.shape).copy_(norm.weight)
        bias = None
        if norm.bias is not None:
            bias = self._buffer(key + ".bias", norm.bias, norm.bias.shape).copy_(norm.bias)
        return replace(norm, weight=weight, bias=bias)

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A tensor every rank keeps whole, copied: ZeRO-3 partitions the layer's own after the shards are cut."""
        return self._buffer(key, t, t.shape).copy_(t)

    def _shard_experts(self, i: int, experts: Experts) -> RowParallelExperts:
        inter = experts.down.shape[2]
        if inter % self.world:
            raise NotImplementedError(f"tensor parallelism: expert width {inter} (moe intermediate size) does not "
                                      f"split over tp_size {self.world}")
        shared_gate = experts.shared_gate
        if shared_gate is not None:
            shared_gate = Linear(self._copy(f"{i}.shared_gate", shared_gate.weight))
        return RowParallelExperts(**{**vars(experts), "group": self.group,
                                     "router": Linear(self._copy(f"{i}.router", experts.router.weight)),
                                     "gate_up": self._pack(f"{i}.experts.gate_up", experts.gate_up, (inter, inter), 1),
                                     "down": self._pack(f"{i}.experts.down", experts.down, (inter,), 2),
                                     "shared_gate": shared_gate})

    def _qkv(self, key: str, t: torch.Tensor, w: ModelWeights, dim: int) -> torch.Tensor:
        H, Hkv, D = w.arch.num_heads, w.arch.num_kv_heads, w.arch.head_dim
        if w.arch.qkv_layout == "per_head":                 # [q|k|v] per head: a contiguous block of heads
            return self._pack(key, t, (3 * H * D,), dim)
        local, kv_heads = head_split(H, Hkv, self.rank, self.world)
        if Hkv % self.world == 0:
            return self._pack(key, t, (H * D, Hkv * D, Hkv * D), dim)
        q_rows = list(range(self.rank * local * D, (self.rank + 1) * local * D))
        kv_rows = [h * D + d for h in kv_heads for d in range(D)]
        index = q_rows + [H * D + r for r in kv_rows] + [(H + Hkv) * D + r for r in kv_rows]
        return self._select(key, t, index, dim)

    def shard_layer(self, i: int, layer: LayerWeights, w: ModelWeights) -> LayerWeights:
        """Layer i's shards for this rank, read from the full (gathered, re-laid) `layer`."""
        def col(lin: Linear, name: str, pack) -> Linear:  # output features split
            dim = 1 if lin.transposed else 0
            bias = pack(f"{i}.{name}.bias", lin.bias, 0) if lin.bias is not None else None
            return Linear(pack(f"{i}.{name}.weight", lin.weight, dim), bias, lin.transposed)

        def row(lin: Linear, name: str, size: int) -> RowParallelLinear:  # input features split
            dim = 0 if lin.transposed else 1
            weight = self._pack(f"{i}.{name}.weight", lin.weight, (size,), dim)
            bias = None  # whole on every rank; a copy, as for the norms: ZeRO-3 partitions the layer's own after this
            if lin.bias is not None:
                bias = self._buffer(f"{i}.{name}.bias", lin.bias, lin.bias.shape).copy_(lin.bias)
            return RowParallelLinear(weight, bias, lin.transposed, self.group)

        mlp = {}
        if layer.up is not None:  # a dense MLP (or a mixture of experts' shared expert)
            up_rows = layer.up.weight.shape[1 if layer.up.transposed else 0]
            inter = up_rows // 2 if w.arch.gated_mlp else up_rows
            if inter % self.world:
                raise NotImplementedError(f"tensor parallelism: MLP width {inter} does not split over tp_size "
                                          f"{self.world}")
            up_splits = (inter, inter) if w.arch.gated_mlp else (inter,)
            mlp = dict(up=col(layer.up, "up", lambda k, t, d: self._pack(k, t, up_splits, d)),
                       down=row(layer.down, "down", inter))
        if layer.experts is not None:
            mlp["experts"] = self._shard_experts(i, layer.experts)
        if w.arch.qk_norm == "projection":
            raise NotImplementedError("tensor parallelism: q/k norms over the whole projection (OLMo 2) need every "
                                      "head's features on one rank; use tp_size=1")
        extra_norms = {}
        if w.arch.qk_norm == "head":  # one (D,) weight shared by all heads: each rank keeps the whole of it
            extra_norms = dict(q_norm=self._copy_norm(f"{i}.q_norm", layer.q_norm),
                            k_norm=self._copy_norm(f"{i}.k_norm", layer.k_norm))
        if w.arch.residual == "sandwich":  # the norms after each sublayer act on the all-reduced output: whole
            extra_norms.update(post_norm1=self._copy_norm(f"{i}.post_norm1", layer.post_norm1),
                            post_norm2=self._copy_norm(f"{i}.post_norm2", layer.post_norm2))
        return replace(
            layer,
            norm1=self._copy_norm(f"{i}.norm1", layer.norm1),  # ZeRO-3 partitions the layer's own after this
            norm2=self._copy_norm(f"{i}.norm2", layer.norm2),
            **extra_norms,
            qkv=col(layer.qkv, "qkv", lambda k, t, d: self._qkv(k, t, w, d)),
            o=row(layer.o, "o", w.arch.num_heads * w.arch.head_dim),
            **mlp,
        )

    def shard_model(self, w: ModelWeights, layers: list[LayerWeights]) -> ModelWeights:
        local, kv_heads = head_split(w.arch.num_heads, w.arch.num_kv_heads, self.rank, self.world)
        return replace(w, layers=layers, arch=replace(w.arch, num_heads=local, num_kv_heads=len(kv_heads)))

    # -- prompts and sampling ----------------------------------------------------------------------
    def gather_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int):
        """The group's prompts, left padded to their longest: (ids, mask, rows) with `rows` = (first row of
        this rank, its row count, extra pad columns put before its prompts)."""
        B, P = input_ids.shape
        device = input_ids.device
        size = torch.tensor([B, P], device=device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        counts = [int(s[0]) for s in sizes]
        B_max, P_max = max(counts), max(int(s[1]) for s in sizes)
        ids = torch.full((B_max, P_max), pad_token_id, dtype=input_ids.dtype, device=device)  # (B_max, P_max)
        mask = torch.zeros((B_max, P_max), dtype=attention_mask.dtype, device=device)
        ids[:B, P_max - P:] = input_ids
        mask[:B, P_max - P:] = attention_mask
        all_ids = [torch.empty_like(ids) for _ in range(self.world)]
        all_mask = [torch.empty_like(mask) for _ in range(self.world)]
        dist.all_gather(all_ids, ids, group=self.group)
        dist.all_gather(all_mask, mask, group=self.group)
        ids = torch.cat([t[:n] for t, n in zip(all_ids, counts)])                            # (sum B, P_max)
        mask = torch.cat([t[:n] for t, n in zip(all_mask, counts)])
        return ids, mask, (sum(counts[:self.rank]), B, P_max - P)

    def own_rows(self, out: GenerationOutput, rows) -> GenerationOutput:
        """This rank's rows, without the extra left padding, and without the trailing columns after all of
        its rows stopped (as generate on its own rows would have)."""
        first, count, extra = rows
        sel = slice(first, first + count)
        action_mask = out.action_mask[sel]                                               # (B, N)
        n = int(action_mask.any(0).nonzero().max()) + 1 if action_mask.any() else action_mask.shape[1]
        cut = out.sequences.shape[1] - out.action_mask.shape[1] + n
        return GenerationOutput(out.sequences[sel, extra:cut].contiguous(), out.logprobs[sel, :n].contiguous(),
                                action_mask[:, :n].contiguous())

    def shared_generator(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
        """A generator in the same state on every rank of the group (the group root's), so every rank samples
        the same tokens. The root's own generator is used (and advanced); the others get a copy."""
        if generator is None:
            seed = torch.randint(0, 2**62, (1,), device=device) if self.rank == 0 else torch.zeros(1, dtype=torch.long,
                                                                                                   device=device)
            dist.broadcast(seed, self.root, group=self.group)
            return torch.Generator(device=device).manual_seed(int(seed))
        state = generator.get_state().to(device)
        dist.broadcast(state, self.root, group=self.group)
        if self.rank == 0:
            return generator
        shared = torch.Generator(device=generator.device)
        shared.set_state(state.cpu())
        return shared
