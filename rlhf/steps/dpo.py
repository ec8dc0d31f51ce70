"""DPO: the SFT model trained directly on preference pairs, against a frozen copy of itself; no reward model, no RL.

    python -m rlhf.steps.dpo --model-name-or-path out/actor --data pairs.jsonl --output-dir out/dpo

Both the policy and the reference start from the SFT checkpoint; the pairs are step 2's slice of ``--data``.
A sequence's logprob is the sum over its answer tokens (the labels of rlhf/data/tokenize.py's pair batches),
the loss is rlhf/core/losses.py's ``dpo_loss``. Evaluation on held-out pairs, before and after training: the
implicit-reward accuracy (share of pairs with ``r_chosen > r_rejected``, ``r = beta (logp - logp_ref)``, ties
counted half: 0.5 before training, where the policy is its own reference), the
mean margin ``r_chosen - r_rejected`` and the loss. The checkpoint loads with
``AutoModelForCausalLM.from_pretrained(output_dir)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from rlhf.core.losses import DPO_LOSSES, dpo_loss, pair_accuracy
from rlhf.data import IGNORE_INDEX, build_pair_dataset
from rlhf.models import create_actor
from rlhf.runtime.checkpoint import save_actor_checkpoint
from rlhf.runtime.config import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    Bounds,
    StepConfig,
    add_config_args,
    config_from_args,
    opt,
    step_main,
)
from rlhf.runtime.distributed import all_reduce_sum, to_device
from rlhf.runtime.engines import init_inference
from rlhf.runtime.loop import initial_eval, prepare_step, skipped_updates, train_loop
from rlhf.runtime.metrics import MetricsLogger
from rlhf.runtime.process import run_cli
from rlhf.runtime.resume import RunControl


@dataclass
class DPOConfig(StepConfig):
    """DPO options; the DPO paper's beta (0.1) and learning rate (1e-6; Rafailov et al. 2023, appendix B)."""

    model_name_or_path: str | None = opt(None, "the SFT checkpoint (step 1's output): the policy starts from it "
                                         "and the frozen reference is it")
    output_dir: str = opt("outputs/dpo", "where the DPO policy checkpoint is written")
    learning_rate: float = opt(1e-6, "initial learning rate (after warmup)", bounds=POSITIVE)
    # With dropout the policy's logprobs would differ from the (eval-mode) reference's before any update, so the
    # log-ratios start as noise; TRL disables it for DPO too.
    dropout: float | None = opt(0.0, "dropout probability of the policy (None keeps the model's)", bounds=PROBABILITY)
    beta: float = opt(0.1, "strength of the implicit KL to the reference (IPO: its tau)", bounds=POSITIVE)
    loss: str = opt("sigmoid", "sigmoid: DPO (with --label-smoothing: conservative DPO); ipo: IPO's squared loss",
                    choices=list(DPO_LOSSES))
    label_smoothing: float = opt(0.0, "sigmoid loss: probability that a preference is flipped, in [0, 0.5)",
                                 bounds=Bounds(0, 0.5, high_open=True))
    eval_interval: int = opt(0, "evaluate every this many optimizer steps (0: only before and after training)",
                             bounds=NON_NEGATIVE)

    def validate(self) -> None:
        if self.model_name_or_path is None:
            raise ValueError("DPO needs --model-name-or-path: the SFT checkpoint (step 1's output)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"DPO --label-smoothing applies to the sigmoid loss, not --loss {self.loss}")


def answer_logprob_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of ``log p(labels[:, t] | tokens < t)`` over the positions where labels are not -100.

    ``logits`` (B, T, V) are a causal LM's; position t - 1 predicts token t, so labels shift by one as in HF's loss.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    answer = targets != IGNORE_INDEX  # (B, T-1)
    # gather - logsumexp instead of log_softmax: one (B, T-1, V) tensor less at a real vocabulary size.
    picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
    logps = picked - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return (logps * answer).sum(-1)


def pair_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) answer logprob sums of a pair batch: the B chosen rows, then the B rejected rows."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return answer_logprob_sums(logits, batch["labels"])  # right padding: the default positions are right


def dpo_batch(policy, reference, batch: dict[str, torch.Tensor], cfg: DPOConfig):
    """``dpo_loss`` of a pair batch: (loss, chosen_rewards (B,), rejected_rewards (B,))."""
    logps = pair_logps(policy, batch)  # (2B,)
    with torch.no_grad():
        ref_logps = pair_logps(reference, batch)  # (2B,)
    half = logps.shape[0] // 2
    return dpo_loss(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:], cfg.beta, cfg.loss,
                    cfg.label_smoothing)


@torch.no_grad()
def evaluate_dpo(policy, reference, loader, device: torch.device, cfg: DPOConfig) -> dict[str, float]:
    """Held-out loss, implicit-reward accuracy and mean margin, chosen and rejected rewards (means over pairs)."""
    policy.eval()
    loss_sum, correct, count, chosen_sum, rejected_sum = 0.0, 0.0, 0.0, 0.0, 0.0
    for batch in loader:
        loss, chosen, rejected = dpo_batch(policy, reference, to_device(batch, device), cfg)
        loss_sum += loss.item() * chosen.numel()
        correct += pair_accuracy(chosen, rejected).sum().item()
        count += chosen.numel()
        chosen_sum += chosen.sum().item()
        rejected_sum += rejected.sum().item()
    policy.train()
    loss_sum, correct, count, chosen_sum, rejected_sum = all_reduce_sum(
        [loss_sum, correct, count, chosen_sum, rejected_sum], device)
    count = max(count, 1.0)
    return {"eval_loss": loss_sum / count, "accuracy": correct / count,
            "margin": (chosen_sum - rejected_sum) / count, "chosen_reward": chosen_sum / count,
            "rejected_reward": rejected_sum / count}


def run_dpo(cfg: DPOConfig, tokenizer=None, metrics: MetricsLogger | None = None,
            control: RunControl | None = None) -> dict:
    """Train ``cfg.model_name_or_path`` with DPO on ``cfg.data``'s step-2 pairs, evaluate, save to
    ``cfg.output_dir``; return a summary."""
    cfg.validate()
    start = time.time()
    s = prepare_step(cfg, 2, "dpo", "DPO", build_pair_dataset, create_actor, tokenizer=tokenizer, metrics=metrics,
                     control=control)
    # The reference gets none of the policy's LoRA or checkpointing: it is the SFT model, frozen. Its parameters
    # can only be offloaded under ZeRO-3 (init_inference), so --offload reaches it there only.
    reference = init_inference(create_actor(cfg.model_name_or_path), cfg.per_device_train_batch_size,
                               cfg.zero_stage, cfg.offload and cfg.zero_stage == 3, cfg.dtype)

    def evaluate(engine):
        return evaluate_dpo(engine, reference, s.eval_loader, s.dist.device, cfg)

    initial = initial_eval(s, "dpo_eval", lambda: evaluate(s.engine))

    def loss_fn(engine, batch):
        loss, chosen, rejected = dpo_batch(engine, reference, batch, cfg)
        return loss, {"train_accuracy": pair_accuracy(chosen, rejected).mean().item(),
                      "margin": (chosen - rejected).mean().item()}

    step, last_loss = train_loop(s, cfg, "DPO", loss_fn, evaluate if len(s.eval_set) else None, cfg.eval_interval,
                                 saved={"initial": initial})
    final = evaluate(s.engine) if len(s.eval_set) else {}
    if final:
        s.metrics.log("dpo_eval", step, **final)
    save_actor_checkpoint(s.engine.module, s.tokenizer, cfg.output_dir)
    nan = float("nan")
    return {
        "output_dir": cfg.output_dir,
        "train_pairs": len(s.train_set),
        "eval_pairs": len(s.eval_set),
        "steps": step,
        "final_train_loss": last_loss,
        "initial_accuracy": initial.get("accuracy", nan),
        "accuracy": final.get("accuracy", nan),
        "margin": final.get("margin", nan),
        **skipped_updates(s),
        "seconds": time.time() - start,
    }


def add_dpo_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "",
                 skip: tuple[str, ...] = (), defaults: DPOConfig | None = None) -> None:
    """Every DPOConfig option as ``--{prefix}name`` (``--beta``, or ``--dpo-beta`` in ``rlhf train``)."""
    add_config_args(parser, DPOConfig, prefix, skip, defaults)


def dpo_config_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> DPOConfig:
    return config_from_args(DPOConfig, args, prefix, **overrides)


def main(argv: list[str] | None = None) -> dict:
    return step_main(DPOConfig, run_dpo, "DPO of the SFT model on preference pairs", argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m rlhf.steps.dpo"))
