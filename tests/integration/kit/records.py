"""What the tests feed the broker (generated inputs, produced keyed or slowly) and read back from it (the
enriched and dead-letter topics, the persons topic), and the reference: replay on the same input."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.config import Settings
from streams.kafka import admin as kafka_admin
from streams.kafka import clients as kafka_clients
from tests.conftest import ROOT, validate
from tests.integration.kit.compare import change_log_state
from tests.integration.kit.process import OUTPUT_TIMEOUT, StartWorker, Worker, worker_env

SAMPLE = kafka_clients.SAMPLE


PLATFORMS = ["mp-wechat"] * 4 + ["mp-alipay"] * 2 + ["web"] * 3 + ["mp-jd"]


ACTIONS = ["track", "login", "bind", "unbind", "logout", "identify", "set_customer_ids", "profile_set"]


WEIGHTS = [50, 12, 8, 5, 8, 6, 8, 3]


def generate(n_records: int = 3000, n_devices: int = 200, *, prefix: str = "g", seed: int = 7,
             start_time: int = 1_712_100_000_000) -> list[bytes]:
    """Raw records of `n_devices` devices mixing every identity action, deterministic for a seed; each
    record has its own `time`, so no two enriched records are alike."""
    rng = random.Random(seed)
    devices = [(f"{prefix}-{i:03d}-{rng.randrange(1 << 32):08x}", rng.choice(PLATFORMS)) for i in range(n_devices)]
    out = []
    for n in range(n_records):
        device_id, platform = rng.choice(devices)
        action = rng.choices(ACTIONS, WEIGHTS)[0]
        record: dict[str, Any] = {"device_id": device_id, "platform": platform, "action": action}
        if action == "track":
            record["event"] = rng.choice(["$pageview", "$MPViewScreen", "buttonClick", "purchase"])
            record["properties"] = {"n": n, "page": f"/p/{rng.randrange(9)}"}
        elif action == "login":
            record["id"] = f"user-{rng.randrange(80)}"
        elif action in ("bind", "unbind"):
            record["key"] = rng.choice(["$identity_mobile", "$identity_email"])
            record["value"] = f"v{rng.randrange(30)}"
        elif action == "identify":
            record["id"] = f"anon-{rng.randrange(500)}"
        elif action == "set_customer_ids":
            record["customer_ids"] = rng.choice([
                {"dpuuid": f"dp-{rng.randrange(100)}"},
                {"userid": {"id": f"user-{rng.randrange(80)}", "authState": "AUTHENTICATED"}},
                {"userid": {"authState": 2}},
                {"email": {"id": f"u{rng.randrange(50)}@example.com", "authState": 1}},
            ])
        elif action == "profile_set":
            record["properties"] = {"plan": rng.choice(["free", "pro"])}
        record["time"] = start_time + n * 1000
        out.append(orjson.dumps(record))
    return out


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


def produce(settings: Settings, messages: list[tuple[bytes | None, bytes]]) -> list[Any]:
    return asyncio.run(kafka_clients.produce(settings, messages))


def produce_file(settings: Settings, path: Path | None, *, keyed: bool = True) -> int:
    return asyncio.run(kafka_clients.produce_file(settings, None if path is None else str(path), keyed=keyed))


def keyed(lines: list[bytes]) -> list[tuple[bytes | None, bytes]]:
    return [(kafka_clients.device_key(v), v) for v in lines]


def sample_lines() -> list[bytes]:
    return [line for line in SAMPLE.read_bytes().splitlines() if line.strip()]


def produce_slowly(settings: Settings, lines: list[bytes], chunks: int = 6, pause: float = 0.4) -> threading.Thread:
    def run() -> None:
        size = -(-len(lines) // chunks)
        for i in range(0, len(lines), size):
            produce(settings, keyed(lines[i:i + size]))
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def write_jsonl(path: Path, lines: Iterable[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@dataclass
class Outputs:
    enriched: list[Any]  # ConsumerRecord
    dead: list[Any]

    def __post_init__(self) -> None:
        for r in self.enriched:
            validate("enriched", r.value)
        for r in self.dead:
            validate("dead-letter", r.value)

    @property
    def enriched_values(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for r in self.enriched]

    @property
    def dead_values(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for r in self.dead]


def read_topic(settings: Settings, topic: str) -> list[Any]:
    try:
        return asyncio.run(kafka_clients.read_all(settings, topic, idle_timeout=5.0))
    except kafka_admin.TopicMissing:
        return []


def read_outputs(settings: Settings) -> Outputs:
    return Outputs(read_topic(settings, settings.enriched_topic), read_topic(settings, settings.dead_letter_topic))


def wait_for_outputs(
    settings: Settings,
    n: int,
    *,
    workers: Sequence[Worker] = (),
    timeout: float = OUTPUT_TIMEOUT,
    distinct: bool = False,
    settle: float = 1.0,
) -> Outputs:
    """Poll until the enriched and dead-letter topics together hold `n` records (`distinct`: `n` different
    values, when repeats are allowed), then wait `settle` seconds and read them once more, so that records
    beyond `n` show. Fails at once when one of `workers` has exited."""
    deadline = time.monotonic() + timeout
    count = 0
    while True:
        for worker in workers:
            worker.check_alive()
        enriched = read_topic(settings, settings.enriched_topic)
        dead = read_topic(settings, settings.dead_letter_topic)
        records = enriched + dead
        count = len({r.value for r in records}) if distinct else len(records)
        if count >= n:
            break
        if time.monotonic() >= deadline:
            tails = "\n".join(f"---- {w.name} ({'running' if w.alive else w.proc.returncode}):\n{w.log_tail()}"
                              for w in workers)
            pytest.fail(f"after {timeout:.0f}s the output topics hold {count} of the {n} records expected "
                        f"({len(enriched)} enriched, {len(dead)} dead letters)\n{tails}", pytrace=False)
        time.sleep(0.3)
    if settle:
        time.sleep(settle)
    return read_outputs(settings)


def kafka_read_enriched(settings: Settings) -> list[Any]:
    try:
        return asyncio.run(kafka_clients.read_all(settings, settings.enriched_topic, idle_timeout=2))
    except kafka_admin.TopicMissing:
        return []


def replay_outputs(settings: Settings, path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`python -m streams replay` on `path` with the same settings: (enriched records, dead letters)."""
    out, dead = path.with_suffix(".replay.jsonl"), path.with_suffix(".replay-dead.jsonl")
    run = subprocess.run(
        [sys.executable, "-m", "streams", "replay", "--input", str(path), "--output", str(out),
         "--dead-letter", str(dead), "--quiet"],
        cwd=ROOT, env=worker_env(settings), capture_output=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    enriched = [orjson.loads(line) for line in out.read_bytes().splitlines() if line]
    letters = [orjson.loads(line) for line in dead.read_bytes().splitlines() if line]
    return enriched, letters


PERSONS_TIMEOUT = 120.0


def replay_persons(settings: Settings, path: Path) -> dict[str, bytes]:
    """`python -m streams replay --persons` on `path`: user ID -> its mapping record's bytes."""
    out = path.with_suffix(".persons.jsonl")
    run = subprocess.run(
        [sys.executable, "-m", "streams", "replay", "--input", str(path), "--output", "/dev/null",
         "--dead-letter", "/dev/null", "--persons", str(out), "--quiet"],
        cwd=ROOT, env=worker_env(settings), capture_output=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    lines = [line for line in out.read_bytes().splitlines() if line]
    assert lines == sorted(lines, key=lambda line: orjson.loads(line)["user_id"])
    return {orjson.loads(line)["user_id"]: line for line in lines}


def topic_persons(settings: Settings) -> dict[str, bytes]:
    """The persons topic as a table: the last value per key, a tombstone removing the key."""
    final: dict[str, bytes] = {}
    for r in read_topic(settings, settings.persons_topic):
        key = r.key.decode()
        if r.value is None:
            final.pop(key, None)
            continue
        value = orjson.loads(r.value)
        validate("person", value)
        assert value["user_id"] == key, f"a mapping under another key: {key} {value}"
        final[key] = r.value
    return final


def wait_for_change_log(settings: Settings, expected: dict[str, bytes], exactly_once: bool) -> None:
    """The identity change log ends at `expected` (replay's mapping): it is written with the persons topic, so
    once that is there the log is too, but for what its own partitions' replication adds."""
    deadline = time.monotonic() + 30
    while True:
        got = change_log_state(read_topic(settings, settings.identity_changes_topic), exactly_once)
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    differ = sorted(k for k in expected.keys() | got.keys() if got.get(k) != expected.get(k))
    assert got == expected, f"the change log ends elsewhere: {len(got)} mappings, replay {len(expected)}: {differ[:3]}"


def wait_for_persons(settings: Settings, expected: dict[str, bytes], workers: list[Worker]) -> dict[str, bytes]:
    deadline = time.monotonic() + PERSONS_TIMEOUT
    while True:
        for w in workers:
            w.check_alive()
        got = topic_persons(settings)
        if got == expected:
            return got
        if time.monotonic() > deadline:
            missing = sorted(expected.keys() - got.keys())
            extra = sorted(got.keys() - expected.keys())
            differ = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
            detail = "\n".join(f"  {k}: got {got[k]!r}\n  {' ' * len(k)}  want {expected[k]!r}" for k in differ[:3])
            pytest.fail(f"after {PERSONS_TIMEOUT:.0f}s the persons topic differs from replay's file: {len(missing)} "
                        f"missing {missing[:3]}, {len(extra)} extra {extra[:3]}, {len(differ)} differ\n{detail}",
                        pytrace=False)
        time.sleep(1.0)


def killed_mid_stream(start_worker: StartWorker, settings: Settings, lines: list[bytes], state_dir: str,
                      guarantee: str, chunks: int = 6) -> Worker:
    """A worker SIGKILLed while `lines` are produced, once its first outputs are out, and then a second one on
    the same state directory, ready in the group; returns the second."""
    first = start_worker(settings, "run1", state_dir=state_dir, processing_guarantee=guarantee)
    first.wait_ready()
    sender = produce_slowly(settings, lines, chunks=chunks, pause=0.5)
    wait_for_outputs(settings, 1, workers=[first], settle=0)
    first.kill()
    sender.join()
    second = start_worker(settings, "run2", state_dir=state_dir, processing_guarantee=guarantee)
    second.wait_ready()
    return second
