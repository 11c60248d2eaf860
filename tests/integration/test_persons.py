"""The persons stage against the real broker: the worker's final persons mapping (the compacted topic's last
value per key, tombstones removing the key) equals replay's `--persons` file, in both delivery modes, across a
SIGKILL and restart, and with two workers."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.config import Settings
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]



def persons_input(n_devices: int = 120, n_records: int = 2400, *, seed: int = 11, prefix: str = "p") -> list[bytes]:
    """Devices that share login IDs, phones and emails, so that pairs are owned, shared, released and claimed
    again: a third never log in (mapped via identity, or in conflict), the rest mostly log in as a user of
    their own; placeholders, resets, logouts and sign-ups in between."""
    rng = random.Random(seed)
    platforms = ["mp-wechat", "mp-wechat", "web", "mp-alipay", "mp-jd"]
    devices = [(f"{prefix}-{i:03d}", rng.choice(platforms), i % 3 == 0) for i in range(n_devices)]
    phones = [f"138{i:04d}" for i in range(40)] + ["null", " 0 "]
    emails = [f"e{i}@x.io" for i in range(30)]
    out = []
    for n in range(n_records):
        i = rng.randrange(n_devices)
        device_id, platform, anonymous = devices[i]
        user = f"u{i}" if rng.random() < 0.9 else f"u{rng.randrange(n_devices)}"
        r = rng.random()
        record: dict[str, Any] = {"device_id": device_id, "platform": platform, "time": 1_712_000_000_000 + n}
        if r < 0.45:
            record.update(action="track", event="view", properties={"n": n})
        elif r < 0.6:
            record.update(action="bind", key="$identity_mobile", value=rng.choice(phones))
        elif r < 0.66:
            record.update(action="bind", key="$identity_email", value=rng.choice(emails))
        elif r < 0.74:
            record.update(action="login", id=user)
        elif r < 0.76:
            record.update(action="login", key="$identity_email", id=rng.choice(emails))
        elif r < 0.82:
            record.update(action="unbind", key="$identity_mobile", value=rng.choice(phones))
        elif r < 0.87:
            record.update(action="logout")
        elif r < 0.9:
            record.update(action="reset_anonymous_id")
        else:
            record.update(action="set_customer_ids", customer_ids={"userid": {"id": user, "authState": 1}})
        if anonymous and (record["action"] in ("login", "set_customer_ids")):
            record = {"device_id": device_id, "platform": platform, "time": record["time"], "event": "anon_view"}
        if platform == "mp-jd" and (record.get("action") in ("bind", "unbind", "reset_anonymous_id")
                                    or "key" in record):
            record = {"device_id": device_id, "platform": platform, "time": record["time"], "event": "jd_view"}
        out.append(orjson.dumps(record))
    return out








def check_enriched(settings: Settings, expected: list[dict[str, Any]], workers: list[kit.Worker],
                   repeats: bool, dead: int = 0) -> None:
    out = kit.wait_for_outputs(settings, len(expected) + dead, workers=workers, distinct=repeats)
    got = {d: kit.without_repeats(rs)[0] if repeats else rs for d, rs in kit.enriched_by_device(out.enriched).items()}
    assert got == kit.by_device(expected)


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_worker_persons_equal_replay(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                     guarantee: str) -> None:
    lines = persons_input()
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
    lines = persons_input(seed=12, prefix="k")
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    expected = kit.replay_persons(topics, path)
    enriched, dead = kit.replay_outputs(topics, path)
    w2 = kit.killed_mid_stream(start_worker, topics, lines, str(tmp_path / "state"), guarantee, chunks=8)
    check_enriched(topics, enriched, [w2], repeats=guarantee == "at_least_once", dead=len(dead))
    kit.wait_for_persons(topics, expected, [w2])
    kit.wait_for_change_log(topics, expected, guarantee == "exactly_once")
    assert w2.stop() == 0


def test_two_workers_agree_with_replay(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path) -> None:
    lines = persons_input(seed=13, prefix="two")
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
    lines = persons_input(n_devices=30, n_records=300, seed=14, prefix="off")
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
