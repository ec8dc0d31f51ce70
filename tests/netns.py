"""Two "nodes" on one host for the multi-node tests: two network namespaces joined by a veth pair.

Each namespace holds one end of the pair, named ``IFNAME`` on both sides (as ``eth0`` is on every machine of a
cluster), with an address of its own in a private /30, and its own loopback. A process started with ``node.popen``
runs inside the namespace: it reaches the other node only over the veth, and nothing else (there is no route out),
so the collectives of a torchrun job cross a real network interface, with its own TCP stack on each side.

    with TwoNodes() as nodes:
        procs = [nodes[i].popen(torchrun(i)) for i in range(2)]

Namespaces and links need root and ``ip`` (iproute2); ``unavailable()`` says why they cannot be made, and a
test skips with that reason unless ``RLHF_REQUIRE_NETNS=1`` (set by .ci/run), where it fails instead. Every
namespace is named after this process and a random token, so parallel runs never share one, and ``close`` (also on
any failure in ``__enter__``) kills the processes it started and deletes both namespaces (which deletes the link).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field

IFNAME = "rlhf0"           # the veth end in each namespace: GLOO_SOCKET_IFNAME names it
SUBNET = "10.231.77.{}"    # a private /30; in namespaces of their own it cannot clash with the host's networks
PREFIX = 30


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"rlhfprobe{os.getpid()}{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


def require_netns():
    """Skip the calling test when namespaces cannot be made, or fail under RLHF_REQUIRE_NETNS=1 (CI)."""
    import pytest

    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("RLHF_REQUIRE_NETNS") == "1":
        pytest.fail(f"RLHF_REQUIRE_NETNS=1 but two network namespaces cannot be made: {reason}")
    pytest.skip(f"two-node tests need network namespaces: {reason}")


@dataclass
class Node:
    """One namespace: ``addr`` on ``IFNAME``; ``popen`` runs a command inside it, ``kill`` ends every process
    in it."""

    name: str
    addr: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process inside this namespace (torchrun starts its workers in sessions of their own)."""
        return [int(pid) for pid in _ip("netns", "pids", self.name).stdout.split()]

    def kill(self) -> None:
        """SIGKILL every process in this namespace: a node that lost power."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait()

    def link(self, up: bool) -> None:
        """Bring this node's end of the link up or down: a pulled cable (no packet in or out, nothing closed)."""
        _check(_ip("-n", self.name, "link", "set", IFNAME, "up" if up else "down"))


def _check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode:
        raise RuntimeError(f"{' '.join(proc.args)}: {proc.stderr.strip()}")


class TwoNodes:
    """Two namespaces joined by a veth pair: ``nodes[0].addr`` is 10.231.77.1, ``nodes[1].addr`` 10.231.77.2."""

    def __init__(self):
        token = f"{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.nodes = [Node(f"rlhf{token}n{i}", SUBNET.format(i + 1)) for i in range(2)]

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def __enter__(self) -> TwoNodes:
        try:
            a, b = self.nodes
            for node in self.nodes:
                _check(_ip("netns", "add", node.name))
            # both ends named IFNAME, each created directly inside its namespace
            _check(_ip("link", "add", IFNAME, "netns", a.name, "type", "veth", "peer", "name", IFNAME, "netns",
                       b.name))
            for node in self.nodes:
                _check(_ip("-n", node.name, "addr", "add", f"{node.addr}/{PREFIX}", "dev", IFNAME))
                _check(_ip("-n", node.name, "link", "set", IFNAME, "up"))
                _check(_ip("-n", node.name, "link", "set", "lo", "up"))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        for node in self.nodes:
            _ip("netns", "delete", node.name)  # also deletes its veth end, and with it the pair
