"""Inference forwards per Hugging Face family. `FAMILIES` maps a config's model_type to the function that
describes such a model's weights for `InferenceModel`.

Adding a family is one file here, one row below, and a tiny config in tests/hf_models.py (the parametrized tests
of tests/test_engine_*.py then hold it to Hugging Face). The file provides one function
`<family>_weights(model, relayer) -> ModelWeights`, called at every eval(), which:

- describes each block as a `LayerWeights`: norm1, norm2 (and q_norm, k_norm where the family has them), qkv as
  one projection yielding [q heads | k heads | v heads] (or NeoX's per-head [q | k | v]), o, up (the fused
  [gate; up] for gated MLPs) and down; a mixture-of-experts layer sets `experts` instead (models/moe.py: the router
  and the experts' fused 3-D weights; up/down then hold its shared expert, or None). Tensors are the training
  parameters themselves: `relayer.linear` / `relayer.weight` for one projection (the parameter, or base + LoRA
  delta), `relayer.param` for any other parameter (an expert tensor: itself, or + the deltas of PEFT's
  ParamWrappers), `relayer.fused` for several that must become one (a buffer refilled in place at each eval());
  never a fresh copy;
- sets the `Architecture` switches (see models/base.py) where the family differs: norm kind, residual layout,
  q/k norms, activation (by the config's name, via common.activation), gated MLP, mixture of experts (`moe`),
  positions, qkv layout, per-layer sliding windows, rotary scaling, softmax scale, attention and final logit
  soft-capping;
- gives the embedding, final norm, LM head and, for rotary families, the rotary module's `inv_freq` (so every
  rope variant Hugging Face computes into inv_freq and attention_scaling is served as it is).

A family built like Llama (model.model with embed_tokens, layers, norm, rotary_emb) passes only its block function
and switches to `llama.rotary_decoder_weights`, as qwen3.py, phi3.py, olmo2.py, mixtral.py and qwen_moe.py do
(`llama.llama_attention` and `llama.gated_mlp` give a Llama block's halves); a family close to another reuses its
block function (gemma2.py takes gemma3.py's). A feature none of the families has yet (a new norm placement, q/k
norms, ...) is an `Architecture` option that `InferenceModel` resolves once at construction, written with the ops of
hybrid_engine/ops so every kernel backend serves it. Where the ops cannot express it, the op gains an argument in
every backend, as `softcap` did for Gemma 2: the reference, the C++ CPU twin, the Triton kernels and the CUDA
kernel, each tested against the reference (tests/op_testing.py). A family tensor parallelism cannot split is named,
with the reason, in parallel.TP_REFUSED, so wrap(tp_size > 1) refuses it before any process group.
"""
from __future__ import annotations

from .base import InferenceModel, ModelWeights
from .common import Relayer
from .gemma2 import gemma2_weights
from .gemma3 import gemma3_weights
from .gpt2 import gpt2_weights
from .gpt_neox import gpt_neox_weights
from .llama import llama_weights
from .mixtral import mixtral_weights
from .olmo2 import olmo2_weights
from .opt import opt_weights
from .phi3 import phi3_weights
from .qwen3 import qwen3_weights
from .qwen_moe import qwen_moe_weights

FAMILIES = {
    "llama": llama_weights,
    "mistral": llama_weights,
    "qwen2": llama_weights,
    "qwen3": qwen3_weights,
    "mixtral": mixtral_weights,
    "qwen2_moe": qwen_moe_weights,
    "qwen3_moe": qwen_moe_weights,
    "phi3": phi3_weights,
    "olmo2": olmo2_weights,
    "gemma2": gemma2_weights,
    "gemma3_text": gemma3_weights,
    "opt": opt_weights,
    "gpt2": gpt2_weights,
    "gpt_neox": gpt_neox_weights,
}

__all__ = ["FAMILIES", "InferenceModel", "ModelWeights", "Relayer"]
