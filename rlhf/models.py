"""Actor, reward model and critic construction, with dropout, gradient checkpointing and LoRA options.

The reward model is a transformer backbone (``AutoModel``) with a bias-free linear value head per token;
a sequence's score is the value at its last non-pad token. The critic starts as a copy of the trained
reward model. A saved reward model is a Hugging Face backbone checkpoint plus ``value_head.safetensors``:

    reward_model = RewardModel.from_pretrained("out/reward")
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_CONFIG_FILE = "reward_model.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelOptions:
    """Per-model options, as DeepSpeed-Chat's flags."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16: the dtype the weights are created or loaded in
    dropout: float | None = None  # None keeps the model config's dropout
    gradient_checkpointing: bool = False
    lora_dim: int = 0  # 0 disables LoRA
    lora_module_name: str = "layers."  # LoRA goes on Linear layers whose full name contains this
    only_optimize_lora: bool = False


def require_checkpoint(path: str | Path, hint: str, reward: bool = False) -> None:
    """One-line ValueError unless ``path`` is a saved checkpoint directory (``config.json``, and for a reward
    model its value head); ``hint`` ends the message with what to pass instead. Checked before Hugging Face, whose
    answer to a missing local path is a hub lookup and a traceback about the internet connection."""
    files = ("config.json", VALUE_HEAD_FILE) if reward else ("config.json",)
    missing = [name for name in files if not (Path(path) / name).is_file()]
    if missing:
        kind = "reward model" if reward else "model"
        raise ValueError(f"{path}: not a saved {kind} (no {missing[0]}); {hint}")


def load_tokenizer(name_or_path: str):
    """A tokenizer from a hub id or a local path; without a pad token it pads with EOS."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _config(source: str | PretrainedConfig, dropout: float | None) -> PretrainedConfig:
    # A copy, so the caller's config is not changed by the dropout override.
    config = AutoConfig.from_pretrained(source) if isinstance(source, str) else copy.deepcopy(source)
    if dropout is not None:  # every family names its dropouts differently; set all that exist
        for key in list(config.to_dict()):
            if "dropout" in key or key.endswith("_pdrop"):
                setattr(config, key, dropout)
    return config


def _build(auto_class, source: str | PretrainedConfig, options: ModelOptions) -> nn.Module:
    config = _config(source, options.dropout)
    dtype = DTYPES[options.dtype]
    if isinstance(source, str):
        model = auto_class.from_pretrained(source, config=config, dtype=dtype)
    else:
        model = auto_class.from_config(config, dtype=dtype)
    if options.gradient_checkpointing:
        # transformers 5 renamed the switch; detect the feature rather than the version
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        if options.lora_dim > 0 and options.only_optimize_lora:
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the recomputed graph
        model.config.use_cache = False  # a KV cache is useless while checkpointing activations
    return model


def apply_lora(model: nn.Module, options: ModelOptions) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA (rank ``lora_dim``) on the Linear layers matching ``lora_module_name``.

    With ``only_optimize_lora`` False the base weights stay trainable too (DeepSpeed-Chat's default).
    """
    if options.lora_dim <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and options.lora_module_name in name
    ]
    if not targets:
        raise ValueError(f"--lora-module-name '{options.lora_module_name}' matches no Linear layer of the model")
    lora = LoraConfig(r=options.lora_dim, lora_alpha=options.lora_dim, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, lora)
    if not options.only_optimize_lora:
        for param in peft_model.parameters():
            param.requires_grad_(True)
    return peft_model


def create_actor(source: str | PretrainedConfig, options: ModelOptions | None = None) -> nn.Module:
    """A causal LM from a hub id, a local path or a config (random init), with the options applied."""
    options = options or ModelOptions()
    return apply_lora(_build(AutoModelForCausalLM, source, options), options)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of the last non-pad token of each row; right or left padding alike."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).long().argmax(dim=1)  # first 1 from the right


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)


class RewardModel(nn.Module):
    """Backbone + ``Linear(hidden, 1, bias=False)``; ``forward`` gives a value per token (B, T)."""

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        hidden_size = hidden_size or backbone.config.hidden_size
        self.value_head = nn.Linear(hidden_size, 1, bias=False, dtype=next(backbone.parameters()).dtype)
        self.config = backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state  # (B, T, H)
        return self.value_head(hidden).squeeze(-1)  # (B, T)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) value at the last non-pad token of each sequence."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return gather_scores(self(input_ids, attention_mask), attention_mask)


    @classmethod
    def from_pretrained(cls, path: str | Path, options: ModelOptions | None = None) -> RewardModel:
        """Load a directory written by ``save_reward_model`` (backbone checkpoint + value head)."""
        options = options or ModelOptions()
        path = Path(path)
        backbone = _build(AutoModel, str(path), options)
        model = cls(backbone)
        head = load_file(str(path / VALUE_HEAD_FILE))
        model.value_head.load_state_dict({k: v.to(model.value_head.weight.dtype) for k, v in head.items()})
        return model


def gather_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) entries of ``values`` (B, T) at the last non-pad token of each row."""
    index = last_token_index(attention_mask)  # (B,)
    return values.gather(1, index.unsqueeze(1)).squeeze(1)


def create_reward_model(source: str | PretrainedConfig, options: ModelOptions | None = None) -> RewardModel:
    """A reward model whose backbone comes from a hub id, a local path (a causal LM works: its head is
    dropped) or a config; the value head starts at random. LoRA applies to the backbone only."""
    options = options or ModelOptions()
    backbone = _build(AutoModel, source, options)
    model = RewardModel(backbone)
    model.backbone = apply_lora(backbone, options)
    return model


def create_critic(reward_model_path: str | Path, options: ModelOptions | None = None) -> RewardModel:
    """The PPO critic: a copy of the trained reward model (DeepSpeed-Chat initialises it so)."""
    options = options or ModelOptions()
    model = RewardModel.from_pretrained(reward_model_path, options)
    model.backbone = apply_lora(model.backbone, options)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under a DeepSpeed engine; a PEFT model is merged into a copy of its base."""
    model = getattr(model, "module", model)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    return model


def save_actor(model: nn.Module, tokenizer, path: str | Path) -> None:
    """Write a checkpoint ``AutoModelForCausalLM.from_pretrained(path)`` loads (LoRA merged) into ``path``."""
    unwrap_model(model).save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def save_reward_model(model: RewardModel, tokenizer, path: str | Path) -> None:
    """Write the backbone as a Hugging Face checkpoint, the head as ``value_head.safetensors``, into ``path``."""
    model = getattr(model, "module", model)
    path = Path(path)
    unwrap_model(model.backbone).save_pretrained(str(path))
    head = {k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()}
    save_file(head, str(path / VALUE_HEAD_FILE))
    (path / REWARD_CONFIG_FILE).write_text(
        json.dumps({"loader": "rlhf.models.RewardModel.from_pretrained", "value_head": VALUE_HEAD_FILE}, indent=2)
        + "\n"
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
