"""What make bench measures of a consumer: it runs until its group has committed the input and its outputs
hold what they should; its events/s over the outputs' broker append times (topics with LogAppendTime), its
CPU in that window, its peak RSS. The worker, the baseline and any consume-and-produce child measured so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from harness import ROOT
from harness.bench_run import PYTHON, STALL_SECONDS, Names
from harness.broker import (
    PARTITIONS,
    HarnessError,
    Kafka,
    clean_env,
    free_port,
    scan_consumer,
    scan_topic,
    tps_of,
    worker_env,
)
from harness.children import Child
from harness.digest import Digest, topic_digest
from harness.replay import ReplayRun
from harness.report import Result


async def wait_consumed(kafka: Kafka, child: Child | list[Child], group: str, source: str, records: int,
                        outputs: list[str], expected_out: int | None) -> None:
    """Until the group has committed all `records` of `source` and the outputs hold `expected_out` records
    (when known). Fails when the child (any of them) exits, or nothing moves for STALL_SECONDS."""
    last_state: tuple[int, int] | None = None
    last_move = time.monotonic()
    children = child if isinstance(child, list) else [child]
    child = children[0]
    while True:
        for c in children:
            if not c.alive():
                raise HarnessError(f"{c.name} exited with code {c.returncode}; the end of {c.log}:\n{c.tail()}")
        committed = await kafka.committed(group, source)
        out = await kafka.count(outputs)
        if committed >= records and (expected_out is None or out >= expected_out):
            return
        if (committed, out) != last_state:
            last_state, last_move = (committed, out), time.monotonic()
        elif time.monotonic() - last_move > STALL_SECONDS:
            raise HarnessError(f"{child.name} stalled: {committed:,} of {records:,} input records committed, "
                               f"{out:,} of {expected_out or '?'} output records; the end of {child.log}:\n"
                               f"{child.tail()}")
        await asyncio.sleep(0.5)


async def read_stamps(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int,
                      max_records: int | None = None) -> list[int]:
    """Timestamps of the records from the position up to `end` (or the first `max_records` of them)."""
    stamps: list[int] = []
    deadline = time.monotonic() + 30
    while await consumer.position(tp) < end and time.monotonic() < deadline:
        records = (await consumer.getmany(tp, timeout_ms=1000, max_records=max_records)).get(tp, [])
        stamps += [r.timestamp for r in records]
        if max_records is not None and len(stamps) >= max_records:
            break
    return stamps


async def first_and_last_stamps(consumer: AIOKafkaConsumer, tp: TopicPartition, begin: int, end: int) -> list[int]:
    """The timestamps of a partition's first and last records. The last offsets may be transaction markers
    (the exactly-once worker's output), which are no records: look back further until a record shows."""
    consumer.seek(tp, begin)
    first = await read_stamps(consumer, tp, end, max_records=1)
    if not first:
        raise HarnessError(f"cannot read {tp} at offset {begin}")
    back = 1
    while True:
        start = max(begin, end - back)
        consumer.seek(tp, start)
        last = await read_stamps(consumer, tp, end)
        if last:
            return [first[0], last[-1]]
        if start == begin:
            raise HarnessError(f"no record in {tp} between offsets {begin} and {end}")
        back *= 16


async def append_span(brokers: str, topics: Iterable[str]) -> tuple[float, float]:
    """(first, last) broker append time in seconds over the topics' records: each partition's first and last
    record, fetched by offset (LogAppendTime only grows within a partition)."""
    consumer = scan_consumer(brokers)
    await consumer.start()
    stamps: list[int] = []
    try:
        for topic in topics:
            begins = await consumer.beginning_offsets(tps_of(topic))
            ends = await consumer.end_offsets(tps_of(topic))
            for tp in tps_of(topic):
                if ends[tp] > begins[tp]:
                    consumer.assign([tp])
                    stamps += await first_and_last_stamps(consumer, tp, begins[tp], ends[tp])
    finally:
        await consumer.stop()
    if not stamps:
        raise HarnessError(f"no output on {list(topics)}")
    return min(stamps) / 1000, max(stamps) / 1000


async def consumer_result(kafka: Kafka, child: Child, name: str, input_label: str, records: int,
                          outputs: list[str], note: str, changelog: str | None = None) -> Result:
    """Events/s over the output's append-time span; CPU of the child over the same window. With a Faust
    table, also how many changelog records it wrote per input record."""
    first, last = await append_span(kafka.brokers, outputs)
    cpu = child.cpu_at(last) - child.cpu_at(first)
    child.stop()
    if changelog is not None:
        written = await scan_topic(kafka.brokers, changelog, lambda r: None)  # records, not markers
        note += f"; {written:,} changelog records ({written / records:.2f} per input record)"
    return Result(name, input_label, records, last - first, cpu, child.peak_rss_mib, note)


async def measure_child(kafka: Kafka, names: Names, label: str, raw: str, records: int, argv: list[str], name: str,
                        note: str, changelog: str | None = None) -> Result:
    """A consume-and-produce child that writes one output per input to the topic it is given: `argv` is
    completed with the brokers, its group, `raw`, its output topic (fresh, LogAppendTime) and, when it keeps
    state (`changelog`: its changelog topic, in which `{group}` stands for its group), a fresh state directory."""
    out, group = names.topic(f"{label}.out"), names.group(label)
    await kafka.create_topics([out])
    argv = [*argv, kafka.brokers, group, raw, out]
    if changelog is not None:
        argv.append(str(names.run_dir / f"{label}-state"))
    child = Child(label, argv, clean_env(), names.run_dir / f"{label}.log")
    await wait_consumed(kafka, child, group, raw, records, [out], records)
    result = await consumer_result(kafka, child, name, "all", records, [out], note,
                                   changelog=None if changelog is None else changelog.format(group=group))
    produced = await kafka.count([out])
    if produced != records:
        result.note += f"; WARNING {produced:,} records out for {records:,} in"
    return result


async def measure_baseline(kafka: Kafka, names: Names, raw: str, records: int, expected: ReplayRun) -> tuple[
        Result, Digest]:
    """The stock Faust agent (scripts/bench_baseline.py) on `raw`."""
    enriched, dead = names.topic("baseline.enriched"), names.topic("baseline.dead-letter")
    group = names.group("baseline")
    await kafka.create_topics([enriched, dead])
    env = clean_env(BENCH_BROKERS=kafka.brokers, BENCH_GROUP=group, BENCH_RAW_TOPIC=raw,
                    BENCH_ENRICHED_TOPIC=enriched, BENCH_DEAD_LETTER_TOPIC=dead,
                    BENCH_STATE_DIR=str(names.run_dir / "baseline-state"), BENCH_WEB_PORT=str(free_port()),
                    BENCH_PARTITIONS=str(PARTITIONS))
    argv = [PYTHON, str(ROOT / "scripts" / "bench_baseline.py"), "worker", "--loglevel", "warn"]
    child = Child("baseline", argv, env, names.run_dir / "baseline.log")
    await wait_consumed(kafka, child, group, raw, records, [enriched, dead],
                        expected.enriched + expected.dead_letters)
    result = await consumer_result(kafka, child, "baseline: stock Faust agent + Table", f"first {records:,}",
                                   records, [enriched, dead],
                                   "one event at a time, table get/set and `await send` per event",
                                   changelog=f"{group}-devices-changelog")
    return result, await topic_digest(kafka.brokers, raw, enriched, dead)


def worker_child(kafka: Kafka, names: Names, label: str, raw: str, enriched: str, dead: str,
                 guarantee: str = "at_least_once", group: str | None = None, state: str | None = None,
                 **more: Any) -> Child:
    """A worker with its own group and state directory, named after `label` unless `group`/`state` say, and
    its own persons topic and identity change log (the persons stage is on by default: without ones of its own,
    every worker of every run would write the shared default topics). `more`: further settings, by Settings
    field name."""
    settings = {
        "brokers": kafka.brokers, "raw_topic": raw, "enriched_topic": enriched, "dead_letter_topic": dead,
        "persons_topic": names.topic(f"{group or label}.persons"),
        "identity_changes_topic": names.topic(f"{group or label}.identity-changes"),
        "group": names.group(group or label), "state_dir": str(names.run_dir / f"{state or label}-state"),
        "web_port": free_port(), "partitions": PARTITIONS, "log_level": "warning",
        "processing_guarantee": guarantee, **more,
    }
    return Child(label, [PYTHON, "-m", "streams", "worker"], worker_env(settings), names.run_dir / f"{label}.log")


async def measure_worker(kafka: Kafka, names: Names, raw: str, records: int, expected: ReplayRun,
                         guarantee: str = "at_least_once") -> tuple[Result, Digest]:
    label = "worker" if guarantee == "at_least_once" else "worker-eos"
    enriched, dead = names.topic(f"{label}.enriched"), names.topic(f"{label}.dead-letter")
    await kafka.create_topics([enriched, dead])  # before the worker does: with LogAppendTime
    child = worker_child(kafka, names, label, raw, enriched, dead, guarantee)
    await wait_consumed(kafka, child, names.group(label), raw, records, [enriched, dead],
                        expected.enriched + expected.dead_letters)
    if guarantee == "at_least_once":
        name, note = ("worker: python -m streams worker", "batches of up to 10,000, state written once per batch; "
                      "persons stage on (the default)")
    else:
        name, note = "worker, --processing-guarantee exactly_once", "the same, one transaction per partition a batch"
    result = await consumer_result(kafka, child, name, "all", records, [enriched, dead], note,
                                   changelog=f"{names.group(label)}-devices-changelog")
    return result, await topic_digest(kafka.brokers, raw, enriched, dead)


async def measure_workers(kafka: Kafka, names: Names, label: str, raw: str, events: int, expected_out: int,
                          count: int = 1, *, group: str | None = None, state: str | None = None,
                          committed: int | None = None, digest: bool = True, name: str = "",
                          note: str = "") -> tuple[Result, Digest | None]:
    """`count` worker processes in one consumer group on `raw`, until the group has committed `committed`
    records of it (default `events`: a fresh group) and the outputs hold `expected_out` records; `events`
    input records are measured. Events/s over the outputs' append span, CPU of all the processes in that
    window, peak RSS of the largest; and the outputs' digest (`digest`)."""
    enriched, dead = names.topic(f"{label}.enriched"), names.topic(f"{label}.dead-letter")
    await kafka.create_topics([enriched, dead])
    group = group or label
    children = [worker_child(kafka, names, f"{label}-{i}" if count > 1 else label, raw, enriched, dead,
                             group=group, state=f"{state or label}-{i}" if count > 1 else state or label)
                for i in range(count)]
    await wait_consumed(kafka, children, names.group(group), raw, committed or events, [enriched, dead],
                        expected_out)
    first, last = await append_span(kafka.brokers, [enriched, dead])
    cpu = sum(c.cpu_at(last) - c.cpu_at(first) for c in children)
    for c in children:
        c.stop()
    result = Result(name or label, "all", events, last - first, cpu, max(c.peak_rss_mib for c in children), note)
    return result, await topic_digest(kafka.brokers, raw, enriched, dead) if digest else None
