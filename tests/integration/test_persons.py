"""The persons stage against the real broker: the worker's final persons mapping (the compacted topic's last
value per key, tombstones removing the key) equals replay's `--persons` file, in both delivery modes, across a
SIGKILL and restart, and with two workers."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.config import Settings
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]


def check_enriched(settings: Settings, expected: list[dict[str, Any]], workers: list[kit.Worker],
                   repeats: bool, dead: int = 0) -> None:
    out = kit.wait_for_outputs(settings, len(expected) + dead, workers=workers, distinct=repeats)
    got = {d: kit.without_repeats(rs)[0] if repeats else rs for d, rs in kit.enriched_by_device(out.enriched).items()}
    assert got == kit.by_device(expected)


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_worker_persons_equal_replay(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                     guarantee: str) -> None:
    lines = kit.persons_input()
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    expected = kit.replay_persons(topics, path)
    enriched, dead = kit.replay_outputs(topics, path)
    # the input exercises what it should: both kinds of mapping, and mappings that end
    vias = [orjson.loads(v)["via"] for v in expected.values()]
    assert vias.count("login") > 20 and vias.count("identity") >= 3, vias
    worker = start_worker(topics, processing_guarantee=guarantee)
    worker.wait_ready()
    kit.produce(topics, kit.keyed(lines))
    check_enriched(topics, enriched, [worker], repeats=False, dead=len(dead))
    kit.wait_for_persons(topics, expected, [worker])
    kit.wait_for_change_log(topics, expected, guarantee == "exactly_once")
    assert all(r.value is None or r.key for r in kit.read_topic(topics, topics.persons_topic))
    metrics = _metrics(topics)
    assert metrics["streams_person_device_users{via=\"login\"}"] == vias.count("login"), metrics
    assert metrics["streams_person_device_users{via=\"identity\"}"] == vias.count("identity"), metrics
    assert worker.stop() == 0


def _metrics(settings: Settings) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("streams_person"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_persons_survive_a_sigkill(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                   guarantee: str) -> None:
    lines = kit.persons_input(seed=12, prefix="k")
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    expected = kit.replay_persons(topics, path)
    enriched, dead = kit.replay_outputs(topics, path)
    w2 = kit.killed_mid_stream(start_worker, topics, lines, str(tmp_path / "state"), guarantee, chunks=8)
    check_enriched(topics, enriched, [w2], repeats=guarantee == "at_least_once", dead=len(dead))
    kit.wait_for_persons(topics, expected, [w2])
    kit.wait_for_change_log(topics, expected, guarantee == "exactly_once")
    assert w2.stop() == 0


def test_two_workers_agree_with_replay(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path) -> None:
    lines = kit.persons_input(seed=13, prefix="two")
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    expected = kit.replay_persons(topics, path)
    enriched, dead = kit.replay_outputs(topics, path)
    a = start_worker(topics, "a", state_dir=str(tmp_path / "state-a"))
    b = start_worker(topics, "b", state_dir=str(tmp_path / "state-b"), web_port=kit.free_port())
    a.wait_ready(members=2, timeout=120)
    b.wait_ready(members=2, timeout=120)
    kit.produce(topics, kit.keyed(lines[: len(lines) // 2]))
    time.sleep(3.0)
    # one leaves mid-stream: the other takes its partitions, both tables with them
    assert a.stop() == 0
    kit.produce(topics, kit.keyed(lines[len(lines) // 2:]))
    check_enriched(topics, enriched, [b], repeats=False, dead=len(dead))
    kit.wait_for_persons(topics, expected, [b])
    kit.wait_for_change_log(topics, expected, exactly_once=False)
    assert b.stop() == 0


def test_persons_off_still_stamps_user_id(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path) -> None:
    lines = kit.persons_input(n_devices=30, n_records=300, seed=14, prefix="off")
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    off = replace(topics, persons="off")
    enriched, dead = kit.replay_outputs(off, path)
    worker = start_worker(off)
    worker.wait_ready()
    kit.produce(off, kit.keyed(lines))
    check_enriched(off, enriched, [worker], repeats=False, dead=len(dead))
    assert all("user_id" in r for r in enriched)
    assert kit.read_topic(off, off.persons_topic) == []
    assert worker.stop() == 0
