"""make bench-recovery: how long a worker takes to rebuild its device table, and to take over a dead one's.

1. Fill the device table's changelog with N device states (default 1M), produced directly in the worker's
   own format (`codec.encode_state`, keyed by device ID, in the partition murmur2 gives the ID), as a worker
   that had seen N devices would have left it.
2. Rebuild: start a worker with an empty state directory and time it from its start until it has produced
   the output of a probe record in every partition (the probes were produced before it started, so their
   outputs come once the table is rebuilt). Then stop it and check that its RocksDB holds every state,
   byte for byte, and nothing else. Done for the batched restore (the worker as it is) and for Faust's own
   restore path (the same worker with `streams.state.restore.BATCHED = False`), side by side; and for a worker with
   an empty changelog (start-up alone).
   With `--guarantee exactly_once` the changelog is written in transactions, and ends in an aborted one
   that overwrites some states with junk: the rebuild must not show any of it.
3. Failover: two workers with empty state directories share the partitions; input flows at a steady rate;
   one is killed with SIGKILL; the time from the kill to the first output of each partition it held (the
   broker's append time) is measured, with `--standby-replicas 1` and with 0.

Every figure is from one run on this machine, side by side. The machine is small and may be shared: read
ratios more than absolute numbers.

    .venv/bin/python scripts/bench_recovery.py [--states N] [--guarantee exactly_once] [--skip-failover]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rocksdict import AccessType, Options, Rdict

from streams import codec
from streams.config import env_name
from streams.identity import CustomerId, DeviceState
from streams.identity.platforms import LOGIN_KEY
from streams.kafka.murmur2 import murmur2

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".cache" / "bench-recovery"
PARTITIONS = 4
TABLE = "devices"
READY_TIMEOUT = 600.0
OFFSET_KEY_PREFIXES = (b"__faust", b"\xff")  # Faust's persisted offset, today's name and the coming one


# -- the states --------------------------------------------------------------------------------------------


def device_id(i: int) -> str:
    return f"rb-{i:07d}-{(i * 2654435761) & 0xFFFFFFFF:08x}"


def state_of(i: int) -> tuple[bytes, bytes]:
    """Device i's key and stored state: a mix of what the worker stores (half logged in, some with a bound
    identity or customer IDs, a few with a changed anonymous ID)."""
    d = device_id(i)
    state = DeviceState.new(d)
    if i % 2 == 0:
        state = DeviceState(anonymous_id=d, default_id=d, login_key=LOGIN_KEY, login_value=f"user-{i}")
    if i % 3 == 0:
        state = DeviceState(anonymous_id=state.anonymous_id, default_id=d, login_key=state.login_key,
                            login_value=state.login_value, bound=(("$identity_mobile", f"139{i:08d}"),))
    if i % 5 == 0:
        state = DeviceState(anonymous_id=f"anon-{i}", default_id=d, login_key=state.login_key,
                            login_value=state.login_value, bound=state.bound,
                            customer_ids=(("userid", CustomerId(f"user-{i}", 1)),))
    # applied offsets as a state updated by forwarded records has them (sources -1..-4): they must not make
    # the worker skip the raw records the failover runs send
    return d.encode(), codec.encode_state(state, {-1 - i % PARTITIONS: i})


def partition_of(key: bytes) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


async def fill_changelog(brokers: str, topic: str, states: int, transactional: bool) -> float:
    """Produce every state to the changelog in hand-built batches per partition. Transactional: commits
    every 100k states, then an aborted transaction overwrites the first 1000 with junk."""
    producer = AIOKafkaProducer(bootstrap_servers=brokers, acks="all", linger_ms=20, max_batch_size=1 << 20,
                                max_request_size=4 << 20,
                                transactional_id=f"{topic}-fill" if transactional else None)
    await producer.start()
    started = time.monotonic()
    try:
        async def send_range(lo: int, hi: int, junk: bool = False) -> None:
            batches: dict[int, Any] = {}
            pending: list[Any] = []
            for i in range(lo, hi):
                key, value = state_of(i)
                if junk:
                    value = b"junk of an aborted transaction"
                p = partition_of(key)
                batch = batches.get(p)
                if batch is None:
                    batch = batches[p] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=p))
                    batch = batches[p] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                if len(pending) >= 32:
                    await asyncio.gather(*pending)
                    pending = []
            for p, batch in batches.items():
                if batch.record_count():
                    pending.append(await producer.send_batch(batch, topic, partition=p))
            await asyncio.gather(*pending)

        step = 100_000
        for lo in range(0, states, step):
            if transactional:
                async with producer.transaction():
                    await send_range(lo, min(lo + step, states))
            else:
                await send_range(lo, min(lo + step, states))
        if transactional:
            await producer.begin_transaction()
            await send_range(0, min(1000, states), junk=True)
            await producer.abort_transaction()
    finally:
        await producer.stop()
    return time.monotonic() - started


def verify_states(state_dir: Path, states: int) -> str:
    """Every state of the changelog in the worker's RocksDB, byte for byte, and no other device but the
    probes. Returns "ok" or what differs."""
    dbs: dict[int, Rdict] = {}
    for p in range(PARTITIONS):
        found = sorted(state_dir.rglob(f"{TABLE}-{p}.db"))
        if not found:
            return f"no RocksDB for partition {p} under {state_dir}"
        dbs[p] = Rdict(str(found[0]), Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        wrong = 0
        step = 20_000
        for lo in range(0, states, step):
            wanted: dict[int, list[tuple[bytes, bytes]]] = {}
            for i in range(lo, min(lo + step, states)):
                key, value = state_of(i)
                wanted.setdefault(partition_of(key), []).append((key, value))
            for p, items in wanted.items():
                got: list[Any] = list(dbs[p].get([k for k, _ in items]) or [])
                wrong += sum(g != v for (_, v), g in zip(items, got, strict=True))
        keys = 0
        for db in dbs.values():
            for stored in db.keys():  # noqa: SIM118 - an Rdict iterates its items
                if isinstance(stored, bytes) and not stored.startswith((*OFFSET_KEY_PREFIXES, b"probe-")):
                    keys += 1
        if wrong or keys != states:
            return f"{wrong} of {states} states differ; {keys} device keys stored"
        return "ok"
    finally:
        for db in dbs.values():
            db.close()


# -- Kafka -------------------------------------------------------------------------------------------------


async def admin_call(brokers: str, call: Any) -> Any:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers, request_timeout_ms=30_000)
    await admin.start()
    try:
        return await call(admin)
    finally:
        await admin.close()


async def create_topics(brokers: str, names: dict[str, dict[str, str]]) -> None:
    async def create(admin: Any) -> None:
        response = await admin.create_topics([NewTopic(n, PARTITIONS, 1, topic_configs=c) for n, c in names.items()])
        for name, code, *_ in response.topic_errors:
            if code:
                raise RuntimeError(f"cannot create topic {name}: error code {code}")
    await admin_call(brokers, create)
    await asyncio.sleep(1.0)


async def delete_topics(brokers: str, prefix: str) -> None:
    async def delete(admin: Any) -> None:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    with contextlib.suppress(Exception):
        await admin_call(brokers, delete)


async def end_offsets(brokers: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
        return {tp.partition: o for tp, o in ends.items()}
    finally:
        await consumer.stop()


async def last_records(brokers: str, topic: str) -> dict[int, int]:
    """Per partition, the offset of the last record a read-committed consumer sees (a changelog written in
    transactions ends in markers, and perhaps in an aborted transaction's records)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=None, isolation_level="read_committed",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        last = {tp.partition: -1 for tp in tps}
        for tp in tps:
            consumer.seek(tp, max(0, ends[tp] - 5000))
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            for tp, recs in (await consumer.getmany(timeout_ms=500)).items():
                if recs:
                    last[tp.partition] = max(last[tp.partition], recs[-1].offset)
        return last
    finally:
        await consumer.stop()


async def produce(brokers: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=brokers, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, partition=partition_of(key)) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def track(device: str, n: int) -> tuple[bytes, bytes]:
    return device.encode(), orjson.dumps({"device_id": device, "platform": "mp-wechat", "action": "track",
                                          "event": "bench", "properties": {"n": n}, "time": 1_712_000_000_000 + n})


def probe_devices(label: str) -> list[str]:
    """One device per partition, named after the run."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < PARTITIONS:
        d = f"probe-{label}-{n}"
        found.setdefault(partition_of(d.encode()), d)
        n += 1
    return [found[p] for p in range(PARTITIONS)]


class OutputWatch:
    """Reads the enriched topic (LogAppendTime) in a thread of its own: per partition, the append time of
    the first record after a moment, and of the first record of given keys."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.brokers = brokers
        self.topic = topic
        self.lock = threading.Lock()
        self.records: list[tuple[int, float, bytes]] = []  # (partition, append time s, key)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.brokers, group_id=None, auto_offset_reset="earliest",
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(self.topic, p) for p in range(PARTITIONS)])
            while not self._stop.is_set():
                got = await consumer.getmany(timeout_ms=200)
                with self.lock:
                    for tp, recs in got.items():
                        self.records.extend((tp.partition, r.timestamp / 1000, r.key or b"") for r in recs)
        finally:
            await consumer.stop()

    def first_after(self, moment: float, partitions: set[int]) -> dict[int, float]:
        out: dict[int, float] = {}
        with self.lock:
            for p, t, _ in self.records:
                if p in partitions and t > moment and p not in out:
                    out[p] = t
        return out

    def first_of(self, keys: set[bytes]) -> dict[bytes, float]:
        out: dict[bytes, float] = {}
        with self.lock:
            for _, t, k in self.records:
                if k in keys and k not in out:
                    out[k] = t
        return out

    def count(self) -> int:
        with self.lock:
            return len(self.records)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# -- the worker --------------------------------------------------------------------------------------------


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    web_port: int
    log: Path
    started: float
    log_file: IO[bytes] = field(repr=False)

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    def raw_partitions(self, raw_topic: str) -> set[int]:
        return {int(m) for m in re.findall(rf'streams_consumer_lag{{topic="{re.escape(raw_topic)}",partition="(\d+)"}}',
                                           self.metrics())}

    def restored(self) -> dict[str, int]:
        return {r: int(float(n)) for r, n in re.findall(r'streams_restored_records_total{role="(\w+)"} (\S+)',
                                                        self.metrics())}

    def standby_offsets(self) -> dict[int, int]:
        return {int(p): int(float(o)) for p, o in
                re.findall(r'streams_restored_offset{role="standby",partition="(\d+)"} (\S+)', self.metrics())}

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log_file.close()

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RUN_FAUST_PATH = ("import sys, streams.state.restore; streams.state.restore.BATCHED = False; "
                  "from streams.cli import main; sys.exit(main(['worker']))")


def start_worker(name: str, settings: dict[str, Any], *, faust_path: bool = False) -> Worker:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    env.update({env_name(k): str(v) for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    log = RUN_DIR / f"{name}.log"
    log_file = open(log, "wb")  # noqa: SIM115 - closed when the worker stops
    argv = [sys.executable, "-c", RUN_FAUST_PATH] if faust_path else [sys.executable, "-m", "streams", "worker"]
    started = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return Worker(name, proc, int(settings["web_port"]), log, started, log_file)


def wait_until(what: str, ok: Any, workers: list[Worker], timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        for w in workers:
            if not w.alive():
                raise RuntimeError(f"{w.name} exited with {w.proc.returncode} while waiting for {what}:\n{w.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f}s\n" + "\n".join(w.tail() for w in workers))
        time.sleep(0.1)


# -- the runs ----------------------------------------------------------------------------------------------


@dataclass
class Names:
    stamp: str
    guarantee: str

    @property
    def group(self) -> str:
        return f"{self.stamp}-g"

    def topic(self, which: str) -> str:
        return f"{self.stamp}.{which}"

    @property
    def changelog(self) -> str:
        return f"{self.group}-{TABLE}-changelog"

    def settings(self, name: str, group: str | None = None, **more: Any) -> dict[str, Any]:
        state_dir = RUN_DIR / "state" / name
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        return {"brokers": BROKERS, "raw_topic": self.topic("raw"), "enriched_topic": self.topic("enriched"),
                "dead_letter_topic": self.topic("dead"), "group": group or self.group, "state_dir": state_dir,
                "web_port": free_port(), "processing_guarantee": self.guarantee, "log_level": "warning", **more}


@dataclass
class Rebuild:
    label: str
    states: int
    seconds: float
    check: str
    restored: dict[str, int]


def rebuild(names: Names, watch: OutputWatch, label: str, states: int, *, faust_path: bool = False,
            group: str | None = None) -> Rebuild:
    settings = names.settings(label, group)
    probes = probe_devices(label)
    asyncio.run(produce(BROKERS, names.topic("raw"), [track(d, i) for i, d in enumerate(probes)]))
    keys = {d.encode() for d in probes}
    worker = start_worker(label, settings, faust_path=faust_path)
    try:
        wait_until(f"{label}: the probes' outputs", lambda: len(watch.first_of(keys)) == len(keys), [worker])
        seconds = max(watch.first_of(keys).values()) - worker.started
        restored = worker.restored()
    finally:
        code = worker.stop()
    if code != 0:
        raise RuntimeError(f"{label}: the worker exited with {code}:\n{worker.tail()}")
    check = verify_states(Path(settings["state_dir"]), states) if states else "-"
    return Rebuild(label, states, seconds, check, restored)


@dataclass
class Failover:
    standby: int
    moved: set[int]
    seconds_first: float
    seconds_all: float
    restored_after_kill: int
    standby_cpu: float  # CPU seconds of the survivor while input flowed before the kill (per second)
    complete: str


def failover(names: Names, watch: OutputWatch, standby: int, rate: int) -> Failover:
    label = f"failover-standby{standby}"
    a = start_worker(f"{label}-a", names.settings(f"{label}-a", standby_replicas=standby))
    b = start_worker(f"{label}-b", names.settings(f"{label}-b", standby_replicas=standby))
    workers = [a, b]
    raw = names.topic("raw")
    stop_input = threading.Event()
    produced: list[int] = [0]
    try:
        def split() -> bool:
            pa, pb = a.raw_partitions(raw), b.raw_partitions(raw)
            return len(pa) == 2 and len(pb) == 2 and not pa & pb
        wait_until(f"{label}: two workers holding two partitions each", split, workers)
        probes = probe_devices(label)
        asyncio.run(produce(BROKERS, raw, [track(d, i) for i, d in enumerate(probes)]))
        keys = {d.encode() for d in probes}
        wait_until(f"{label}: the probes' outputs", lambda: len(watch.first_of(keys)) == len(keys), workers)
        moved = a.raw_partitions(raw)
        if standby:
            last = asyncio.run(last_records(BROKERS, names.changelog))

            def caught_up() -> bool:
                offsets = b.standby_offsets()
                return all(offsets.get(p, -1) >= last[p] for p in moved)
            wait_until(f"{label}: the standbys caught up", caught_up, workers)

        def feed() -> None:
            async def run() -> None:
                producer = AIOKafkaProducer(bootstrap_servers=BROKERS, acks="all", linger_ms=5)
                await producer.start()
                try:
                    n = 0
                    tick = time.monotonic()
                    while not stop_input.is_set():
                        for _ in range(rate // 10):
                            key, value = track(device_id((n * 7919) % STATES), n)
                            await producer.send(raw, value, key=key, partition=partition_of(key))
                            n += 1
                        await producer.flush()
                        tick += 0.1
                        await asyncio.sleep(max(0.0, tick - time.monotonic()))
                finally:
                    await producer.stop()
                    produced[0] = n
            asyncio.run(run())
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        time.sleep(3)
        cpu0, t0 = b.cpu_seconds(), time.monotonic()
        time.sleep(5)
        standby_cpu = (b.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        restored_before = b.restored().get("active", 0)
        killed = time.time()
        a.kill()
        wait_until(f"{label}: output from the moved partitions {sorted(moved)}",
                   lambda: len(watch.first_after(killed + 1.0, moved)) == len(moved), [b], timeout=300)
        firsts = watch.first_after(killed + 1.0, moved)
        restored_after = b.restored().get("active", 0) - restored_before
        time.sleep(2)
        stop_input.set()
        feeder.join(60)
        complete = outputs_complete(names, watch, b)
        return Failover(standby, moved, min(firsts.values()) - killed, max(firsts.values()) - killed,
                        restored_after, standby_cpu, complete)
    finally:
        stop_input.set()
        for w in workers:
            if w.alive():
                w.stop()


def outputs_complete(names: Names, watch: OutputWatch, survivor: Worker) -> str:
    """Whether every raw record has its output (at-least-once may repeat some): the survivor's lag falls to
    zero and the enriched topic holds at least as many records as the raw topic."""
    deadline = time.monotonic() + 120
    raw_total = 0
    while time.monotonic() < deadline:
        raw_total = sum(asyncio.run(end_offsets(BROKERS, names.topic("raw"))).values())
        if watch.count() >= raw_total:
            return f"ok ({watch.count():,} outputs for {raw_total:,} inputs)"
        time.sleep(1)
    print(f"bench-recovery: outputs missing; the survivor's log ends with:\n{survivor.tail()}", file=sys.stderr)
    return f"INCOMPLETE: {watch.count():,} outputs for {raw_total:,} inputs"


# -- the report --------------------------------------------------------------------------------------------


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    cores = len(os.sched_getaffinity(0))
    return (f"{cores} CPUs ({model.group(1).strip() if model else platform.machine()})"
            + (f", {int(mem.group(1)) / 2**20:.1f} GiB RAM" if mem else ""))


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    print(f"bench-recovery: {text} ...", flush=True)
    t = time.monotonic()
    yield
    print(f"bench-recovery:   done in {time.monotonic() - t:.1f}s", flush=True)


BROKERS = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"
STATES = 1_000_000


def main(argv: list[str] | None = None) -> int:
    global BROKERS, STATES
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", default=BROKERS)
    parser.add_argument("--states", type=int, default=STATES, help="device states in the changelog")
    parser.add_argument("--guarantee", default="at_least_once", choices=["at_least_once", "exactly_once"])
    parser.add_argument("--rate", type=int, default=2000, help="input records/s during the failover runs")
    parser.add_argument("--skip-faust-path", action="store_true", help="no rebuild through Faust's own path")
    parser.add_argument("--skip-failover", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the topics and state directories")
    args = parser.parse_args(argv)
    BROKERS, STATES = args.brokers, args.states
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    names = Names(f"rb{int(time.time())}", args.guarantee)
    lines = [f"machine: {machine()}; Python {platform.python_version()}; {args.guarantee}; "
             f"{PARTITIONS} partitions; one Kafka broker on the same machine", ""]
    watch: OutputWatch | None = None
    try:
        with step("creating the topics"):
            asyncio.run(create_topics(BROKERS, {
                names.topic("raw"): {}, names.topic("enriched"): {"message.timestamp.type": "LogAppendTime"},
                names.topic("dead"): {}, names.changelog: {"cleanup.policy": "compact"},
                f"{names.group}-empty-{TABLE}-changelog": {"cleanup.policy": "compact"}}))
        with step(f"filling the changelog with {STATES:,} device states"):
            took = asyncio.run(fill_changelog(BROKERS, names.changelog, STATES, args.guarantee == "exactly_once"))
            print(f"bench-recovery:   {STATES / took:,.0f} states/s produced")
        watch = OutputWatch(BROKERS, names.topic("enriched"))
        runs: list[Rebuild] = []
        with step("start-up with an empty changelog"):
            runs.append(rebuild(names, watch, "empty-changelog", 0, group=f"{names.group}-empty"))
        with step(f"rebuild of {STATES:,} states, batched restore"):
            runs.append(rebuild(names, watch, "batched", STATES))
        if not args.skip_faust_path:
            with step(f"rebuild of {STATES:,} states, Faust's own restore path"):
                runs.append(rebuild(names, watch, "faust-path", STATES, faust_path=True))
        lines += ["| rebuild from the changelog | states | seconds (start to first output in every partition) "
                  "| states/s | restored records (metric) | RocksDB equals the changelog |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in runs:
            rate = f"{r.states / r.seconds:,.0f}" if r.states else "-"
            lines.append(f"| {r.label} | {r.states:,} | {r.seconds:.1f} | {rate} | "
                         f"{r.restored.get('active', 0):,} | {r.check} |")
        failed = any(r.check not in ("ok", "-") for r in runs)
        if not args.skip_failover:
            fails = []
            for standby in (1, 0):
                with step(f"failover, standby replicas {standby}"):
                    fails.append(failover(names, watch, standby, args.rate))
            lines += ["", "| failover (kill -9 of one of two workers) | moved partitions | kill to first output "
                      "of a moved partition, s | kill to output of every moved partition, s | changelog records "
                      "the survivor read after the kill | survivor CPU before the kill | outputs |",
                      "|---|---|---:|---:|---:|---:|---|"]
            for f in fails:
                lines.append(f"| standby replicas {f.standby} | {sorted(f.moved)} | {f.seconds_first:.1f} | "
                             f"{f.seconds_all:.1f} | {f.restored_after_kill:,} | {f.standby_cpu * 100:.0f}% | "
                             f"{f.complete} |")
                failed = failed or not f.complete.startswith("ok")
            lines.append("")
            lines.append(f"(input {args.rate:,} records/s over the {STATES:,} devices; session timeout 10 s, the "
                         "default: the group notices a killed worker only then)")
    finally:
        if watch is not None:
            watch.stop()
        if not args.keep:
            asyncio.run(delete_topics(BROKERS, names.stamp))
            shutil.rmtree(RUN_DIR / "state", ignore_errors=True)
    report = "\n".join(lines)
    print()
    print(report)
    (RUN_DIR / "last.md").write_text(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
