"""make bench-recovery's parts: the device states it fills a changelog with (in the worker's own format) and
checks the rebuilt RocksDB against, the probe and feed records, the worker, and a watch on the enriched topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from rocksdict import AccessType, Options, Rdict

from harness.broker import PARTITIONS, batch_producer, partition_of, send_batches, tps_of
from harness.children import Worker
from streams import codec
from streams.identity import CustomerId, DeviceState
from streams.identity.platforms import LOGIN_KEY

TABLE = "devices"
READY_TIMEOUT = 600.0
OFFSET_KEY_PREFIXES = (b"__faust", b"\xff")  # Faust's persisted offset, today's name and the coming one
# the worker with Faust's own restore path instead of the batched one
RUN_FAUST_PATH = ("import sys, streams.state.restore; streams.state.restore.BATCHED = False; "
                  "from streams.cli import main; sys.exit(main(['worker']))")


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


def states_in(lo: int, hi: int, junk: bool = False) -> Iterator[tuple[bytes | None, bytes, int]]:
    """States lo..hi as (key, value, partition); `junk`: their values junk (an aborted transaction's)."""
    for i in range(lo, hi):
        key, value = state_of(i)
        yield key, b"junk of an aborted transaction" if junk else value, partition_of(key)


async def fill_changelog(brokers: str, topic: str, states: int, transactional: bool) -> float:
    """Produce every state to the changelog in hand-built batches per partition. Transactional: commits
    every 100k states, then an aborted transaction overwrites the first 1000 with junk."""
    producer = batch_producer(brokers, f"{topic}-fill" if transactional else None)
    await producer.start()
    started = time.monotonic()
    try:
        step = 100_000
        for lo in range(0, states, step):
            async with producer.transaction() if transactional else contextlib.nullcontext():
                await send_batches(producer, topic, states_in(lo, min(lo + step, states)))
        if transactional:
            await producer.begin_transaction()
            await send_batches(producer, topic, states_in(0, min(1000, states), junk=True))
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
            for key, value, p in states_in(lo, min(lo + step, states)):
                assert key is not None
                wanted.setdefault(p, []).append((key, value))
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


async def produce(brokers: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Each (key, value) to the partition murmur2 gives its key."""
    producer = batch_producer(brokers)
    await producer.start()
    try:
        await send_batches(producer, topic, ((key, value, partition_of(key)) for key, value in messages))
    finally:
        await producer.stop()


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
            consumer.assign(tps_of(self.topic))
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


def wait_until(what: str, ok: Callable[[], bool], workers: list[Worker], timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        for w in workers:
            if not w.alive():
                raise RuntimeError(f"{w.name} exited with {w.returncode} while waiting for {what}:\n{w.tail(20)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f}s\n" + "\n".join(w.tail(20) for w in workers))
        time.sleep(0.1)
