"""The worker as a subprocess (`python -m streams worker` with a test's settings as STREAMS_* variables), its
group's assignment, its web port and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from streams.config import Settings, env_name
from streams.kafka import admin as kafka_admin
from tests.conftest import ROOT

PARTITIONS = 4


OUTPUT_TIMEOUT = 120.0


READY_TIMEOUT = 90.0


async def admin_call(brokers: str, call: Callable[[Any], Any]) -> Any:
    # the project's admin client: it asks a broker that answers, also with one of three down
    admin = kafka_admin.Admin(bootstrap_servers=brokers, request_timeout_ms=15_000)
    await admin.start()
    try:
        return await call(admin)
    finally:
        await admin.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            env[env_name(f.name)] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """`python -m streams worker` with `settings` in its environment; output in `log_path`."""

    def __init__(self, settings: Settings, log_path: Path, name: str = "worker", prefix: Sequence[str] = (),
                 faults: Mapping[str, str] | None = None, *, cwd: Path = ROOT, env: Mapping[str, str] | None = None,
                 label: str = "") -> None:
        """`faults`: FAULT_* variables for `tests/integration/faults.py`, which then runs the worker with those
        faults patched into its process. `cwd`, `env`: where it runs and its whole environment (an earlier
        release's source, `kit.releases`); `label`: what the log's first line says it is."""
        self.settings = settings
        self.name = name
        self.log_path = log_path
        self.expected_exit = False
        self.forced = False
        with open(log_path, "ab") as log:
            log.write(f"---- {name}: {label}python -m streams worker, state_dir={settings.state_dir}, "
                      f"web_port={settings.web_port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                # `prefix`: where it runs, e.g. `ip netns exec HOST` (a test host, scripts/testhosts.py)
                [*prefix, sys.executable, "-m", "tests.integration.faults" if faults else "streams", "worker"],
                cwd=cwd, env={**(env if env is not None else worker_env(settings)), **(faults or {})},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def errors(self) -> list[str]:
        """The log's ERROR and CRITICAL lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if "[ERROR]" in line or "[CRITICAL]" in line]

    def check_alive(self) -> None:
        if not self.alive:
            pytest.fail(f"worker {self.name} exited with code {self.proc.returncode} "
                        f"(log {self.log_path}):\n{self.log_tail()}", pytrace=False)

    def wait_ready(self, timeout: float = READY_TIMEOUT, members: int = 1) -> float:
        """Until the worker's web port answers and the group is stable with `members` members that hold
        all raw partitions between them; returns the seconds it took since the start."""
        deadline = time.monotonic() + timeout
        port_open = False
        last = "web port closed"
        while time.monotonic() < deadline:
            self.check_alive()
            if not port_open:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.settimeout(0.5)
                    port_open = s.connect_ex((self.settings.web_bind, self.settings.web_port)) == 0
            if port_open:
                state, assignments = group_assignment(self.settings)
                held = set().union(*assignments) if assignments else set()
                last = f"group {state}, raw partitions per member {assignments}"
                if (state == "Stable" and len(assignments) == members and all(assignments)
                        and held == set(range(self.settings.partitions))):
                    return time.monotonic() - self.started
            time.sleep(0.25)
        pytest.fail(f"worker {self.name} not ready after {timeout:.0f}s ({last}); log:\n{self.log_tail()}",
                    pytrace=False)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM; SIGKILL when it has not exited after `timeout` seconds. Returns the exit code (a negative
        signal number when killed); `self.forced` says whether SIGKILL was needed."""
        self.expected_exit = True
        self.forced = False
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.forced = True
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def kill(self) -> int:
        self.expected_exit = True
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)
        return int(self.proc.returncode)


StartWorker = Callable[..., Worker]


GUARANTEES = ["at_least_once", "exactly_once"]


def group_assignment(settings: Settings) -> tuple[str, list[set[int]]]:
    """The group's state and, per member, the raw-topic partitions it holds."""
    try:
        return asyncio.run(kafka_admin.group_assignment(settings))
    except Exception as e:
        return f"unknown ({e!r})", []


def wait_for_group(settings: Settings, ok: Callable[[str, list[set[int]]], bool], timeout: float, what: str,
                   log: Callable[[], str] = lambda: "") -> None:
    """Poll the group's state and assignment until `ok(state, held)`; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    state, held = group_assignment(settings)
    while not ok(state, held):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {state} {held}\n{log()}")
        time.sleep(0.05)
        state, held = group_assignment(settings)


def held_by_one(state: str, held: list[set[int]]) -> bool:
    return state == "Stable" and held == [set(range(PARTITIONS))]


SAMPLE_RE = re.compile(r'^(streams_[a-z_]+)(?:\{([^}]*)\})? (\S+)$')


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = get(f"http://{host}:{port}/metrics")
    assert status == 200
    samples = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"not Prometheus text format: {line!r}"
        labels = frozenset(tuple(kv.split("=", 1)) for kv in (m.group(2) or "").split(",") if kv)
        samples[(m.group(1), frozenset((k, v.strip('"')) for k, v in labels))] = float(m.group(3))
    return samples


def two_hosts(start_worker: StartWorker, settings: Settings, state_dir: Path) -> tuple[Worker, Worker, int]:
    """Two workers on two loopback addresses and the same port, each advertising its own URL, ready in one
    group; the second keeps its state in `state_dir`. Returns both and the port."""
    port = free_port()
    first = start_worker(settings, name="first", web_bind="127.0.0.1", web_port=port,
                         advertised_url=f"http://127.0.0.1:{port}")
    second = start_worker(settings, name="second", web_bind="127.0.0.2", web_port=port,
                          advertised_url=f"http://127.0.0.2:{port}", state_dir=str(state_dir))
    first.wait_ready(members=2)
    second.wait_ready(members=2)
    return first, second, port


@contextlib.contextmanager
def one_at_a_time(name: str) -> Iterator[None]:
    """Across the test processes of one `pytest -n` run, one at a time: one starts the broker (or the cluster, or
    builds the images), the others wait for it and find it done."""
    lock_dir = ROOT / ".cache"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
