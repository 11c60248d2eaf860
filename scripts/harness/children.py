"""The processes a run starts (workers, replays, passthroughs, peers), watched from /proc, and what a worker
reports on its /metrics.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

from harness import ROOT
from harness.broker import worker_env
from streams.config import Settings, env_name

CLK_TCK = os.sysconf("SC_CLK_TCK")
LIFE_MARKER = b"\n==== life #"  # a new life's header in a log that several lives append to


class Child:
    """A subprocess of the harness in a session of its own (a Ctrl-C at the terminal reaches the harness, which
    stops its children in order), its output in `log`, watched from /proc every 0.05 s: CPU time (so that CPU
    can be read for any time window) and VmHWM, the peak RSS since its exec. Not wait4's ru_maxrss: Linux keeps
    the forked harness's own RSS in it across the exec, so every child would show at least the harness's size.
    Reaped with wait4 for its total CPU time.

    `header`: the log is appended to, after this line (a worker's lives share one log); else it is new."""

    registry: ClassVar[list[Child]] = []  # every child ever started: stopped at the end, whatever happened

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path, header: str | None = None
                 ) -> None:
        self.name = name
        self.log = log
        self.samples: list[tuple[float, float]] = []  # (wall time, CPU seconds)
        self.hwm_kib = 0
        self.rusage: Any = None
        self.returncode: int | None = None
        self._log_file: IO[bytes] = open(log, "ab" if header else "wb")  # noqa: SIM115 - closed when reaped
        self.log_from = self._log_file.tell()
        if header:
            self._log_file.write(f"{LIFE_MARKER.decode()[1:]}{header}\n".encode())
            self._log_file.flush()
        self.started = time.time()
        self._began = time.monotonic()
        self.proc = subprocess.Popen(list(argv), env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        Child.registry.append(self)
        self._sampler = threading.Thread(target=self._sample, name=f"sample-{name}", daemon=True)
        self._sampler.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def age(self) -> float:
        """Seconds since it was started."""
        return time.monotonic() - self._began

    def _sample(self) -> None:
        stat_path, status_path = f"/proc/{self.pid}/stat", f"/proc/{self.pid}/status"
        # until it has exec'd, the child is a copy of the harness, VmHWM included: wait for its own command line
        own_cmdline = Path("/proc/self/cmdline").read_bytes()
        while self.returncode is None:
            try:
                if Path(f"/proc/{self.pid}/cmdline").read_bytes() == own_cmdline:
                    time.sleep(0.005)
                    continue
                with open(stat_path) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(status_path) as f:
                    status = f.read()
            except OSError:
                return
            if fields[0] == "Z":  # exited, not reaped yet
                return
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            self.samples.append((time.time(), cpu))
            m = re.search(r"VmHWM:\s+(\d+)", status)
            if m:
                self.hwm_kib = max(self.hwm_kib, int(m.group(1)))
            time.sleep(0.05)

    def cpu_at(self, wall: float) -> float:
        """The child's CPU seconds at wall-clock time `wall`, interpolated between samples."""
        samples = list(self.samples)
        if not samples:
            return 0.0
        i = bisect.bisect(samples, (wall, float("inf")))
        if i == 0:
            return samples[0][1]
        if i == len(samples):
            return samples[-1][1]
        (t0, c0), (t1, c1) = samples[i - 1], samples[i]
        return c0 + (c1 - c0) * (wall - t0) / (t1 - t0) if t1 > t0 else c1

    def alive(self) -> bool:
        if self.returncode is not None:
            return False
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid:
            self._reaped(status, usage)
            return False
        return True

    def poll(self) -> int | None:
        """Its exit code, None while it runs."""
        self.alive()
        return self.returncode

    def _reaped(self, status: int, usage: Any) -> None:
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.rusage = usage
        self._log_file.close()

    def wait(self) -> int:
        """Block until it exits by itself."""
        if self.returncode is None:
            _, status, usage = os.wait4(self.pid, 0)
            self._reaped(status, usage)
        assert self.returncode is not None
        return self.returncode

    def send(self, number: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, number)

    def kill(self) -> int:
        """SIGKILL; reaps it. Its exit code."""
        self.send(signal.SIGKILL)
        return self.wait()

    def stop(self, grace: float = 30.0) -> tuple[int, float, bool]:
        """SIGTERM, then SIGKILL after `grace` seconds; reaps it. Idempotent. (exit code, seconds it took,
        whether SIGKILL was needed)."""
        started = time.monotonic()
        self.send(signal.SIGTERM)
        while self.alive():
            if time.monotonic() - started > grace:
                print(f"{self.name} (pid {self.pid}) still running {grace:.0f}s after SIGTERM: SIGKILL",
                      file=sys.stderr)
                return self.kill(), time.monotonic() - started, True
            time.sleep(0.1)
        return self.wait(), time.monotonic() - started, False

    @property
    def peak_rss_mib(self) -> float:
        return self.hwm_kib / 1024

    @property
    def cpu_total(self) -> float:
        if self.rusage is not None:
            return float(self.rusage.ru_utime + self.rusage.ru_stime)
        return self.samples[-1][1] if self.samples else 0.0

    def text(self) -> str:
        """Its part of the log (a life's, in a log that lives share)."""
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(self.log_from)
            data = f.read()
            end = data.find(LIFE_MARKER, 1)
            return (data if end < 0 else data[: end + 1]).decode(errors="replace")
        return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def errors(self) -> list[str]:
        """The ERROR, CRITICAL and traceback lines of its part of the log."""
        return [line for line in self.text().splitlines()
                if "[ERROR]" in line or "[CRITICAL]" in line or line.startswith(("Traceback", "streams worker:"))]


def stop_all() -> None:
    for child in Child.registry:
        child.stop()


# -- a worker's /metrics --------------------------------------------------------------------------------------

METRIC = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int, bind: str = "127.0.0.1", timeout: float = 2.0) -> Samples | None:
    """The worker's /metrics as (name, labels, value), at the address it binds (a wildcard: this machine's
    loopback); None when it does not answer."""
    host = "127.0.0.1" if bind in ("", "0.0.0.0", "::", "[::]") else bind
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    samples = []
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            labels = dict(LABEL.findall(m["labels"] or ""))
            with contextlib.suppress(ValueError):
                samples.append((m["name"], labels, float(m["value"])))
    return samples


def metric(samples: Samples | None, name: str) -> float | None:
    if samples is None:
        return None
    values = [v for n, _, v in samples if n == name]
    return sum(values) if values else None


def labelled(samples: Samples | None, name: str, label: str, **match: str) -> dict[str, float]:
    """The values of metric `name` by the value of its label `label`, among those whose labels hold `match`."""
    return {labels[label]: v for n, labels, v in samples or ()
            if n == name and label in labels and all(labels.get(k) == w for k, w in match.items())}


def raw_lag(samples: Samples | None, raw_topic: str) -> dict[int, float]:
    """streams_consumer_lag per raw partition, as far as the worker reports it."""
    return {int(p): v for p, v in labelled(samples, "streams_consumer_lag", "partition", topic=raw_topic).items()}


class Worker(Child):
    """`python -m streams worker` (or `argv`) with `settings` (a Settings, or values by Settings field name) as
    its environment, its /metrics at hand. `prefix`: where it runs (`ip netns exec HOST`, which execs it: the
    pid stays the worker's)."""

    def __init__(self, name: str, settings: Settings | Mapping[str, Any], log: Path, header: str | None = None,
                 prefix: Sequence[str] = (), argv: Sequence[str] = ("-m", "streams", "worker")) -> None:
        env = worker_env(settings)
        self.port = int(env[env_name("web_port")])
        self.bind = env.get(env_name("web_bind"), "127.0.0.1")
        super().__init__(name, [*prefix, sys.executable, *argv], env, log, header)

    def metrics(self, timeout: float = 2.0) -> Samples | None:
        return scrape(self.port, self.bind, timeout)

    def raw_lag(self, raw_topic: str) -> dict[int, float]:
        return raw_lag(self.metrics(), raw_topic)
