"""Chat with a trained actor through the hybrid engine.

    rlhf chat outputs/ppo/actor                 # interactive; `clear` forgets the conversation, `quit` leaves
    rlhf chat outputs/ppo/actor --prompt "review: pizza hotel"   # answer once and exit (for scripts)

Turns are written with the tokenizer's chat template when it has one, else in the "Human: ... Assistant:"
format the pipeline trains on. When the conversation outgrows --max-seq-len, the oldest turns are dropped.
"""
from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM

import hybrid_engine
from rlhf.data.tokenize import DEFAULT_TEMPLATE
from rlhf.models import load_tokenizer, loading, require_checkpoint
from rlhf.runtime.config import AT_LEAST_1, ArgumentParser, Bounds, bounded, option_bounds
from rlhf.runtime.process import run_cli
from rlhf.steps.rl_config import SamplingOptions


class Chat:
    """A conversation with one model: a list of (user, assistant) turns and the engine that answers."""

    def __init__(self, path: str, max_seq_len: int = 1024, max_new_tokens: int = 128, do_sample: bool = True,
                 temperature: float = 0.7, top_k: int = 0, top_p: float = 0.9, seed: int = 0, device: str = "cpu"):
        require_checkpoint(path, "pass a checkpoint directory such as outputs/run/ppo/actor")
        self.tokenizer = load_tokenizer(path)
        with loading(path, "model"):
            model = AutoModelForCausalLM.from_pretrained(path).to(device)
        self.engine = hybrid_engine.wrap(model, max_seq_len=max_seq_len, max_batch_size=1, allow_fallback=True).eval()
        self.max_seq_len, self.max_new_tokens = max_seq_len, min(max_new_tokens, max_seq_len - 1)
        self.sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device
        self.turns: list[tuple[str, str]] = []

    def clear(self) -> None:
        self.turns = []

    def _encode(self, user: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [m for u, a in self.turns for m in ({"role": "user", "content": u},
                                                           {"role": "assistant", "content": a})]
            messages.append({"role": "user", "content": user})
            # transformers 5 returns a BatchEncoding unless told otherwise (4.x returned the ids); ask for the ids
            return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        text = "\n\n".join(DEFAULT_TEMPLATE.format(prompt=u) + " " + a for u, a in self.turns)
        text = (text + "\n\n" if text else "") + DEFAULT_TEMPLATE.format(prompt=user)
        return tok(text)["input_ids"]

    def ask(self, user: str) -> str:
        """Answer `user` in the context of the conversation so far, and remember the turn."""
        ids = self._encode(user)
        while len(ids) + self.max_new_tokens > self.max_seq_len and self.turns:
            self.turns.pop(0)  # forget the oldest turn rather than fail
            ids = self._encode(user)
        if len(ids) + self.max_new_tokens > self.max_seq_len:
            raise ValueError(f"the message is {len(ids)} tokens; with --max-new-tokens {self.max_new_tokens} it "
                             f"exceeds --max-seq-len {self.max_seq_len}")
        input_ids = torch.tensor([ids], device=self.device)
        out = self.engine.generate(input_ids, max_new_tokens=self.max_new_tokens,
                                   eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                   generator=self.generator, **self.sampling)
        answer = self.tokenizer.decode(out.sequences[0, len(ids):][out.action_mask[0]], skip_special_tokens=True)
        answer = answer.strip()
        self.turns.append((user, answer))
        return answer


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rlhf chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a saved actor: a Hugging Face checkpoint directory (e.g. outputs/ppo/actor)")
    p.add_argument("--prompt", default=None, help="answer this one message, print the answer and exit")
    p.add_argument("--max-new-tokens", type=bounded(int, AT_LEAST_1), default=128,
                   help="longest answer in tokens (default 128)")
    p.add_argument("--max-seq-len", type=bounded(int, Bounds(2)), default=1024, help="conversation + answer budget "
                   "in tokens; older turns are dropped beyond it (default 1024)")
    p.add_argument("--greedy", action="store_true", help="pick the most likely token instead of sampling")
    p.add_argument("--temperature", type=bounded(float, option_bounds(SamplingOptions, "temperature")), default=0.7,
                   help="sampling temperature (default 0.7)")
    p.add_argument("--top-k", type=bounded(int, option_bounds(SamplingOptions, "top_k")), default=0,
                   help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=bounded(float, option_bounds(SamplingOptions, "top_p")), default=0.9,
                   help="nucleus sampling mass (default 0.9; 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chat = Chat(args.path, args.max_seq_len, args.max_new_tokens, not args.greedy, args.temperature, args.top_k,
                args.top_p, args.seed, args.device)
    if args.prompt is not None:
        print(chat.ask(args.prompt))
        return 0
    print("Chatting with", args.path, "- type 'clear' to start over, 'quit' to leave.")
    while True:
        try:
            user = input("Human: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user == "quit":
            return 0
        if user == "clear":
            chat.clear()
            print("(conversation cleared)")
            continue
        if user:
            print("Assistant:", chat.ask(user), flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main, "rlhf chat"))
