"""How an entry point ends: one line for bad input (exit 2), a resume hint after a signal, and in a
multi-process run os._exit after a barrier (end_process)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from rlhf.runtime.cluster import LOST_EXIT, comm_failure, lost_message
from rlhf.runtime.distributed import is_distributed, rank_world


def run_cli(main: Callable, prog: str, argv: list[str] | None = None) -> int:
    """Run an entry point's `main(argv)`. Bad input (a ValueError, such as the data loader's DataError naming
    file, line and field) ends the run with that one line on stderr and exit status 2, not a traceback;
    RLHF_TRACEBACK=1 shows the traceback instead. A run stopped by SIGTERM/SIGINT after its checkpoint prints how
    to resume and exits 143/130. A collective that fails because ranks stopped (a lost node: their heartbeats
    stopped) ends in one line naming them, exit 75. In a multi-process run the process ends here, through
    `end_process`."""
    from rlhf.runtime.guards import Stopped

    try:
        result = main(argv)
    except ValueError as err:
        if os.environ.get("RLHF_TRACEBACK"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return end_process(2, all_ranks=False)  # bad input may be seen by one rank only: no barrier
    except Stopped as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: {stop}", file=sys.stderr, flush=True)
        return end_process(stop.code)
    except RuntimeError as err:  # torch.distributed's DistError too
        if not is_distributed() or not comm_failure(err) or os.environ.get("RLHF_TRACEBACK"):
            raise
        found = lost_message(err, *rank_world())
        if found is None:  # every rank still beats: not a lost node; the traceback says what it is
            raise
        message, speaker = found
        if speaker:
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return end_process(LOST_EXIT, all_ranks=False)
    return end_process(result if isinstance(result, int) else 0)


def end_process(code: int, all_ranks: bool = True) -> int:
    """Return ``code`` in a single process. In a multi-process run, end the process here with it: a barrier (when
    ``all_ranks`` got here), the groups destroyed, output flushed, then ``os._exit``, skipping the interpreter's
    shutdown. During that shutdown gloo's worker threads can still be dropping their last finished collectives,
    whose tensors need the GIL the shutdown has taken; the thread is killed inside a destructor and the rank aborts
    ("terminate called without an active exception", SIGABRT) after its work is done and saved. Seen in 2 of 20
    plain two-process gloo runs that exit normally, and in CI once even after barrier + destroy_process_group.
    A single process keeps its group: DeepSpeed caches groups made from it, and a caller that runs again in the
    same process (a test, a notebook) needs them alive."""
    import logging

    import torch.distributed as dist

    if not is_distributed():
        return code
    if all_ranks:
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
