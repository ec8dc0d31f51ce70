"""The one place that asks whether this is a multi-process run, and the process group set-up (DeepSpeed's, gloo on
CPU, NCCL on CUDA) with the small collectives the steps share."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from rlhf.runtime.cluster import Heartbeat


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) when no process group is up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return rank_world()[1] > 1


def is_main_process() -> bool:
    return rank_world()[0] == 0


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _cpu_only() -> bool:
    return not torch.cuda.is_available()


def _free_port() -> int:
    """A TCP port the system reports free now. A port derived from the pid (as before) could still be held in
    TIME_WAIT by a process that just exited (a killed run resumed at once): EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0  # a silent peer ends the run in 5 minutes, not NCCL's or gloo's 30


def require_fresh_store_on_restart() -> None:
    """One line unless a torchrun with --max-restarts gives each start of the group a store of its own. With its
    default, one store shared by every round of the rendezvous (the agent's), a restarted group finds the previous
    group's keys there: a rank can read a dead peer's address before the peer's new start overwrites it ("Gloo
    connectFullMesh failed ... Connection refused", seen in 1 of 2 restarts of tests/test_multinode.py)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ValueError(f"torchrun --max-restarts {restarts}: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every "
                         "node's environment, so each start of the group gets a store of its own (with torchrun's "
                         "shared store a restarted group can read its dead predecessors' addresses)")


def set_default_group_timeout(timeout: timedelta) -> None:
    """The timeout of every process group made later without one: torch's ``new_group`` takes its module default
    (30 minutes for gloo and NCCL), not the world group's, and DeepSpeed makes its data-parallel group (every ZeRO
    collective) and the engine its TP groups that way."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed once; idempotent (the first call's ``timeout_s`` holds).

    Without a launcher it runs as rank 0 of 1 (MASTER_ADDR 127.0.0.1, a free MASTER_PORT). On CPU the
    backend is gloo, on CUDA NCCL. ``timeout_s`` (``--collective-timeout``, default 300) bounds every collective
    and store wait: a rank whose peer went silent raises after it instead of hanging. Several processes each
    start a heartbeat (rlhf.runtime.cluster), which names the ranks that stopped when a collective fails.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process of its own: any port the system has free
        os.environ["MASTER_PORT"] = str(_free_port())
    require_fresh_store_on_restart()
    import deepspeed

    if _cpu_only():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (30-90 s on first use). One process
        # needs no collective; several CPU processes use gloo's (torch.distributed), which is all we call.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ValueError(f"LOCAL_RANK {local_rank}: this node shows {visible} CUDA device(s); start at most "
                             f"{visible} processes per node, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPU "
                             "with gloo")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = timedelta(seconds=timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S)
    set_default_group_timeout(timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)
    if info.world_size > 1:
        Heartbeat.start(info.rank)
    return info


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (identity in a single process)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order ([obj] in a single process)."""
    import torch.distributed as dist

    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def make_dataloader(
    dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 1234,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with the dataset's collator (``dataset.collate``); each rank gets its own shard when several
    processes run."""
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=dataset.collate, drop_last=drop_last
    )
