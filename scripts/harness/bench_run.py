"""A make bench run, whichever its mode: its sizes, its names (every topic, group and directory holds its stamp:
cleanup deletes the topics by it), its steps announced and timed, the Kafka clients' errors counted per step,
its report written out, and its teardown (children stopped, topics deleted, the broker left as found).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness import ROOT
from harness.broker import BROKERS, Broker, HarnessError, Kafka
from harness.children import stop_all
from harness.report import footer, problems, publish

BENCH_DIR = ROOT / ".cache" / "bench"
PYTHON = sys.executable
STALL_SECONDS = 180.0  # a consumer that makes no progress this long has failed (startup included)


@dataclass(frozen=True)
class Plan:
    records: int
    devices: int
    baseline_records: int  # the stock Faust agent is slow: it runs on the input's first records only
    wide_devices: int  # devices of the second input, for replay's RSS against the number of devices
    latency_rate: int
    latency_seconds: float
    seed: int
    quick: bool
    persons_pairs: int = 2  # the persons stage off then on, this many times
    persons_timeout: float = 120.0

    @property
    def latency_records(self) -> int:
        return int(self.latency_rate * self.latency_seconds)


@dataclass(frozen=True)
class Names:
    """Every topic, group and directory of one run holds its stamp."""

    stamp: str
    run_dir: Path

    def topic(self, name: str) -> str:
        return f"{self.stamp}.{name}"

    def group(self, name: str) -> str:
        return f"{self.stamp}-{name}"


class KafkaTrouble(logging.Handler):
    """Counts the Kafka clients' errors per step of the run, and shows only the first few: the broker is
    shared, and when someone restarts it under the bench, the figures of that step are not to be trusted."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.step = "start"
        self.errors: Counter[str] = Counter()
        self.shown: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors[self.step] += 1
        self.shown[self.step] += 1
        if self.shown[self.step] <= 3:
            print(f"bench: [{self.step}] aiokafka {record.levelname.lower()}: {record.getMessage()}",
                  file=sys.stderr)

    def install(self) -> None:
        kafka_log = logging.getLogger("aiokafka")
        kafka_log.addHandler(self)
        kafka_log.propagate = False

    def warning(self) -> list[str]:
        """The report's warning, when there is one."""
        if not self.errors:
            return []
        return [f"**WARNING: the bench's Kafka clients logged errors during: "
                f"{', '.join(f'{k} ({n:,})' for k, n in self.errors.items())}. The broker was unreachable for "
                "a while (restarted by another user?): those steps' figures are not to be trusted; run again.**", ""]


TROUBLE = KafkaTrouble()


def step(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(key: str, text: str, took: dict[str, float]) -> Iterator[None]:
    """A step of the run: announced on stderr, its duration kept under `key` for the report."""
    started = time.monotonic()
    step(text + " ...")
    TROUBLE.step = key
    try:
        yield
    finally:
        took[key] = time.monotonic() - started


class Run:
    """One run of a mode: its stamp, directory and step timings, the broker (started when none answers at the
    default address, stopped again at the end), and the Kafka clients once connected."""

    def __init__(self, brokers: str, keep: bool) -> None:
        self.started = time.monotonic()
        self.load_before = os.getloadavg()
        self.stamp = f"bench-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        self.names = Names(self.stamp, BENCH_DIR / self.stamp)
        self.names.run_dir.mkdir(parents=True, exist_ok=True)
        self.brokers = brokers
        self.keep = keep
        self.took: dict[str, float] = {}
        self.broker: Broker | None = None
        self.kafka: Kafka | None = None

    @property
    def run_dir(self) -> Path:
        return self.names.run_dir

    def timed(self, key: str, text: str) -> contextlib.AbstractContextManager[None]:
        return timed(key, text, self.took)

    async def start_broker(self) -> None:
        if self.brokers != BROKERS:
            return
        self.broker = await asyncio.to_thread(Broker, step)
        await asyncio.to_thread(self.broker.ensure_up)

    async def connect(self) -> Kafka:
        self.kafka = await Kafka(self.brokers).start()
        return self.kafka

    def finish(self, report: list[str], name: str, failures: list[str]) -> int:
        """The report (with the machine, its load and the steps' times) on stdout and in .cache/bench/`name`;
        the failures on stderr. The exit code."""
        lines = [*report, "", *footer(self.load_before, self.started, self.took)]
        lines[2:2] = TROUBLE.warning()
        publish(lines, BENCH_DIR / name)
        problems(failures, "bench: FAIL")
        return 1 if failures else 0

    async def teardown(self) -> None:
        stop_all()
        if self.kafka is not None:
            try:
                deleted = await self.kafka.delete_topics(self.stamp)
                step(f"deleted {len(deleted)} topics of this run")
            except Exception as e:  # e.g. someone stopped the shared broker: say what is left behind
                step(f"could not delete the topics {self.stamp}*: {type(e).__name__}: {e}")
            await self.kafka.close()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.leave_as_found, False)
        if not self.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)


async def run_mode(brokers: str, keep: bool, body: Callable[[Run], Awaitable[int]], start_broker: bool = True) -> int:
    """`body` on a fresh run; a HarnessError fails the run (exit 1); the teardown whatever happened."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    run = Run(brokers, keep)
    try:
        if start_broker:
            await run.start_broker()
        return await body(run)
    except HarnessError as e:
        print(f"bench: FAIL: {e}", file=sys.stderr)
        return 1
    finally:
        await run.teardown()
