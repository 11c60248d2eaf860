"""A make chaos run, whichever its kind: its settings, log and findings, a worker's lives, how far the workers got
(the group's offsets, the outputs growing), waiting until they are back at work or caught up, and the cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from harness import ROOT
from harness.broker import PARTITIONS, Broker, Kafka
from harness.children import Worker
from harness.report import indent
from streams.config import Settings

T = TypeVar("T")
CHAOS_DIR = ROOT / ".cache" / "chaos"
# a restarted worker first waits for the group to drop its killed predecessor (the session timeout, 10 s),
# then restores its table: minutes mean it is not coming back
READY_TIMEOUT = 180.0
BROKER_RECOVERY_TIMEOUT = 240.0
CATCH_UP_TIMEOUT = 900.0
STALL_TIMEOUT = 240.0  # the last worker made no progress this long: it is stuck
STOP_TIMEOUT = 60.0
TAIL = 40  # log lines shown of a worker's life


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """One Kafka call from synchronous code, bounded: a call that hangs must not hang the harness."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Finding:
    fatal: bool
    text: str


def start_worker(settings: Settings, log_path: Path, life: int, note: str, prefix: Sequence[str] = ()) -> Worker:
    """`python -m streams worker` with the run's settings; every life appends to one log, after a marker."""
    return Worker(f"worker life #{life}", settings, log_path, prefix=prefix,
                  header=f"{life}: python -m streams worker ({note}), web {settings.web_bind}:{settings.web_port}, "
                         f"{time.strftime('%H:%M:%S')}")


def stop_at_the_end(worker: Worker, who: str, findings: list[Finding]) -> tuple[int, float, bool]:
    """SIGTERM at the end of the run: the worker must exit 0 within STOP_TIMEOUT, else it is a finding.
    (exit code, seconds it took, whether SIGKILL was needed)"""
    code, took, forced = worker.stop(STOP_TIMEOUT)
    if code != 0 or forced:
        findings.append(Finding(True, (
            f"{who}: SIGTERM gave exit code {code} after {took:.1f}s{' (SIGKILL was needed)' if forced else ''}; "
            f"its last log lines:\n{indent(worker.tail(TAIL))}")))
    return code, took, forced


@dataclass
class Offsets:
    raw_end: dict[int, int]
    committed: dict[int, int]  # the group's committed offsets on the raw topic (-1: none)
    outputs_end: dict[str, int]  # enriched, dead-letter, repartition: the sum of their partitions' ends

    def lag(self) -> int:
        return sum(max(0, end - max(0, self.committed.get(p, -1))) for p, end in self.raw_end.items())

    def reached(self, target: Offsets) -> bool:
        """The group has committed what the raw topic held at `target`."""
        return all(self.committed.get(p, -1) >= end for p, end in target.raw_end.items())


async def offsets(settings: Settings, repartition: str) -> Offsets:
    outputs = {"enriched": settings.enriched_topic, "dead-letter": settings.dead_letter_topic,
               "repartition": repartition}
    async with Kafka(settings.brokers, timeout_ms=15_000) as kafka:
        existing = await kafka.topics()
        return Offsets(await kafka.end_offsets(settings.raw_topic),
                       await kafka.committed_offsets(settings.group, settings.raw_topic),
                       {k: await kafka.count([t]) if t in existing else 0 for k, t in outputs.items()})


async def outputs_grow(settings: Settings, then: Callable[[], Any], timeout: float = 60.0) -> float | None:
    """Call `then`, and return how many seconds later the enriched and dead-letter topics hold more records
    than before (None: not within `timeout`)."""
    outputs = [settings.enriched_topic, settings.dead_letter_topic]
    async with Kafka(settings.brokers) as kafka:
        before = await kafka.count(outputs)
        then()
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if await kafka.count(outputs) > before:
                return time.monotonic() - started
            await asyncio.sleep(0.01)
        return None


def repartition_of(settings: Settings) -> str:
    return f"{settings.group}-{settings.raw_topic}-repartition"


def back_at_work(settings: Settings, going: Callable[[], bool]) -> float | None:
    """After the broker answered again: seconds until the group's committed offsets reach what the raw topic
    held at the first look (None: not within BROKER_RECOVERY_TIMEOUT, or `going()` said the workers are gone)."""
    started, target = time.monotonic(), None
    while time.monotonic() - started < BROKER_RECOVERY_TIMEOUT and going():
        with contextlib.suppress(Exception):
            now = run_async(offsets(settings, repartition_of(settings)), timeout=30)
            target = target or now
            if now.reached(target):
                return time.monotonic() - started
        time.sleep(0.5)
    return None


def wait_caught_up(settings: Settings, records: int, who: str, workers: Callable[[], list[Worker]],
                   gone: Callable[[], str | None], findings: list[Finding], every_partition: bool) -> bool:
    """Until every input record is committed, the workers report no lag on any raw partition (`every_partition`:
    and one reports each), and the output topics stopped growing (two polls 2 s apart agree). `gone()`: why the
    wait is over ("" when that is reported already), None while the workers run."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    progress_at, last_committed = time.monotonic(), -1
    previous: Offsets | None = None
    while time.monotonic() < deadline:
        why = gone()
        if why is not None:
            findings.extend([Finding(True, why)] if why else [])
            return False
        try:
            now = run_async(offsets(settings, repartition_of(settings)), timeout=30)
        except Exception as e:
            log(f"offsets: {type(e).__name__}: {e}")
            time.sleep(2)
            continue
        committed = sum(max(0, c) for c in now.committed.values())
        if committed != last_committed:
            progress_at, last_committed = time.monotonic(), committed
        lags = [w.raw_lag(settings.raw_topic) for w in workers()]
        reported = set().union(*lags)
        done = (sum(now.raw_end.values()) == records and now.lag() == 0
                and (not every_partition or reported == set(range(PARTITIONS)))
                and not any(v for lag in lags for v in lag.values()))
        if done and previous is not None and previous.outputs_end == now.outputs_end:
            return True
        previous = now if done else None
        if time.monotonic() - progress_at > STALL_TIMEOUT:
            tails = "".join(f"\nthe last log lines of {w.name}:\n{w.tail()}" for w in workers())
            findings.append(Finding(True, f"{who}: no progress for {STALL_TIMEOUT:.0f}s, lag {now.lag()} (committed "
                                          f"{now.committed}, ends {now.raw_end}, metrics {lags}){tails}"))
            return False
        time.sleep(2)
    findings.append(Finding(True, f"{who} did not catch up within {CATCH_UP_TIMEOUT:.0f}s"))
    return False


def run_settings(stamp: str, run_dir: Path, brokers: str, guarantee: str) -> Settings:
    name = f"chaos-{stamp}"
    return replace(
        Settings(), brokers=brokers, raw_topic=f"{name}.raw", enriched_topic=f"{name}.enriched",
        dead_letter_topic=f"{name}.dead-letter", persons_topic=f"{name}.persons",
        identity_changes_topic=f"{name}.identity-changes", group=name,
        state_dir=str(run_dir / "state"),
        partitions=PARTITIONS, log_level="info", processing_guarantee=guarantee,
    )


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM on the harness runs its cleanup (stop the worker, delete the topics) like Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cleanup(settings: Settings, run_dir: Path, broker: Broker | None, keep: bool) -> None:
    """Delete the run's topics and state directories (unless --keep), and leave the broker as it was found."""
    if broker is None:
        return
    try:
        if not keep:
            broker.ensure_up()  # a failure mid-restart may have left it down: the topics go all the same

            async def delete() -> list[str]:
                async with Kafka(settings.brokers, timeout_ms=15_000) as kafka:
                    return await kafka.delete_topics(settings.group)

            deleted = run_async(delete())
            log(f"deleted {len(deleted)} topics: {', '.join(deleted)}")
            shutil.rmtree(settings.state_dir, ignore_errors=True)
            for name in ("state-a", "state-b"):  # group runs: one per worker
                shutil.rmtree(run_dir / name, ignore_errors=True)
        else:
            log(f"kept the topics {settings.group}* and the state directory {settings.state_dir}")
    except Exception as e:
        print(f"chaos: cleanup: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        broker.leave_as_found()
