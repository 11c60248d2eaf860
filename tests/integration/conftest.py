"""The fixtures of the integration tests: the real broker, unique topics per test, the cluster, workers.

`kafka` (a broker on 127.0.0.1:9092, started with `scripts/kafka.sh start` when none answers, and stopped at the
end only then; the session fails when it cannot start one), `topics` (fresh topic names, group and state dir as
a `config.Settings`, the raw topic created with 4 partitions, everything the test made deleted afterwards), the
same on three brokers (`kafka_cluster`, started with `scripts/kafka.sh cluster-start` by the first test that asks
for it; `cluster` brings every node back up after a test that killed one; `cluster_topics`) and `start_worker`.
What the tests call besides (the worker process, inputs, outputs, comparisons) is in `kit/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import NewTopic
from aiokafka.client import AIOKafkaClient

from streams.config import Settings
from streams.kafka import admin as kafka_admin
from tests.conftest import ROOT
from tests.integration import kit

KAFKA_SH = ROOT / "scripts" / "kafka.sh"
BOOTSTRAP = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"  # where scripts/kafka.sh puts it


# -- the broker ------------------------------------------------------------------------------------------


def _kafka_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # a node started while the other tests load both cores, or catching up after its disk was wiped, can take
    # longer than the script's own 90 s to answer: give it most of the call's time
    env = {**os.environ, "KAFKA_START_TIMEOUT": str(int(max(90, timeout - 30)))}
    return subprocess.run(["bash", str(KAFKA_SH), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)




def _stop_at_the_end() -> bool:
    """Whether this test process stops at its end what it started: not when others of the same run (`pytest -n`)
    may still use it; the broker is then left running, as `make run` leaves it."""
    return "PYTEST_XDIST_WORKER" not in os.environ


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """The bootstrap address of a broker that answers. Never skips: no broker is a failure."""
    if not KAFKA_SH.exists():
        pytest.fail(f"{KAFKA_SH} is missing: it installs and starts the test broker", pytrace=False)
    started = False
    with kit.one_at_a_time("kafka"):
        if _kafka_sh("status", timeout=120).returncode != 0:
            # on a fresh machine this downloads the broker's jars first
            run = _kafka_sh("start", timeout=1800)
            if run.returncode != 0:
                pytest.fail(f"`bash scripts/kafka.sh start` failed with exit code {run.returncode}:\n"
                            f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}", pytrace=False)
            started = _stop_at_the_end()
    try:
        asyncio.run(asyncio.wait_for(kit.admin_call(BOOTSTRAP, lambda a: a.list_topics()), 60))
    except Exception as e:
        pytest.fail(f"the broker on {BOOTSTRAP} does not answer the admin API: {e!r}", pytrace=False)
    yield BOOTSTRAP
    if started:
        _kafka_sh("stop", timeout=120)


# -- per-test topics -------------------------------------------------------------------------------------




async def _create_topic(brokers: str, topic: str, partitions: int) -> None:
    async def create(admin: Any) -> None:
        # -1: the brokers' default.replication.factor (3 on the cluster)
        response = await admin.create_topics([NewTopic(topic, partitions, -1, replica_assignments={})])
        for name, code, *message in response.topic_errors:
            assert code == 0, f"cannot create topic {name}: error {code} {message}"

    await kit.admin_call(brokers, create)


async def _delete_topics(brokers: str, prefix: str) -> None:
    async def delete(admin: Any) -> None:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)

    await kit.admin_call(brokers, delete)


@contextlib.contextmanager
def fresh_topics(brokers: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings of fresh topics, group, state dir and web port on `brokers`; the raw topic exists (4
    partitions, the brokers' default replication). Everything named after them is deleted afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    settings = replace(
        Settings(),
        brokers=brokers,
        raw_topic=f"{name}.raw",
        enriched_topic=f"{name}.enriched",
        dead_letter_topic=f"{name}.dead-letter",
        persons_topic=f"{name}.persons",
        identity_changes_topic=f"{name}.identity-changes",
        group=name,
        state_dir=str(tmp_path / "state"),
        partitions=kit.PARTITIONS,
        web_port=kit.free_port(),
        log_level="info",
    )
    asyncio.run(_create_topic(brokers, settings.raw_topic, kit.PARTITIONS))
    deadline = time.monotonic() + 15
    while asyncio.run(kafka_admin.partition_count(settings, settings.raw_topic)) != kit.PARTITIONS:
        assert time.monotonic() < deadline, f"{settings.raw_topic} does not show in the broker's metadata"
        time.sleep(0.1)
    yield settings
    # the test's topics and the worker's own (changelog, repartition: named after the group)
    with contextlib.suppress(Exception):
        asyncio.run(_delete_topics(brokers, name))


@pytest.fixture
def topics(kafka: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings of this test's own topics, group, state dir and web port; the raw topic exists (4 partitions)."""
    with fresh_topics(kafka, tmp_path) as settings:
        yield settings


# -- the three-broker cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """The three-node cluster of `scripts/kafka.sh cluster-*`: its nodes killed, wiped and started again."""

    brokers: str

    @staticmethod
    def _run(*args: str) -> None:
        run = _kafka_sh(*args, timeout=300)
        # the script's own lines first (why it failed), then the end of what it printed (a node's log)
        said = "\n".join(line for line in run.stderr.splitlines() if line.startswith("kafka:"))
        assert run.returncode == 0, (f"scripts/kafka.sh {' '.join(args)}: exit {run.returncode}\n{said}\n"
                                     f"{run.stderr[-3000:]}")

    def kill(self, node: int) -> None:
        """SIGKILL, as a crash or a power loss would."""
        self._run("cluster-kill", str(node))

    def wipe(self, node: int) -> None:
        """SIGKILL, and its data deleted: a lost disk."""
        self._run("cluster-wipe-node", str(node))

    def start(self, node: int) -> None:
        self._run("cluster-start-node", str(node))

    def up(self) -> set[int]:
        """The nodes that answer a metadata request themselves, asked from this process (`cluster-status` starts
        a JVM a node: a load that slowed the other tests)."""
        async def answers(address: str) -> bool:
            client = AIOKafkaClient(bootstrap_servers=address, request_timeout_ms=5_000)
            try:
                await asyncio.wait_for(client.bootstrap(), 10)
                return True
            except Exception:
                return False
            finally:
                await client.close()

        async def ask() -> list[bool]:
            return await asyncio.gather(*(answers(a) for a in self.brokers.split(",")))

        return {n for n, ok in enumerate(asyncio.run(ask()), 1) if ok}

    def all_up(self) -> None:
        self._run("cluster-start")


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[Cluster]:
    """Three brokers (scripts/kafka.sh cluster-start), for the tests that need them only; stopped at the end
    when this session started them. Never skips: a cluster that does not come up is a failure."""
    with kit.one_at_a_time("kafka-cluster"):
        started = _kafka_sh("cluster-status", timeout=120).returncode != 0
        if started:
            run = _kafka_sh("cluster-start", timeout=1800)
            if run.returncode != 0:
                pytest.fail(f"`bash scripts/kafka.sh cluster-start` failed with exit code {run.returncode}:\n"
                            f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}", pytrace=False)
    # the cluster's tests run in one process (`xdist_group`), so the one that started it may stop it
    brokers = _kafka_sh("cluster-brokers", timeout=60).stdout.strip()
    try:
        asyncio.run(asyncio.wait_for(kit.admin_call(brokers, lambda a: a.list_topics()), 60))
    except Exception as e:
        pytest.fail(f"the cluster on {brokers} does not answer the admin API: {e!r}", pytrace=False)
    yield Cluster(brokers)
    if started:
        _kafka_sh("cluster-stop", timeout=300)


@pytest.fixture
def cluster(kafka_cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, every node up before the test and again after it (a test kills and wipes nodes)."""
    if kafka_cluster.up() != {1, 2, 3}:
        kafka_cluster.all_up()
    yield kafka_cluster
    if kafka_cluster.up() != {1, 2, 3}:
        kafka_cluster.all_up()


@pytest.fixture
def cluster_topics(cluster: Cluster, tmp_path: Path) -> Iterator[Settings]:
    """As `topics`, on the three-broker cluster (replication factor 3 by the brokers' default)."""
    with fresh_topics(cluster.brokers, tmp_path) as settings:
        yield settings


# -- the worker ------------------------------------------------------------------------------------------






@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., kit.Worker]]:
    """Start workers; whatever still runs at the end of the test is stopped (SIGTERM, then SIGKILL)."""
    started: list[kit.Worker] = []

    def start(settings: Settings, name: str = "worker", prefix: Sequence[str] = (),
              faults: dict[str, str] | None = None, **changes: Any) -> kit.Worker:
        worker = kit.Worker(replace(settings, **changes), tmp_path / f"{name}.log", name, prefix, faults)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=15)








# -- reading what the worker wrote -----------------------------------------------------------------------










# -- the reference: replay -------------------------------------------------------------------------------






# -- comparisons -----------------------------------------------------------------------------------------
















