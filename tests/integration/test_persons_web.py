"""The persons stage's operations face against the real broker: `GET /persons/{user_id}` answered for every
mapped device user by either of two workers on two hosts (the owner of the user ID's partition answers), a
conflict, the 404 and 400 answers, `python -m streams person`, and the persons gauges of /metrics, also for
partitions a worker took over and has had no batch of (their counts read from the persons table)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.config import Settings
from streams.kafka.partitioners import key_hash
from tests.conftest import ROOT
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

LOGIN_DEVICES = 24
PHONE, EMAIL = "13800000001", "dave@x.io"


def persons_web_input() -> list[bytes]:
    """Device users mapped via login (one per device that was anonymous, then logged in), one mapped via
    identity (an anonymous device binds a phone that one login user owns) and one in conflict (an anonymous
    device binds that phone and an email another login user owns)."""
    records: list[dict[str, Any]] = []
    for i in range(LOGIN_DEVICES):
        records += [{"device_id": f"pw-login-{i:02d}", "event": "view"},
                    {"device_id": f"pw-login-{i:02d}", "action": "login", "id": f"alice{i}"}]
    records += [
        {"device_id": "pw-bob", "action": "login", "id": "bob"},
        {"device_id": "pw-bob", "action": "bind", "key": "$identity_mobile", "value": PHONE},
        {"device_id": "pw-dave", "action": "login", "id": "dave"},
        {"device_id": "pw-dave", "action": "bind", "key": "$identity_email", "value": EMAIL},
        {"device_id": "pw-anon", "event": "view"},
        {"device_id": "pw-anon", "action": "bind", "key": "$identity_mobile", "value": PHONE},
        {"device_id": "pw-both", "action": "bind", "key": "$identity_mobile", "value": PHONE},
        {"device_id": "pw-both", "action": "bind", "key": "$identity_email", "value": EMAIL},
    ]
    return [orjson.dumps({"platform": "web", "time": 1_712_000_000_000 + n, **r}) for n, r in enumerate(records)]


def device_users(settings: Settings, path: Path) -> dict[str, str]:
    """Per device of the input, the user_id of its last enriched record (replay's)."""
    out = path.with_suffix(".users.jsonl")
    run = subprocess.run(
        [sys.executable, "-m", "streams", "replay", "--input", str(path), "--output", str(out),
         "--dead-letter", "/dev/null", "--quiet"],
        cwd=ROOT, env=kit.worker_env(settings), capture_output=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    return {r["device_id"]: r["user_id"] for r in map(orjson.loads, out.read_bytes().splitlines())}


def ask(host: str, port: int, user_id: str) -> tuple[int, dict[str, Any]]:
    status, body = kit.get(f"http://{host}:{port}/persons/{user_id}")
    return status, orjson.loads(body)


def wait_for_answer(host: str, port: int, user_id: str, want: dict[str, Any], timeout: float = 60.0) -> None:
    """The index is written by the last message of the stage: poll until it holds `want`."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = ask(host, port, user_id)
        if (status, body) == (200, want):
            return
        assert time.monotonic() < deadline, f"{host}: /persons/{user_id} answers {status} {body}, not {want}"
        time.sleep(0.5)


def person_metrics(hosts: list[tuple[str, int]]) -> Counter[str]:
    """The persons samples of /metrics, summed over the workers (name{labels} -> value)."""
    total: Counter[str] = Counter()
    for host, port in hosts:
        for (name, labels), value in kit.scrape(port, host).items():
            if name.startswith("streams_person"):
                label = ",".join(f'{k}="{v}"' for k, v in sorted(labels))
                total[f"{name}{{{label}}}" if label else name] += int(value)
    return total


def wait_for_metrics(hosts: list[tuple[str, int]], want: dict[str, int], timeout: float = 60.0) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        got = person_metrics(hosts)
        if all(got[k] == v for k, v in want.items()):
            return got
        assert time.monotonic() < deadline, f"persons metrics {dict(got)}, want {want}"
        time.sleep(0.5)


def test_person_lookup_from_either_host(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path) -> None:
    lines = persons_web_input()
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    expected = kit.replay_persons(topics, path)
    users = device_users(topics, path)
    mappings = {u: orjson.loads(v) for u, v in expected.items()}
    anon, both = users["pw-anon"], users["pw-both"]
    # bob's and dave's devices logged in on their first record: their device users are mapped via login too
    via_login = LOGIN_DEVICES + 2
    assert Counter(m["via"] for m in mappings.values()) == {"login": via_login, "identity": 1}
    bob = users["pw-bob"]
    assert mappings[anon] == {"user_id": anon, "person_id": bob, "via": "identity", "device_id": "pw-anon",
                              "identity_key": "$identity_mobile"}
    assert both not in mappings
    hash_of = key_hash(topics.partitioner)
    assert {hash_of(u.encode()) % topics.partitions for u in mappings} == set(range(topics.partitions))

    first, second, port = kit.two_hosts(start_worker, topics, tmp_path / "state2")
    hosts = [("127.0.0.1", port), ("127.0.0.2", port)]
    kit.produce(topics, kit.keyed(lines))
    kit.wait_for_persons(topics, expected, [first, second])
    _, owned = kit.group_assignment(topics)
    assert len(owned) == 2 and all(owned), owned  # so that every host answers some users by routing them

    for user, mapping in mappings.items():
        for host, _ in hosts:
            assert ask(host, port, user) == (200, mapping), (host, user)
    conflict = {"user_id": both, "person_id": None, "conflict": True}
    for host, _ in hosts:
        wait_for_answer(host, port, both, conflict)
        # a user ID in capitals is the same user
        assert ask(host, port, anon.upper()) == (200, mappings[anon])

        status, body = ask(host, port, bob)  # a login user: a person of its own
        assert status == 404 and body["user_id"] == bob, body
        assert "a login user is a person of its own" in body["error"], body
        assert "without a mapping" in body["error"] and "its own person" in body["error"], body
        status, body = ask(host, port, "00000000-0000-5000-8000-000000000000")
        assert status == 404, body
        status, body = ask(host, port, "pw-anon")
        assert status == 400 and "not a user ID" in body["error"] and "UUID" in body["error"], body

    gauges = {'streams_person_device_users{via="login"}': via_login,
              'streams_person_device_users{via="identity"}': 1,
              "streams_person_conflicts": 1,
              'streams_person_pairs{state="owned"}': 2,
              'streams_person_pairs{state="shared"}': 0,
              # bob's phone and dave's email, claimed by them; the phone by pw-anon's user; both by pw-both's
              "streams_person_claims": 5}
    metrics = wait_for_metrics(hosts, gauges)
    # at least once: a batch tried again (a send that timed out, a rebalance) writes its mappings again
    assert metrics["streams_person_mappings_written_total"] >= len(mappings), metrics
    # two workers' messages may interleave otherwise than replay's one order: a mapping may end for a while on
    # the way, but every one it wrote a tombstone for is written again (the topic ends as replay's, above)
    assert (metrics["streams_person_mappings_written_total"] - metrics["streams_person_tombstones_written_total"]
            >= len(mappings)), metrics
    assert metrics["streams_person_unreadable_messages_total"] == 0, metrics
    assert metrics['streams_person_messages_total{kind="claim"}'] >= 5, metrics
    assert metrics['streams_person_messages_total{kind="owner"}'] >= 3, metrics
    assert metrics['streams_person_messages_total{kind="user"}'] >= len(mappings) + 1, metrics

    # the command line asks a worker, which routes it
    for user, want in ((anon, mappings[anon]), (both, conflict)):
        run = subprocess.run([sys.executable, "-m", "streams", "person", user, "--url", f"http://127.0.0.2:{port}"],
                             cwd=ROOT, env=kit.worker_env(topics), capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert orjson.loads(run.stdout) == want
    run = subprocess.run([sys.executable, "-m", "streams", "person", bob, "--web-bind", "127.0.0.1",
                          "--web-port", str(port)], cwd=ROOT, env=kit.worker_env(topics), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and "a login user is a person of its own" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "streams", "person", "nobody", "--url", f"http://127.0.0.1:{port}"],
                         cwd=ROOT, env=kit.worker_env(topics), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "HTTP 400" in run.stderr and "not a user ID" in run.stderr, run.stderr

    # one leaves: the other takes its partitions, with no batch since (no input): their counts come from the
    # persons table, and their users' lookups are answered here
    assert second.stop() == 0
    first.wait_ready(members=1)
    wait_for_metrics(hosts[:1], gauges)
    for user, mapping in [*mappings.items(), (both, conflict)]:
        wait_for_answer("127.0.0.1", port, user, mapping)


def test_person_lookup_when_the_stage_is_off(topics: Settings, start_worker: kit.StartWorker) -> None:
    off = replace(topics, persons="off")
    worker = start_worker(off)
    worker.wait_ready()
    status, body = ask("127.0.0.1", off.web_port, "00000000-0000-5000-8000-000000000000")
    assert status == 404 and "STREAMS_PERSONS=off" in body["error"], body
    assert not [name for name, _ in kit.scrape(off.web_port) if name.startswith("streams_person")]
    run = subprocess.run([sys.executable, "-m", "streams", "person", "00000000-0000-5000-8000-000000000000"],
                         cwd=ROOT, env=kit.worker_env(off), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "STREAMS_PERSONS=off" in run.stderr, run.stderr
    assert worker.stop() == 0
