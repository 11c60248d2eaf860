"""make bench-recovery: how long a worker takes to rebuild its device table, and to take over a dead one's.

1. Fill the device table's changelog with N device states (default 1M), produced directly in the worker's
   own format (`codec.encode_state`, keyed by device ID, in the partition murmur2 gives the ID), as a worker
   that had seen N devices would have left it.
2. Rebuild: start a worker with an empty state directory and time it from its start until it has produced
   the output of a probe record in every partition (the probes were produced before it started, so their
   outputs come once the table is rebuilt). Then stop it and check that its RocksDB holds every state,
   byte for byte, and nothing else. Done for the batched restore (the worker as it is) and for Faust's own
   restore path (the same worker with `streams.state.restore.BATCHED = False`), side by side; and for a worker with
   an empty changelog (start-up alone).
   With `--guarantee exactly_once` the changelog is written in transactions, and ends in an aborted one
   that overwrites some states with junk: the rebuild must not show any of it.
3. Failover: two workers with empty state directories share the partitions; input flows at a steady rate;
   one is killed with SIGKILL; the time from the kill to the first output of each partition it held (the
   broker's append time) is measured, with `--standby-replicas 1` and with 0.

Every figure is from one run on this machine, side by side. The machine is small and may be shared: read
ratios more than absolute numbers.

    .venv/bin/python scripts/bench_recovery.py [--states N] [--guarantee exactly_once] [--skip-failover]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from harness import ROOT
from harness.broker import (
    BROKERS,
    LOG_APPEND_TIME,
    PARTITIONS,
    Broker,
    HarnessError,
    Kafka,
    free_port,
    last_offsets,
    partition_of,
)
from harness.children import Worker, labelled
from harness.recovery import (
    RUN_FAUST_PATH,
    TABLE,
    OutputWatch,
    device_id,
    fill_changelog,
    probe_devices,
    produce,
    track,
    verify_states,
    wait_until,
)
from harness.report import machine

from streams.kafka import admin as kafka_admin

RUN_DIR = ROOT / ".cache" / "bench-recovery"
STATES = 1_000_000


# -- the worker --------------------------------------------------------------------------------------------


def start_worker(name: str, settings: dict[str, Any], *, faust_path: bool = False) -> Worker:
    argv = ("-c", RUN_FAUST_PATH) if faust_path else ("-m", "streams", "worker")
    return Worker(name, settings, RUN_DIR / f"{name}.log", argv=argv)


def raw_partitions(worker: Worker, raw_topic: str) -> set[int]:
    return set(worker.raw_lag(raw_topic))


def restored(worker: Worker) -> dict[str, int]:
    return {r: int(n) for r, n in labelled(worker.metrics(5), "streams_restored_records_total", "role").items()}


def standby_offsets(worker: Worker) -> dict[int, int]:
    return {int(p): int(o) for p, o in
            labelled(worker.metrics(5), "streams_restored_offset", "partition", role="standby").items()}


def stop(worker: Worker) -> int:
    return worker.stop(60)[0]


# -- the runs ----------------------------------------------------------------------------------------------


@dataclass
class Names:
    stamp: str
    guarantee: str
    brokers: str

    @property
    def group(self) -> str:
        return f"{self.stamp}-g"

    def topic(self, which: str) -> str:
        return f"{self.stamp}.{which}"

    @property
    def changelog(self) -> str:
        return f"{self.group}-{TABLE}-changelog"

    def settings(self, name: str, group: str | None = None, **more: Any) -> dict[str, Any]:
        state_dir = RUN_DIR / "state" / name
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        return {"brokers": self.brokers, "raw_topic": self.topic("raw"), "enriched_topic": self.topic("enriched"),
                "dead_letter_topic": self.topic("dead"), "group": group or self.group, "state_dir": state_dir,
                "web_port": free_port(), "processing_guarantee": self.guarantee, "log_level": "warning", **more}

    async def create_topics(self) -> None:
        compact = {"cleanup.policy": "compact"}
        async with Kafka(self.brokers) as kafka:
            await kafka.create_topics([self.topic("raw"), self.topic("dead")], {})
            await kafka.create_topics([self.topic("enriched")], LOG_APPEND_TIME)
            await kafka.create_topics([self.changelog, f"{self.group}-empty-{TABLE}-changelog"], compact)

    async def delete_topics(self) -> None:
        with contextlib.suppress(Exception):
            async with Kafka(self.brokers) as kafka:
                await kafka.delete_topics(self.stamp)

    async def raw_records(self) -> int:
        async with Kafka(self.brokers) as kafka:
            return await kafka.count([self.topic("raw")])


@dataclass
class Rebuild:
    label: str
    states: int
    seconds: float
    check: str
    restored: dict[str, int]


def rebuild(names: Names, watch: OutputWatch, label: str, states: int, *, faust_path: bool = False,
            group: str | None = None) -> Rebuild:
    settings = names.settings(label, group)
    probes = probe_devices(label)
    asyncio.run(produce(names.brokers, names.topic("raw"), [track(d, i) for i, d in enumerate(probes)]))
    keys = {d.encode() for d in probes}
    worker = start_worker(label, settings, faust_path=faust_path)
    try:
        wait_until(f"{label}: the probes' outputs", lambda: len(watch.first_of(keys)) == len(keys), [worker])
        seconds = max(watch.first_of(keys).values()) - worker.started
        done = restored(worker)
    finally:
        code = stop(worker)
    if code != 0:
        raise RuntimeError(f"{label}: the worker exited with {code}:\n{worker.tail(20)}")
    check = verify_states(Path(settings["state_dir"]), states) if states else "-"
    return Rebuild(label, states, seconds, check, done)


@dataclass
class Failover:
    standby: int
    moved: set[int]
    seconds_first: float
    seconds_all: float
    restored_after_kill: int
    standby_cpu: float  # CPU seconds of the survivor while input flowed before the kill (per second)
    complete: str


def feed(names: Names, rate: int, stop_input: threading.Event) -> None:
    """Input at `rate` records/s over the STATES devices, in ticks of 0.1 s, until `stop_input` is set."""
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=names.brokers, acks="all", linger_ms=5)
        await producer.start()
        try:
            n = 0
            tick = time.monotonic()
            while not stop_input.is_set():
                for _ in range(rate // 10):
                    key, value = track(device_id((n * 7919) % STATES), n)
                    await producer.send(names.topic("raw"), value, key=key, partition=partition_of(key))
                    n += 1
                await producer.flush()
                tick += 0.1
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
        finally:
            await producer.stop()
    asyncio.run(run())


def failover(names: Names, watch: OutputWatch, standby: int, rate: int) -> Failover:
    label = f"failover-standby{standby}"
    a = start_worker(f"{label}-a", names.settings(f"{label}-a", standby_replicas=standby))
    b = start_worker(f"{label}-b", names.settings(f"{label}-b", standby_replicas=standby))
    workers = [a, b]
    raw = names.topic("raw")
    stop_input = threading.Event()
    try:
        def split() -> bool:
            pa, pb = raw_partitions(a, raw), raw_partitions(b, raw)
            return len(pa) == 2 and len(pb) == 2 and not pa & pb
        wait_until(f"{label}: two workers holding two partitions each", split, workers)
        probes = probe_devices(label)
        asyncio.run(produce(names.brokers, raw, [track(d, i) for i, d in enumerate(probes)]))
        keys = {d.encode() for d in probes}
        wait_until(f"{label}: the probes' outputs", lambda: len(watch.first_of(keys)) == len(keys), workers)
        moved = raw_partitions(a, raw)
        if standby:
            last = asyncio.run(last_offsets(names.brokers, names.changelog))

            def caught_up() -> bool:
                offsets = standby_offsets(b)
                return all(offsets.get(p, -1) >= last[p] for p in moved)
            wait_until(f"{label}: the standbys caught up", caught_up, workers)

        feeder = threading.Thread(target=feed, args=(names, rate, stop_input), daemon=True)
        feeder.start()
        time.sleep(3)
        cpu0, t0 = b.cpu_at(time.time()), time.monotonic()
        time.sleep(5)
        standby_cpu = (b.cpu_at(time.time()) - cpu0) / (time.monotonic() - t0)
        restored_before = restored(b).get("active", 0)
        killed = time.time()
        a.kill()
        wait_until(f"{label}: output from the moved partitions {sorted(moved)}",
                   lambda: len(watch.first_after(killed + 1.0, moved)) == len(moved), [b], timeout=300)
        firsts = watch.first_after(killed + 1.0, moved)
        restored_after = restored(b).get("active", 0) - restored_before
        time.sleep(2)
        stop_input.set()
        feeder.join(60)
        complete = outputs_complete(names, watch, b)
        return Failover(standby, moved, min(firsts.values()) - killed, max(firsts.values()) - killed,
                        restored_after, standby_cpu, complete)
    finally:
        stop_input.set()
        for w in workers:
            if w.alive():
                stop(w)


def outputs_complete(names: Names, watch: OutputWatch, survivor: Worker) -> str:
    """Whether every raw record has its output (at-least-once may repeat some): the survivor's lag falls to
    zero and the enriched topic holds at least as many records as the raw topic."""
    deadline = time.monotonic() + 120
    raw_total = 0
    while time.monotonic() < deadline:
        raw_total = asyncio.run(names.raw_records())
        if watch.count() >= raw_total:
            return f"ok ({watch.count():,} outputs for {raw_total:,} inputs)"
        time.sleep(1)
    print(f"bench-recovery: outputs missing; the survivor's log ends with:\n{survivor.tail(20)}", file=sys.stderr)
    return f"INCOMPLETE: {watch.count():,} outputs for {raw_total:,} inputs"


# -- the report --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    print(f"bench-recovery: {text} ...", flush=True)
    t = time.monotonic()
    yield
    print(f"bench-recovery:   done in {time.monotonic() - t:.1f}s", flush=True)


def rebuild_lines(runs: list[Rebuild]) -> list[str]:
    lines = ["| rebuild from the changelog | states | seconds (start to first output in every partition) "
             "| states/s | restored records (metric) | RocksDB equals the changelog |",
             "|---|---:|---:|---:|---:|---|"]
    for r in runs:
        rate = f"{r.states / r.seconds:,.0f}" if r.states else "-"
        lines.append(f"| {r.label} | {r.states:,} | {r.seconds:.1f} | {rate} | "
                     f"{r.restored.get('active', 0):,} | {r.check} |")
    return lines


def failover_lines(fails: list[Failover], rate: int) -> list[str]:
    lines = ["", "| failover (kill -9 of one of two workers) | moved partitions | kill to first output "
             "of a moved partition, s | kill to output of every moved partition, s | changelog records "
             "the survivor read after the kill | survivor CPU before the kill | outputs |",
             "|---|---|---:|---:|---:|---:|---|"]
    for f in fails:
        lines.append(f"| standby replicas {f.standby} | {sorted(f.moved)} | {f.seconds_first:.1f} | "
                     f"{f.seconds_all:.1f} | {f.restored_after_kill:,} | {f.standby_cpu * 100:.0f}% | "
                     f"{f.complete} |")
    return [*lines, "", f"(input {rate:,} records/s over the {STATES:,} devices; session timeout 10 s, the "
                        "default: the group notices a killed worker only then)"]


async def answers(brokers: str) -> None:
    """Raises unless a broker answers the admin API on `brokers` (aiokafka's own complaints kept quiet)."""
    quiet = logging.getLogger("aiokafka")
    level, quiet.level = quiet.level, logging.CRITICAL
    admin = kafka_admin.Admin(bootstrap_servers=brokers, request_timeout_ms=10_000)
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
        quiet.level = level


def main(argv: list[str] | None = None) -> int:
    global STATES
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", default=BROKERS)
    parser.add_argument("--states", type=int, default=STATES, help="device states in the changelog")
    parser.add_argument("--guarantee", default="at_least_once", choices=["at_least_once", "exactly_once"])
    parser.add_argument("--rate", type=int, default=2000, help="input records/s during the failover runs")
    parser.add_argument("--skip-faust-path", action="store_true", help="no rebuild through Faust's own path")
    parser.add_argument("--skip-failover", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the topics and state directories")
    args = parser.parse_args(argv)
    STATES = args.states
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    broker = None
    if args.brokers == BROKERS:  # scripts/kafka.sh's: started when none answers, as make run does
        broker = Broker(lambda text: print(f"bench-recovery: {text}", flush=True))
        try:
            broker.ensure_up()
        except HarnessError as e:
            print(f"bench-recovery: no broker on {BROKERS}, and starting one failed: {e}", file=sys.stderr)
            return 2
    try:
        asyncio.run(asyncio.wait_for(answers(args.brokers), 60))
    except Exception as e:
        print(f"bench-recovery: no broker answers on {args.brokers} ({type(e).__name__}): start one with "
              "`make kafka`, or pass --brokers HOST:PORT", file=sys.stderr)
        return 2
    names = Names(f"rb{int(time.time())}", args.guarantee, args.brokers)
    lines = [f"machine: {machine()}; Python {platform.python_version()}; {args.guarantee}; "
             f"{PARTITIONS} partitions; one Kafka broker on the same machine", ""]
    watch: OutputWatch | None = None
    try:
        with step("creating the topics"):
            asyncio.run(names.create_topics())
        with step(f"filling the changelog with {STATES:,} device states"):
            took = asyncio.run(fill_changelog(names.brokers, names.changelog, STATES,
                                              args.guarantee == "exactly_once"))
            print(f"bench-recovery:   {STATES / took:,.0f} states/s produced")
        watch = OutputWatch(names.brokers, names.topic("enriched"))
        runs: list[Rebuild] = []
        with step("start-up with an empty changelog"):
            runs.append(rebuild(names, watch, "empty-changelog", 0, group=f"{names.group}-empty"))
        with step(f"rebuild of {STATES:,} states, batched restore"):
            runs.append(rebuild(names, watch, "batched", STATES))
        if not args.skip_faust_path:
            with step(f"rebuild of {STATES:,} states, Faust's own restore path"):
                runs.append(rebuild(names, watch, "faust-path", STATES, faust_path=True))
        lines += rebuild_lines(runs)
        failed = any(r.check not in ("ok", "-") for r in runs)
        if not args.skip_failover:
            fails = []
            for standby in (1, 0):
                with step(f"failover, standby replicas {standby}"):
                    fails.append(failover(names, watch, standby, args.rate))
            lines += failover_lines(fails, args.rate)
            failed = failed or any(not f.complete.startswith("ok") for f in fails)
    finally:
        if watch is not None:
            watch.stop()
        if not args.keep:
            asyncio.run(names.delete_topics())
            shutil.rmtree(RUN_DIR / "state", ignore_errors=True)
        if broker is not None:
            broker.leave_as_found(restart=False)
    report = "\n".join(lines)
    print()
    print(report)
    (RUN_DIR / "last.md").write_text(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
