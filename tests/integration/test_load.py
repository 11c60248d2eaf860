"""`python -m streams load` against the real broker, in both delivery modes: what it loads from a worker's topics
equals replay (persons_latest is replay's --persons mapping, events_with_person one row per record_id, each
device's records in order), an identity change log written to its topic here (at-least-once: with repeats)
gives person_history, whose current mapping is persons_latest, and a load SIGKILLed twice mid-way, then run
again, gives the same rows as a clean load: nothing lost, nothing repeated. --follow loads what arrives, and
stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from streams.config import Settings
from streams.kafka import admin as kafka_admin
from streams.kafka import clients as kafka_clients
from tests.conftest import ROOT
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

TABLES = ("enriched", "enriched_identities", "dead_letters", "persons", "identity_changes", "load_offsets")
VIEWS = ("persons_latest", "events_with_person", "identity_graph", "person_history")
CHUNK = 40  # records per transaction: small, so that a load of a few thousand records takes many
REPEAT_EVERY = 10  # at-least-once: every tenth enriched record written again
T0 = 1_712_000_000_000  # the change log's first processing time (ms)


def load_command(path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "streams", "load", "--into", str(path), "--chunk-records", str(CHUNK), *args]


def run_load(settings: Settings, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(load_command(path, *args), cwd=ROOT, env=kit.worker_env(settings), capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


class Loader:
    """`python -m streams load` in the background; its stderr read line by line (the log says each commit)."""

    def __init__(self, settings: Settings, path: Path, *args: str) -> None:
        self.proc = subprocess.Popen(load_command(path, *args), cwd=ROOT, env=kit.worker_env(settings), text=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[str] = []

    def wait_for(self, commits: int = 0, records: int = 0, timeout: float = 120.0) -> None:
        """Until the log has said `commits` commits of `records` records or more."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while self.commits() < commits or self.records() < records:
            line = self.proc.stderr.readline()
            if not line:
                pytest.fail(f"the loader exited ({self.proc.wait()}) after {self.commits()} commits:\n"
                            + "".join(self.lines[-30:]), pytrace=False)
            self.lines.append(line)
            assert time.monotonic() < deadline, "".join(self.lines[-30:])

    def commits(self) -> int:
        return sum("committed " in line for line in self.lines)

    def records(self) -> int:
        return sum(int(line.split("committed ")[1].split()[0]) for line in self.lines if "committed " in line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    return {name: query(path, f"SELECT * FROM {name} ORDER BY ALL") for name in (*TABLES, *VIEWS)}


def with_change_log(settings: Settings) -> Settings:
    """The settings with an identity change log topic of this test's own (named after its topics, so that they
    are deleted with them), which this test writes itself: the worker writes its own elsewhere."""
    topic = f"{settings.raw_topic.split('.')[0]}.direct-identity-changes"

    async def create(admin: Any) -> None:
        await kafka_admin.create_topic(admin, topic, kit.PARTITIONS,
                                       await kafka_admin.replication_factor(admin, settings))

    asyncio.run(kit.admin_call(settings.brokers, create))
    changes = replace(settings, identity_changes_topic=topic)
    deadline = time.monotonic() + 15
    while asyncio.run(kafka_admin.partition_count(changes, topic)) != kit.PARTITIONS:
        assert time.monotonic() < deadline, f"{topic} does not show in the broker's metadata"
        time.sleep(0.1)
    return changes


def change_log(persons: dict[str, bytes], repeat: bool) -> tuple[list[tuple[bytes, bytes]], dict[str, str]]:
    """Rows of an identity change log whose final state is `persons` (user ID -> its mapping's bytes): every
    third user was mapped to another person first, and one more user was mapped and is no longer; each mapping
    row is followed by its link row. `repeat` (at-least-once): every fifth row is written again after the others.
    Returns the messages and the mapping as of T0 + 1 (user ID -> person)."""
    rows: list[dict[str, Any]] = []
    first: dict[str, str] = {}

    def mapping(user: str, version: int, op: str, person: str | None, previous: str | None, value: dict[str, Any]
                ) -> None:
        rows.append({"kind": "mapping", "user_id": user, "version": version, "model": "test", "op": op,
                     "person_id": person, "previous_person_id": previous, "via": value.get("via"),
                     "device_id": value.get("device_id", "d"), "record_id": f"raw:0:{len(rows)}:0",
                     "event_time": T0 - 5, "processed_time": T0 + 1000 * version})
        if person is not None:
            rows.append({"kind": "link", "user_id": user, "version": version, "model": "test", "person_id": person,
                         "key": "$identity_login_id", "value_hash": person})

    gone = "00000000-0000-5000-8000-000000000000"
    mapping(gone, 1, "created", "someone", None, {"via": "login"})
    mapping(gone, 2, "unmapped", None, "someone", {})
    for n, (user, value) in enumerate(sorted(persons.items())):
        final = orjson.loads(value)
        if n % 3 == 0:
            mapping(user, 1, "created", "earlier", None, final)
            mapping(user, 2, "remapped", final["person_id"], "earlier", final)
        else:
            mapping(user, 1, "created", final["person_id"], None, final)
        first[user] = "earlier" if n % 3 == 0 else final["person_id"]
    messages = [(r["user_id"].encode(), orjson.dumps(r)) for r in rows]
    if repeat:
        messages += messages[::5]
    return messages, first


def worker_topics(settings: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                  guarantee: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, bytes]]:
    """The worker's topics after a stream with a SIGKILL and a restart of the worker in it (in at-least-once
    mode, outputs written again); replay's enriched records, dead letters and persons mapping for the same."""
    lines = kit.generate(3000, 250, prefix="load", seed=21)
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    expected_persons = kit.replay_persons(settings, path)
    enriched, dead = kit.replay_outputs(settings, path)
    second = kit.killed_mid_stream(start_worker, settings, lines, str(tmp_path / "state"), guarantee)
    kit.wait_for_outputs(settings, len(enriched) + len(dead), workers=[second],
                         distinct=guarantee == "at_least_once")
    kit.wait_for_persons(settings, expected_persons, [second])
    assert second.stop() == 0
    if guarantee == "at_least_once":
        # what a crash between a batch's sends and its commit leaves: copies of records already written, byte for
        # byte (a SIGKILL above makes some only now and then)
        written = kit.read_topic(settings, settings.enriched_topic)
        again = [(r.key, r.value) for r in written[::REPEAT_EVERY]]
        asyncio.run(kafka_clients.produce(settings, again, topic=settings.enriched_topic))
    return enriched, dead, expected_persons


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_load_equals_replay_and_a_killed_load_loses_and_repeats_nothing(
        topics: Settings, start_worker: kit.StartWorker, tmp_path: Path, guarantee: str) -> None:
    enriched, dead, expected_persons = worker_topics(topics, start_worker, tmp_path, guarantee)
    assert len(expected_persons) > 20
    topics = with_change_log(topics)
    changes, first = change_log(expected_persons, guarantee == "at_least_once")
    asyncio.run(kafka_clients.produce(topics, changes, topic=topics.identity_changes_topic))

    clean = tmp_path / "clean.duckdb"
    summary = run_load(topics, clean).stderr
    assert f"into {clean}" in summary, summary
    # persons_latest: replay's mapping, and the persons table holds its records' bytes
    persons = {user: value.encode() for user, value in query(clean, "SELECT user_id, value_json FROM persons")}
    assert persons == expected_persons
    latest = query(clean, "SELECT user_id, person_id, via, device_id, identity_key FROM persons_latest")
    assert sorted(latest) == sorted(tuple(orjson.loads(v).get(k) for k in ("user_id", "person_id", "via", "device_id",
                                                                           "identity_key"))
                                    for v in expected_persons.values())
    # events_with_person: one row per record_id, each device's records as replay gives them, the person mapped
    rows = query(clean, "SELECT record_id, person_id, value_json FROM events_with_person "
                        "ORDER BY kafka_partition, kafka_offset")
    assert len(rows) == len({r for r, _, _ in rows}) == len(enriched)
    got = [orjson.loads(v) for _, _, v in rows]
    for record in got:
        record.pop("record_id")
    kit.assert_same_per_device(kit.by_device(got), kit.by_device(enriched))
    people = {u: orjson.loads(v)["person_id"] for u, v in expected_persons.items()}
    assert [p for _, p, _ in rows] == [people.get(r["user_id"], r["user_id"]) for r in got]
    loaded_dead = [orjson.loads(v) for (v,) in query(clean, "SELECT value_json FROM dead_letters")]
    if guarantee == "at_least_once":  # a dead letter written again after the kill: the same one, source and all
        loaded_dead = list({kit.canonical(d): d for d in loaded_dead}.values())
    assert kit.dead_letters_without_source(loaded_dead) == kit.dead_letters_without_source(dead)
    repeats = -(-len(enriched) // REPEAT_EVERY) if guarantee == "at_least_once" else 0
    assert query(clean, "SELECT COUNT(*) FROM enriched")[0][0] >= len(enriched) + repeats
    # the change log: every row as written, repeats included; person_history once per version, and its current
    # mapping is the persons topic's
    assert query(clean, "SELECT COUNT(*) FROM identity_changes") == [(len(changes),)]
    assert sorted(v.encode() for (v,) in query(clean, "SELECT value_json FROM identity_changes")) == sorted(
        v for _, v in changes)
    versions = {(orjson.loads(v)["user_id"], orjson.loads(v)["version"]) for _, v in changes
                if orjson.loads(v)["kind"] == "mapping"}
    assert query(clean, "SELECT COUNT(*) FROM person_history") == [(len(versions),)]
    as_of = ("SELECT user_id, person_id, via FROM person_history WHERE valid_from <= {t} "
             "AND (valid_to IS NULL OR valid_to > {t}) AND person_id IS NOT NULL ORDER BY user_id")
    current = query(clean, "SELECT user_id, person_id, via FROM persons_latest ORDER BY user_id")
    assert query(clean, as_of.format(t=T0 + 10_000)) == current and len(current) == len(expected_persons)
    assert {u: p for u, p, _ in query(clean, as_of.format(t=T0 + 1001))} == first | {
        "00000000-0000-5000-8000-000000000000": "someone"}

    # the same load SIGKILLed twice in the middle, then run to the end
    crashed = tmp_path / "crashed.duckdb"
    offsets = "SELECT SUM(next_offset) FROM load_offsets"
    seen, end = 0, query(clean, offsets)[0][0]
    for commits in (8, 20):
        loader = Loader(topics, crashed)
        loader.wait_for(commits)
        loader.kill()
        loaded = query(crashed, offsets)[0][0]
        assert seen < loaded < end, (seen, loaded, end)
        seen = loaded
    run_load(topics, crashed)
    assert dump(crashed) == dump(clean)
    # and again: nothing new to load, nothing changes
    assert "0 records into" in run_load(topics, crashed).stderr
    assert dump(crashed) == dump(clean)


def test_follow_loads_what_arrives_and_stops_on_sigterm(topics: Settings, tmp_path: Path) -> None:
    def send(n: int, start: int) -> None:
        records = [(f"d{i % 7}".encode(), orjson.dumps({"device_id": f"d{i % 7}", "record_id": f"r:0:{i}:0",
                                                         "user_id": f"u{i % 7}", "type": "track", "time": i}))
                   for i in range(start, start + n)]
        asyncio.run(kafka_clients.produce(topics, records, topic=topics.enriched_topic))

    asyncio.run(kafka_admin.ensure_topics(topics))  # the raw, enriched and dead-letter topics: no persons topic
    send(100, 0)
    path = tmp_path / "w.duckdb"
    missing = f"{topics.raw_topic}.no-identity-changes"
    loader = Loader(replace(topics, identity_changes_topic=missing), path, "--follow")
    loader.wait_for(records=100)
    send(50, 100)
    loader.wait_for(records=150)
    loader.proc.send_signal(signal.SIGTERM)
    assert loader.proc.wait(30) == 0
    assert loader.proc.stderr is not None
    rest = loader.proc.stderr.read()
    said = "".join(loader.lines) + rest
    assert f"topic {topics.persons_topic} does not exist: skipped" in said
    assert f"topic {missing} does not exist: skipped" in said
    assert f"load: 150 records into {path}" in rest
    assert query(path, "SELECT COUNT(*), COUNT(DISTINCT record_id) FROM events_with_person") == [(150, 150)]
