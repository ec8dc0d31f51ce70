"""DeepSpeed set-up shared by the three steps: process group, ds_config, engine with optimizer and schedule.

Works in a plain single process on CPU (gloo, env defaults filled in) and under the ``deepspeed`` /
``torchrun`` launchers, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

Optimizer choice: DeepSpeed's FusedAdam needs CUDA, so we create the optimizer ourselves: torch AdamW on
CPU and for GPU without offload (``fused=True`` on CUDA), DeepSpeedCPUAdam when ZeRO offloads the optimizer
state to the CPU (it is ~5x faster there than torch's, and DeepSpeed expects it for offload).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn


def ds_config(
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    zero_stage: int = 0,
    offload: bool = False,
    dtype: str = "fp32",
    gradient_clipping: float = 1.0,
    world_size: int | None = None,
    steps_per_print: int = 10**9,
) -> dict:
    """A ds_config.json as a dict. The optimizer and scheduler are created by ``initialize``, not here."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype}")
    device = "cpu" if offload else "none"
    zero = {
        "stage": zero_stage,
        "offload_param": {"device": device if zero_stage == 3 else "none"},
        "offload_optimizer": {"device": device},
        "stage3_param_persistence_threshold": 10_000,
        "stage3_max_live_parameters": 30_000_000,
        "stage3_prefetch_bucket_size": 30_000_000,
        "memory_efficient_linear": False,
    }
    return {
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "steps_per_print": steps_per_print,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100},
        "gradient_clipping": gradient_clipping,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        # We pass a torch optimizer under offload on CPU-only hosts; DeepSpeed would otherwise insist on its own.
        "zero_force_ds_cpu_optimizer": False,
    }


def param_groups(model: nn.Module, weight_decay: float, lora_lr: float | None = None) -> list[dict]:
    """Trainable parameters split into decay / no-decay (biases and norms) groups, and LoRA at its own lr."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "bias" in name or "norm" in name.lower()
        is_lora = "lora_" in name
        groups.setdefault((no_decay, is_lora), []).append(param)
    out = []
    for (no_decay, is_lora), params in groups.items():
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if is_lora and lora_lr is not None:
            group["lr"] = lora_lr
        out.append(group)
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out


def make_optimizer(groups: list[dict], lr: float, offload: bool, betas=(0.9, 0.95)) -> torch.optim.Optimizer:
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available() and not offload)


def warmup_steps(total_steps: int, num_warmup_steps: int, warmup_ratio: float | None = None) -> int:
    """Optimizer steps of linear warmup: ``warmup_ratio`` of the run's ``total_steps`` (rounded up, as Hugging Face
    does) when it is given, else ``num_warmup_steps``. A fixed count suits no run length: 100 steps (step 3's
    default) is the whole of a short run, spent at a tiny learning rate."""
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio is not None else num_warmup_steps


def initialize(
    model: nn.Module,
    config: dict,
    lr: float,
    weight_decay: float = 0.0,
    num_training_steps: int = 1,
    num_warmup_steps: int = 0,
    scheduler: str = "cosine",
    lora_lr: float | None = None,
):
    """Wrap ``model`` in a DeepSpeed engine with AdamW (trainable parameters only) and a warmup + decay schedule.

    ``num_training_steps`` counts optimizer steps (after gradient accumulation). Returns the engine.
    """
    import deepspeed
    from transformers import get_scheduler

    offload = config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    optimizer = make_optimizer(param_groups(model, weight_decay, lora_lr), lr, offload)
    lr_scheduler = get_scheduler(
        scheduler,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=max(1, num_training_steps),
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
    return engine


def frozen_zero_stage(trainee_stage: int) -> int:
    """ZeRO stage of a frozen model (reference, reward) beside a trainee at ``trainee_stage``: 3 when the trainee
    shards its parameters, else 0 (DeepSpeed-Chat's rule). Stages 1 and 2 shard optimizer state and gradients,
    which a frozen model has none of, and DeepSpeed refuses them without an optimizer."""
    return 3 if trainee_stage == 3 else 0


def init_inference(model: nn.Module, micro_batch_size: int, trainee_stage: int, offload: bool = False,
                   dtype: str = "fp32"):
    """A DeepSpeed engine for a frozen model (reference / reward model in PPO), no optimizer, at the ZeRO stage
    ``frozen_zero_stage(trainee_stage)``. ``offload`` moves its parameters to CPU memory, which DeepSpeed does
    under ZeRO-3 only; elsewhere the flag has nothing to act on and a warning says so."""
    import deepspeed

    stage = frozen_zero_stage(trainee_stage)
    if offload and stage != 3:
        warnings.warn(f"parameter offload of a frozen model needs ZeRO-3; its trainee uses stage {trainee_stage}, "
                      "so the model stays where it is", RuntimeWarning, stacklevel=2)
    for param in model.parameters():
        param.requires_grad_(False)
    config = ds_config(micro_batch_size, 1, stage, offload and stage == 3, dtype)
    config["zero_optimization"]["offload_optimizer"] = {"device": "none"}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
