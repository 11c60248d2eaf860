"""Security against the real broker: SASL (PLAIN and SCRAM) reaches every Kafka client of the worker and the
tools, and no identity value reaches the worker's log at INFO."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from streams.config import Settings
from streams.kafka import clients as kafka_clients
from tests.conftest import ROOT
from tests.integration import kit

pytestmark = pytest.mark.kafka

SAMPLE = ROOT / "streams" / "samples" / "seed.jsonl"
SASL_PORT = int(os.environ.get("KAFKA_SASL_PORT", "9094"))  # scripts/kafka.sh's SASL_PLAINTEXT listener
USER, PASSWORD = "streams", "streams-secret"  # the users scripts/kafka.sh creates


def sasl(settings: Settings, mechanism: str, password: str = PASSWORD) -> Settings:
    return replace(settings, brokers=f"127.0.0.1:{SASL_PORT}", security_protocol="SASL_PLAINTEXT",
                   sasl_mechanism=mechanism, sasl_username=USER, sasl_password=password)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_the_worker_and_tools_over_sasl(topics: Settings, start_worker: kit.StartWorker,
                                        mechanism: str) -> None:
    secured = sasl(topics, mechanism)
    worker = start_worker(secured)
    worker.wait_ready()
    asyncio.run(kafka_clients.produce_file(secured, str(SAMPLE)))
    expected, letters = kit.replay_outputs(secured, SAMPLE)
    outputs = kit.wait_for_outputs(secured, len(expected) + len(letters), workers=[worker])
    assert len(outputs.enriched) == len(expected)
    assert len(outputs.dead) == len(letters)


def test_a_wrong_password_is_refused_with_a_clear_message(topics: Settings, tmp_path: Path) -> None:
    import subprocess
    import sys


    run = subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, capture_output=True, text=True,
                         env=kit.worker_env(sasl(topics, "SCRAM-SHA-256", password="wrong")), timeout=120)
    assert run.returncode != 0
    assert "cannot reach Kafka" in run.stderr, run.stderr[-2000:]
    assert "wrong" not in run.stderr  # the password is not echoed


def test_no_identity_value_in_the_log(topics: Settings, start_worker: kit.StartWorker) -> None:
    worker = start_worker(topics, log_level="info")
    worker.wait_ready()
    asyncio.run(kafka_clients.produce_file(topics, str(SAMPLE)))
    expected, letters = kit.replay_outputs(topics, SAMPLE)
    kit.wait_for_outputs(topics, len(expected) + len(letters), workers=[worker])
    worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "Worker ready" in log  # the log is at INFO indeed
    values = set()
    for line in SAMPLE.read_bytes().splitlines():
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(raw, dict):
            for field in ("id", "value"):
                if isinstance(raw.get(field), str) and len(raw[field]) > 3:
                    values.add(raw[field])
            for entry in (raw.get("customer_ids") or {}).values():
                if isinstance(entry, dict) and isinstance(entry.get("id"), str) and len(entry["id"]) > 3:
                    values.add(entry["id"])
    assert values >= {"your_customer_id", "187****8991", "67312378756723456"}
    leaked = sorted(v for v in values if v in log)
    assert not leaked, f"identity values in the worker's INFO log: {leaked}"
