"""``python -m rlhf.train``, ``torchrun -m rlhf.train`` and ``deepspeed --module rlhf.train``: the ``rlhf train``
command (rlhf/cli/train.py), under the module name its launch lines and resume hints have always used."""
import sys

from rlhf.cli.train import main
from rlhf.runtime.process import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main, "rlhf train"))
