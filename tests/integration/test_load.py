"""`python -m streams load` against the real broker, in both delivery modes: what it loads from a worker's topics
equals replay (persons_latest is replay's --persons mapping, events_with_person one row per record_id, each
device's records in order), and a load SIGKILLed twice mid-way, then run again, gives the same rows as a clean
load: nothing lost, nothing repeated. --follow loads what arrives, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
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

TABLES = ("enriched", "enriched_identities", "dead_letters", "persons", "load_offsets")
VIEWS = ("persons_latest", "events_with_person", "identity_graph")
CHUNK = 40  # records per transaction: small, so that a load of a few thousand records takes many
REPEAT_EVERY = 10  # at-least-once: every tenth enriched record written again


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
    loader = Loader(topics, path, "--follow")
    loader.wait_for(records=100)
    send(50, 100)
    loader.wait_for(records=150)
    loader.proc.send_signal(signal.SIGTERM)
    assert loader.proc.wait(30) == 0
    assert loader.proc.stderr is not None
    rest = loader.proc.stderr.read()
    said = "".join(loader.lines) + rest
    assert f"topic {topics.persons_topic} does not exist: skipped" in said
    assert f"load: 150 records into {path}" in rest
    assert query(path, "SELECT COUNT(*), COUNT(DISTINCT record_id) FROM events_with_person") == [(150, 150)]
