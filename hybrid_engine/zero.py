"""ZeRO-3 for generation: gather the partitioned training parameters, build the inference weights, release.

DeepSpeed ZeRO-3 keeps 1/world of every parameter on each rank (`param.ds_tensor`); `param.data` is empty
until gathered. The inference forward reads parameters in place, so once a parameter is gathered the
family code (models/*.py) describes it as usual. Three ways to build the weights (`build_weights`):

  pinned, tp 1   every layer gathered at eval() (`group_size` layers per collective, the next group's
                 all-gather in flight while the current one is unpacked), kept until train() or
                 release_memory(): as fast as an unsharded model, costs the full model's memory.
  streamed, tp 1 only the embedding, final norm and head are kept; during every forward the layers are
                 gathered `group_size` at a time, the next group prefetched while the current one runs,
                 the previous one released (DeepSpeed-Chat's --unpin_actor_parameters): memory of two
                 groups, one all-gather of the layers per forward.
  tensor parallel each group is gathered, described, cut into this rank's TP shards (parallel.py) and
                 released at eval(), as DeepSpeed-Chat with --tp_gather_partition_size: peak memory one
                 group in full (plus the next in flight), then 1/tp of the layers for the whole rollout.

Without ZeRO-3 (stages 0-2, or no DeepSpeed) the same paths run with nothing to gather.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch
import torch.nn as nn

from .models import ModelWeights, Relayer


def is_zero3(param: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitions (it carries ds_id / ds_status)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM: the ModuleList with num_hidden_layers entries."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise NotImplementedError(f"{type(model).__name__}: no ModuleList of its {n} decoder blocks")


def layer_groups(num_layers: int, group_size: int) -> list[range]:
    size = group_size if group_size > 0 else num_layers
    return [range(s, min(s + size, num_layers)) for s in range(0, num_layers, size)]


def _nbytes(params) -> int:
    return sum(p.ds_numel * p.element_size() for p in params)


class _Pending:
    """An all-gather in flight: its DeepSpeed handle and the parameters it fills."""

    def __init__(self, handle, params: list):
        self.handle, self.params = handle, params

    def wait(self) -> None:
        if self.handle is not None:
            self.handle.wait()
            self.handle = None


class ZeroParams:
    """The ZeRO-3 parameters of one model: per decoder block and the rest (embedding, norms, head).

    `start` launches one coalesced all-gather of the parameters that are partitioned now (persistent small
    parameters are always whole and are skipped), `release` partitions again what this object gathered.
    Every rank must make the same calls in the same order: the all-gathers are collectives.
    """

    def __init__(self, model: nn.Module):
        blocks = decoder_blocks(model)
        self.layer_params = [[p for p in block.parameters() if is_zero3(p)] for block in blocks]
        in_layers = {id(p) for ps in self.layer_params for p in ps}
        self.other_params = [p for p in model.parameters() if is_zero3(p) and id(p) not in in_layers]
        self.live: dict[int, nn.Parameter] = {}   # gathered by us, by id
        self.pending: list[_Pending] = []
        self.gathered_bytes = 0                   # full-size bytes materialised since reset_counters()
        self.gather_s = 0.0

    @staticmethod
    def present(model: nn.Module) -> bool:
        return any(is_zero3(p) for p in model.parameters())

    def params_of(self, layers: range) -> list:
        return [p for i in layers for p in self.layer_params[i]]

    def reset_counters(self) -> None:
        self.gathered_bytes, self.gather_s = 0, 0.0

    def start(self, params: list) -> _Pending:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        t = time.perf_counter()
        todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE and id(p) not in self.live]
        handle = todo[0].all_gather_coalesced(todo) if todo else None
        for p in todo:
            self.live[id(p)] = p
        self.gathered_bytes += _nbytes(todo)
        pending = _Pending(handle, todo)
        self.pending.append(pending)
        self.gather_s += time.perf_counter() - t
        return pending

    def wait(self, pending: _Pending | None) -> None:
        if pending is None:
            return
        t = time.perf_counter()
        pending.wait()
        if pending in self.pending:
            self.pending.remove(pending)
        self.gather_s += time.perf_counter() - t

    def gather(self, params: list) -> None:
        self.wait(self.start(params))

    def release(self, params: list | None = None) -> float:
        """Partition again the parameters we gathered (all of them by default); returns the seconds it took."""
        t = time.perf_counter()
        for pending in list(self.pending):  # never partition a parameter while its all-gather is in flight
            self.wait(pending)
        chosen = list(self.live.values()) if params is None else [p for p in params if id(p) in self.live]
        if chosen:
            chosen[0].partition(param_list=chosen, has_been_updated=False)
            for p in chosen:
                del self.live[id(p)]
        return time.perf_counter() - t

    @property
    def live_bytes(self) -> int:
        return _nbytes(self.live.values())


class StreamedLayers(Sequence):
    """`ModelWeights.layers` for streamed ZeRO-3 generation: iterating it (as the forward does, once per
    forward) gathers each group of layers just in time, prefetches the next group (group 0 while the last
    runs, for the next forward) and releases the group before; the group's fused buffers go to a scratch
    Relayer refilled per group, so memory holds two groups, never the whole model."""

    def __init__(self, model: nn.Module, describe: Callable, zero: ZeroParams, groups: list[range]):
        self.model, self.describe, self.zero, self.groups = model, describe, zero, groups
        self.scratch = Relayer()
        self.inflight: dict[int, _Pending] = {}   # group index -> its all-gather
        self.num_layers = groups[-1].stop

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, i: int):
        gi = next(g for g, r in enumerate(self.groups) if i in r)
        return self._load(gi).layers[i]

    def __iter__(self) -> Iterator:
        for gi, group in enumerate(self.groups):
            layers = self._load(gi).layers
            for i in group:
                yield layers[i]

    def _load(self, gi: int) -> ModelWeights:
        n = len(self.groups)
        keep = {gi, (gi + 1) % n}
        # gathered data must be ordinary tensors (training reuses the parameters), and need no autograd
        with torch.inference_mode(False), torch.no_grad():
            for g in [g for g in self.inflight if g not in keep]:
                self.zero.release(self.zero.params_of(self.groups[g]))
                del self.inflight[g]
            if gi not in self.inflight:
                self.inflight[gi] = self.zero.start(self.zero.params_of(self.groups[gi]))
            nxt = (gi + 1) % n
            if nxt not in self.inflight:
                self.inflight[nxt] = self.zero.start(self.zero.params_of(self.groups[nxt]))
            self.zero.wait(self.inflight[gi])
            self.scratch.release()
            return self.describe(self.model, self.scratch)

    def reset(self) -> None:
        """Forget the gathered groups (their parameters are released by ZeroParams.release)."""
        self.inflight.clear()
        self.scratch.release()


def build_weights(model: nn.Module, describe: Callable, relayer: Relayer, zero: ZeroParams | None, tp,
                  group_size: int, pinned: bool, stats) -> ModelWeights:
    """The inference weights of `model` for this rank; fills `stats` (a SwitchStats) as it goes.

    describe: the family function (model, relayer) -> ModelWeights; tp: parallel.TensorParallel or None.
    """
    if zero is not None:
        zero.reset_counters()
        zero.gather(zero.other_params)  # embedding, final norm, head: small next to the layers, kept
    groups = layer_groups(len(zero.layer_params) if zero is not None else len(decoder_blocks(model)), group_size)

    if tp is None and zero is not None and not pinned:
        t = time.perf_counter()
        weights = describe(model, relayer)  # layers are placeholders here: StreamedLayers fills them
        stats.relay_s += time.perf_counter() - t
        weights = replace(weights, layers=StreamedLayers(model, describe, zero, groups))
    elif tp is None:
        if zero is not None:
            pending = zero.start(zero.params_of(groups[0]))
            for gi in range(len(groups)):
                nxt = zero.start(zero.params_of(groups[gi + 1])) if gi + 1 < len(groups) else None
                zero.wait(pending)
                pending = nxt
        t = time.perf_counter()
        weights = describe(model, relayer)
        stats.relay_s += time.perf_counter() - t
        stats.relaid_bytes = relayer.nbytes
    else:
        layers: list = [None] * groups[-1].stop
        pending = zero.start(zero.params_of(groups[0])) if zero is not None else None
        desc = None
        for gi, group in enumerate(groups):
            nxt = None
            if zero is not None:
                nxt = zero.start(zero.params_of(groups[gi + 1])) if gi + 1 < len(groups) else None
                zero.wait(pending)
            t = time.perf_counter()
            desc = describe(model, relayer)
            stats.relay_s += time.perf_counter() - t
            t = time.perf_counter()
            for i in group:
                layers[i] = tp.shard_layer(i, desc.layers[i], desc)
            stats.tp_s += time.perf_counter() - t
            # the full fused buffers of this group: only its shards are kept
            stats.relaid_bytes += relayer.release_layers()
            if zero is not None:
                zero.release(zero.params_of(group))
            pending = nxt
        weights = tp.shard_model(desc, layers)
        stats.relaid_bytes += relayer.nbytes
        stats.tp_bytes = tp.nbytes
    if zero is not None:
        stats.gather_s, stats.gathered_bytes = zero.gather_s, zero.gathered_bytes
    return weights
