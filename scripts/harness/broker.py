"""The broker, as the harness drives it: scripts/kafka.sh (the single node, the three-node cluster), an admin
and offset client, topics created and deleted, a file loaded into a topic, a topic read, the partition of a
key, and the environment of the processes a run starts.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import GroupCoordinatorNotAvailableError

from harness import ROOT
from streams.config import Settings, env_name
from streams.kafka import admin as kafka_admin
from streams.kafka.clients import device_key
from streams.kafka.murmur2 import murmur2

KAFKA_SH = ROOT / "scripts" / "kafka.sh"
BROKERS = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"  # where scripts/kafka.sh puts the broker
PARTITIONS = 4
LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


class HarnessError(Exception):
    """The harness itself could not go on (no broker, a child died, a consumer stalled, a produce failed)."""


# -- scripts/kafka.sh --------------------------------------------------------------------------------------


def kafka_sh(command: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(KAFKA_SH), command, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Broker:
    """The single node of scripts/kafka.sh, or (`cluster`) its three-node cluster: started when down, and left
    as it was found; the single node restarted, a node of the cluster killed and started again."""

    def __init__(self, say: Callable[[str], None], cluster: bool = False) -> None:
        self.say = say
        self.cluster = cluster
        self.prefix = "cluster-" if cluster else ""
        self.was_up = self.up()
        self.restarts: list[float] = []  # seconds each restart took

    def run(self, command: str, *args: str, timeout: float) -> float:
        """`bash scripts/kafka.sh [cluster-]COMMAND ARGS`; the seconds it took. Raises HarnessError when it fails."""
        started = time.monotonic()
        run = kafka_sh(self.prefix + command, *args, timeout=timeout)
        if run.returncode != 0:
            raise HarnessError(f"`bash scripts/kafka.sh {self.prefix}{command} {' '.join(args)}` failed "
                               f"({run.returncode}):\n{run.stderr[-3000:]}")
        return time.monotonic() - started

    def up(self) -> bool:
        return kafka_sh(self.prefix + "status", timeout=120).returncode == 0

    def brokers(self) -> str:
        return kafka_sh("cluster-brokers", timeout=60).stdout.strip() if self.cluster else BROKERS

    def ensure_up(self) -> None:
        if not self.up():
            self.say(f"no broker answers: starting one (bash scripts/kafka.sh {self.prefix}start); it is "
                     "stopped again at the end" if not self.was_up else "starting the broker again")
            self.run("start", timeout=1800)

    def restart(self) -> float:
        took = self.run("restart", timeout=600)
        self.restarts.append(took)
        return took

    def kill(self, node: int) -> None:
        self.run("kill", str(node), timeout=120)

    def start_node(self, node: int) -> float:
        return self.run("start-node", str(node), timeout=600)

    def leave_as_found(self, restart: bool = True) -> None:
        """Stopped when it was down at the start; when it was up, and is down now, started again (`restart`:
        a run that restarts it may have left it down) or left alone (someone else stopped it)."""
        if self.was_up:
            if restart and not self.up():
                self.say("the broker was up at the start: starting it again")
                kafka_sh(self.prefix + "start", timeout=1800)
        else:
            self.say(f"the broker was down at the start: stopping it (bash scripts/kafka.sh {self.prefix}stop)")
            kafka_sh(self.prefix + "stop", timeout=300)


# -- the clients ------------------------------------------------------------------------------------------


def partition_of(key: bytes, partitions: int = PARTITIONS) -> int:
    """Kafka's default partitioner (murmur2, as the Java client): the partition the worker expects."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def tps_of(topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(PARTITIONS)]


class Kafka:
    """The harness's admin and offset lookups on the broker; `async with Kafka(brokers) as kafka`. The project's
    admin client: it asks a broker that answers, also while one node of the cluster is down."""

    def __init__(self, brokers: str, timeout_ms: int = 30_000) -> None:
        self.brokers = brokers
        self.admin = kafka_admin.Admin(bootstrap_servers=brokers, request_timeout_ms=timeout_ms)
        self.lookup = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=None, enable_auto_commit=False,
                                       request_timeout_ms=timeout_ms)

    async def start(self) -> Kafka:
        await self.admin.start()
        await self.lookup.start()
        return self

    async def close(self) -> None:
        await self.lookup.stop()
        await self.admin.close()

    async def __aenter__(self) -> Kafka:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def create_topics(self, names: Iterable[str], configs: Mapping[str, str] = LOG_APPEND_TIME,
                            partitions: int = PARTITIONS) -> None:
        """Fresh topics, by default stamped by the broker's clock (LogAppendTime: the throughput and latency
        figures come from these stamps, not from any client's clock); ready when every partition has a leader."""
        names = list(names)
        response = await self.admin.create_topics(
            [NewTopic(n, partitions, 1, topic_configs=dict(configs)) for n in names])
        for name, code, *_ in response.topic_errors:
            if code:
                raise HarnessError(f"cannot create topic {name}: error code {code}")
        deadline = time.monotonic() + 30
        while True:
            meta = {t["topic"]: t for t in await self.admin.describe_topics(names)}
            if all(n in meta and not meta[n]["error_code"] and len(meta[n]["partitions"]) == partitions
                   and all(not p["error_code"] for p in meta[n]["partitions"]) for n in names):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"topics {names} did not become ready")
            await asyncio.sleep(0.1)

    async def topics(self) -> set[str]:
        return set(await self.admin.list_topics())

    async def end_offsets(self, topic: str) -> dict[int, int]:
        return {tp.partition: o for tp, o in (await self.lookup.end_offsets(tps_of(topic))).items()}

    async def count(self, topics: Iterable[str]) -> int:
        return sum([sum((await self.end_offsets(t)).values()) for t in topics])

    async def committed_offsets(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offset per partition of `topic` (-1: none)."""
        try:
            offsets = await self.admin.list_consumer_group_offsets(group, partitions=tps_of(topic))
        except GroupCoordinatorNotAvailableError:  # a fresh broker makes its offsets topic on the first ask
            return dict.fromkeys(range(PARTITIONS), -1)
        return {tp.partition: o.offset for tp, o in offsets.items()}

    async def committed(self, group: str, topic: str) -> int:
        """How many records of `topic` the group has committed (fresh topics: offsets start at 0)."""
        return sum(max(0, o) for o in (await self.committed_offsets(group, topic)).values())

    async def delete_topics(self, stamp: str) -> list[str]:
        """Every topic whose name holds the run's stamp: its own, and those its children made (the worker's
        changelog, repartition and leader topics; Quix names its changelogs changelog__<group>--...)."""
        names = sorted(t for t in await self.topics() if stamp in t)
        for i in range(0, len(names), 20):
            await self.admin.delete_topics(names[i: i + 20])
        return names


async def send_batches(producer: AIOKafkaProducer, topic: str,
                       messages: Iterable[tuple[bytes | None, bytes, int]]) -> int:
    """Each (key, value, partition) into its partition's batch, built by hand: much faster than a send() per
    record, and the broker sees the same records. Returns how many were sent."""
    batches: dict[int, Any] = {}
    pending: list[asyncio.Future[Any]] = []
    count = 0
    for key, value, p in messages:
        batch = batches.get(p)
        if batch is None:
            batch = batches[p] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
            pending.append(await producer.send_batch(batch, topic, partition=p))
            batch = batches[p] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
        count += 1
        if len(pending) >= 64:
            await asyncio.gather(*pending)
            pending = []
    for p, batch in batches.items():
        if batch.record_count():
            pending.append(await producer.send_batch(batch, topic, partition=p))
    await asyncio.gather(*pending)
    return count


def batch_producer(brokers: str, transactional_id: str | None = None) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=brokers, acks="all", linger_ms=50, max_batch_size=512 << 10,
                            max_request_size=4 << 20, transactional_id=transactional_id)


def keyed(lines: Iterable[bytes]) -> Iterable[tuple[bytes | None, bytes, int]]:
    """Each line keyed by its device_id (as `streams produce` keys it), in the partition murmur2 gives the key
    (murmur2 once per device); a line without one in the next partition in turn."""
    partition_cache: dict[bytes, int] = {}
    unkeyed = itertools.cycle(range(PARTITIONS))
    for line in lines:
        value = line.rstrip(b"\n")
        key = device_key(value)
        if key is None:
            yield None, value, next(unkeyed)
            continue
        p = partition_cache.get(key, -1)
        if p < 0:
            p = partition_cache[key] = partition_of(key)
        yield key, value, p


async def load_topic(brokers: str, topic: str, path: Path) -> tuple[int, float]:
    """Send every line of `path` to `topic`, keyed by its device_id. Returns (records, seconds)."""
    producer = batch_producer(brokers)
    await producer.start()
    started = time.monotonic()
    try:
        with open(path, "rb") as f:
            count = await send_batches(producer, topic, keyed(f))
    finally:
        await producer.stop()
    return count, time.monotonic() - started


def scan_consumer(brokers: str) -> AIOKafkaConsumer:
    # read_committed: what a warehouse loading the exactly-once worker's output would read
    return AIOKafkaConsumer(bootstrap_servers=brokers, group_id=None, enable_auto_commit=False,
                            auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                            fetch_max_bytes=64 << 20, isolation_level="read_committed")


async def read_up_to(consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int],
                     on_records: Callable[[TopicPartition, Sequence[ConsumerRecord]], None], what: str) -> None:
    """Fetch from the consumer's positions until each partition's position reaches its end offset (by
    position, not by the last record's offset: the last offsets may be transaction markers), handing each
    fetched list to `on_records`. Raises HarnessError when nothing comes for 60 s."""
    left = {tp for tp, end in ends.items() if await consumer.position(tp) < end}
    last = time.monotonic()
    while left:
        batch = await consumer.getmany(*left, timeout_ms=500, max_records=50_000)
        for tp, records in batch.items():
            on_records(tp, records)
            if records:
                last = time.monotonic()
        for tp in list(left):
            if await consumer.position(tp) >= ends[tp]:
                left.discard(tp)
        if time.monotonic() - last > 60:
            raise HarnessError(f"reading {what} stalled")


async def scan_topic(brokers: str, topic: str, on_record: Callable[[ConsumerRecord], None]) -> int:
    """Call `on_record` for every record now in `topic`, partition by partition in offset order."""
    consumer = scan_consumer(brokers)
    await consumer.start()
    count = 0
    try:
        consumer.assign(tps_of(topic))
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps_of(topic))
        await consumer.seek_to_beginning(*ends)

        def each(tp: TopicPartition, records: Sequence[ConsumerRecord]) -> None:
            nonlocal count
            for r in records:
                if r.offset < ends[tp]:
                    on_record(r)
                    count += 1

        await read_up_to(consumer, ends, each, topic)
    finally:
        await consumer.stop()
    return count


def fold(table: dict[str, bytes], records: Iterable[ConsumerRecord]) -> tuple[int, int]:
    """A compacted topic's records into a table: the last value per key, a tombstone (null value) removing the
    key. Returns how many (values, tombstones) it read."""
    values = tombstones = 0
    for r in records:
        key = r.key.decode(errors="replace") if r.key is not None else ""
        if r.value is None:
            table.pop(key, None)
            tombstones += 1
        else:
            table[key] = r.value
            values += 1
    return values, tombstones


async def last_offsets(brokers: str, topic: str, back: int = 5000) -> dict[int, int]:
    """Per partition, the offset of the last record a read-committed reader sees among the last `back` offsets
    (a topic written in transactions ends in markers, perhaps after an aborted transaction's records)."""
    consumer = scan_consumer(brokers)
    await consumer.start()
    last = dict.fromkeys(range(PARTITIONS), -1)

    def note(tp: TopicPartition, records: Sequence[ConsumerRecord]) -> None:
        if records:
            last[tp.partition] = max(last[tp.partition], records[-1].offset)

    try:
        consumer.assign(tps_of(topic))
        ends = await consumer.end_offsets(tps_of(topic))
        for tp, end in ends.items():
            consumer.seek(tp, max(0, end - back))
        await read_up_to(consumer, ends, note, topic)
    finally:
        await consumer.stop()
    return last


# -- the processes' environment ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any STREAMS_* or BENCH_* setting of the caller's (the runs must all see the
    same settings: the defaults), output unbuffered, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMS_", "BENCH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def worker_env(settings: Settings | Mapping[str, Any]) -> dict[str, str]:
    """`clean_env` with the worker's settings (a Settings, or values by Settings field name; None left out) as
    its STREAMS_* variables."""
    if isinstance(settings, Settings):
        settings = {f.name: getattr(settings, f.name) for f in fields(settings)}
    return clean_env(**{env_name(k): str(v) for k, v in settings.items() if v is not None})
