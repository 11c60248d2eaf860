"""The worker's batch step without a broker: a fake producer and consumer around `Pipeline.process`, with
crashes between a batch's outputs and its state, for what no single run on the real broker can show often
enough (the integration tests drive the same paths against Kafka).

- Mixed keying: a device's records arrive partly keyed in its own partition and partly unkeyed elsewhere
  (forwarded through the repartition topic). Whatever the fetch sizes and crashes, nothing is lost and every
  `record_id` carries the same bytes each time it is written.
- Stored values that cannot be decoded, and device IDs equal to the table's old internal keys, become dead
  letters; the batch completes.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import orjson
import pytest

from streams.enrich import Enricher
from streams.state.keys import APPLIED_KEY, OFFSET_KEY, PLAN_KEY
from streams.worker.batch import Pipeline
from streams.worker.names import Topics
from streams.worker.stages.route import SOURCE_HEADER
from tests.fakes import DB, TP, Broker, Crash, Record
from tests.fakes import recover as recover_partition
from tests.fakes import run_worker as fake_worker

T = Topics(raw="raw", repartition="raw-repartition", enriched="enriched", dead_letter="dead", changelog="changelog",
           partitions=3)


def new_broker(rng: random.Random, failure_rate: float = 0.0) -> Broker:
    """A send to the changelog or the enriched topic fails with probability `failure_rate`."""
    return Broker(rng, failure_rate, fail_on={T.changelog, T.enriched})


def pipeline(broker: Broker, dbs: dict[int, DB]) -> Pipeline:
    """A new worker that owns every partition: nothing in memory, its partitions' producers opened."""
    async def producer() -> Broker:
        return broker

    return Pipeline(Enricher(), T, producer, db_for_partition=lambda p: dbs[p], write_batch=list,
                    changelog_offset_key=OFFSET_KEY, cache_size=50, transactions=broker.producers(T.partitions))


def run_worker(broker: Broker, rng: random.Random, *, steps: int = 5_000) -> int:
    """The raw and repartition topics consumed in batches of random sizes, crashes and all (`fakes.run_worker`)."""
    dbs: dict[int, DB] = defaultdict(DB)
    return fake_worker(broker, rng, lambda: pipeline(broker, dbs), lambda: recover(broker, dbs),
                       (T.raw, T.repartition), T.partitions, take=4, steps=steps)


def recover(broker: Broker, dbs: dict[int, DB]) -> None:
    for p in range(T.partitions):
        recover_partition(broker, dbs[p], T.changelog, p, OFFSET_KEY)


def mixed_input(rng: random.Random, devices: int, per_device: int) -> list[tuple[bytes | None, bytes]]:
    """Each device: a login and tracks, about half sent without key (so in a random partition)."""
    lines = []
    for d in range(devices):
        for i in range(per_device):
            action = {"action": "login", "id": f"u{d}-{i}"} if i % 3 == 1 else {"event": f"e{i}"}
            record = {"device_id": f"dev-{d}", "platform": "web", **action}
            keyed = rng.random() < 0.5
            lines.append((f"dev-{d}".encode() if keyed else None, orjson.dumps(record)))
    rng.shuffle(lines)
    return lines


def produce(broker: Broker, lines: list[tuple[bytes | None, bytes]], rng: random.Random) -> None:
    probe = pipeline(broker, {})
    for key, value in lines:
        p = probe.partition_for(key.decode()) if key is not None else rng.randrange(T.partitions)
        log = broker.logs[(T.raw, p)]
        log.append(Record(T.raw, p, len(log), key, value))


def outputs(broker: Broker) -> dict[str, list[bytes]]:
    copies: dict[str, list[bytes]] = defaultdict(list)
    for p in range(T.partitions):
        for rec in broker.logs[(T.enriched, p)]:
            assert rec.value is not None
            copies[orjson.loads(rec.value)["record_id"]].append(rec.value)
    return copies


@pytest.mark.parametrize("seed", range(8))
def test_mixed_keying_loses_nothing_and_repeats_records_byte_for_byte(seed: int) -> None:
    rng = random.Random(seed)
    broker = new_broker(rng, failure_rate=0.15)
    lines = mixed_input(rng, devices=12, per_device=6)
    produce(broker, lines, rng)
    crashes = run_worker(broker, rng)
    assert crashes > 0, "the run must crash between outputs and state to test anything"

    copies = outputs(broker)
    expected = {f"raw:{p}:{rec.offset}:0" for p in range(T.partitions) for rec in broker.logs[(T.raw, p)]}
    assert set(copies) == expected, f"lost: {sorted(expected - set(copies))[:5]}"
    differing = {rid: set(values) for rid, values in copies.items() if len(set(values)) > 1}
    assert not differing, f"{len(differing)} record_ids with different bytes, e.g. {next(iter(differing.items()))}"
    assert not any(broker.logs[(T.dead_letter, p)] for p in range(T.partitions))


def test_without_crashes_each_record_comes_out_once() -> None:
    rng = random.Random(7)
    broker = Broker(rng)
    produce(broker, mixed_input(rng, devices=10, per_device=5), rng)
    assert run_worker(broker, rng) == 0
    copies = outputs(broker)
    assert len(copies) == 50 and all(len(v) == 1 for v in copies.values())


def test_forwarded_records_wait_for_the_raw_log_the_first_time_then_every_batch_has_a_plan() -> None:
    rng = random.Random(1)
    broker = Broker(rng)
    dbs: dict[int, DB] = defaultdict(DB)
    worker = pipeline(broker, dbs)
    p = worker.partition_for("dev-a")
    value = orjson.dumps({"device_id": "dev-a", "platform": "web", "event": "e"})
    forwarded = Record(T.repartition, p, 0, b"dev-a", value, [(SOURCE_HEADER, f"raw/{(p + 1) % 3}/9".encode())])
    direct = [Record(T.raw, p, o, b"dev-a", value) for o in range(4, 8)]
    ends = {(T.raw, p): 8, (T.repartition, p): 1}

    # without a plan: the raw log's records up to its end (8) go first; the forwarded one waits
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): direct[:1]}, {}, ends))
    assert result.commit == {TP(T.raw, p): 5} and result.rewind == {TP(T.repartition, p): 0}
    changelog = broker.logs[(T.changelog, p)]
    assert (changelog[0].key, changelog[0].value) == (PLAN_KEY, b"8,0") and dbs[p][PLAN_KEY] == b"8,0"
    # still short of 8: the forwarded record waits again
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): direct[1:3]},
                                        {(T.raw, p): 7, (T.repartition, p): 1}, ends))
    assert result.commit == {TP(T.raw, p): 7} and result.rewind == {TP(T.repartition, p): 0}
    # the last raw record of the plan, then the forwarded one, under a new plan written before their outputs
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): direct[3:]},
                                        {(T.raw, p): 8, (T.repartition, p): 1}, ends))
    assert result.commit == {TP(T.raw, p): 8} and result.rewind == {TP(T.repartition, p): 0}
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded]}, {(T.raw, p): 8, (T.repartition, p): 1},
                                        ends))
    assert result.commit == {TP(T.repartition, p): 1} and not result.rewind
    assert dbs[p][PLAN_KEY] == b"8,1"
    enriched = [orjson.loads(r.value or b"") for r in broker.logs[(T.enriched, p)]]
    assert [r["record_id"] for r in enriched] == [*(f"raw:{p}:{o}:0" for o in range(4, 8)), f"raw:{(p + 1) % 3}:9:0"]


def test_a_pending_plan_holds_back_what_came_after_it() -> None:
    """After a crash, raw records past the plan wait until the plan's forwarded records are applied."""
    rng = random.Random(2)
    broker = Broker(rng)
    dbs: dict[int, DB] = defaultdict(DB)
    worker = pipeline(broker, dbs)
    p = worker.partition_for("dev-a")
    dbs[p][PLAN_KEY] = b"5,1"
    value = orjson.dumps({"device_id": "dev-a", "platform": "web", "event": "e"})
    raw = [Record(T.raw, p, o, b"dev-a", value) for o in (4, 5, 6)]
    result = asyncio.run(worker.process({TP(T.raw, p): raw}, {(T.repartition, p): 0, (T.raw, p): 7}))
    assert result.commit == {TP(T.raw, p): 5} and result.rewind == {TP(T.raw, p): 5}
    forwarded = Record(T.repartition, p, 0, b"dev-a", value, [(SOURCE_HEADER, b"raw/0/3")])
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): raw[1:]},
                                        {(T.repartition, p): 1, (T.raw, p): 7}))
    assert result.commit == {TP(T.repartition, p): 1} and result.rewind == {TP(T.raw, p): 5}
    result = asyncio.run(worker.process({TP(T.raw, p): raw[1:]}, {(T.repartition, p): 1, (T.raw, p): 7}))
    assert result.commit == {TP(T.raw, p): 7} and not result.rewind
    assert dbs[p][PLAN_KEY] == b"7,1"


@pytest.mark.parametrize("stored", [b"1234", b"[9, null]", b"\xff\xfe", b"[1,2,3,4,5,6,7,8,9]"])
def test_a_stored_state_that_cannot_be_read_is_a_dead_letter_not_a_stall(stored: bytes) -> None:
    broker = Broker(random.Random(0))
    dbs: dict[int, DB] = defaultdict(DB)
    worker = pipeline(broker, dbs)
    records = {}
    for device in ("__faust\x00offset__", "dev-b"):
        p = worker.partition_for(device)
        dbs[p][device.encode()] = stored
        value = orjson.dumps({"device_id": device, "platform": "web", "event": "e"})
        records.setdefault(TP(T.raw, p), []).append(Record(T.raw, p, len(records.get(TP(T.raw, p), [])),
                                                           device.encode(), value))
    asyncio.run(worker.process(records, {}))
    letters = [orjson.loads(r.value or b"") for p in range(T.partitions) for r in broker.logs[(T.dead_letter, p)]]
    assert sorted(d["device_id"] for d in letters) == ["__faust\x00offset__", "dev-b"]
    assert {(d["reason"], d["field"]) for d in letters} == {("unreadable_state", "device_id")}
    assert worker.counters.unreadable_states == 2
    assert not any(broker.logs[(T.enriched, p)] for p in range(T.partitions))


def test_a_device_named_like_fausts_offset_key_is_an_ordinary_device() -> None:
    broker = Broker(random.Random(0))
    dbs: dict[int, DB] = defaultdict(DB)
    worker = pipeline(broker, dbs)
    device = "__faust\x00offset__"
    p = worker.partition_for(device)
    value = orjson.dumps({"device_id": device, "platform": "web", "action": "login", "id": "u1"})
    asyncio.run(worker.process({TP(T.raw, p): [Record(T.raw, p, 0, device.encode(), value)]}, {}))
    (out,) = broker.logs[(T.enriched, p)]
    assert orjson.loads(out.value or b"")["login_id"] == "u1"
    assert OFFSET_KEY in dbs[p] and device.encode() in dbs[p]


def test_quarantine_keeps_every_record_as_an_internal_error() -> None:
    broker = Broker(random.Random(0))
    worker = pipeline(broker, defaultdict(DB))
    value = orjson.dumps({"device_id": "dev-c", "platform": "web", "event": "e"})
    p = worker.partition_for("dev-c")
    result = asyncio.run(worker.process({TP(T.raw, p): [Record(T.raw, p, 0, b"dev-c", value)]}, {},
                                        quarantine=True))
    assert result.commit == {TP(T.raw, p): 1}
    (letter,) = [orjson.loads(r.value or b"") for q in range(T.partitions) for r in broker.logs[(T.dead_letter, q)]]
    assert letter["reason"] == "internal_error" and letter["raw"] == value.decode()
    assert not any(broker.logs[(T.changelog, q)] for q in range(T.partitions))


@pytest.mark.parametrize("key", [APPLIED_KEY, PLAN_KEY])
def test_damaged_internal_keys_do_not_stop_the_partition(key: bytes) -> None:
    broker = Broker(random.Random(0))
    dbs: dict[int, DB] = defaultdict(DB)
    worker = pipeline(broker, dbs)
    p = worker.partition_for("dev-d")
    dbs[p][key] = b"\x00garbage"
    value = orjson.dumps({"device_id": "dev-d", "platform": "web", "event": "e"})
    forwarded = Record(T.repartition, p, 0, b"dev-d", value, [(SOURCE_HEADER, b"raw/0/1")])
    batch = {TP(T.raw, p): [Record(T.raw, p, 0, b"dev-d", value)], TP(T.repartition, p): [forwarded]}
    ends = {(T.raw, p): 1, (T.repartition, p): 1}
    result = asyncio.run(worker.process(batch, {}, ends))
    assert result.commit == {TP(T.raw, p): 1}
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded]}, {(T.raw, p): 1}, ends))
    assert result.commit == {TP(T.repartition, p): 1}
    assert len(broker.logs[(T.enriched, p)]) == 2


def test_a_record_tried_alone_after_a_failure_is_kept_not_skipped() -> None:
    """What the worker does with a record that fails on its own (`BatchConsumer._isolate`): the failed try
    advanced the partition's applied marks in memory only; once they are forgotten, quarantine keeps it."""
    broker = Broker(random.Random(0), failure_rate=1.0, fail_on={T.enriched})
    worker = pipeline(broker, defaultdict(DB))
    value = orjson.dumps({"device_id": "dev-e", "platform": "web", "event": "e"})
    p = worker.partition_for("dev-e")
    batch = {TP(T.raw, p): [Record(T.raw, p, 0, b"dev-e", value)]}
    with pytest.raises(Crash):
        asyncio.run(worker.process(batch, {}))
    broker.failure_rate = 0.0
    worker.forget_partitions([p])
    result = asyncio.run(worker.process(batch, {}, quarantine=True))
    assert result.commit == {TP(T.raw, p): 1}
    (letter,) = [orjson.loads(r.value or b"") for q in range(T.partitions) for r in broker.logs[(T.dead_letter, q)]]
    assert letter["reason"] == "internal_error"


def test_a_worker_that_lost_its_partition_without_being_told_writes_no_state() -> None:
    """A worker cut off from the network past the session timeout still holds its partitions in memory; their
    next owner opens their producers, which fences its own. Once back, its next batch sends its outputs (copies
    of what the next owner writes), but none of its state lands, in Kafka or in its RocksDB."""
    broker = Broker(random.Random(0))
    old_dbs: dict[int, DB] = defaultdict(DB)
    old = pipeline(broker, old_dbs)
    p = old.partition_for("dev-g")

    def record(offset: int, **action: str) -> Record:
        return Record(T.raw, p, offset, b"dev-g", orjson.dumps({"device_id": "dev-g", "platform": "web", **action}))

    asyncio.run(old.process({TP(T.raw, p): [record(0, action="login", id="u1")]}, {}))
    broker.committed[(T.raw, p)] = 1
    # the group gave p to another worker, which fenced the old one's producer and rebuilt p's state
    new_dbs: dict[int, DB] = defaultdict(DB)
    new = pipeline(broker, new_dbs)
    recover(broker, new_dbs)
    asyncio.run(new.process({TP(T.raw, p): [record(1, action="logout"), record(2, event="e")]}, {}))
    changelog = [(r.key, r.value) for r in broker.visible(T.changelog, p)]
    old_state = dict(old_dbs[p])
    with pytest.raises(Crash, match="fenced"):
        asyncio.run(old.process({TP(T.raw, p): [record(1, action="logout"), record(2, event="e")]}, {}))
    assert [(r.key, r.value) for r in broker.visible(T.changelog, p)] == changelog
    assert dict(old_dbs[p]) == old_state
    assert not old.transactions.holds([p])  # type: ignore[union-attr]
    # what the old worker did send are byte-identical copies of the new owner's outputs
    outputs = [r.value for r in broker.logs[(T.enriched, p)]]
    assert len(outputs) == 3 and outputs[2] == outputs[1]
