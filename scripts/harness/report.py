"""The reports' parts: numbers, ratios and spans of seconds as text, the markdown table of measured runs, the
machine, the versions and the code a run exercised, and writing a report out.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import ROOT


def fmt(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def fmt_n(value: float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def spread(values: Sequence[float]) -> str:
    """Sorted seconds as `min-max (median)`."""
    if not values:
        return "-"
    return f"{values[0]:.1f}-{values[-1]:.1f}s (median {values[len(values) // 2]:.1f}s)"


def indent(text: str, prefix: str = "    | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def durations(took: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}s" for k, v in took.items())


@dataclass
class Result:
    """A measured run: a row of the table."""

    name: str
    input: str
    events: int
    seconds: float
    cpu_seconds: float | None
    peak_rss_mib: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float | None:
        return None if self.cpu_seconds is None else self.cpu_seconds / self.events * 1e6


def table(results: Sequence[Result]) -> list[str]:
    rows = ["| run | input records | events/s | CPU µs/event | peak RSS MiB | how |",
            "|---|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r.name} | {r.input} ({r.events:,}) | {fmt(r.rate)} | {fmt(r.cpu_us)} | "
                    f"{fmt(r.peak_rss_mib)} | {r.note} |")
    return rows


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    cores = len(os.sched_getaffinity(0))
    return (f"{cores} CPUs ({model.group(1).strip() if model else platform.machine()})"
            + (f", {int(mem.group(1)) / 2**20:.1f} GiB RAM" if mem else ""))


def kafka_version() -> str:
    """The running broker's version, from its jar on its command line; else the one scripts/kafka.sh pins."""
    pid_file = ROOT / ".cache" / "kafka" / "data" / "kafka.pid"
    with contextlib.suppress(OSError, ValueError):
        cmdline = Path(f"/proc/{int(pid_file.read_text())}/cmdline").read_bytes().decode(errors="replace")
        m = re.search(r"kafka_[\d.]+-([\d.]+)\.jar", cmdline)
        if m:
            return f"{m.group(1)} (the running broker's jar)"
    m = re.search(r"KAFKA_VERSION=([\d.]+)", (ROOT / "scripts" / "kafka.sh").read_text())
    return f"{m.group(1)} (as scripts/kafka.sh pins it)" if m else "unknown"


def versions() -> str:
    libs = ", ".join(f"{n} {importlib.metadata.version(n)}"
                     for n in ("faust-streaming", "aiokafka", "orjson", "rocksdict"))
    return f"Python {platform.python_version()}, Kafka {kafka_version()}, {libs}"


def code_version() -> str:
    """The worker code the run exercised: the commit, and the files of `streams/` changed since (other people
    edit the tree while a run goes on)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "streams"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"{head or '?'}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def footer(load_before: Sequence[float], started: float, took: Mapping[str, float]) -> list[str]:
    """A bench report's last lines: the machine, its load, the versions, and how long each step took."""
    return [f"Machine: {machine()}; load average {load_before[0]:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end. {versions()}.",
            f"Took {time.monotonic() - started:,.0f}s: {durations(took)}."]


def publish(lines: Sequence[str], path: Path) -> None:
    """The report on stdout and in `path`."""
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    path.write_text(text)


def problems(lines: Sequence[str], prefix: str) -> None:
    for line in lines:
        print(f"{prefix}: {line}", file=sys.stderr)
