"""Evaluate a policy on a file of prompts with a reward: greedy and sampled answers through the hybrid engine.

    rlhf eval outputs/run/grpo/actor --data heldout.jsonl --reward-fn reward.py:exact_number --output-dir ev
    rlhf eval outputs/run/ppo/actor --data prompts.jsonl --reward-model outputs/run/reward --n-samples 8 ...
    rlhf eval --config eval.yaml                       # the same options as YAML; flags override it

Every record of --data gives its prompt (a string, or chat `messages` ending in a user turn, written with the
tokenizer's chat template); its other fields (`answer`, ...) reach the reward function as columns, as in training.
Prints the greedy answers' mean reward, the mean reward of --n-samples sampled answers and pass@k (k = 1, 2, 4,
... K; an answer passes when its reward is at least --pass-threshold), each with its standard error over prompts,
and writes OUTPUT_DIR/eval.json (those numbers, as {"mean", "stderr"}, with n_prompts and n_samples) and
OUTPUT_DIR/generations.jsonl (one line per answer: index, prompt, sample (null: greedy), answer, reward).
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import hybrid_engine
from rlhf.core.experience import sample
from rlhf.core.rewards import RewardFunction
from rlhf.data import build_prompt_dataset
from rlhf.models import RewardModel, load_tokenizer, loading, require_checkpoint, require_model_source
from rlhf.runtime.config import (
    AT_LEAST_1,
    ArgumentParser,
    apply_config_file,
    bounded,
    option_bounds,
    read_config_file,
    require_output_dir,
)
from rlhf.runtime.distributed import make_dataloader
from rlhf.runtime.process import run_cli
from rlhf.steps.eval import EvalSettings, decode_answers, evaluate, format_result, load_eval_examples, write_eval
from rlhf.steps.rl_config import SamplingOptions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rlhf eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="the policy: a saved actor (e.g. outputs/run/grpo/actor) or a Hugging Face model id")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="options as YAML (checkpoint, data, reward-fn, n-samples, ...); flags given here override it")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="prompt records (JSON list, JSONL, or a datasets directory); every record is evaluated")
    p.add_argument("--reward-fn", default=None, metavar="FILE.py:FUNCTION",
                   help="score answers with a Python function: 'synthetic', 'path/file.py:function' or "
                   "'package.module:function' (rlhf/core/rewards.py)")
    p.add_argument("--reward-model", default=None, metavar="DIR",
                   help="score answers with a saved reward model (step 2's output) instead")
    p.add_argument("--n-samples", type=bounded(int, AT_LEAST_1), default=4,
                   help="sampled answers per prompt, for mean_reward and pass@k (default 4; the greedy answer is "
                   "extra)")
    p.add_argument("--temperature", type=bounded(float, option_bounds(SamplingOptions, "temperature")), default=1.0,
                   help="sampling temperature of the sampled answers (default 1.0)")
    p.add_argument("--top-p", type=bounded(float, option_bounds(SamplingOptions, "top_p")), default=1.0,
                   help="nucleus sampling mass of the sampled answers (default 1: off)")
    p.add_argument("--max-new-tokens", type=bounded(int, AT_LEAST_1), default=256,
                   help="longest answer in tokens (default 256)")
    p.add_argument("--max-prompt-len", type=bounded(int, AT_LEAST_1), default=512,
                   help="longer prompts are skipped and counted (default 512 tokens)")
    p.add_argument("--limit", type=bounded(int, AT_LEAST_1), default=None,
                   help="evaluate only the first N records (default: all)")
    p.add_argument("--pass-threshold", type=float, default=1.0,
                   help="an answer passes (pass@k) when its reward is at least this (default 1.0)")
    p.add_argument("--batch-size", type=bounded(int, AT_LEAST_1), default=64,
                   help="answers generated per engine call (default 64)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): the same policy gets the same "
                   "answers")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights' precision (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output-dir", default=None, help="where eval.json and generations.jsonl are written")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags over the --config file's values; one line for what is missing or contradictory."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        apply_config_file(parser, read_config_file(first.config), first.config)
    args = parser.parse_args(argv)
    missing = [flag for flag, value in (("CHECKPOINT", args.checkpoint), ("--data", args.data),
                                         ("--output-dir", args.output_dir)) if not value]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (on the command line or in the --config file)")
    if (args.reward_fn is None) == (args.reward_model is None):
        raise ValueError("give exactly one of --reward-fn FILE.py:FUNCTION and --reward-model DIR, got "
                         + ("both" if args.reward_fn else "neither"))
    return args


def load_prompts(args: argparse.Namespace, tokenizer, reward_fn: RewardFunction | None):
    """The prompt dataset of every record of --data, in file order, up to --limit."""
    examples = load_eval_examples(args.data, args.limit)
    if reward_fn is not None:
        reward_fn.check_fields(examples)
    dataset = build_prompt_dataset(tokenizer, examples, args.max_prompt_len)
    if len(dataset) == 0:
        raise ValueError(f"{' '.join(args.data)}: no prompt within --max-prompt-len {args.max_prompt_len} tokens")
    return dataset


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_output_dir(args.output_dir)
    require_model_source(args.checkpoint, "CHECKPOINT")
    reward_fn = RewardFunction(args.reward_fn) if args.reward_fn else None
    if args.reward_model:
        require_checkpoint(args.reward_model, "--reward-model expects step 2's output", reward=True)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    tokenizer = load_tokenizer(args.checkpoint)
    dataset = load_prompts(args, tokenizer, reward_fn)
    with loading(args.checkpoint, "model"):
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(device)
    max_prompt = max(len(row) for row in dataset.rows)
    engine = hybrid_engine.wrap(model, max_seq_len=max_prompt + args.max_new_tokens, max_batch_size=args.batch_size,
                                allow_fallback=True).eval()
    if reward_fn is not None:
        score = lambda s, prompts, fields: reward_fn(prompts, decode_answers(tokenizer, s), fields)  # noqa: E731
    else:
        with loading(args.reward_model, "reward model"):
            reward_model = RewardModel.from_pretrained(args.reward_model).to(device=device, dtype=dtype).eval()
        score = lambda s, prompts, fields: reward_model.score(s.sequences, s.attention_mask).float().cpu()  # noqa: E731
    sampler = lambda ids, mask, params, prompts, fields: sample(  # noqa: E731
        engine, ids, mask, params, args.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, switch=False)
    settings = EvalSettings(args.n_samples, args.temperature, 0, args.top_p, args.pass_threshold, args.seed)
    loader = make_dataloader(dataset, max(1, args.batch_size // args.n_samples), shuffle=False)
    with tqdm(total=len(dataset), desc="rlhf eval", unit="prompt") as bar:
        result, generations = evaluate(sampler, score, tokenizer, dataset, loader, settings, device, args.batch_size,
                                       bar.update)
    path = write_eval(args.output_dir, result, generations)
    skipped = f"; {dataset.num_dropped} prompts over --max-prompt-len skipped" if dataset.num_dropped else ""
    print(f"{format_result(result)}{skipped}\nwrote {path} and {path.parent / 'generations.jsonl'}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, "rlhf eval"))
