"""Inference forwards per Hugging Face family. `FAMILIES` maps a config's model_type to the function that
describes such a model's weights for `InferenceModel`."""
from __future__ import annotations

from .base import InferenceModel, ModelWeights
from .common import Relayer
from .gpt2 import gpt2_weights
from .gpt_neox import gpt_neox_weights
from .llama import llama_weights
from .opt import opt_weights

FAMILIES = {
    "llama": llama_weights,
    "mistral": llama_weights,
    "qwen2": llama_weights,
    "opt": opt_weights,
    "gpt2": gpt2_weights,
    "gpt_neox": gpt_neox_weights,
}

__all__ = ["FAMILIES", "InferenceModel", "ModelWeights", "Relayer"]
