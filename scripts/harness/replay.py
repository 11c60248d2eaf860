"""`python -m streams replay` as the harness runs it: the reference every output is compared with, and a
measured run of its own (records/s from its summary line, CPU and peak RSS of the process).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.broker import HarnessError, clean_env
from harness.children import Child
from harness.report import Result

SUMMARY = re.compile(r"replay: ([\d,]+) records in, ([\d,]+) enriched out, ([\d,]+) dead letters, "
                     r"([\d.]+)s \(([\d,]+) records/s\)")


@dataclass
class ReplayRun:
    records: int
    enriched: int
    dead_letters: int
    rate: float  # records/s as its summary line gives it (computed from the unrounded time)
    cpu_seconds: float
    peak_rss_mib: float
    output: Path
    dead: Path
    summary: str  # its summary line
    persons: Path | None = None  # the final persons mapping (`--persons`)

    def files(self) -> list[Path]:
        return [self.output, self.dead, *([self.persons] if self.persons else [])]


async def run_replay(run_dir: Path, label: str, src: Path, state_dir: Path | None = None, jobs: int = 1,
                     discard: bool = False, persons: bool = False) -> ReplayRun:
    """Replay of `src` into run_dir/replay-`label`.*; `discard`: the enriched output to /dev/null (only its
    counts are wanted); `persons`: write the final persons mapping too (`--persons`)."""
    out, dead = run_dir / f"replay-{label}.jsonl", run_dir / f"replay-{label}.dead.jsonl"
    if discard:
        out = Path(os.devnull)
    argv = [sys.executable, "-m", "streams", "replay", "--input", str(src), "--output", str(out),
            "--dead-letter", str(dead)]
    persons_file = run_dir / f"replay-{label}.persons.jsonl" if persons else None
    if persons_file is not None:
        argv += ["--persons", str(persons_file)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    if jobs > 1:
        argv += ["--jobs", str(jobs)]
    child = Child(f"replay {label}", argv, clean_env(), run_dir / f"replay-{label}.log")
    code = await asyncio.to_thread(child.wait)
    if code != 0:
        raise HarnessError(f"replay {label} exited with {code}:\n{child.tail()}")
    m = SUMMARY.search(child.log.read_text())
    if m is None:
        raise HarnessError(f"replay {label}: no summary line in {child.log}")
    records, enriched, dead_letters = (int(g.replace(",", "")) for g in m.group(1, 2, 3))
    return ReplayRun(records, enriched, dead_letters, float(m.group(5).replace(",", "")), child.cpu_total,
                     child.peak_rss_mib, out, dead, m.group(0), persons_file)


def replay_result(name: str, run: ReplayRun, label: str, note: str, startup_cpu: float) -> Result:
    """A replay as a row of the table: its CPU without the interpreter's start (`startup_cpu`: a replay of an
    empty file)."""
    seconds = run.records / run.rate if run.rate else 0.0
    return Result(name, label, run.records, seconds, max(0.0, run.cpu_seconds - startup_cpu), run.peak_rss_mib,
                  note)
