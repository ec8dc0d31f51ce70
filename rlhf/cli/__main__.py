"""``python -m rlhf.cli train|chat ...``: the ``rlhf`` console script."""
import sys

from rlhf.cli import main

sys.exit(main())
