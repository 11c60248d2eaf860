"""Test hosts: network namespaces on this machine whose network a test can cut, as a partition would.

Each host is a namespace joined to this machine by a veth pair, with addresses of TEST-NET-1 (192.0.2.0/24, a
documentation range: no one else's host is there, and these exist only inside the namespaces made here). The
broker of `scripts/kafka.sh` listens on 192.0.2.1 (an address of this machine's loopback interface, added as
root) besides 127.0.0.1, so a worker on a test host reaches it through its veth link.

A cut is an nftables table in the host's namespace that drops every packet in and out, but on its own
loopback: no reset, no link change, no error at once, as a switch or a cloud host losing its network gives.
Deleting the table heals it. A pause (SIGSTOP/SIGCONT) needs no host.

Needs root, `ip` (iproute2) and `nft` (nftables, installed with apt-get when missing). Used by
`tests/integration/test_partition.py` and by `scripts/chaos.py --faults partition|pause`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

BROKER_ADDRESS = os.environ.get("KAFKA_TESTHOST_ADDRESS", "192.0.2.1")
BROKER_PORT = int(os.environ.get("KAFKA_TESTHOST_PORT", "9096"))
BROKERS = f"{BROKER_ADDRESS}:{BROKER_PORT}"
PREFIX = "stv"  # of every namespace and link made here: what `remove_all` finds again

CUT = """table inet streams_cut {
  chain in { type filter hook input priority 0; policy drop; iif lo accept; }
  chain out { type filter hook output priority 0; policy drop; oif lo accept; }
}
"""


class Unavailable(Exception):
    """This machine cannot make test hosts (not root, or no iproute2/nftables); the message says why."""


def _run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=60)
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {run.returncode}: {run.stderr.strip()}")
    return run


def ensure_tools() -> None:
    """root, ip and nft; nftables installed from Debian's packages when it is missing."""
    if os.geteuid() != 0:
        raise Unavailable("test hosts need root (network namespaces and nftables)")
    if shutil.which("ip") is None:
        raise Unavailable("test hosts need iproute2's `ip`")
    if shutil.which("nft") is None:
        if shutil.which("apt-get") is None:
            raise Unavailable("test hosts need nftables' `nft`, and there is no apt-get to install it")
        _run("apt-get", "update", "-qq", check=False)
        install = _run("apt-get", "install", "-y", "-qq", "nftables", check=False)
        if shutil.which("nft") is None:
            raise Unavailable(f"apt-get install nftables failed: {install.stderr.strip()[-500:]}")


@dataclass(frozen=True)
class TestHost:
    """Host number `n` (1..60): namespace stvN, its address 192.0.2.(4n+2), this machine's side 192.0.2.(4n+1)."""

    n: int

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.n}"

    @property
    def address(self) -> str:
        return f"192.0.2.{4 * self.n + 2}"

    @property
    def gateway(self) -> str:
        return f"192.0.2.{4 * self.n + 1}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.name, *argv]

    def create(self) -> bool:
        """Make it; False when a host of this number exists already (another run's: left alone)."""
        outside, inside = f"{self.name}h", f"{self.name}n"
        if _run("ip", "netns", "add", self.name, check=False).returncode != 0:
            return False
        _run("ip", "link", "delete", outside, check=False)  # a link a killed run left behind
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", self.name)
        _run("ip", "addr", "add", f"{self.gateway}/30", "dev", outside)
        _run("ip", "link", "set", outside, "up")
        for argv in (["ip", "addr", "add", f"{self.address}/30", "dev", inside], ["ip", "link", "set", inside, "up"],
                     ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", self.gateway]):
            _run(*self.command(argv))
        return True

    def cut(self) -> None:
        """Every packet in or out dropped from now on."""
        _run(*self.command(["nft", "-f", "-"]), input=CUT)

    def heal(self) -> None:
        _run(*self.command(["nft", "delete", "table", "inet", "streams_cut"]), check=False)

    @property
    def is_cut(self) -> bool:
        return _run(*self.command(["nft", "list", "tables"]), check=False).stdout.find("streams_cut") >= 0

    def remove(self) -> None:
        """The namespace and its link; what still runs in it is the caller's to stop first."""
        _run("ip", "netns", "delete", self.name, check=False)
        _run("ip", "link", "delete", f"{self.name}h", check=False)


def broker_reachable(timeout: float = 3.0) -> bool:
    """Whether the broker's test-host listener accepts connections (from this machine)."""
    import socket

    try:
        with socket.create_connection((BROKER_ADDRESS, BROKER_PORT), timeout=timeout):
            return True
    except OSError:
        return False


def make_hosts(count: int, first: int = 1) -> list[TestHost]:
    """`count` fresh test hosts, of numbers from `first` on that no other run holds (runs side by side each get
    their own); raises `Unavailable` where this machine cannot make them."""
    ensure_tools()
    hosts: list[TestHost] = []
    for n in range(first, 61):
        host = TestHost(n)
        if host.create():
            hosts.append(host)
            if len(hosts) == count:
                return hosts
    for host in hosts:
        host.remove()
    raise Unavailable("no free test host numbers (1..60): `ip netns list` shows what holds them")


def remove_all() -> None:
    """Every test host a run left behind (a run killed before its clean-up): those no process runs in. One that
    a process still runs in is a run's going on (a test's, `make chaos`'s) and is left alone: removing it would
    cut that run's workers off."""
    if shutil.which("ip") is None:
        return
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            if _run("ip", "netns", "pids", name, check=False).stdout.split():
                continue
            TestHost(int(name[len(PREFIX):])).remove()
