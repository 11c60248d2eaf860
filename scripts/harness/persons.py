"""make bench's persons stage: the worker with STREAMS_PERSONS=off, then on, then on without the identity change
log, alternating, on one raw topic; the on/off ratio of events/s, the change log's cost, each run's output
against replay's, the persons topic's final mapping against `replay --persons`'s (polled until it settles), and
how long it took to settle after the enriched output.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiokafka import ConsumerRecord, TopicPartition

from harness.bench_run import TROUBLE, Names, Plan, step
from harness.broker import LOG_APPEND_TIME, HarnessError, Kafka, fold, read_up_to, scan_consumer, tps_of
from harness.digest import Digest, compare, file_digest, topic_digest
from harness.measure import append_span, wait_consumed, worker_child
from harness.replay import ReplayRun, run_replay
from harness.report import Result, fmt, ratio, table

PERSONS_PAIRS = Plan.persons_pairs  # off then on, this many times: one pair's ratio moves with the machine's noise
PERSONS_TIMEOUT = Plan.persons_timeout  # seconds the persons topic has, after the enriched output, to settle


def via_counts(mapping: dict[str, bytes]) -> Counter[str]:
    return Counter(str(orjson.loads(v).get("via")) for v in mapping.values())


class TopicTable:
    """A compacted topic read as a table, from its beginning and then as it grows (`fold`). Counts the values
    and tombstones read, and keeps the latest broker append time."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.topic = topic
        self.consumer = scan_consumer(brokers)
        self.table: dict[str, bytes] = {}
        self.values = 0
        self.tombstones = 0
        self.last_stamp: int | None = None  # ms

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign(tps_of(self.topic))
        await self.consumer.seek_to_beginning(*tps_of(self.topic))

    async def stop(self) -> None:
        await self.consumer.stop()

    def _add(self, tp: TopicPartition, records: Sequence[ConsumerRecord]) -> None:
        values, tombstones = fold(self.table, records)
        self.values += values
        self.tombstones += tombstones
        for r in records:
            self.last_stamp = r.timestamp if self.last_stamp is None else max(self.last_stamp, r.timestamp)

    async def catch_up(self) -> None:
        """Read up to the end offsets of now."""
        await read_up_to(self.consumer, await self.consumer.end_offsets(tps_of(self.topic)), self._add, self.topic)


def mapping_difference(expected: dict[str, bytes], actual: dict[str, bytes]) -> list[str]:
    """What differs between two persons tables, counted, with a few examples."""
    missing = sorted(expected.keys() - actual.keys())
    invented = sorted(actual.keys() - expected.keys())
    differing = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    lines = [f"{len(missing):,} user IDs missing, {len(invented):,} invented, {len(differing):,} with another "
             f"value (of replay's {len(expected):,})"]
    for user in differing[:2]:
        lines.append(f"e.g. {user}: topic {actual[user].decode(errors='replace')}, replay "
                     f"{expected[user].decode(errors='replace')}")
    for user in missing[:1]:
        lines.append(f"e.g. missing {expected[user].decode(errors='replace')}")
    for user in invented[:1]:
        lines.append(f"e.g. invented {actual[user].decode(errors='replace')}")
    return lines


def read_persons_file(path: Path) -> dict[str, bytes]:
    """`replay --persons`'s file as a table: user ID -> its line's bytes."""
    with open(path, "rb") as f:
        return {orjson.loads(line)["user_id"]: line.rstrip(b"\n") for line in f if line.strip()}


@dataclass
class PersonsReference:
    replay: ReplayRun
    digest: Digest
    mapping: dict[str, bytes]  # user ID -> replay's line


async def persons_reference(names: Names, src: Path) -> PersonsReference:
    """`replay --persons` on the persons input (state in memory): the enriched output and the final mapping
    the worker must give."""
    run = await run_replay(names.run_dir, "persons", src, persons=True)
    assert run.persons is not None
    digest = await asyncio.to_thread(file_digest, run)
    mapping = await asyncio.to_thread(read_persons_file, run.persons)
    run.output.unlink()
    return PersonsReference(run, digest, mapping)


@dataclass
class PersonsRun:
    result: Result
    persons: bool
    enriched_ok: bool
    enriched_line: str
    mapping_ok: bool | None = None  # None: the stage was off
    mapping_lines: list[str] = field(default_factory=list)
    settled_after: float | None = None  # s from the last enriched record to the persons topic's last record
    seen_after: float | None = None  # s from the last enriched record until the bench saw the topic settled
    tail_cpu: float | None = None  # the worker's CPU seconds from the last enriched record until then
    values: int = 0  # mapping records on the persons topic
    tombstones: int = 0
    messages: int = 0  # records on the stage's internal topic
    via: Counter[str] = field(default_factory=Counter)
    changes: bool = True  # the identity change log on
    change_rows: int = 0  # rows on its topic


async def persons_settled(kafka: Kafka, tail: TopicTable, group: str, repartition: str,
                          expected: dict[str, bytes], timeout: float) -> bool:
    """Poll until the persons topic equals `expected` and the stage is idle (the group has committed every
    message of its internal topic: nothing more is on the way), or `timeout` seconds. True when equal."""
    deadline = time.monotonic() + timeout
    while True:
        await tail.catch_up()
        if tail.table == expected:
            idle = await kafka.committed(group, repartition) >= await kafka.count([repartition])
            if idle:
                await tail.catch_up()  # what was written before the last message was committed
                if tail.table == expected:
                    return True
        if time.monotonic() > deadline:
            return tail.table == expected
        await asyncio.sleep(0.5)


async def measure_persons_run(kafka: Kafka, names: Names, label: str, raw: str, ref: PersonsReference,
                              persons: bool, timeout: float, changes: bool = True) -> PersonsRun:
    """One worker over `raw` with the persons stage on or off: fresh group, state directory and topics (its own
    persons topic, compacted, with LogAppendTime as the outputs). Events/s and CPU as the worker's measurement;
    with the stage on, then until the persons topic settles, and its final mapping against replay's."""
    enriched, dead, persons_topic = (names.topic(f"{label}.{t}") for t in ("enriched", "dead-letter", "persons"))
    await kafka.create_topics([enriched, dead])
    await kafka.create_topics([persons_topic], {**LOG_APPEND_TIME, "cleanup.policy": "compact"})
    group = names.group(label)
    repartition = f"{group}-persons-repartition"  # the stage's internal topic (streams.worker.names.topic_names)
    child = worker_child(kafka, names, label, raw, enriched, dead, persons="on" if persons else "off",
                         persons_topic=persons_topic, identity_changes="on" if changes else "off")
    records = ref.replay.records
    await wait_consumed(kafka, child, group, raw, records, [enriched, dead],
                        ref.replay.enriched + ref.replay.dead_letters)
    first, last = await append_span(kafka.brokers, [enriched, dead])
    cpu = child.cpu_at(last) - child.cpu_at(first)
    mapping_ok, seen, tail_cpu = False, time.time(), 0.0
    tail = TopicTable(kafka.brokers, persons_topic)
    await tail.start()
    try:
        if persons:
            mapping_ok = await persons_settled(kafka, tail, group, repartition, ref.mapping, timeout)
            seen = time.time()
            tail_cpu = child.cpu_at(seen) - child.cpu_at(last)
        else:
            await tail.catch_up()
    finally:
        await tail.stop()
    if not child.alive():
        raise HarnessError(f"{child.name} exited with code {child.returncode}; the end of {child.log}:\n"
                           f"{child.tail()}")
    child.stop()
    state = "on" if persons else "off"
    if persons and not changes:
        state = "on, change log off"
    result = Result(f"worker, persons {state} ({label.rsplit('-', 1)[-1]})", "all", records, last - first, cpu,
                    child.peak_rss_mib, f"STREAMS_PERSONS={state}")
    verdict = compare(ref.digest, await topic_digest(kafka.brokers, raw, enriched, dead), f"worker, persons {state}")
    run = PersonsRun(result, persons, verdict.ok, " ".join(verdict.lines), values=tail.values,
                     tombstones=tail.tombstones, changes=changes)
    if not persons:
        run.mapping_lines = [f"{tail.values + tail.tombstones:,} records on its persons topic (the stage is off)"]
        return run
    run.messages = await kafka.count([repartition])
    if changes:
        run.change_rows = await kafka.count([names.topic(f"{label}.identity-changes")])
    run.via = via_counts(tail.table)
    run.tail_cpu = tail_cpu
    run.seen_after = seen - last
    if tail.last_stamp is not None:
        run.settled_after = tail.last_stamp / 1000 - last
    run.mapping_ok = mapping_ok
    if mapping_ok:
        run.mapping_lines = [f"the persons topic's final mapping == replay --persons: {len(tail.table):,} device "
                             f"users (last value per key, tombstones removing the key)"]
    else:
        run.mapping_lines = [f"the persons topic's final mapping != replay --persons after {timeout:.0f}s: "
                             + "; ".join(mapping_difference(ref.mapping, tail.table))]
    result.note = (f"STREAMS_PERSONS=on; {tail.values:,} mappings and {tail.tombstones:,} tombstones written, "
                   f"{run.messages:,} internal messages; topic settled {fmt(run.settled_after, 1)}s after the last "
                   f"enriched record")
    return run


def seconds_list(values: Sequence[float | None]) -> str:
    return ", ".join(f"{fmt(v, 1)}s" for v in values)


async def measure_persons(kafka: Kafka, names: Names, raw: str, ref: PersonsReference, pairs: int,
                          timeout: float, devices: int) -> tuple[list[str], list[str]]:
    """The worker with the persons stage off, then on, then on without the identity change log, `pairs` times
    over the same raw topic. Returns the report's lines and the failures."""
    runs: list[PersonsRun] = []
    for i in range(1, pairs + 1):
        for on, changes, name in ((False, False, "off"), (True, True, "on"), (True, False, "on-nolog")):
            label = f"persons-{name}-{i}"
            step(f"  {label}")
            TROUBLE.step = label
            runs.append(await measure_persons_run(kafka, names, label, raw, ref, on, timeout, changes))
    offs = [r for r in runs if not r.persons]
    ons = [r for r in runs if r.persons and r.changes]
    nologs = [r for r in runs if r.persons and not r.changes]
    failures = [f"{r.result.name}: {r.enriched_line}" for r in runs if not r.enriched_ok]
    failures += [f"{r.result.name}: {' '.join(r.mapping_lines)}" for r in ons if not r.mapping_ok]
    off_rate = sum(r.result.rate for r in offs) / len(offs)
    on_rate = sum(r.result.rate for r in ons) / len(ons)
    nolog_rate = sum(r.result.rate for r in nologs) / len(nologs)
    nolog_cpu = sum(r.result.cpu_us or 0 for r in nologs) / len(nologs)
    off_cpu = sum(r.result.cpu_us or 0 for r in offs) / len(offs)
    on_cpu = sum(r.result.cpu_us or 0 for r in ons) / len(ons)
    per_pair = ", ".join(f"pair {i + 1} {ratio(on.result.rate, off.result.rate)} "
                         f"({fmt(on.result.rate)} / {fmt(off.result.rate)})"
                         for i, (off, on) in enumerate(zip(offs, ons, strict=True)))
    ref_via = via_counts(ref.mapping)
    last_on = ons[-1]
    lines = [
        f"### The persons stage: on against off, {ref.replay.records:,} records over {devices:,} device IDs",
        "",
        *table([r.result for r in runs]),
        "",
        f"- **persons on / off: {ratio(on_rate, off_rate)} of the events/s** (mean events/s of {pairs} run(s) "
        f"each; target >= 0.8); per pair, run one after the other: {per_pair}. CPU per event on / off: "
        f"{ratio(on_cpu, off_cpu)}x.",
        f"- **the identity change log's cost: persons on with it / without it: {ratio(on_rate, nolog_rate)} of the "
        f"events/s** (target >= 0.95; STREAMS_IDENTITY_CHANGES=on, the default, against off); CPU per event with / "
        f"without: {ratio(on_cpu, nolog_cpu)}x; it wrote {ons[-1].change_rows:,} rows in the last run.",
        f"- the persons topic settled (its last record appended) {seconds_list([r.settled_after for r in ons])} "
        f"after the last enriched record; the bench saw it equal replay's and the stage idle after "
        f"{seconds_list([r.seen_after for r in ons])} (polled every 0.5 s); the worker's CPU meanwhile "
        f"{seconds_list([r.tail_cpu for r in ons])} (not in the table's CPU, which is that of the enriched "
        "output's window).",
        f"- the stage's work (last run): {last_on.messages:,} messages through its internal topic, "
        f"{last_on.values:,} mapping records and {last_on.tombstones:,} tombstones written to the persons topic; "
        f"**{sum(last_on.via.values()):,} device users mapped: {last_on.via['login']:,} via login, "
        f"{last_on.via['identity']:,} via identity** (replay --persons: {len(ref.mapping):,}, "
        f"{ref_via['login']:,} and {ref_via['identity']:,}).",
        "",
        "Correctness of these runs: " + ("PASS." if not failures else "**FAIL**."),
        *[f"- {r.result.name}: {r.enriched_line}" for r in runs],
        *[f"- {r.result.name}: {' '.join(r.mapping_lines)}" for r in runs],
        "",
        "How: `python -m streams worker` as in the worker's measurement, each run with its own consumer group, "
        "state directory and topics (its own "
        "STREAMS_PERSONS_TOPIC, created compacted with LogAppendTime), off then on, alternating, on one raw "
        "topic loaded once. Events/s and CPU over the enriched and dead-letter outputs' append span; the "
        "persons topic is read as a table (last value per key, a tombstone removing it) until it equals "
        f"replay --persons's file and the group has committed its internal topic ({timeout:.0f}s at most).",
    ]
    return lines, failures
