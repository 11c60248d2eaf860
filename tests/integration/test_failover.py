"""Two workers with a standby replica of each other's partitions, one killed with SIGKILL mid-stream: the
survivor takes its partitions over from its standby copies, without rebuilding them from the changelog, and
the output still equals replay's. And a worker with an empty state directory rebuilds its table from a
changelog that ends in a transaction marker and holds an aborted transaction.

What the survivor restored is read from its /metrics: `streams_restored_records_total` (changelog records
written to its RocksDB, by role), `streams_restored_offset` (per standby partition, the offset its copy
holds) and `streams_restore_started_after` (per owned partition, where its last rebuild started).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams import codec
from streams.config import Settings
from streams.identity import DeviceState
from streams.kafka.murmur2 import murmur2
from streams.worker.names import TABLE
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]



def metrics(worker: kit.Worker) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.web_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for labels, value in re.findall(rf"^streams_{name}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        out.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


def raw_partitions(worker: kit.Worker) -> set[int]:
    raw = worker.settings.raw_topic
    return {int(s["partition"]) for s, _ in samples(metrics(worker), "consumer_lag") if s["topic"] == raw}


def restored(worker: kit.Worker, role: str) -> int:
    return sum(int(v) for s, v in samples(metrics(worker), "restored_records_total") if s["role"] == role)


def standby_offsets(worker: kit.Worker) -> dict[int, int]:
    return {int(s["partition"]): int(v) for s, v in samples(metrics(worker), "restored_offset")
            if s["role"] == "standby"}


def started_after(worker: kit.Worker) -> dict[int, int]:
    return {int(s["partition"]): int(v) for s, v in samples(metrics(worker), "restore_started_after")}


def changelog(settings: Settings) -> str:
    return f"{settings.group}-{TABLE}-changelog"


async def _end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.brokers, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(kit.PARTITIONS)])
        return {tp.partition: o for tp, o in ends.items()}
    finally:
        await consumer.stop()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    return asyncio.run(_end_offsets(settings, topic))


async def _last_records(settings: Settings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.brokers, group_id=None, isolation_level="read_committed",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(kit.PARTITIONS)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        last = {p: -1 for p in range(kit.PARTITIONS)}

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            for tp, recs in (await consumer.getmany(timeout_ms=500)).items():
                if recs:
                    last[tp.partition] = max(last[tp.partition], recs[-1].offset)
        return last
    finally:
        await consumer.stop()


def last_records(settings: Settings, topic: str) -> dict[int, int]:
    """Per partition, the offset of the last record a read-committed reader sees (with exactly-once the
    changelog ends in a commit marker, or after a failed batch in an aborted transaction's records)."""
    return asyncio.run(_last_records(settings, topic))


def wait_until(what: str, ok: Callable[[], bool], workers: list[kit.Worker], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        for w in workers:
            w.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f}s\n" + "\n".join(w.log_tail(30) for w in workers))
        time.sleep(0.2)




@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_the_survivor_takes_over_from_its_standby_copies(topics: Settings, start_worker: kit.StartWorker,
                                                         tmp_path: Path, guarantee: str) -> None:
    topics = replace(topics, processing_guarantee=guarantee, standby_replicas=1)
    generated = kit.generate(3000, 240, prefix="fo", seed=13)
    first, rest = generated[:2000], generated[2000:]
    expected1, dead1 = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "first.jsonl", first))
    expected, expected_dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "all.jsonl", generated))
    repeats_allowed = guarantee == "at_least_once"

    a = start_worker(topics, "a", state_dir=str(tmp_path / "state-a"))
    b = start_worker(topics, "b", state_dir=str(tmp_path / "state-b"), web_port=kit.free_port())
    a.wait_ready(members=2, timeout=120)
    b.wait_ready(members=2, timeout=120)
    kit.produce(topics, kit.keyed(first))
    kit.wait_for_outputs(topics, len(expected1) + len(dead1), workers=[a, b], settle=0)
    moved = raw_partitions(a)
    assert len(moved) == 2 and not moved & raw_partitions(b), (moved, raw_partitions(b))

    # b keeps a copy of a's partitions: it catches up with their changelog, once a has written it (a batch's
    # outputs are acknowledged before its changelog records are sent)
    last_record: dict[int, int] = {}

    def written() -> bool:
        nonlocal last_record
        previous, last_record = last_record, last_records(topics, changelog(topics))
        return previous == last_record and all(last_record[p] > 0 for p in moved)
    wait_until("a's changelog records written", written, [a, b])
    wait_until("b's standby copies of a's partitions catch up",
               lambda: all(standby_offsets(b).get(p, -1) >= last_record[p] for p in moved), [a, b])

    # a dies in the middle of the second part
    sender = kit.produce_slowly(topics, rest, chunks=8, pause=0.3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(kit.kafka_read_enriched(topics)) < len(expected1) + len(rest) // 4:
        time.sleep(0.1)
    copied = standby_offsets(b)
    rebuilt_before = restored(b, "active")
    a.kill()
    sender.join(60)

    out = kit.wait_for_outputs(topics, len(expected) + len(expected_dead), workers=[b], distinct=repeats_allowed,
                           timeout=180)
    wait_until("b owns every partition", lambda: raw_partitions(b) == set(range(kit.PARTITIONS)), [b])

    # no rebuild from scratch: each moved partition's rebuild started where b's copy of it had got to, and b
    # read no more changelog records than were written after that
    starts = started_after(b)
    assert all(starts.get(p, -1) >= copied[p] for p in moved), (starts, copied)
    ends_now = end_offsets(topics, changelog(topics))
    tail = sum(ends_now[p] - 1 - copied[p] for p in moved)
    rebuilt = restored(b, "active") - rebuilt_before
    assert rebuilt <= tail, f"{rebuilt} changelog records read after the takeover; {tail} were new"

    got = kit.enriched_by_device(out.enriched)
    if repeats_allowed:
        for device_id, records in got.items():
            got[device_id], _ = kit.without_repeats(records)
    else:
        assert len(out.enriched) == len(expected), f"{len(out.enriched)} records out, {len(expected)} expected"
    kit.assert_same_per_device(got, kit.by_device(expected))
    assert kit.dead_letters_without_source(out.dead_values) == kit.dead_letters_without_source(expected_dead)
    assert b.stop() == 0, f"SIGTERM: exit code {b.proc.returncode}\n{b.log_tail()}"


# -- a rebuild from a transactional changelog -------------------------------------------------------------


def partition_of(key: bytes) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % kit.PARTITIONS


async def _write_changelog(settings: Settings, committed: dict[bytes, bytes], aborted: dict[bytes, bytes]) -> None:
    """`committed` in two transactions (so that the changelog's records sit between commit markers), then
    `aborted` in a transaction that is aborted: the changelog ends in an abort marker."""
    # as the worker would create it
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.brokers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(changelog(settings), kit.PARTITIONS, 1,
                                            topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=settings.brokers, transactional_id=f"{settings.group}-test")
    await producer.start()
    try:
        items = list(committed.items())
        for part in (items[: len(items) // 2], items[len(items) // 2:]):
            async with producer.transaction():
                await asyncio.gather(*[await producer.send(changelog(settings), v, key=k, partition=partition_of(k))
                                       for k, v in part])
        await producer.begin_transaction()
        await asyncio.gather(*[await producer.send(changelog(settings), v, key=k, partition=partition_of(k))
                               for k, v in aborted.items()])
        await producer.abort_transaction()
    finally:
        await producer.stop()


def test_a_rebuild_reads_committed_states_only(topics: Settings, start_worker: kit.StartWorker,
                                               tmp_path: Path) -> None:
    """A worker with an empty state directory rebuilds its table from a changelog written in transactions,
    which ends in the marker of an aborted one: it holds the committed states, none of the aborted ones,
    and becomes ready (a changelog ending in a marker is read to its end)."""
    topics = replace(topics, processing_guarantee="exactly_once")
    devices = [f"tx-{i:03d}" for i in range(200)]
    committed = {d.encode(): codec.encode_state(DeviceState(anonymous_id=d, default_id=d,
                                                            login_key="$identity_login_id",
                                                            login_value=f"user-{d}")) for d in devices}
    aborted = {d.encode(): codec.encode_state(DeviceState(anonymous_id=f"aborted-{d}", default_id=d))
               for d in devices[:50]}
    asyncio.run(_write_changelog(topics, committed, aborted))
    ends = end_offsets(topics, changelog(topics))
    assert all(ends[p] > 0 for p in range(kit.PARTITIONS)), ends

    worker = start_worker(topics, "rebuild", state_dir=str(tmp_path / "state"))
    worker.wait_ready(timeout=120)
    # a track of each device: its output carries the state the rebuild gave it
    tracks = [orjson.dumps({"device_id": d, "platform": "mp-wechat", "action": "track", "event": "after",
                            "time": 1_712_400_000_000 + i}) for i, d in enumerate(devices)]
    kit.produce(topics, kit.keyed(tracks))
    out = kit.wait_for_outputs(topics, len(devices), workers=[worker])
    assert restored(worker, "active") == len(committed)
    assert not restored(worker, "standby")
    assert all(v == -1 for v in started_after(worker).values()), started_after(worker)
    values: dict[str, Any] = {r["device_id"]: r for r in out.enriched_values}
    assert sorted(values) == sorted(devices)
    for d, record in values.items():
        assert record["login_id"] == f"user-{d}", record
        assert record["anonymous_id"] == d, record
    assert worker.stop() == 0, worker.log_tail()
