"""What a run across nodes needs of them, and what it does when one is lost.

- **One shared output directory.** Rank 0 alone writes what every rank reads back (the synthetic data, each step's
  saved model, run_state.json, the checkpoints' meta.json), while every rank writes its own part of a checkpoint
  (its ZeRO partitions, its rank<r>.pt) next to rank 0's. So every node must see the same ``--output-dir``
  (NFS, Lustre, a cluster filesystem at the same path); ``require_shared_dir`` refuses node-local ones at start.
- **A lost node.** Every rank beats a counter in the process group's store (``Heartbeat``, one thread). When a
  collective fails (gloo's "Connection reset by peer", or its timeout, ``--collective-timeout``, when a node is
  silent), ``lost_ranks`` names the ranks whose counter stopped, and ``lost_message`` says so in one line.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

BEAT_S = 1.0       # one store increment per rank per second: a few bytes, off the training thread
SILENT_BEATS = 4   # a rank whose counter has not moved for this many beats is lost
LOST_EXIT = 75     # EX_TEMPFAIL: the run can go on from its newest checkpoint once the nodes are back


def _store(timeout_s: float):
    """A client of its own to the store the process group rendezvoused through (torchrun's agent's, or rank 0's):
    heartbeats and the lost-rank check never wait behind the group's own store calls."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def node_name() -> str:
    """This host's name and its address toward the rendezvous (MASTER_ADDR): what names a node in messages."""
    addr = "?"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # UDP connect: picks the route, sends nothing
            sock.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "1"))))
            addr = sock.getsockname()[0]
    except OSError:
        pass
    return f"{socket.gethostname()} {addr}"


def group_restarts() -> int:
    """How often torchrun (--max-restarts) has started this group again: the largest TORCHELASTIC_RESTART_COUNT of
    its ranks. Agents count apart: one whose workers failed counts a restart, one that only restarts its healthy
    workers to re-form the group does not. Collective."""
    import torch.distributed as dist

    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    return max(counts)


class Heartbeat:
    """A daemon thread adding 1 to ``rlhf/<launch>/beat/<rank>`` in the store every ``BEAT_S`` seconds; it runs
    while the training thread waits inside a collective (which releases the GIL). ``launch`` is a token rank 0
    draws for this group (a restarted group may meet the keys of the one before it in the same store). Started
    once per process; collective."""

    prefix: str | None = None

    @classmethod
    def start(cls, rank: int) -> None:
        import torch.distributed as dist

        if cls.prefix is not None:
            return
        token = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        cls.prefix = f"rlhf/{token[0]}"
        store = _store(10 * BEAT_S)
        store.set(f"{cls.prefix}/node/{rank}", node_name())
        key = f"{cls.prefix}/beat/{rank}"

        def beat() -> None:
            while True:
                try:
                    store.add(key, 1)
                except Exception:  # noqa: BLE001 -- the store's node is gone: nothing left to tell
                    return
                time.sleep(BEAT_S)

        threading.Thread(target=beat, name="rlhf-heartbeat", daemon=True).start()


def comm_failure(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is a failed collective or store operation: a peer that closed
    its connection or stayed silent past the timeout, not a bug of one rank."""
    import torch.distributed as dist

    seen = err
    while seen is not None:
        text = str(seen)
        if (isinstance(seen, dist.DistError) or "gloo/transport" in text or "NCCL" in text
                or (isinstance(seen, OSError) and seen.errno in (errno.ECONNRESET, errno.ECONNREFUSED))):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def lost_ranks(rank: int, world: int) -> tuple[list[int], dict[int, str]] | None:
    """The ranks whose heartbeat stopped (``SILENT_BEATS`` beats to tell) without saying they saw the failure too,
    with their nodes' names; None when the store itself cannot be reached (it lives on rank 0's node, or with
    torchrun on its agent's)."""
    prefix = Heartbeat.prefix
    beats = [f"{prefix}/beat/{r}" for r in range(world)]
    try:
        store = _store(2 * BEAT_S)
        store.set(f"{prefix}/failed/{rank}", "1")  # a survivor that stops first is no lost rank
        first = [store.add(k, 0) for k in beats]
        time.sleep(SILENT_BEATS * BEAT_S)
        lost = [r for r, k in enumerate(beats)
                if store.add(k, 0) == first[r] and not store.check([f"{prefix}/failed/{r}"])]
        names = {r: store.get(f"{prefix}/node/{r}").decode() for r in lost}
    except Exception:  # noqa: BLE001 -- any store error means the same: it is out of reach
        return None
    return lost, names


def _gist(err: BaseException) -> str:
    """The first sentence of an error, without the source location gloo puts first: "Read error
    [10.0.0.2]:32485: Connection reset by peer"."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line.split(". ")[0][:200]


def _ranges(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def lost_message(err: BaseException, rank: int, world: int) -> tuple[str, bool] | None:
    """One line naming the lost ranks and their nodes after the collective failure ``err``, and whether this rank
    says it (the lowest surviving rank does); None when every rank still beats (then it is no lost node, and the
    error is shown as it is)."""
    if Heartbeat.prefix is None:  # failed before the heartbeats began: nothing to tell lost ranks by
        return None
    found = lost_ranks(rank, world)
    first_line = _gist(err)
    if found is None:  # no store: no survivor can tell the others; each says it
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return (f"rank {rank}: a collective failed ({first_line}) and the rendezvous store at {where} (on rank 0's "
                "node) is out of reach: that node is lost or this one is cut off; once they are back, restart every "
                "node's launch with --resume"), True
    lost, names = found
    if not lost:
        return None
    nodes = sorted(set(names.values()))
    speaker = min(r for r in range(world) if r not in lost)
    return (f"lost rank{'s' if len(lost) > 1 else ''} {_ranges(lost)} (node {', '.join(nodes)}): no heartbeat for "
            f"{SILENT_BEATS * BEAT_S:.0f} s after a collective failed on rank {rank} ({first_line}); the survivors "
            "stopped; once the node is back, restart every node's launch with --resume (torchrun --max-restarts N "
            "does it by itself)"), rank == speaker


def require_shared_dir(path: str | Path, rank: int, world: int) -> None:
    """One line on every rank unless every rank sees the file rank 0 writes into ``path`` (a node-local
    --output-dir, or a different path per node). Call on every rank; collective."""
    import torch.distributed as dist

    path = Path(path)
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = path / f".shared-probe-{token[0]}"
    if rank == 0:
        probe.write_text(token[0])
    dist.barrier()
    sees = [None] * world
    dist.all_gather_object(sees, (probe.is_file() and probe.read_text() == token[0], node_name()))
    dist.barrier()
    if rank == 0:
        probe.unlink()
    blind = [r for r, (seen, _) in enumerate(sees) if not seen]
    if blind:
        nodes = sorted({sees[r][1] for r in blind})
        who = f"ranks {_ranges(blind)} (node {', '.join(nodes)}) do" if len(blind) > 1 else \
            f"rank {blind[0]} (node {nodes[0]}) does"
        raise ValueError(f"--output-dir {path}: {who} not see the files rank 0 ({sees[0][1]}) writes there; a run "
                         "across nodes needs one directory every node shares (NFS, Lustre, ...) at the same path: "
                         "rank 0 writes the data, models and checkpoint records once, and every rank reads them")
