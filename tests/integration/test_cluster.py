"""The worker on a three-broker cluster (replication factor 3, min ISR 2): a broker killed under it, a broker
that lost its disk, a start while a broker is down. Nothing may be lost, and the worker must not exit.

The cluster is `scripts/kafka.sh cluster-start` (the `kafka_cluster` fixture starts it for these tests only).
The reference is `python -m streams replay` on the same input, as in test_worker.py: per device the same
records in the same order; at-least-once may repeat a record only as its identical first copy, exactly-once
not at all (read committed).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from streams.config import Settings
from streams.kafka import admin as kafka_admin
from streams.kafka import clients as kafka_clients
from tests.integration import kit
from tests.integration.conftest import Cluster

# one process runs them all, one after the other: each kills, wipes and starts the cluster's nodes
pytestmark = [pytest.mark.kafka, pytest.mark.cluster, pytest.mark.timeout(480), pytest.mark.xdist_group("cluster")]

OUTPUT_TIMEOUT = 240.0  # a broker's death moves leaders and coordinators: slower than the single broker


def describe(settings: Settings, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """Per topic whose name starts with `prefix`, its partitions' leader, replicas and ISR."""
    async def call(admin: Any) -> Any:
        return await admin.describe_topics()

    metadata = asyncio.run(kit.admin_call(settings.brokers, call))
    return {t["topic"]: t["partitions"] for t in metadata if t["topic"].startswith(prefix)}


def leader_of(settings: Settings, topic: str, partition: int = 0) -> int:
    return int(next(p["leader"] for p in describe(settings, topic)[topic] if p["partition"] == partition))


def wait_in_sync(settings: Settings, prefix: str, timeout: float = 120.0) -> None:
    """Until every partition of the test's topics has all three replicas in sync again."""
    deadline = time.monotonic() + timeout
    behind: list[str] = []
    while time.monotonic() < deadline:
        topics = describe(settings, prefix)
        behind = [f"{t}/{p['partition']}: isr {p['isr']}" for t, ps in topics.items() for p in ps
                  if len(p["isr"]) < 3]
        if topics and not behind:
            return
        time.sleep(1.0)
    pytest.fail(f"replicas not back in sync after {timeout:.0f}s: {behind[:10]}")


def send_in_background(settings: Settings, lines: list[bytes], chunks: int = 12,
                       pause: float = 0.5) -> threading.Thread:
    """Produce `lines` in chunks with pauses (acks=all, idempotent); a failed produce fails the test."""
    errors: list[BaseException] = []

    def run() -> None:
        size = -(-len(lines) // chunks)
        try:
            for i in range(0, len(lines), size):
                kit.produce(settings, kit.keyed(lines[i:i + size]))
                time.sleep(pause)
        except BaseException as e:  # reported by `finish`
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def finish(thread: threading.Thread) -> None:
    thread.join(180)
    assert not thread.is_alive(), "producing the input did not end within 180 s"
    errors = thread.errors  # type: ignore[attr-defined]
    assert not errors, f"producing the input failed: {errors[0]!r}"


def outputs_so_far(settings: Settings) -> int:
    try:
        return len(asyncio.run(kafka_clients.read_all(settings, settings.enriched_topic, idle_timeout=2)))
    except kafka_admin.TopicMissing:
        return 0


def check_against_replay(out: kit.Outputs, expected: list[dict[str, Any]], expected_dead: list[dict[str, Any]],
                         repeats_allowed: bool) -> int:
    """The worker's outputs are replay's: per device in order, repeats (allowed or not) identical to the first
    copy. Returns how many repeated records there were."""
    got = kit.enriched_by_device(out.enriched)  # also: a record_id written twice carries the same bytes
    repeats = 0
    for device_id, records in got.items():
        got[device_id], n = kit.without_repeats(records)
        repeats += n
    kit.assert_same_per_device(got, kit.by_device(expected))
    letters = {kit.canonical(d): d for d in out.dead_values}  # a repeated dead letter has the same source
    assert kit.dead_letters_without_source(letters.values()) == kit.dead_letters_without_source(expected_dead)
    if not repeats_allowed:
        assert repeats == 0 and len(out.dead) == len(letters), "exactly-once: a record was written twice"
    return repeats


# -- a broker killed mid-stream --------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_a_broker_killed_mid_stream_loses_nothing(cluster: Cluster, cluster_topics: Settings,
                                                  start_worker: kit.StartWorker, tmp_path: Path,
                                                  guarantee: str) -> None:
    settings = replace(cluster_topics, processing_guarantee=guarantee)
    lines = kit.sample_lines() + kit.generate(1200, 120, prefix="kill", seed=11)
    expected, expected_dead = kit.replay_outputs(settings, kit.write_jsonl(tmp_path / "input.jsonl", lines))

    worker = start_worker(settings)
    worker.wait_ready()
    sender = send_in_background(settings, lines)
    deadline = time.monotonic() + 120
    while outputs_so_far(settings) < len(expected) // 4:
        assert time.monotonic() < deadline, "no outputs within 120 s"
        worker.check_alive()
        time.sleep(0.2)
    # the leader of the raw topic's first partition: its fetches, and its share of everything, move
    victim = leader_of(settings, settings.raw_topic)
    cluster.kill(victim)
    finish(sender)

    out = kit.wait_for_outputs(settings, len(expected) + len(expected_dead), workers=[worker], timeout=OUTPUT_TIMEOUT,
                           distinct=guarantee == "at_least_once", settle=3.0)
    repeats = check_against_replay(out, expected, expected_dead, repeats_allowed=guarantee == "at_least_once")
    worker.check_alive()
    print(f"{guarantee}: broker {victim} killed mid-stream; {len(out.enriched)} enriched records, {repeats} repeats")


# -- a broker that lost its disk -------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_a_broker_that_lost_its_disk_catches_up_and_nothing_is_lost(
    cluster: Cluster, cluster_topics: Settings, start_worker: kit.StartWorker, tmp_path: Path, guarantee: str
) -> None:
    settings = replace(cluster_topics, processing_guarantee=guarantee)
    lines = kit.generate(900, 90, prefix="disk", seed=13)
    parts = [lines[:300], lines[300:600], lines[600:]]
    expected1, _ = kit.replay_outputs(settings, kit.write_jsonl(tmp_path / "part1.jsonl", parts[0]))
    expected12, _ = kit.replay_outputs(settings, kit.write_jsonl(tmp_path / "part12.jsonl", parts[0] + parts[1]))
    expected, expected_dead = kit.replay_outputs(settings, kit.write_jsonl(tmp_path / "input.jsonl", lines))
    repeats_allowed = guarantee == "at_least_once"

    worker = start_worker(settings)
    worker.wait_ready()
    kit.produce(settings, kit.keyed(parts[0]))
    kit.wait_for_outputs(settings, len(expected1), workers=[worker], settle=0)

    # SIGKILL and its data deleted; the rest arrives while it is gone
    lost = leader_of(settings, settings.raw_topic)
    cluster.wipe(lost)
    kit.produce(settings, kit.keyed(parts[1]))
    kit.wait_for_outputs(settings, len(expected12), workers=[worker], timeout=OUTPUT_TIMEOUT, distinct=repeats_allowed,
                     settle=0)

    # back with an empty disk: it fetches every replica it holds from the others
    cluster.start(lost)
    wait_in_sync(settings, settings.group)
    # now another broker goes: what the lost disk held must be on the rebuilt one
    other = next(n for n in (1, 2, 3) if n != lost)
    cluster.kill(other)
    kit.produce(settings, kit.keyed(parts[2]))
    out = kit.wait_for_outputs(settings, len(expected) + len(expected_dead), workers=[worker], timeout=OUTPUT_TIMEOUT,
                           distinct=repeats_allowed, settle=3.0)
    repeats = check_against_replay(out, expected, expected_dead, repeats_allowed)
    worker.check_alive()
    print(f"{guarantee}: broker {lost} wiped and rebuilt, then broker {other} killed; {repeats} repeats")


# -- a start while a broker is down ----------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_the_worker_starts_while_a_broker_is_down(cluster: Cluster, cluster_topics: Settings,
                                                 start_worker: kit.StartWorker, tmp_path: Path, guarantee: str) -> None:
    settings = replace(cluster_topics, processing_guarantee=guarantee)
    lines = kit.sample_lines() + kit.generate(600, 60, prefix="down", seed=17)
    expected, expected_dead = kit.replay_outputs(settings, kit.write_jsonl(tmp_path / "input.jsonl", lines))

    # the first of the bootstrap list, started at once: the cluster's metadata still lists it for seconds
    cluster.kill(1)
    worker: kit.Worker = start_worker(settings)
    worker.wait_ready(timeout=180)
    kit.produce(settings, kit.keyed(lines))
    out = kit.wait_for_outputs(settings, len(expected) + len(expected_dead), workers=[worker], timeout=OUTPUT_TIMEOUT)
    check_against_replay(out, expected, expected_dead, repeats_allowed=False)  # nothing was interrupted

    # every topic the worker created (enriched, dead letters, changelog, repartition, Faust's leader topic)
    # has the brokers' default replication factor, 3
    created = describe(settings, settings.group)
    assert {f"{settings.group}-devices-changelog", f"{settings.group}-{settings.raw_topic}-repartition",
            settings.enriched_topic, settings.dead_letter_topic} <= set(created)
    assert {t: {len(p["replicas"]) for p in ps} for t, ps in created.items()} == {t: {3} for t in created}
    time.sleep(2)
    worker.check_alive()
