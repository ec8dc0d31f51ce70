"""Helpers the family files share: reading a projection's effective weight and re-laying fused buffers."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.reference import ACTIVATIONS
from .base import AutocastLinear, Linear, Norm


def activation(name: str):
    """The activation a Hugging Face config names, as a function."""
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported; supported: "
                                  f"{', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


# Rope types whose inv_freq and attention_scaling are fixed at init: the engine reads both from the model's rotary
# module at each eval(). "dynamic" (NTK) and "longrope" change inv_freq with the sequence length inside Hugging
# Face's forward, which one table per eval() does not follow.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unserved_rope(config) -> str | None:
    """The config's first rope type whose frequencies depend on the sequence length, or None."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    variants = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]  # per layer type
    for params in variants:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in STATIC_ROPE_TYPES:
            return rope_type
    return None


def check_rope(config) -> None:
    """Refuse, in one line naming it, a rope type whose frequencies depend on the sequence length."""
    rope_type = unserved_rope(config)
    if rope_type is not None:
        raise NotImplementedError(f"hybrid_engine.wrap: rope type {rope_type!r} of {config.model_type!r} is not "
                                  f"supported (its frequencies change with the sequence length); supported: "
                                  f"{', '.join(STATIC_ROPE_TYPES)}")


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full data is not on this rank now (DeepSpeed holds only a shard of it)."""
    return hasattr(param, "ds_numel") and param.data.numel() != param.ds_numel


def is_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer wrapping a Linear or Conv1D (it has a base_layer and lora_A/lora_B)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _lora_delta(module: nn.Module) -> torch.Tensor | None:
    """The summed low-rank update of the active adapters, in the base layer's weight layout, or None."""
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return None
    delta = None
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise NotImplementedError("LoRA with DoRA is not supported by the inference path")
        d = module.get_delta_weight(name)
        delta = d if delta is None else delta + d
    return delta


class Relayer:
    """The buffers the engine re-lays on eval() (fused QKV, fused gate/up, LoRA-merged weights).

    They are allocated on the first eval() and refilled in place on each later one, so a switch costs one
    copy of those weights and no allocation. Everything else is read in place from the training module.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def release(self) -> None:
        self.buffers.clear()

    def release_layers(self) -> int:
        """Drop the per-layer buffers (keys "<layer>.<name>"), keep the model-level ones; returns bytes freed."""
        keys = [k for k in self.buffers if k.split(".", 1)[0].isdigit()]
        freed = sum(self.buffers[k].numel() * self.buffers[k].element_size() for k in keys)
        for key in keys:
            del self.buffers[key]
        return freed

    def _buffer(self, key: str, like: torch.Tensor, shape) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def weight(self, key: str, module: nn.Module) -> torch.Tensor:
        """The weight to compute with: the parameter itself, or base + LoRA delta in a buffer."""
        base = _base(module).weight
        if is_partitioned(base):  # ZeRO-3 layer not gathered now: a placeholder (zero.py re-describes it)
            return base
        delta = _lora_delta(module) if is_lora(module) else None
        if delta is None:
            return base
        return torch.add(base, delta.to(base.dtype), out=self._buffer(key, base, base.shape))

    def param(self, key: str, module: nn.Module, name: str) -> torch.Tensor:
        """A module's parameter `name` to compute with (a fused 3-D expert tensor, a router's weight): the parameter
        itself, or parameter + the LoRA deltas of PEFT's ParamWrappers around the module (LoRA `target_parameters`,
        one wrapper per parameter, nested) in a buffer."""
        deltas = []
        while is_lora(module):
            if getattr(module, "parameter_name", None) == name:
                delta = _lora_delta(module)
                if delta is not None:
                    deltas.append(delta)
            module = module.base_layer
        base = getattr(module, name)
        if is_partitioned(base) or not deltas:  # partitioned: a ZeRO-3 placeholder (zero.py re-describes it)
            return base
        out = self._buffer(key, base, base.shape).copy_(base)
        for delta in deltas:
            out.add_(delta.to(base.dtype))
        return out

    def linear(self, key: str, module: nn.Module, transposed: bool = False) -> Linear:
        return Linear(self.weight(key, module), _base(module).bias, transposed)

    def offset_norm(self, key: str, module: nn.Module) -> Norm:
        """An RMSNorm that scales by (1 + weight) (Gemma), as a Norm of weight 1 + w in a buffer, so the rms_norm op
        of every backend serves it. 1 + w is computed in fp32, as Hugging Face does, and kept in w's dtype."""
        weight = module.weight
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
        if is_partitioned(weight):  # ZeRO-3 layer not gathered now: a placeholder (zero.py re-describes it)
            return Norm(weight, None, eps)
        buf = self._buffer(key, weight, weight.shape)
        return Norm(buf.copy_(weight.float() + 1.0), None, eps)

    def fused(self, key: str, modules: list[nn.Module]) -> Linear:
        """One (sum of out, in) Linear standing for several nn.Linear applied to the same input."""
        bases = [_base(m) for m in modules]
        first = bases[0].weight
        if any(is_partitioned(b.weight) for b in bases):  # ZeRO-3 layer not gathered now: a placeholder
            return Linear(first)
        rows = [b.weight.shape[0] for b in bases]
        weight = self._buffer(key + ".weight", first, (sum(rows), first.shape[1]))
        for dst, module, base in zip(weight.split(rows), modules, bases):
            dst.copy_(base.weight)
            delta = _lora_delta(module) if is_lora(module) else None
            if delta is not None:
                dst.add_(delta.to(dst.dtype))
        bias = None
        if any(b.bias is not None for b in bases):
            bias = self._buffer(key + ".bias", first, (sum(rows),))
            for dst, base in zip(bias.split(rows), bases):
                dst.copy_(base.bias) if base.bias is not None else dst.zero_()
        return Linear(weight, bias)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if is_lora(module) else module


def layer_norm(module: nn.Module) -> Norm:
    """A LayerNorm's or RMSNorm's tensors and eps (which of the two it is: Architecture.norm)."""
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-5)
    return Norm(module.weight, getattr(module, "bias", None), eps)


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN can pack this weight for CPU matmuls (fp32 or bf16 on a CPU build with oneDNN)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(weights, batch_hint: int) -> int:
    """Give every projection of `weights` (a ModelWeights), and every expert of its mixture-of-experts layers, a
    oneDNN-packed copy of its weight; returns bytes.

    Why: a decode step multiplies a few rows by every weight once, and MKL's sgemm reads a (B <= 32)-row
    product's weights at 5-9 GB/s on this 2-core CPU where a copy runs at 20+; oneDNN's blocked layout reaches
    14-16 GB/s (benchmarks in the closing note of issue 2). Results differ from sgemm's by summation order
    only (~1e-6). The copies are made on every eval(), so they always hold the current training weights.
    """
    linears = [lin for layer in weights.layers for lin in (layer.qkv, layer.o, layer.up, layer.down)]
    linears += [weights.lm_head, weights.project_in, weights.project_out]
    total = 0
    for lin in linears:
        if lin is None or type(lin) not in (Linear, AutocastLinear):  # TP linears all-reduce: left as they are
            continue
        weight = lin.weight.detach()
        weight = weight.t().contiguous() if lin.transposed else weight  # oneDNN wants (out, in)
        lin.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        total += weight.numel() * weight.element_size()
    for experts in (layer.experts for layer in weights.layers if layer.experts is not None):
        experts.packed = tuple([torch.ops.mkldnn._reorder_linear_weight(w[e].detach(), batch_hint)
                                for e in range(w.shape[0])] for w in (experts.gate_up, experts.down))
        total += sum(w.numel() * w.element_size() for w in (experts.gate_up, experts.down))
    return total


def cast_linears(weights, dtype: torch.dtype) -> int:
    """Replace every projection of `weights` (a ModelWeights) by an AutocastLinear over a `dtype` copy of its
    weight and bias, so the inference forward runs its matmuls as torch.autocast(dtype) runs the training
    forward's (in `dtype`, the rest in the parameters' dtype); returns the bytes of the copies. Tensor-parallel
    linears and mixture-of-experts experts are left in the parameters' dtype."""
    total = 0

    def cast(lin):
        nonlocal total
        if lin is None or type(lin) is not Linear:
            return lin
        weight = lin.weight.detach().to(dtype)
        bias = None if lin.bias is None else lin.bias.detach().to(dtype)
        total += weight.numel() * weight.element_size() + (0 if bias is None else bias.numel() * bias.element_size())
        return AutocastLinear(weight, bias, lin.transposed)

    for layer in weights.layers:
        layer.qkv, layer.o, layer.up, layer.down = cast(layer.qkv), cast(layer.o), cast(layer.up), cast(layer.down)
    weights.lm_head, weights.project_in, weights.project_out = (cast(weights.lm_head), cast(weights.project_in),
                                                                cast(weights.project_out))
    return total
