"""The persons stage in the worker's batch step without a broker: the fakes of `tests/fakes.py`, with the
persons topics and table, and crashes between a batch's outputs and
its state (a changelog cut short included). Whatever the fetch sizes and crashes, the persons topic read as a
table (last value per key, tombstones removing it) ends equal to replay's mapping."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams import codec as persons_codec
from streams.enrich import Enricher, EnrichSettings
from streams.offline.replay import replay
from streams.state.keys import OFFSET_KEY
from streams.worker.batch import Pipeline
from streams.worker.names import Topics
from streams.worker.stages import persons as persons_stage
from streams.worker.stages.persons import CLAIM, HEADER
from tests.fakes import DB, TP, Broker, Record
from tests.fakes import recover as recover_partition
from tests.fakes import run_worker as fake_worker

T = Topics(raw="raw", repartition="raw-repartition", enriched="enriched", dead_letter="dead", changelog="changelog",
           partitions=3, persons_repartition="persons-repartition", persons_changelog="persons-changelog",
           persons="persons", persons_partitions=2, identity_changes="identity-changes",
           identity_changes_partitions=2)
INPUTS = (T.raw, T.repartition, T.persons_repartition)
CHANGELOGS = {"devices": T.changelog, "persons": T.persons_changelog}


def new_broker(rng: random.Random, failure_rate: float = 0.0) -> Broker:
    """A send to a changelog or an output of the persons stage fails with probability `failure_rate`."""
    persons = {T.persons_changelog or "", T.persons or "", T.persons_repartition or ""}
    return Broker(rng, failure_rate, fail_on={T.changelog, T.enriched, *persons})


def pipeline(broker: Broker, dbs: dict[tuple[str, int], DB], settings: EnrichSettings) -> Pipeline:
    async def producer() -> Broker:
        return broker

    return Pipeline(Enricher(settings), T, producer, db_for_partition=lambda p: dbs[("devices", p)],
                    write_batch=list, changelog_offset_key=OFFSET_KEY, cache_size=20,
                    persons_db_for_partition=lambda p: dbs[("persons", p)], transactions=broker.producers(T.partitions))


def recover(broker: Broker, dbs: dict[tuple[str, int], DB]) -> None:
    """Faust's table recovery on restart, for both tables."""
    for table, topic in CHANGELOGS.items():
        for p in range(T.partitions):
            recover_partition(broker, dbs[(table, p)], topic or "", p, OFFSET_KEY)


def run_worker(broker: Broker, rng: random.Random, settings: EnrichSettings, *, steps: int = 20_000) -> int:
    """The three inputs consumed in batches of random sizes (the persons stage's messages beget more), crashes
    and all (`fakes.run_worker`)."""
    dbs: dict[tuple[str, int], DB] = defaultdict(DB)
    return fake_worker(broker, rng, lambda: pipeline(broker, dbs, settings), lambda: recover(broker, dbs),
                       INPUTS, T.partitions, take=5, steps=steps)


def persons_input(rng: random.Random, devices: int, records: int) -> list[bytes]:
    """Devices sharing a few logins, phones and emails: pairs owned, shared, released, claimed again."""
    lines = []
    for _ in range(records):
        d = rng.randrange(devices)
        record: dict[str, Any] = {"device_id": f"dev-{d}", "platform": "web" if d % 4 == 0 else "mp-wechat"}
        r = rng.random()
        if r < 0.3:
            record.update(action="track", event="e")
        elif r < 0.55:
            record.update(action="bind", key=rng.choice(["$identity_mobile", "$identity_email"]),
                          value=rng.choice(["p1", "p2", "p3", "p4", "null"]))
        elif r < 0.67:
            record.update(action="unbind", key="$identity_mobile", value=rng.choice(["p1", "p2", "p3"]))
        elif r < 0.78 and d % 3:
            record.update(action="login", id=f"u{rng.randrange(4)}")
        elif r < 0.86:
            record.update(action="logout")
        elif r < 0.92:
            record.update(action="reset_anonymous_id", id=rng.choice(["r1", "r2", f"dev-{d}"]))
        else:
            record.update(action="track", event="f")
        lines.append(orjson.dumps(record))
    return lines


def produce(broker: Broker, lines: list[bytes], settings: EnrichSettings) -> None:
    probe = pipeline(broker, defaultdict(DB), settings)
    for value in lines:
        key = orjson.loads(value)["device_id"].encode()
        p = probe.partition_for(key.decode())
        log = broker.logs[(T.raw, p)]
        log.append(Record(T.raw, p, len(log), key, value))


def topic_persons(broker: Broker) -> dict[str, bytes]:
    final: dict[str, bytes] = {}
    for p in range(T.persons_partitions):
        for rec in broker.visible(T.persons or "", p):
            assert rec.key is not None
            if rec.value is None:
                final.pop(rec.key.decode(), None)
            else:
                final[rec.key.decode()] = rec.value
    return final


def replay_persons(tmp_path: Path, lines: list[bytes], settings: EnrichSettings) -> dict[str, bytes]:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    replay(str(src), "/dev/null", "/dev/null", settings, persons_path=str(tmp_path / "persons.jsonl"))
    return {orjson.loads(line)["user_id"]: line for line in (tmp_path / "persons.jsonl").read_bytes().splitlines()}


SEEDS = int(os.environ.get("PERSONS_CRASH_SEEDS", "6"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_persons_topic_ends_equal_to_replay_whatever_the_crashes(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    settings = EnrichSettings(person_max_devices=3 if seed % 2 else 50)
    lines = persons_input(rng, devices=14, records=160)
    expected = replay_persons(tmp_path, lines, settings)
    broker = new_broker(rng, failure_rate=0.12)
    produce(broker, lines, settings)
    crashes = run_worker(broker, rng, settings)
    assert crashes > 0, "the run must crash between outputs and state to test anything"
    assert topic_persons(broker) == expected
    # a tombstone only ever follows a mapping of the same key (a crash may repeat it, as any value)
    for p in range(T.persons_partitions):
        mapped: set[bytes] = set()
        for rec in broker.visible(T.persons or "", p):
            assert rec.key is not None
            if rec.value is None:
                assert rec.key in mapped, "a tombstone for a key that never had a mapping"
            else:
                mapped.add(rec.key)


def test_the_crash_inputs_map_via_login_and_identity(tmp_path: Path) -> None:
    """The suite's seeds exercise both kinds of mapping (else the crash test would prove little)."""
    for seed in range(0, min(SEEDS, 6), 2):
        rng = random.Random(seed)
        settings = EnrichSettings()
        values = replay_persons(tmp_path, persons_input(rng, devices=14, records=160), settings).values()
        assert any(b'"identity"' in v for v in values) and any(b'"login"' in v for v in values), seed


def test_without_crashes_the_persons_topic_repeats_nothing(tmp_path: Path) -> None:
    rng = random.Random(99)
    settings = EnrichSettings()
    lines = persons_input(rng, devices=12, records=150)
    broker = Broker(rng)
    produce(broker, lines, settings)
    assert run_worker(broker, rng, settings) == 0
    assert topic_persons(broker) == replay_persons(tmp_path, lines, settings)
    for p in range(T.persons_partitions):
        values = [(rec.key, rec.value) for rec in broker.visible(T.persons or "", p)]
        per_key: dict[bytes | None, list[bytes | None]] = defaultdict(list)
        for key, value in values:
            per_key[key].append(value)
        for key, seq in per_key.items():
            assert all(a != b for a, b in itertools.pairwise(seq)), f"{key!r} written twice alike: {seq}"


def test_a_damaged_persons_message_is_kept_as_a_dead_letter() -> None:
    broker = Broker(random.Random(0))
    dbs: dict[tuple[str, int], DB] = defaultdict(DB)
    worker = pipeline(broker, dbs, EnrichSettings())
    bad = [Record(T.persons_repartition or "", 0, 0, b"$identity_mobile+1", b"not json", [(HEADER, CLAIM)]),
           Record(T.persons_repartition or "", 0, 1, b"k", b"[]", [(HEADER, b"what")]),
           Record(T.persons_repartition or "", 0, 2, None, b"[]", [])]
    result = asyncio.run(worker.process({TP(T.persons_repartition or "", 0): bad}, {}))
    assert result.commit == {TP(T.persons_repartition or "", 0): 3}
    assert worker.persons_counters.unreadable == 3
    letters = [orjson.loads(r.value or b"") for q in range(T.partitions) for r in broker.logs[(T.dead_letter, q)]]
    assert sorted(d["source"]["offset"] for d in letters) == [0, 1, 2]
    assert {(d["reason"], d["source"]["topic"]) for d in letters} == {("internal_error", T.persons_repartition)}
    assert [d["raw"] for d in sorted(letters, key=lambda d: d["source"]["offset"])] == ["not json", "[]", "[]"]


def claim_messages(settings: EnrichSettings) -> list[Record]:
    """The claim messages the device side sends for devices that bind phones some of them share."""
    broker = Broker(random.Random(0))
    lines = [orjson.dumps({"device_id": f"dev-{d}", "platform": "web", "action": "bind", "key": "$identity_mobile",
                           "value": f"p{d % 3}"}) for d in range(12)]
    produce(broker, lines, settings)
    worker = pipeline(broker, defaultdict(DB), settings)
    asyncio.run(worker.process({TP(T.raw, p): broker.logs[(T.raw, p)] for p in range(T.partitions)}, {}))
    return [r for q in range(T.partitions) for r in broker.logs[(T.persons_repartition or "", q)]
            if dict(r.headers or []).get(HEADER) == CLAIM]


def test_a_persons_message_that_fails_midway_is_never_half_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault after the pair was written (injected into the stage's `claim`): the pair stays as it was, no owner
    is announced for it, the message is a dead letter, and the messages around it are applied as without it."""
    settings = EnrichSettings()
    messages = claim_messages(settings)
    q = max(range(T.partitions), key=lambda q: sum(r.partition == q for r in messages))
    mine = [r for r in messages if r.partition == q]
    assert len(mine) >= 3
    victim = mine[len(mine) // 2]

    def run(batch: list[Record]) -> tuple[Broker, DB]:
        broker = Broker(random.Random(0))
        dbs: dict[tuple[str, int], DB] = defaultdict(DB)
        worker = pipeline(broker, dbs, settings)
        result = asyncio.run(worker.process({TP(T.persons_repartition or "", q): batch}, {}))
        assert result.commit == {TP(T.persons_repartition or "", q): mine[-1].offset + 1}
        return broker, dbs[("persons", q)]

    without, db_without = run([r for r in mine if r is not victim])
    real_claim = persons_stage.claim

    def failing_claim(pairs: Any, pair: str, device_id: str, *args: Any) -> Any:
        answers = real_claim(pairs, pair, device_id, *args)
        if (pair.encode(), device_id) == (victim.key, persons_codec.decode_claim(victim.value or b"")[0]):
            raise RuntimeError("a fault after the pair was written")
        return answers

    monkeypatch.setattr(persons_stage, "claim", failing_claim)
    broker, db = run(mine)
    assert db == db_without
    for topic in (T.persons_repartition or "", T.persons or ""):
        for p in range(T.partitions):
            sent = [(r.key, r.value) for r in broker.logs[(topic, p)]]
            assert sent == [(r.key, r.value) for r in without.logs[(topic, p)]], (topic, p)
    (letter,) = [orjson.loads(r.value or b"") for p in range(T.partitions) for r in broker.logs[(T.dead_letter, p)]]
    assert letter["source"] == {"topic": T.persons_repartition, "partition": q, "offset": victim.offset}
    assert letter["reason"] == "internal_error"


# -- the identity change log (`streams.worker.stages.changes`) ---------------------------------------------------

def change_log(broker: Broker) -> list[dict[str, Any]]:
    rows = []
    for p in range(T.identity_changes_partitions):
        for rec in broker.visible(T.identity_changes or "", p):
            assert rec.value is not None and rec.key is not None
            row = orjson.loads(rec.value)
            assert rec.key.decode() == row["user_id"]
            rows.append(row | {"_bytes": rec.value})
    return rows


def final_state(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The mapping each user's row of the highest version says (none: unmapped), as a persons record."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["kind"] == "mapping" and row["version"] > last.get(row["user_id"], {"version": 0})["version"]:
            last[row["user_id"]] = row
    return {user: {k: row[k] for k in ("user_id", "person_id", "via", "device_id", "identity_key") if k in row}
            for user, row in last.items() if row["person_id"] is not None}


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_change_log_ends_where_the_persons_topic_does_and_repeats_only_byte_for_byte(
        seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    settings = EnrichSettings(person_max_devices=3 if seed % 2 else 50)
    lines = persons_input(rng, devices=14, records=160)
    broker = new_broker(rng, failure_rate=0.12)
    produce(broker, lines, settings)
    assert run_worker(broker, rng, settings) > 0
    rows = change_log(broker)
    persons = {user: orjson.loads(value) for user, value in topic_persons(broker).items()}
    assert persons and final_state(rows) == persons
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    replay(str(src), "/dev/null", "/dev/null", settings, changes_path=str(tmp_path / "changes.jsonl"))
    replayed = [orjson.loads(line) for line in (tmp_path / "changes.jsonl").read_bytes().splitlines()]
    assert final_state(replayed) == persons
    # at-least-once repeats a row after a crash, the same bytes under the same user and version; a user's
    # versions otherwise only grow, in the order of the log, and a mapping row comes before its links
    seen: dict[tuple[str, str, int, str | None, str | None], bytes] = {}
    latest: dict[str, int] = {}
    for row in rows:
        key = (row["kind"], row["user_id"], row["version"], row.get("key"), row.get("value_hash"))
        if key in seen:
            assert seen[key] == row["_bytes"]
            continue
        seen[key] = row["_bytes"]
        if row["kind"] == "mapping":
            assert row["version"] > latest.get(row["user_id"], 0)
            latest[row["user_id"]] = row["version"]
            assert row["processed_time"] is not None  # (the inputs carry no client time)
            assert row["record_id"] is not None and row["record_id"].startswith(T.raw + ":")
        else:
            assert row["version"] == latest[row["user_id"]], "a link row after its mapping row"


def test_with_the_change_log_off_the_persons_messages_carry_no_causes(tmp_path: Path) -> None:
    """Off, the stage sends what it sent before the log existed: the same persons topic, no cause in any
    message, no row."""
    rng = random.Random(5)
    settings = EnrichSettings()
    lines = persons_input(rng, devices=12, records=150)
    broker = Broker(rng)
    produce(broker, lines, settings)
    global T
    saved, T = T, dataclasses.replace(T, identity_changes=None)
    try:
        run_worker(broker, rng, settings)
    finally:
        T = saved
    assert topic_persons(broker) == replay_persons(tmp_path, lines, settings)
    assert not change_log(broker)
    for p in range(T.partitions):
        for rec in broker.visible(T.persons_repartition or "", p):
            assert [name for name, _ in rec.headers] == [HEADER], rec.headers


def test_the_persons_messages_values_are_those_a_release_without_the_log_reads(tmp_path: Path) -> None:
    """The causes travel in a header: the values decode as before the log existed, so that the previous
    release can run again on this state and its internal topic (README, "Upgrading")."""
    rng = random.Random(6)
    settings = EnrichSettings()
    broker = Broker(rng)
    produce(broker, persons_input(rng, devices=12, records=150), settings)
    run_worker(broker, rng, settings)
    kinds = defaultdict(int)
    for p in range(T.partitions):
        for rec in broker.visible(T.persons_repartition or "", p):
            headers = dict(rec.headers)
            assert set(headers) == {HEADER, persons_stage.CAUSE_HEADER}, rec.headers
            value = orjson.loads(rec.value or b"")
            kind = headers[HEADER]
            kinds[kind] += 1
            # the shapes the previous release unpacks: [device, logins, device_user] or [device]; [pair, owner];
            # [mapping, conflict]
            assert len(value) in ((1, 3) if kind == CLAIM else (2,)), (kind, value)
    assert set(kinds) == {CLAIM, b"owner", b"user"}, kinds
