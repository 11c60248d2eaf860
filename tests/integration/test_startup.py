"""What the worker checks before it consumes, against the real (single) broker: a missing raw topic stops it
with a clear error unless it may create the topic, and every error of creating a topic is reported; existing
topics whose settings break a promise are refused with the commands that fix them; and once it runs, no client of
the worker creates a topic (a deleted raw topic stays deleted)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import NewTopic

from streams.config import Settings
from streams.kafka import admin as kafka_admin
from tests.conftest import ROOT
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

EX_CONFIG = 78


def run_worker(settings: Settings) -> subprocess.CompletedProcess[str]:
    """`python -m streams worker` that is expected to stop by itself."""
    return subprocess.run([sys.executable, "-m", "streams", "worker"], cwd=ROOT, env=kit.worker_env(settings),
                          capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL)


def replication(settings: Settings, topic: str) -> set[int]:
    async def call(admin: kafka_admin.Admin) -> object:
        return await admin.describe_topics([topic])

    metadata = asyncio.run(kit.admin_call(settings.brokers, call))
    return {len(p["replicas"]) for t in metadata for p in t["partitions"]}  # type: ignore[attr-defined]


def test_a_missing_raw_topic_stops_the_worker_with_a_clear_error(topics: Settings) -> None:
    typo = replace(topics, raw_topic=topics.raw_topic + "s")  # e.g. a typo in STREAMS_RAW_TOPIC
    run = run_worker(typo)
    assert run.returncode == EX_CONFIG, run.stderr[-3000:]
    message = run.stderr.strip().splitlines()[-1]
    assert f"the raw topic {typo.raw_topic} does not exist on {typo.brokers}" in message, message
    assert "STREAMS_MISSING_RAW_TOPIC=create" in message
    # nothing was created: no empty raw topic, no outputs
    for topic in (typo.raw_topic, typo.enriched_topic, typo.dead_letter_topic):
        assert asyncio.run(kafka_admin.partition_count(typo, topic)) is None, topic


def test_the_worker_creates_the_raw_topic_when_allowed(topics: Settings,
                                                       start_worker: kit.StartWorker) -> None:
    fresh = replace(topics, raw_topic=topics.raw_topic + "-new", missing_raw_topic="create")
    worker = start_worker(fresh)
    worker.wait_ready()
    assert asyncio.run(kafka_admin.partition_count(fresh, fresh.raw_topic)) == fresh.partitions
    # the single broker's default.replication.factor
    assert replication(fresh, fresh.raw_topic) == {1}
    assert replication(fresh, f"{fresh.group}-devices-changelog") == {1}


def test_a_topic_the_brokers_refuse_is_reported(topics: Settings) -> None:
    # one broker cannot hold three replicas: the broker answers INVALID_REPLICATION_FACTOR
    three = replace(topics, replication_factor=3)
    run = run_worker(three)
    assert run.returncode == EX_CONFIG, run.stderr[-3000:]
    message = run.stderr.strip().splitlines()[-1]
    assert f"cannot create topic '{three.enriched_topic}': InvalidReplicationFactorError (error code 38)" in message
    assert three.brokers in message and "replication factor 3" in message, message
    assert asyncio.run(kafka_admin.partition_count(three, three.enriched_topic)) is None

    # the tools report it the same way
    with pytest.raises(kafka_admin.TopicCreationFailed, match="InvalidReplicationFactorError"):
        asyncio.run(kafka_admin.ensure_topics(replace(three, raw_topic=three.raw_topic + "2")))


def test_the_replication_factor_is_the_setting_or_the_brokers_default(topics: Settings) -> None:
    async def resolve(settings: Settings) -> int:
        return int(await kit.admin_call(settings.brokers, lambda a: kafka_admin.replication_factor(a, settings)))

    assert asyncio.run(resolve(topics)) == 1  # -1: the broker's default.replication.factor
    assert asyncio.run(resolve(replace(topics, replication_factor=2))) == 2


# -- existing topics whose settings break a promise --------------------------------------------------------


def create(settings: Settings, topic: str, replication: int = 1, **configs: str) -> None:
    async def call(admin: kafka_admin.Admin) -> None:
        response = await admin.create_topics([NewTopic(topic, kit.PARTITIONS, replication, topic_configs=configs)])
        for name, code, *message in response.topic_errors:
            assert code == 0, f"cannot create topic {name}: error {code} {message}"

    asyncio.run(kit.admin_call(settings.brokers, call))


def kafka_configs(command: str) -> subprocess.CompletedProcess[str]:
    """Run a `kafka-configs.sh ...` command line as the worker printed it, with the broker's own jars."""
    libs = Path(os.environ.get("KAFKA_CACHE", ROOT / ".cache" / "kafka"))
    if not any(libs.glob("*/libs/*.jar")):
        subprocess.run(["bash", str(ROOT / "scripts" / "kafka.sh"), "install"], check=True, capture_output=True)
    classpath = ":".join(str(p) for p in sorted(libs.glob("*/libs/*.jar")))
    argv = shlex.split(command)
    assert argv[0] == "kafka-configs.sh", command
    return subprocess.run(["java", "-Xmx256m", "-XX:TieredStopAtLevel=1", "-cp", classpath,
                           "kafka.admin.ConfigCommand", *argv[1:]], capture_output=True, text=True, timeout=120)


def test_existing_topics_that_break_a_promise_are_refused_with_the_commands_that_fix_them(
        topics: Settings, start_worker: kit.StartWorker) -> None:
    changelog = f"{topics.group}-devices-changelog"
    create(topics, topics.persons_topic)  # not compacted: mappings of users not seen for a while would go
    create(topics, changelog, **{"cleanup.policy": "compact", "min.insync.replicas": "2"})  # no write can succeed
    create(topics, topics.enriched_topic, **{"cleanup.policy": "compact"})  # one record left per device
    run = run_worker(topics)
    assert run.returncode == EX_CONFIG, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert (f"streams worker: 3 setting(s) of existing topics on {topics.brokers} break what the worker promises"
            in run.stderr), run.stderr
    fixes = re.findall(r"kafka-configs\.sh .*$", run.stderr, re.MULTILINE)
    assert sorted(fixes) == sorted(
        f"kafka-configs.sh --bootstrap-server {topics.brokers} --alter --entity-type topics --entity-name {name} "
        f"--add-config {change}" for name, change in [(topics.persons_topic, "cleanup.policy=compact"),
                                                       (changelog, "min.insync.replicas=1"),
                                                       (topics.enriched_topic, "cleanup.policy=delete")])
    # refused before anything was made
    assert asyncio.run(kafka_admin.partition_count(topics, topics.dead_letter_topic)) is None

    for fix in fixes:  # the commands, as printed, put the topics right
        done = kafka_configs(fix)
        assert done.returncode == 0, done.stderr[-3000:]
    worker = start_worker(topics)
    worker.wait_ready()


def test_an_existing_topic_with_fewer_replicas_than_the_worker_creates_is_refused(topics: Settings) -> None:
    create(topics, topics.dead_letter_topic)
    two = replace(topics, replication_factor=2)
    run = run_worker(two)
    assert run.returncode == EX_CONFIG, run.stderr[-3000:]
    assert (f"{two.dead_letter_topic} (the dead-letter topic) has 1 replica(s), but the worker creates its topics "
            "with 2 (STREAMS_REPLICATION_FACTOR)") in run.stderr, run.stderr
    assert "kafka-reassign-partitions.sh" in run.stderr and "STREAMS_REPLICATION_FACTOR=1" in run.stderr
    assert asyncio.run(kafka_admin.partition_count(two, two.enriched_topic)) is None


# -- no topic made by a client once the worker runs ---------------------------------------------------------


# `python -c RECORDER RECORD python -m streams worker`: the worker, with every metadata request its Kafka clients
# send written to RECORD (the topics it names, and whether it asks the brokers to create them)
RECORDER = """
import json, runpy, sys
from aiokafka.conn import AIOKafkaConnection
from aiokafka.protocol.metadata import MetadataRequest

record = open(sys.argv[1], "a")
send = AIOKafkaConnection.send

def recorded(self, request, *args, **kwargs):
    if isinstance(request, MetadataRequest):
        allow = request._allow_auto_topic_creation
        record.write(json.dumps({"topics": request._topics, "allow": True if allow is None else allow}) + "\\n")
        record.flush()
    return send(self, request, *args, **kwargs)

AIOKafkaConnection.send = recorded
sys.argv = ["streams", *sys.argv[sys.argv.index("streams") + 1:]]
runpy.run_module("streams", run_name="__main__", alter_sys=True)
"""


def recorded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_raw_topic_deleted_under_the_worker_is_not_created_again(topics: Settings, start_worker: kit.StartWorker,
                                                                   tmp_path: Path) -> None:
    """This broker creates no topic by itself (auto.create.topics.enable=false), whatever a client asks: what the
    worker's clients ask is read from their requests. On brokers with Kafka's default (true), a request that
    asked would create the topic again, with the brokers' default partition count."""
    record = tmp_path / "metadata.jsonl"
    worker = start_worker(topics, prefix=[sys.executable, "-c", RECORDER, str(record)])
    worker.wait_ready()
    # a record through first: the consumer's positions are set, and a fetch from the deleted topic fails
    kit.produce(topics, [(b"d-1", b'{"device_id": "d-1", "platform": "web", "event": "e"}')])
    kit.wait_for_outputs(topics, 1, workers=[worker])
    asked = len(recorded(record))

    async def delete(admin: kafka_admin.Admin) -> None:
        await admin.delete_topics([topics.raw_topic])

    asyncio.run(kit.admin_call(topics.brokers, delete))
    deadline = time.monotonic() + 60
    while not any(topics.raw_topic in (r["topics"] or []) for r in recorded(record)[asked:]):
        assert time.monotonic() < deadline, f"the worker asked for no metadata of {topics.raw_topic} after it went"
        time.sleep(0.5)
    time.sleep(5)  # the consumer's tries after the first
    requests = recorded(record)
    naming = [r for r in requests if r["topics"]]
    assert naming and not [r for r in naming if r["allow"]], [r for r in naming if r["allow"]][:5]
    assert any(topics.raw_topic in r["topics"] for r in requests[asked:])
    assert asyncio.run(kafka_admin.partition_count(topics, topics.raw_topic)) is None
