"""Producing to and reading from Kafka, for the tools and the tests: `produce_file` / `produce` (one message per
line, keyed by device ID, delivery awaited) and `read_all` (a topic's whole content). aiokafka only: the worker's
Faust app (`streams.worker.app`) is not needed to feed it or to look at what it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from streams.config import Settings
from streams.kafka.admin import TopicMissing, partition_count
from streams.kafka.partitioners import aiokafka_partitioner

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "seed.jsonl"
SEND_WINDOW = 10_000  # deliveries awaited in chunks: memory stays flat for any file size




def producer(settings: Settings) -> Any:
    """Not started; every message acknowledged by all in-sync replicas, no duplicates on retry."""
    return AIOKafkaProducer(bootstrap_servers=settings.brokers, acks="all", enable_idempotence=True, linger_ms=5,
                            partitioner=aiokafka_partitioner(settings.partitioner), **settings.kafka_options())


def device_key(value: bytes) -> bytes | None:
    """The record's device_id as UTF-8, when it is a JSON object with a string device_id; else None."""
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    device_id = record.get("device_id")
    if not isinstance(device_id, str):
        return None
    try:
        return device_id.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None


def _lines(src: BinaryIO) -> Iterator[bytes]:
    """Each non-blank line without its newline, bytes unchanged (as `replay` reads them)."""
    for line in src:
        value = line[:-1] if line.endswith(b"\n") else line
        if value.strip():
            yield value


@contextlib.contextmanager
def _open_in(path: str | None) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
    else:
        with open(SAMPLE if path is None else path, "rb") as f:
            yield f


async def _send_all(
    producer: Any, topic: str, messages: Iterable[tuple[bytes | None, bytes]], keep: list[Any] | None
) -> int:
    count = 0
    pending: list[asyncio.Future[Any]] = []
    for key, value in messages:
        pending.append(await producer.send(topic, value, key=key))
        count += 1
        if len(pending) >= SEND_WINDOW:
            delivered = await asyncio.gather(*pending)
            if keep is not None:
                keep.extend(delivered)
            pending = []
    delivered = await asyncio.gather(*pending)
    if keep is not None:
        keep.extend(delivered)
    return count


async def produce(
    settings: Settings, messages: Iterable[tuple[bytes | None, bytes]], *, topic: str | None = None
) -> list[Any]:
    """Send (key, value) pairs in order to `topic` (default: the raw topic) and await every delivery.
    Returns each message's RecordMetadata (topic, partition, offset), in the order given."""
    out: list[Any] = []
    p = producer(settings)
    await p.start()
    try:
        await _send_all(p, topic or settings.raw_topic, messages, out)
    finally:
        await p.stop()
    return out


async def produce_file(
    settings: Settings, path_or_dash: str | None, *, keyed: bool = True, topic: str | None = None
) -> int:
    """Send each non-blank line of a JSONL file ('-' = stdin; None = the built-in sample) as one message,
    bytes unchanged, keyed by its device_id when it has one (and `keyed`), else without key. Awaits every
    delivery; returns the number of messages."""
    p = producer(settings)
    with _open_in(path_or_dash) as src:
        await p.start()
        try:
            messages = ((device_key(v) if keyed else None, v) for v in _lines(src))
            return await _send_all(p, topic or settings.raw_topic, messages, None)
        finally:
            await p.stop()


def topic_of(settings: Settings, which: str) -> str:
    return {"enriched": settings.enriched_topic, "dead-letter": settings.dead_letter_topic,
            "persons": settings.persons_topic, "identity-changes": settings.identity_changes_topic}.get(which, which)


@contextlib.asynccontextmanager
async def assigned(settings: Settings, topic: str, *, from_beginning: bool = True) -> AsyncIterator[Any]:
    """A consumer without group that holds every partition of `topic`, at its beginning or end."""
    count = await partition_count(settings, topic)
    if count is None:
        raise TopicMissing(topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.brokers,
        **settings.kafka_options(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        yield consumer
    finally:
        await stopped(consumer)


async def stopped(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`. aiokafka's fetcher lets the cancellation of its own fetch task out of `stop()` when a
    fetch had just failed (a broker closing the connection): that one is not ours, and the records read stand.
    A cancellation of the caller's own task still goes through."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def read_all(settings: Settings, topic: str, *, idle_timeout: float = 5.0) -> list[ConsumerRecord]:
    """Every record now in the topic (all partitions, committed only), by partition then offset. Reads up
    to the end offsets taken at the start, or until `idle_timeout` seconds pass without progress."""
    async with assigned(settings, topic) as consumer:
        partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        ends = await consumer.end_offsets(partitions)
        records: list[Any] = []
        last = time.monotonic()
        while True:
            positions = {tp: await consumer.position(tp) for tp in partitions}
            if all(positions[tp] >= ends[tp] for tp in partitions):
                break
            if time.monotonic() - last > idle_timeout:
                break
            batch = await consumer.getmany(timeout_ms=100)
            for tp_records in batch.values():
                records.extend(tp_records)
            if batch or [tp for tp in partitions if await consumer.position(tp) != positions[tp]]:
                last = time.monotonic()
        records.sort(key=lambda r: (r.partition, r.offset))
        return records

