"""The fakes every broker-less test of the worker's batch step uses: a broker, its transactional producers, and a
partition's RocksDB database.

- `Broker`: topics as lists of records, where a record's offset is its index. A send to a topic in `fail_on`
  fails with probability `failure_rate` (a crash in the middle of a batch). Its transactional producers
  (`Broker.producers()`, as `streams.kafka.transactions.PartitionProducers`) behave as Kafka's do for a reader that
  reads committed records: a transaction's records take their offsets at once, a commit appends a marker (an
  offset no record holds) to each partition written, and the records of a transaction that never committed
  stay in the log, aborted. `Broker.visible` is what such a reader sees.
- `DB`: a dict answering as rocksdict does: multi-get, write batches with deletions, ordered reads.
- `run_worker`: a worker's consumer over the fake broker, in batches of random sizes, with a crash and a
  restart from the committed offsets whenever a batch fails.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.kafka.transactions import PartitionProducers
from streams.worker.batch import BatchResult, Pipeline


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int | None = None
    control: bool = False  # a transaction's commit marker: no consumer sees it
    aborted: bool = False  # of a transaction that never committed: a reader of committed records skips it


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


class Crash(Exception):
    """The fake broker went away in the middle of a batch."""


class Meta:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset


class FakeBatch:
    """Three messages at most: a batch's changelog spans several record batches, and a crash can leave some
    of them written and not the others."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any, headers: Any) -> object | None:
        if len(self.messages) >= 3:
            return None
        self.messages.append((key, value, list(headers)))
        return object()

    def close(self) -> None:
        pass


class Broker:
    def __init__(self, rng: random.Random, failure_rate: float = 0.0, fail_on: set[str] | None = None) -> None:
        self.logs: dict[tuple[str, int], list[Record]] = defaultdict(list)
        self.clock = 1_700_000_000_000
        self.committed: dict[tuple[str, int], int] = defaultdict(int)
        self.rng = rng
        self.failure_rate = failure_rate
        self.fail_on = fail_on or set()
        self.epochs: dict[str, int] = defaultdict(int)  # per transactional ID, the newest producer's

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, partition: int) -> asyncio.Future[Meta]:
        return self._append(batch, topic, partition)

    def _append(self, batch: FakeBatch, topic: str, partition: int, into: list[Record] | None = None
                ) -> asyncio.Future[Meta]:
        if topic in self.fail_on and self.rng.random() < self.failure_rate:
            raise Crash(topic)
        log = self.logs[(topic, partition)]
        first = len(log)
        for key, value, headers in batch.messages:
            self.clock += 1  # a real record always has a timestamp: the producer's clock, here a count
            record = Record(topic, partition, len(log), key, value, headers, self.clock)
            log.append(record)
            if into is not None:
                into.append(record)
        future: asyncio.Future[Meta] = asyncio.get_running_loop().create_future()
        future.set_result(Meta(topic, partition, first))
        return future

    def visible(self, topic: str, partition: int, start: int = 0, count: int | None = None) -> list[Record]:
        """The records at offsets [start, start + count) that a reader of committed records sees."""
        log = self.logs[(topic, partition)]
        end = len(log) if count is None else start + count
        return [r for r in log[start:end] if not (r.control or r.aborted)]

    def producers(self, partitions: int, group: str = "g") -> PartitionProducers:
        """Transactional producers for a worker that owns every partition, opened (as `own` does: each fences
        the one opened before it for the same partition)."""
        producers = PartitionProducers(group, lambda transactional_id: TransactionalProducer(self, transactional_id))
        for p in range(partitions):
            producer = TransactionalProducer(self, producers.transactional_id(p))
            producer.open()
            producers.producers[p] = producer  # type: ignore[assignment]
        return producers


class TransactionalProducer:
    """One transactional ID's producer: opening it fences the earlier one of the same ID."""

    def __init__(self, broker: Broker, transactional_id: str) -> None:
        self.broker = broker
        self.transactional_id = transactional_id
        self.epoch = -1
        self.pending: list[Record] | None = None  # the open transaction's records
        self.offsets: dict[tuple[str, int], int] = {}

    async def start(self) -> None:
        self.open()

    def open(self) -> None:
        self.broker.epochs[self.transactional_id] += 1
        self.epoch = self.broker.epochs[self.transactional_id]

    async def stop(self) -> None:
        self._abort()

    def _check(self) -> None:
        if self.epoch != self.broker.epochs[self.transactional_id]:
            self._abort()
            raise Crash(f"{self.transactional_id}: fenced")

    def _abort(self) -> None:
        for record in self.pending or ():
            record.aborted = True
        self.pending = None
        self.offsets = {}

    async def begin_transaction(self) -> None:
        self._check()
        assert self.pending is None, "a transaction is already open"
        self.pending = []

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, partition: int) -> asyncio.Future[Meta]:
        self._check()
        assert self.pending is not None, "a transactional send outside a transaction"
        return self.broker._append(batch, topic, partition, self.pending)

    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group: str) -> None:
        self._check()
        self.offsets.update({(tp.topic, tp.partition): o for tp, o in offsets.items()})

    async def abort_transaction(self) -> None:
        """Its records aborted, each of their partitions closed by a marker; a fenced producer cannot."""
        self._check()
        assert self.pending is not None
        touched = dict.fromkeys((r.topic, r.partition) for r in self.pending)
        self._abort()
        self._markers(touched)

    def _markers(self, partitions: Iterable[tuple[str, int]]) -> None:
        for topic, partition in partitions:
            log = self.broker.logs[(topic, partition)]
            log.append(Record(topic, partition, len(log), None, None, control=True))

    async def commit_transaction(self) -> None:
        self._check()
        assert self.pending is not None
        self._markers(dict.fromkeys((r.topic, r.partition) for r in self.pending))
        self.broker.committed.update(self.offsets)
        self.pending = None
        self.offsets = {}


class DB(dict[bytes, bytes]):
    """A partition's RocksDB as rocksdict answers: `get` of a list of keys is one multi-get."""

    def get(self, key: Any, default: Any = None) -> Any:  # type: ignore[override]
        if isinstance(key, list):
            return [super(DB, self).get(k) for k in key]
        return super().get(key, default)

    def write(self, batch: list[tuple[bytes, bytes | None]]) -> None:
        for key, value in batch:
            if value is None:
                self.pop(key, None)
            else:
                self[key] = value

    def items(self, backwards: bool = False, from_key: Any = None) -> Iterator[tuple[bytes, bytes]]:  # type: ignore[override]
        for key in sorted(self):
            if from_key is None or key >= from_key:
                yield key, self[key]


def recover(broker: Broker, db: DB, changelog: str, partition: int, offset_key: bytes) -> None:
    """What Faust's table recovery does on restart: the changelog's committed records past the stored offset,
    into RocksDB (a record without value is a deletion)."""
    start = int(db.get(offset_key, b"-1")) + 1
    log = broker.logs[(changelog, partition)]
    for rec in broker.visible(changelog, partition, start):
        assert rec.key is not None
        db.write([(rec.key, rec.value)])
    if log:
        db[offset_key] = str(len(log) - 1).encode()


def run_worker(broker: Broker, rng: random.Random, new_worker: Callable[[], Pipeline], recover: Callable[[], None],
               inputs: Sequence[str], partitions: int, *, take: int, steps: int) -> int:
    """Consume `inputs` in batches of 0 to `take` records per partition until all are read (what the batches
    write to them is read too); a batch that fails is a crash: the table is recovered and a new worker (nothing
    in memory) starts from the committed offsets. Returns the crash count."""
    crashes = 0

    async def run() -> None:
        nonlocal crashes
        worker = new_worker()
        positions = dict(broker.committed)
        for _ in range(steps):
            batch: dict[TP, list[Record]] = {}
            for p in range(partitions):
                for topic in inputs:
                    start = positions.get((topic, p), 0)
                    n = rng.randint(0, take)
                    records = broker.visible(topic, p, start, n)
                    if records:
                        batch[TP(topic, p)] = records
                    positions[(topic, p)] = min(start + n, len(broker.logs[(topic, p)]))
            if not batch:
                if all(positions.get((topic, p), 0) >= len(broker.logs[(topic, p)])
                       for topic in inputs for p in range(partitions)):
                    return
                continue
            try:
                ends = {(topic, p): len(broker.logs[(topic, p)]) for topic in inputs for p in range(partitions)}
                result: BatchResult = await worker.process(batch, dict(positions), ends)
            except Crash:
                crashes += 1
                recover()
                worker = new_worker()
                positions = dict(broker.committed)
                continue
            for tp, offset in result.commit.items():
                broker.committed[(tp.topic, tp.partition)] = offset
            for tp, offset in result.rewind.items():
                positions[(tp.topic, tp.partition)] = offset
        raise AssertionError("the worker did not finish")

    asyncio.run(run())
    return crashes
