"""The worker's HTTP face against the real broker: /metrics after a known input, and the device lookup
answered for a device whose partition the other of two workers owns."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams import codec
from streams.config import Settings
from streams.enrich import Enricher, MemoryStore
from streams.kafka import clients as kafka_clients
from tests.conftest import ROOT
from tests.integration import kit

pytestmark = pytest.mark.kafka

SAMPLE = ROOT / "streams" / "samples" / "seed.jsonl"
SAMPLE_LINES = [line for line in SAMPLE.read_bytes().splitlines() if line.strip()]






def by_label(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for (metric, labels), value in samples.items():
        if metric == name:
            out[dict(labels)[label]] += int(value)
    return out


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_metrics_count_a_known_input(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                     guarantee: str) -> None:
    worker = start_worker(topics, processing_guarantee=guarantee)
    worker.wait_ready()
    asyncio.run(kafka_clients.produce_file(topics, str(SAMPLE)))
    expected, letters = kit.replay_outputs(topics, SAMPLE)
    kit.wait_for_outputs(topics, len(expected) + len(letters), workers=[worker])

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for _ in range(50):  # the lag gauge follows the commit just after the last batch
        samples = kit.scrape(topics.web_port)
        if sum(v for (m, _), v in samples.items() if m == "streams_consumer_lag") == 0:
            break
        asyncio.run(asyncio.sleep(0.2))
    assert samples[("streams_records_in_total", frozenset())] == len(SAMPLE_LINES), samples
    assert by_label(samples, "streams_enriched_out_total", "type") == Counter(r["type"] for r in expected)
    assert by_label(samples, "streams_dead_letters_total", "reason") == Counter(d["reason"] for d in letters)
    lags = {dict(labels)["partition"]: v for (m, labels), v in samples.items()
            if m == "streams_consumer_lag" and dict(labels)["topic"] == topics.raw_topic}
    assert sorted(lags) == ["0", "1", "2", "3"]
    assert sum(lags.values()) == 0
    persons_lags = {labels for (m, labels), _ in samples.items()
                    if m == "streams_consumer_lag" and dict(labels)["topic"].endswith("persons-repartition")}
    assert len(persons_lags) == topics.partitions, samples  # every topic the worker reads
    for path, status in (("/health/live", "live"), ("/health/ready", "ready")):
        code, body = kit.get(f"http://127.0.0.1:{topics.web_port}{path}")
        assert code == 200 and orjson.loads(body)["status"] == status, (path, body)
    assert samples[("streams_state_devices", frozenset())] == len(expected_states())
    batches = samples[("streams_batches_total", frozenset())]
    assert batches >= 1
    assert samples[("streams_batches_failed_total", frozenset())] == 0
    transactions = samples[("streams_transactions_total", frozenset())]
    if guarantee == "exactly_once":  # one per partition with records in a batch
        assert batches <= transactions <= batches * topics.partitions, (batches, transactions)
    else:  # one per partition whose state a batch changed (the sample changes some)
        assert 1 <= transactions <= batches * topics.partitions, (batches, transactions)


def expected_states() -> dict[str, dict[str, Any]]:
    """Every device's final state, from the engine itself (the lookup's job is to find it, not compute it)."""
    enricher, store = Enricher(), MemoryStore()
    for n, line in enumerate(SAMPLE_LINES, 1):
        enricher.step(line, {"line": n}, store)
    return {d: codec.state_as_json(s) for d, s in store.states.items()}


def test_lookup_is_routed_to_the_owner(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path) -> None:
    first = start_worker(topics, name="first")
    # a free port, not the next one: under `pytest -n` another test's worker may hold that
    second = start_worker(topics, name="second", state_dir=str(tmp_path / "state2"), web_port=kit.free_port())
    first.wait_ready(members=2)
    second.wait_ready(members=2)
    asyncio.run(kafka_clients.produce_file(topics, str(SAMPLE)))
    expected, letters = kit.replay_outputs(topics, SAMPLE)
    kit.wait_for_outputs(topics, len(expected) + len(letters), workers=[first, second])
    _, owned = kit.group_assignment(topics)
    assert len(owned) == 2 and all(owned)

    states = expected_states()
    assert states, "the sample changes some device's state"
    for device_id, state in states.items():
        for worker in (first, second):
            status, body = kit.get(f"http://127.0.0.1:{worker.settings.web_port}/devices/"
                               f"{urllib.request.quote(device_id, safe='')}")
            assert status == 200, (worker.name, device_id, body[:300])
            found = orjson.loads(body)
            assert found["device_id"] == device_id
            assert {k: found[k] for k in state} == json.loads(json.dumps(state)), (worker.name, device_id)
    # devices live on both workers' partitions, so each worker answered some lookups by routing them
    partitions = {found_partition(d, topics) for d in states}
    assert any(p in owned[0] for p in partitions) and any(p in owned[1] for p in partitions)

    status, body = kit.get(f"http://127.0.0.1:{first.settings.web_port}/devices/never-seen")
    assert status == 404
    assert b"no identity state" in body


def found_partition(device_id: str, settings: Settings) -> int:
    from aiokafka.partitioner import murmur2

    return (murmur2(device_id.encode()) & 0x7FFFFFFF) % settings.partitions


def test_state_command_asks_a_worker(topics: Settings, start_worker: kit.StartWorker) -> None:
    worker = start_worker(topics)
    worker.wait_ready()
    asyncio.run(kafka_clients.produce_file(topics, str(SAMPLE)))
    expected, letters = kit.replay_outputs(topics, SAMPLE)
    kit.wait_for_outputs(topics, len(expected) + len(letters), workers=[worker])
    device = "1712042794795-4430041-097b46dd83f7da8-29832842"
    run = subprocess.run([sys.executable, "-m", "streams", "state", device], cwd=ROOT, env=kit.worker_env(topics),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    state = json.loads(run.stdout)
    assert (state["login_id"], state["bound"]) == ("your_customer_id", {"$identity_mobile": "187****8991"})
    missing = subprocess.run([sys.executable, "-m", "streams", "state", "never-seen"], cwd=ROOT,
                             env=kit.worker_env(topics), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert "no identity state stored" in missing.stderr
