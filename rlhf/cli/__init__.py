"""The ``rlhf`` console script: ``rlhf train [...]`` runs the pipeline, ``rlhf eval CHECKPOINT ...`` scores a policy
on prompts with a reward, ``rlhf chat PATH`` chats with a model."""

from __future__ import annotations

import sys

from rlhf.runtime.process import run_cli

USAGE = """usage: rlhf {train,eval,chat} ...

  rlhf train [options]     steps 1-3 (no options: the tiny preset end to end on CPU); rlhf train --help
  rlhf eval CHECKPOINT --data FILE (--reward-fn F | --reward-model DIR) --output-dir DIR
                           greedy and sampled rewards, pass@k, with standard errors; rlhf eval --help
  rlhf chat PATH [options] chat with a saved actor; rlhf chat --help
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from rlhf.cli.train import main as train_main

        return run_cli(train_main, "rlhf train", rest)
    if command == "eval":
        from rlhf.cli.eval import main as eval_main

        return run_cli(eval_main, "rlhf eval", rest)
    if command == "chat":
        from rlhf.cli.chat import main as chat_main

        return run_cli(chat_main, "rlhf chat", rest)
    print(f"rlhf: unknown command '{command}'\n{USAGE}", end="", file=sys.stderr)
    return 2

