"""The real broker for the integration tests, unique topics per test, and the worker as a subprocess.

Lives here: the `kafka` session fixture (a broker on 127.0.0.1:9092, started with `scripts/kafka.sh start`
when none answers, and stopped at the end only then; the session fails when it cannot start one), the
`topics` fixture (fresh topic names, group and state dir as a `config.Settings`, the raw topic created with 4
partitions, everything the test made deleted afterwards), the same on three brokers (`kafka_cluster`, started
with `scripts/kafka.sh cluster-start` by the first test that asks for it; `cluster` brings every node back up
after a test that killed one; `cluster_topics`), `Worker` (`python -m streams worker` with those
settings as STREAMS_* variables), `wait_for_outputs` (polls the enriched and dead-letter topics until they
hold N records), `replay_outputs` (what `python -m streams replay` makes of the same input) and the
comparisons the tests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import NewTopic

from streams.config import Settings, env_name
from streams.kafka import admin as kafka_admin
from streams.kafka import clients as kafka_clients
from tests.conftest import ROOT, validate

KAFKA_SH = ROOT / "scripts" / "kafka.sh"
BOOTSTRAP = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"  # where scripts/kafka.sh puts it
PARTITIONS = 4
RECORD_ID = re.compile(r"[a-zA-Z0-9._-]+:[0-9]+:[0-9]+:[0-9]+")
OUTPUT_TIMEOUT = 120.0
READY_TIMEOUT = 90.0


# -- the broker ------------------------------------------------------------------------------------------


def _kafka_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(KAFKA_SH), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


async def _admin_call(brokers: str, call: Callable[[Any], Any]) -> Any:
    # the project's admin client: it asks a broker that answers, also with one of three down
    admin = kafka_admin.Admin(bootstrap_servers=brokers, request_timeout_ms=15_000)
    await admin.start()
    try:
        return await call(admin)
    finally:
        await admin.close()


@contextlib.contextmanager
def _one_at_a_time(name: str) -> Iterator[None]:
    """Across the test processes of one `pytest -n` run: one starts the broker (or the cluster), the others wait
    for it and find it up."""
    lock_dir = ROOT / ".cache"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    with _one_at_a_time("kafka"):
        if _kafka_sh("status", timeout=120).returncode != 0:
            # on a fresh machine this downloads the broker's jars first
            run = _kafka_sh("start", timeout=1800)
            if run.returncode != 0:
                pytest.fail(f"`bash scripts/kafka.sh start` failed with exit code {run.returncode}:\n"
                            f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}", pytrace=False)
            started = _stop_at_the_end()
    try:
        asyncio.run(asyncio.wait_for(_admin_call(BOOTSTRAP, lambda a: a.list_topics()), 60))
    except Exception as e:
        pytest.fail(f"the broker on {BOOTSTRAP} does not answer the admin API: {e!r}", pytrace=False)
    yield BOOTSTRAP
    if started:
        _kafka_sh("stop", timeout=120)


# -- per-test topics -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _create_topic(brokers: str, topic: str, partitions: int) -> None:
    async def create(admin: Any) -> None:
        # -1: the brokers' default.replication.factor (3 on the cluster)
        response = await admin.create_topics([NewTopic(topic, partitions, -1, replica_assignments={})])
        for name, code, *message in response.topic_errors:
            assert code == 0, f"cannot create topic {name}: error {code} {message}"

    await _admin_call(brokers, create)


async def _delete_topics(brokers: str, prefix: str) -> None:
    async def delete(admin: Any) -> None:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)

    await _admin_call(brokers, delete)


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
        group=name,
        state_dir=str(tmp_path / "state"),
        partitions=PARTITIONS,
        web_port=free_port(),
        log_level="info",
    )
    asyncio.run(_create_topic(brokers, settings.raw_topic, PARTITIONS))
    deadline = time.monotonic() + 15
    while asyncio.run(kafka_admin.partition_count(settings, settings.raw_topic)) != PARTITIONS:
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
        assert run.returncode == 0, f"scripts/kafka.sh {' '.join(args)}: exit {run.returncode}\n{run.stderr[-3000:]}"

    def kill(self, node: int) -> None:
        """SIGKILL, as a crash or a power loss would."""
        self._run("cluster-kill", str(node))

    def wipe(self, node: int) -> None:
        """SIGKILL, and its data deleted: a lost disk."""
        self._run("cluster-wipe-node", str(node))

    def start(self, node: int) -> None:
        self._run("cluster-start-node", str(node))

    def up(self) -> set[int]:
        run = _kafka_sh("cluster-status", timeout=120)
        return {int(line.split()[1].rstrip(":")) for line in run.stdout.splitlines() if ": up " in line}

    def all_up(self) -> None:
        self._run("cluster-start")


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[Cluster]:
    """Three brokers (scripts/kafka.sh cluster-start), for the tests that need them only; stopped at the end
    when this session started them. Never skips: a cluster that does not come up is a failure."""
    with _one_at_a_time("kafka-cluster"):
        started = _kafka_sh("cluster-status", timeout=120).returncode != 0
        if started:
            run = _kafka_sh("cluster-start", timeout=1800)
            if run.returncode != 0:
                pytest.fail(f"`bash scripts/kafka.sh cluster-start` failed with exit code {run.returncode}:\n"
                            f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}", pytrace=False)
    # the cluster's tests run in one process (`xdist_group`), so the one that started it may stop it
    brokers = _kafka_sh("cluster-brokers", timeout=60).stdout.strip()
    try:
        asyncio.run(asyncio.wait_for(_admin_call(brokers, lambda a: a.list_topics()), 60))
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
    kafka_cluster.all_up()


@pytest.fixture
def cluster_topics(cluster: Cluster, tmp_path: Path) -> Iterator[Settings]:
    """As `topics`, on the three-broker cluster (replication factor 3 by the brokers' default)."""
    with fresh_topics(cluster.brokers, tmp_path) as settings:
        yield settings


# -- the worker ------------------------------------------------------------------------------------------


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            env[env_name(f.name)] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """`python -m streams worker` with `settings` in its environment; output in `log_path`."""

    def __init__(self, settings: Settings, log_path: Path, name: str = "worker", prefix: Sequence[str] = ()) -> None:
        self.settings = settings
        self.name = name
        self.log_path = log_path
        self.expected_exit = False
        self.forced = False
        with open(log_path, "ab") as log:
            log.write(f"---- {name}: python -m streams worker, state_dir={settings.state_dir}, "
                      f"web_port={settings.web_port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                # `prefix`: where it runs, e.g. `ip netns exec HOST` (a test host, scripts/testhosts.py)
                [*prefix, sys.executable, "-m", "streams", "worker"],
                cwd=ROOT, env=worker_env(settings), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def errors(self) -> list[str]:
        """The log's ERROR and CRITICAL lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if "[ERROR]" in line or "[CRITICAL]" in line]

    def check_alive(self) -> None:
        if not self.alive:
            pytest.fail(f"worker {self.name} exited with code {self.proc.returncode} "
                        f"(log {self.log_path}):\n{self.log_tail()}", pytrace=False)

    def wait_ready(self, timeout: float = READY_TIMEOUT, members: int = 1) -> float:
        """Until the worker's web port answers and the group is stable with `members` members that hold
        all raw partitions between them; returns the seconds it took since the start."""
        deadline = time.monotonic() + timeout
        port_open = False
        last = "web port closed"
        while time.monotonic() < deadline:
            self.check_alive()
            if not port_open:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.settimeout(0.5)
                    port_open = s.connect_ex((self.settings.web_bind, self.settings.web_port)) == 0
            if port_open:
                state, assignments = group_assignment(self.settings)
                held = set().union(*assignments) if assignments else set()
                last = f"group {state}, raw partitions per member {assignments}"
                if (state == "Stable" and len(assignments) == members and all(assignments)
                        and held == set(range(self.settings.partitions))):
                    return time.monotonic() - self.started
            time.sleep(0.25)
        pytest.fail(f"worker {self.name} not ready after {timeout:.0f}s ({last}); log:\n{self.log_tail()}",
                    pytrace=False)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM; SIGKILL when it has not exited after `timeout` seconds. Returns the exit code (a negative
        signal number when killed); `self.forced` says whether SIGKILL was needed."""
        self.expected_exit = True
        self.forced = False
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.forced = True
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def kill(self) -> int:
        self.expected_exit = True
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)
        return int(self.proc.returncode)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers; whatever still runs at the end of the test is stopped (SIGTERM, then SIGKILL)."""
    started: list[Worker] = []

    def start(settings: Settings, name: str = "worker", prefix: Sequence[str] = (), **changes: Any) -> Worker:
        worker = Worker(replace(settings, **changes), tmp_path / f"{name}.log", name, prefix)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=15)


def group_assignment(settings: Settings) -> tuple[str, list[set[int]]]:
    """The group's state and, per member, the raw-topic partitions it holds."""
    try:
        return asyncio.run(kafka_admin.group_assignment(settings))
    except Exception as e:
        return f"unknown ({e!r})", []


def wait_for_group(settings: Settings, ok: Callable[[str, list[set[int]]], bool], timeout: float, what: str,
                   log: Callable[[], str] = lambda: "") -> None:
    """Poll the group's state and assignment until `ok(state, held)`; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    state, held = group_assignment(settings)
    while not ok(state, held):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {state} {held}\n{log()}")
        time.sleep(0.05)
        state, held = group_assignment(settings)


def held_by_one(state: str, held: list[set[int]]) -> bool:
    return state == "Stable" and held == [set(range(PARTITIONS))]


# -- reading what the worker wrote -----------------------------------------------------------------------


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


def _read(settings: Settings, topic: str) -> list[Any]:
    try:
        return asyncio.run(kafka_clients.read_all(settings, topic, idle_timeout=5.0))
    except kafka_admin.TopicMissing:
        return []


def read_outputs(settings: Settings) -> Outputs:
    return Outputs(_read(settings, settings.enriched_topic), _read(settings, settings.dead_letter_topic))


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
        enriched = _read(settings, settings.enriched_topic)
        dead = _read(settings, settings.dead_letter_topic)
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


# -- the reference: replay -------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: Iterable[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


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


# -- comparisons -----------------------------------------------------------------------------------------


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def by_device(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[r["device_id"]].append(r)
    return dict(out)


def enriched_by_device(records: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    """Enriched Kafka records per device in partition order; each must be keyed by its device_id, and all
    of a device's records must sit in one partition (else their order means nothing)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    wrong_keys = []
    first_copy: dict[str, bytes] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = orjson.loads(r.value)
        device_id = value["device_id"]
        # the worker's record id names the raw record (topic:partition:offset:n); replay has none to give.
        # A record written twice (after a crash) must be byte for byte the first copy
        record_id = value.pop("record_id")
        assert RECORD_ID.fullmatch(record_id), record_id
        assert first_copy.setdefault(record_id, r.value) == r.value, f"{record_id}: a repeat that differs"
        if r.key != device_id.encode():
            wrong_keys.append(f"p{r.partition}@{r.offset}: key {r.key!r}, device_id {device_id!r}")
        partitions[device_id].add(r.partition)
        out[device_id].append(value)
    assert not wrong_keys, f"{len(wrong_keys)} enriched records not keyed by their device_id: {wrong_keys[:5]}"
    split = {d: sorted(p) for d, p in partitions.items() if len(p) > 1}
    assert not split, f"{len(split)} devices have enriched records in several partitions: {list(split.items())[:5]}"
    return dict(out)


def _brief(record: dict[str, Any] | None) -> str:
    return "(none)" if record is None else orjson.dumps(record).decode()[:400]


def assert_same_per_device(actual: dict[str, list[dict[str, Any]]], expected: dict[str, list[dict[str, Any]]],
                           what: str = "replay") -> None:
    """Each device's sequence of records equals `expected`'s (records of different devices may interleave)."""
    problems = []
    for device_id in sorted(expected.keys() | actual.keys()):
        a, e = actual.get(device_id, []), expected.get(device_id, [])
        if a == e:
            continue
        i = next((i for i, (x, y) in enumerate(zip(a, e, strict=False)) if x != y), min(len(a), len(e)))
        problems.append(
            f"device {device_id!r}: {len(a)} records, {what} has {len(e)}; first difference at #{i}:\n"
            f"    got:      {_brief(a[i] if i < len(a) else None)}\n"
            f"    expected: {_brief(e[i] if i < len(e) else None)}"
        )
    assert not problems, (f"{len(problems)} of {len(expected)} devices differ from {what}:\n"
                          + "\n".join(problems[:5]))


def without_repeats(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Records with every exact repeat of an earlier one dropped, and how many were dropped."""
    seen: set[bytes] = set()
    kept = []
    for r in records:
        c = canonical(r)
        if c not in seen:
            seen.add(c)
            kept.append(r)
    return kept, len(records) - len(kept)


def dead_letters_without_source(letters: Iterable[dict[str, Any]]) -> Counter[bytes]:
    return Counter(canonical({k: v for k, v in d.items() if k != "source"}) for d in letters)


def assert_sources_in(letters: Iterable[dict[str, Any]], settings: Settings) -> None:
    for d in letters:
        source = d["source"]
        assert set(source) == {"topic", "partition", "offset"}, d
        assert source["topic"] == settings.raw_topic, d
        assert 0 <= source["partition"] < settings.partitions, d
