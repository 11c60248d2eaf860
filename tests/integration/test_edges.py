"""The edges of the worker against the real broker: devices whose records arrive both keyed and unkeyed,
across a SIGKILL; device IDs and stored values meant to stall a partition; Faust's own environment
variables; lookups across two loopback hosts; producers that place keys with librdkafka's CRC32.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.config import Settings
from streams.kafka import clients as kafka_clients
from streams.kafka.partitioners import key_hash
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]



def produce(settings: Settings, messages: list[tuple[bytes | None, bytes]]) -> list[Any]:
    return asyncio.run(kafka_clients.produce(settings, messages))


def record_ids(settings: Settings, sent: list[Any]) -> set[str]:
    """The record_id of the one enriched record each sent raw record makes (topic:partition:offset:0)."""
    return {f"{settings.raw_topic}:{m.partition}:{m.offset}:0" for m in sent}


def copies_by_record_id(records: list[Any]) -> dict[str, set[bytes]]:
    copies: dict[str, set[bytes]] = defaultdict(set)
    for r in records:
        copies[orjson.loads(r.value)["record_id"]].add(r.value)
    return copies


def wait_for_record_ids(settings: Settings, wanted: set[str], workers: list[kit.Worker],
                        timeout: float = 150) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            worker.check_alive()
        enriched = kit.read_outputs(settings).enriched
        missing = wanted - set(copies_by_record_id(enriched))
        if not missing:
            return enriched
        if time.monotonic() > deadline:
            tails = "\n".join(f"-- {w.name}:\n{w.log_tail(30)}" for w in workers)
            pytest.fail(f"{len(missing)} of {len(wanted)} records never came out, e.g. {sorted(missing)[:5]}\n{tails}",
                        pytrace=False)
        time.sleep(0.5)


# -- mixed keying ----------------------------------------------------------------------------------------


def mixed_rounds(devices: int) -> list[list[tuple[bool, bytes]]]:
    """Per device: an unkeyed track, a keyed login, an unkeyed track, a keyed track; in rounds (all devices'
    first record, then all second ones...). True = keyed by device ID."""
    steps: list[tuple[bool, dict[str, Any]]] = [
        (False, {"event": "open"}), (True, {"action": "login", "id": "user-{i}"}),
        (False, {"event": "browse"}), (True, {"event": "buy"})]
    return [[(keyed, orjson.dumps({"device_id": f"mixed-{i:03d}", "platform": "web",
                                   **{k: v.format(i=i) for k, v in step.items()}, "time": 1_712_500_000_000 + n}))
             for i in range(devices)]
            for n, (keyed, step) in enumerate(steps)]


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_mixed_keying_loses_nothing_across_a_kill(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                                  guarantee: str) -> None:
    """Before, a forwarded record and a later keyed record of its raw partition shared one applied offset, and
    40 of 160 such records never came out. Now every record comes out, and a record written twice (at-least-once,
    around the kill) is byte for byte the first copy."""
    topics = replace(topics, processing_guarantee=guarantee)
    rounds = mixed_rounds(150)
    worker = start_worker(topics, name="first")
    worker.wait_ready()
    sent: list[Any] = []
    for records in rounds[:2]:
        sent += produce(topics, [(orjson.loads(v)["device_id"].encode() if k else None, v) for k, v in records])
    wait_for_record_ids(topics, record_ids(topics, sent[:150]), [worker])
    # mid-stream: the rest is sent while the worker is killed and started again
    for records in rounds[2:]:
        sent += produce(topics, [(orjson.loads(v)["device_id"].encode() if k else None, v) for k, v in records])
    worker.kill()
    worker = start_worker(topics, name="second")
    worker.wait_ready()
    enriched = wait_for_record_ids(topics, record_ids(topics, sent), [worker])

    copies = copies_by_record_id(enriched)
    assert set(copies) == record_ids(topics, sent)
    differing = {k: v for k, v in copies.items() if len(v) > 1}
    assert not differing, f"{len(differing)} record_ids carry different bytes, e.g. {next(iter(differing.items()))}"
    if guarantee == "exactly_once":
        assert len(enriched) == len(sent), "exactly-once: no record written twice"
    # every device ends logged in, with each of its records stamped for it
    for r in enriched:
        value = orjson.loads(r.value)
        assert r.key == value["device_id"].encode()
        if value["event"] == "buy":
            assert value["login_id"] == "user-" + str(int(value["device_id"].split("-")[1]))


# -- records and stored values that would stall a partition ----------------------------------------------


def test_no_device_id_or_stored_value_stalls_a_partition(topics: Settings, start_worker: kit.StartWorker,
                                                         tmp_path: Path) -> None:
    worker = start_worker(topics, name="first")
    worker.wait_ready()
    normal = [orjson.dumps({"device_id": f"n-{i:03d}", "platform": "web", "action": "login", "id": f"u{i}"})
              for i in range(100)]
    produce(topics, [(kafka_clients.device_key(v), v) for v in normal])
    kit.wait_for_outputs(topics, 100, workers=[worker], settle=0)

    # device IDs equal to the keys Faust and older versions kept beside the states, and odd bytes
    hostile_ids = ["__faust\x00offset__", "__faust\\u0000offset__", "\x00", "\u00ff\u00fe", "\U0001f600" * 60]
    hostile = [orjson.dumps({"device_id": d, "platform": "web", "action": "login", "id": "evil"}) for d in hostile_ids]
    after = [orjson.dumps({"device_id": f"a-{i:03d}", "platform": "web", "event": "after"}) for i in range(200)]
    produce(topics, [(kafka_clients.device_key(v), v) for v in hostile + after])
    out = kit.wait_for_outputs(topics, 100 + len(hostile) + len(after), workers=[worker])
    devices = {v["device_id"] for v in out.enriched_values}
    assert set(hostile_ids) <= devices and {f"a-{i:03d}" for i in range(200)} <= devices
    assert not out.dead

    # a stored state that cannot be decoded: put on the changelog, read back into RocksDB by a worker that
    # starts with an empty state directory
    changelog = f"{topics.group}-devices-changelog"
    damaged = "n-007"
    partition = key_hash("murmur2")(damaged.encode()) % topics.partitions
    worker.kill()
    asyncio.run(_produce_to(topics, changelog, partition, damaged.encode(), b"\x00not a state"))
    shutil.rmtree(topics.state_dir)
    worker = start_worker(topics, name="second")
    worker.wait_ready()
    more = [orjson.dumps({"device_id": damaged, "platform": "web", "event": "e"})] + [
        orjson.dumps({"device_id": f"b-{i:03d}", "platform": "web", "event": "later"}) for i in range(100)]
    produce(topics, [(kafka_clients.device_key(v), v) for v in more])
    out = kit.wait_for_outputs(topics, 100 + len(hostile) + len(after) + len(more), workers=[worker])
    (letter,) = out.dead_values
    assert (letter["reason"], letter["field"], letter["device_id"]) == ("unreadable_state", "device_id", damaged)
    assert {f"b-{i:03d}" for i in range(100)} <= {v["device_id"] for v in out.enriched_values}
    metrics = kit.scrape(topics.web_port)
    assert metrics[("streams_unreadable_states_total", frozenset())] == 1
    assert metrics[("streams_batch_failures_in_a_row", frozenset())] == 0


async def _produce_to(settings: Settings, topic: str, partition: int, key: bytes, value: bytes) -> None:
    producer = kafka_clients.producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


# -- only STREAMS_* configure the worker -----------------------------------------------------------------


def test_fausts_own_variables_do_not_change_the_worker(topics: Settings, start_worker: kit.StartWorker,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of these, read by Faust, used to move the consumer to another cluster, crash the start-up, or turn
    on Faust's own exactly-once under ours."""
    monkeypatch.setenv("BROKER_URL", "kafka://127.0.0.1:1")
    monkeypatch.setenv("WEB_PORT", "tcp://10.1.2.3:80")  # what Kubernetes injects for a service named `web`
    monkeypatch.setenv("PROCESSING_GUARANTEE", "exactly_once")
    monkeypatch.setenv("FAUST_WEB_PORT", "tcp://10.1.2.4:80")
    monkeypatch.setenv("APP_ENV_PREFIX", "EVIL_")
    monkeypatch.setenv("EVIL_BROKER_URL", "kafka://127.0.0.1:2")
    worker = start_worker(topics)
    worker.wait_ready()
    asyncio.run(kafka_clients.produce_file(topics, None))
    expected, letters = kit.replay_outputs(topics, kafka_clients.SAMPLE)
    out = kit.wait_for_outputs(topics, len(expected) + len(letters), workers=[worker])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    assert "ignoring FAUST_WEB_PORT" in worker.log_tail(400)


# -- lookups across hosts --------------------------------------------------------------------------------


def test_lookups_are_routed_between_two_hosts(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path) -> None:
    """Two workers on two loopback addresses, the same port, each advertising its own URL: a lookup sent to
    either one is answered by the owner of the device."""
    first, second, port = kit.two_hosts(start_worker, topics, tmp_path / "state2")
    logins = [orjson.dumps({"device_id": f"h-{i:02d}", "platform": "web", "action": "login", "id": f"u{i}"})
              for i in range(40)]
    produce(topics, [(kafka_clients.device_key(v), v) for v in logins])
    kit.wait_for_outputs(topics, 40, workers=[first, second])
    answered_by: dict[str, set[int]] = defaultdict(set)
    for i in range(40):
        for host in ("127.0.0.1", "127.0.0.2"):
            status, body = kit.get(f"http://{host}:{port}/devices/h-{i:02d}")
            assert status == 200, (host, i, body[:300])
            found = orjson.loads(body)
            assert (found["device_id"], found["login_id"]) == (f"h-{i:02d}", f"u{i}")
            answered_by[host].add(found["partition"])
    # both hosts answered for every partition: half of those answers came from the other host
    assert answered_by["127.0.0.1"] == answered_by["127.0.0.2"] == set(range(topics.partitions))


# -- librdkafka's partitioner ----------------------------------------------------------------------------


def test_records_placed_by_librdkafka_are_not_repartitioned_with_crc32(topics: Settings, start_worker: kit.StartWorker,
                                                                        tmp_path: Path) -> None:
    """confluent-kafka (librdkafka) with its default partitioner: with `--partitioner crc32` the worker finds
    every keyed record in its device's partition and forwards none; the output equals replay's."""
    from confluent_kafka import Producer

    lines = [line for line in kafka_clients.SAMPLE.read_bytes().splitlines() if line.strip()]
    extra = [orjson.dumps({"device_id": f"rd-{i:03d}", "platform": "mp-wechat", "action": "login", "id": f"u{i}"})
             for i in range(200)]
    placed: list[tuple[bytes, int]] = []
    producer = Producer({"bootstrap.servers": topics.brokers, "acks": "all"})
    for value in lines + extra:
        key = kafka_clients.device_key(value)
        if key is None:
            continue

        def delivered(err: Any, msg: Any, key: bytes = key) -> None:
            assert err is None, err
            placed.append((key, msg.partition()))

        producer.produce(topics.raw_topic, value, key=key, on_delivery=delivered)
    assert producer.flush(30) == 0
    keyed = [v for v in lines + extra if kafka_clients.device_key(v) is not None]
    assert len(placed) == len(keyed)
    crc32, murmur2 = key_hash("crc32"), key_hash("murmur2")
    assert all(p == crc32(k) % topics.partitions for k, p in placed), "librdkafka's default is CRC32"
    assert sum(p != murmur2(k) % topics.partitions for k, p in placed) > len(placed) // 2

    topics = replace(topics, partitioner="crc32")
    worker = start_worker(topics)
    worker.wait_ready()
    expected, letters = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "in.jsonl", keyed))
    out = kit.wait_for_outputs(topics, len(expected) + len(letters), workers=[worker])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    metrics = kit.scrape(topics.web_port)
    assert metrics[("streams_repartitioned_total", frozenset())] == 0
    # and the lookup finds the devices where librdkafka put them
    status, body = kit.get(f"http://127.0.0.1:{topics.web_port}/devices/rd-007")
    assert status == 200 and orjson.loads(body)["partition"] == crc32(b"rd-007") % topics.partitions


def test_a_second_worker_advertising_the_same_url_is_refused(topics: Settings, start_worker: kit.StartWorker,
                                                             tmp_path: Path) -> None:
    """Two workers of one group on one machine, the same advertised URL (each with its own port): the group's
    map of owners would send both workers' lookups to one of them. The second is refused at its first
    assignment, exit 78, saying what to set; the first goes on."""
    url = f"http://127.0.0.1:{topics.web_port}"
    first = start_worker(topics, name="first", advertised_url=url)
    first.wait_ready()
    second = start_worker(topics, name="second", advertised_url=url, web_port=kit.free_port(),
                          state_dir=str(tmp_path / "state2"))
    assert second.proc.wait(120) == 78
    log = second.log_path.read_text(errors="replace")
    assert "advertises the same URL" in log and "STREAMS_ADVERTISED_URL" in log, log[-2000:]
    first.wait_ready()
    first.check_alive()
