"""Actor, reward model and critic construction, with dropout, gradient checkpointing and LoRA options.

The reward model is a transformer backbone (``AutoModel``) with a bias-free linear value head per token;
a sequence's score is the value at its last non-pad token. The critic starts as a copy of the trained
reward model. A saved reward model is a Hugging Face backbone checkpoint plus ``value_head.safetensors``:

    reward_model = RewardModel.from_pretrained("out/reward")
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
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


class ModelError(ValueError):
    """A model, reward-model or tokenizer path that cannot be loaded; the one-line message names the path (or the
    file in it) and what was expected."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id (``org/name``): it exists, or starts with ``/``, ``.`` or ``~``, or has more than
    one ``/``. Such a path is never sent to the hub, whose answer to a missing one is a traceback about the internet
    connection."""
    return (Path(name_or_path).expanduser().exists() or name_or_path.startswith(("/", ".", "~"))
            or name_or_path.count("/") > 1 or "\\" in name_or_path)


def _require_intact_safetensors(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):  # reads the header only; a truncated file fails here
            pass
    except (OSError, SafetensorError) as err:
        raise ModelError(f"{file}: truncated or corrupt ({err}); save or download the checkpoint again") from err


def _require_weights(path: Path, shown: str, kind: str, hint: str) -> None:
    found = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise ModelError(f"{shown}: not a saved {kind} (no {' or '.join(WEIGHT_FILES[::2])}); {hint}")
    if found[0] == "model.safetensors":
        _require_intact_safetensors(path / found[0])
    elif found[0] == "model.safetensors.index.json":
        index = path / found[0]
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise ModelError(f"{index}: unreadable shard index ({err}); save or download the checkpoint again") \
                from err
        for shard in shards:
            if not (path / shard).is_file():
                raise ModelError(f"{path / shard}: missing (listed in {index.name}); save or download the "
                                 "checkpoint again")
            _require_intact_safetensors(path / shard)


def _require_config(path: Path, shown: str, kind: str, hint: str) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{shown}: not a saved {kind} (no config.json); {hint}")
    try:
        values = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{config}: cannot read ({err})") from err
    except json.JSONDecodeError as err:
        raise ModelError(f"{config}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); expected "
                         "a Hugging Face model config") from err
    if not isinstance(values, dict) or "model_type" not in values:
        raise ModelError(f"{config}: no 'model_type' (expected a Hugging Face model config)")


def require_checkpoint(path: str | Path, hint: str, reward: bool = False) -> None:
    """One-line ModelError unless ``path`` is a saved checkpoint directory: a readable ``config.json``, intact
    weights, and for a reward model its value head; ``hint`` ends the message with what to pass instead. Checked
    before Hugging Face, whose answers are a hub lookup for a missing path and tracebacks for broken files."""
    shown, path = str(path), Path(path).expanduser()  # the message shows the path as the user wrote it
    kind = "reward model" if reward else "model"
    if not path.exists():
        raise ModelError(f"{shown}: not a saved {kind} (no such directory); {hint}")
    if not path.is_dir():
        raise ModelError(f"{shown}: not a saved {kind} (a file, not a checkpoint directory); {hint}")
    _require_config(path, shown, kind, hint)
    _require_weights(path, shown, kind, hint)
    if reward:
        if not (path / VALUE_HEAD_FILE).is_file():
            raise ModelError(f"{shown}: not a saved reward model (no {VALUE_HEAD_FILE}); {hint}")
        _require_intact_safetensors(path / VALUE_HEAD_FILE)


def require_model_source(name_or_path: str, flag: str | None = None) -> None:
    """A hub id passes (Hugging Face reports on it); a local path must be a checkpoint (``require_checkpoint``)."""
    if looks_local(name_or_path):
        require_checkpoint(name_or_path, f"{flag + ' expects' if flag else 'expected'} a checkpoint directory or a "
                           "Hugging Face model id")


def require_tokenizer_source(name_or_path: str, flag: str | None = None) -> None:
    """A hub id passes; a local path must be a directory holding a saved tokenizer."""
    if not looks_local(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    hint = f"{flag + ' expects' if flag else 'expected'} a tokenizer directory or a Hugging Face model id"
    if not path.is_dir():
        raise ModelError(f"{name_or_path}: not a saved tokenizer ({'a file' if path.exists() else 'no such directory'}"
                         f"); {hint}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{name_or_path}: not a saved tokenizer (no {' or '.join(TOKENIZER_FILES)}); {hint}")


@contextlib.contextmanager
def loading(source: str, what: str) -> Iterator[None]:
    """Turn Hugging Face's errors while loading ``source`` (a hub id it cannot find, a file it cannot parse) into
    one ModelError line naming ``source``; RLHF_TRACEBACK=1 still shows the original, chained."""
    try:
        yield
    except (ModelError, torch.cuda.OutOfMemoryError):  # out of memory is no bad input
        raise
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{source}: cannot load the {what} ({first})") from err


def load_tokenizer(name_or_path: str, flag: str | None = None):
    """A tokenizer from a hub id or a local path; without a pad token it pads with EOS."""
    require_tokenizer_source(name_or_path, flag)
    with loading(name_or_path, "tokenizer"):
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
    dtype = DTYPES[options.dtype]
    if isinstance(source, str):
        require_model_source(source)
        with loading(source, "model"):
            config = _config(source, options.dropout)
            model = auto_class.from_pretrained(source, config=config, dtype=dtype)
    else:
        model = auto_class.from_config(_config(source, options.dropout), dtype=dtype)
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) values. `position_ids` without a mask: packed rows (positions restart at each sequence; the
        backbone's causal mask is block-diagonal, rlhf/core/microbatch.py)."""
        if attention_mask is None and position_ids is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids if position_ids is not None else position_ids_from_mask(attention_mask),
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
        require_checkpoint(path, "expected a directory written by step 2 (rlhf.models.save_reward_model)",
                           reward=True)
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
