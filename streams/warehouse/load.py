"""The load: the topics of `tables.TABLES` into a DuckDB file, chunk by chunk, each chunk with its offsets.

No consumer group: the loader holds every partition of its topics (`assign`), seeks each to the offset the file
stores for it (the topic's beginning when none), reads committed records only, and writes each chunk's rows
with the offsets after them in one DuckDB transaction. Without `follow` it stops at the end offsets it saw at
the start (the last stable offsets: records of transactions still open then are left to the next run). A chunk
is written in a thread while the next one is fetched (`Writer`), one chunk at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.config import Settings
from streams.kafka.admin import partition_count
from streams.progress import ProgressLine
from streams.warehouse import CHUNK_RECORDS
from streams.warehouse.database import Offsets, Warehouse
from streams.warehouse.tables import TABLES, Columns, Table, TableRows, rows_of

log = logging.getLogger(__name__)

FOLLOW_FLUSH_SECONDS = 1.0  # with --follow: how long records wait for a chunk to fill
FETCH_BYTES = 4 * 1024 * 1024  # per partition: larger than the largest record the worker writes (1,000,000 bytes)
# records per getmany: aiokafka builds them all before it returns, and Python's garbage collector walks the
# ones alive at each of its collections; a chunk is read in several
FETCH_RECORDS = 10_000


class NothingToLoad(Exception):
    """None of the tables' topics exists."""


@dataclass
class LoadReport:
    """What a load read and wrote; `missing` lists the topics that did not exist."""

    records: int = 0
    per_table: dict[str, int] = field(default_factory=dict)
    total: int = 0  # records to read at the start (the end offsets less the stored ones: markers included)
    missing: list[str] = field(default_factory=list)
    chunks: int = 0


class Progress:
    """The load's progress line: records and rate, and the share read of what there was at the start."""

    def __init__(self, stream: TextIO, interval: float | None = None) -> None:
        self.line = ProgressLine("load", stream, interval)

    def update(self, report: LoadReport, following: bool) -> None:
        elapsed = self.line.due()
        if elapsed is None:
            return
        rate = ProgressLine.rate(report.records, elapsed)
        if following or not report.total:
            self.line.show(f"{report.records:,} records, {rate:,.0f}/s" + (", following" if following else ""),
                           elapsed)
        else:
            self.line.show(f"{report.records:,} of {report.total:,} records, {rate:,.0f}/s", elapsed,
                           report.records / report.total)

    def finish(self, report: LoadReport, path: str) -> None:
        elapsed = self.line.elapsed()
        tables = ", ".join(f"{name} {n:,}" for name, n in report.per_table.items())
        self.line.finish(f"{report.records:,} records into {path} ({tables}), {elapsed:.1f}s "
                         f"({ProgressLine.rate(report.records, elapsed):,.0f} records/s)")


def consumer(settings: Settings) -> Any:
    """Not started; no group, nothing committed to Kafka, committed records only."""
    return AIOKafkaConsumer(bootstrap_servers=settings.brokers, **settings.kafka_options(), group_id=None,
                            enable_auto_commit=False, isolation_level="read_committed",
                            auto_offset_reset="earliest", max_partition_fetch_bytes=FETCH_BYTES)


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM end the load after the chunk in hand is written."""
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def topics_of(settings: Settings, tables: Sequence[Table], report: LoadReport) -> dict[str, tuple[str, int]]:
    """Table name -> (topic, partitions) for the tables whose topic exists; the others go to `report.missing`."""
    found = {}
    for table in tables:
        topic = getattr(settings, table.topic_setting)
        count = await partition_count(settings, topic)
        if count is None:
            report.missing.append(topic)
        else:
            found[table.name] = (topic, count)
    if not found:
        raise NothingToLoad(f"none of the topics exists: {', '.join(report.missing)}")
    return found


async def load(
    settings: Settings,
    path: str,
    *,
    follow: bool = False,
    chunk_records: int = CHUNK_RECORDS,
    progress: TextIO | None = None,
    tables: Sequence[Table] = TABLES,
) -> LoadReport:
    """Load the tables' topics into the DuckDB file at `path` from the offsets it stores; up to the end offsets
    seen at the start, or (`follow`) until SIGINT or SIGTERM. Returns what was loaded."""
    report = LoadReport(per_table={t.name: 0 for t in tables})
    found = await topics_of(settings, tables, report)
    topics = {name: topic for name, (topic, _) in found.items()}
    meter = Progress(progress) if progress is not None else None
    if progress is not None:
        for topic in report.missing:
            progress.write(f"load: topic {topic} does not exist: skipped\n")
    with Warehouse(path, tables) as warehouse:
        stored = warehouse.offsets()
        kafka = consumer(settings)
        await kafka.start()
        try:
            partitions = [TopicPartition(topic, p) for topic, count in found.values() for p in range(count)]
            kafka.assign(partitions)
            for tp in partitions:
                if (tp.topic, tp.partition) in stored:
                    kafka.seek(tp, stored[(tp.topic, tp.partition)])
                else:
                    await kafka.seek_to_beginning(tp)
            ends = await kafka.end_offsets(partitions)
            starts = {tp: await kafka.position(tp) for tp in partitions}
            report.total = sum(max(0, ends[tp] - starts[tp]) for tp in partitions)
            stop = asyncio.Event()
            with _stop_on_signals(stop):
                await _run(kafka, warehouse, topics, tables, ends, report, stop=stop, follow=follow,
                           chunk_records=chunk_records, progress=meter)
        finally:
            await kafka.stop()
    if meter is not None:
        meter.finish(report, path)
    return report


@dataclass
class Chunk:
    """The records read since the last write, by table (`table_of`: topic -> table name), and the offsets after
    them."""

    table_of: dict[str, str]
    tables: dict[str, Columns] = field(default_factory=dict)
    offsets: Offsets = field(default_factory=dict)
    records: int = 0
    per_table: dict[str, int] = field(default_factory=dict)

    def add(self, tp: TopicPartition, records: list[Any]) -> None:
        name = self.table_of[tp.topic]
        columns = self.tables.get(name)
        if columns is None:
            columns = self.tables[name] = Columns(tp.topic)
        columns.add(records)
        self.offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
        self.records += len(records)
        self.per_table[name] = self.per_table.get(name, 0) + len(records)


class Writer:
    """Writes the chunks to the file in order, each in two steps in threads: its rows are staged (read from its
    file into memory, `Warehouse.stage`) while the chunk before is written (`Warehouse.write`), and the loop
    fetches the next. DuckDB releases the GIL, and runs each step on one core whatever its threads: in steps,
    reading Kafka and the two halves of DuckDB's work share the machine's cores instead of taking turns. A chunk
    is written only once the one before it is: a failure stops the chunks after it."""

    def __init__(self, warehouse: Warehouse, tables: Sequence[Table], report: LoadReport) -> None:
        self.warehouse = warehouse
        self.tables = {t.name: t for t in tables}
        self.report = report
        self.in_hand: deque[asyncio.Task[Chunk]] = deque()  # oldest first: one being written, one being staged
        self.staging = asyncio.Lock()  # one chunk staged at a time (one connection, one file)
        self.chunks = 0

    async def _steps(self, chunk: Chunk, slot: int, before: asyncio.Task[Chunk] | None) -> Chunk:
        rows = {name: rows_of(self.tables[name], columns) for name, columns in chunk.tables.items()}
        async with self.staging:
            staged = await asyncio.to_thread(self.warehouse.stage, rows, slot)
        for name in staged:  # the records are in DuckDB's memory now, a third chunk in hand is in Python's
            rows[name] = TableRows(Columns(rows[name].records.topic), rows[name].replaced_keys)
            del chunk.tables[name]
        if before is not None:
            await asyncio.wait([before])
            if before.cancelled() or before.exception() is not None:
                raise ChunkNotWritten("a chunk before this one was not written")
        await asyncio.to_thread(self.warehouse.write, rows, chunk.offsets, staged)
        return chunk

    async def write(self, chunk: Chunk) -> None:
        """Hand the chunk over, once the chunk before the one in hand is written (its failure raised here)."""
        while len(self.in_hand) >= 2:
            await self._count()
        before = self.in_hand[-1] if self.in_hand else None
        # two slots: the staged rows of the chunk being written are not replaced meanwhile
        self.in_hand.append(asyncio.ensure_future(self._steps(chunk, self.chunks % 2, before)))
        self.chunks += 1

    async def written(self, wait: bool = True) -> None:
        """Count the chunks written (a failure raised here); with `wait`, once all in hand are."""
        while self.in_hand and (wait or self.in_hand[0].done()):
            await self._count()

    async def _count(self) -> None:
        """Wait for the oldest chunk in hand to be written, and count it."""
        try:
            chunk = await asyncio.shield(self.in_hand[0])
        except BaseException:
            # the threads go on with the connections: the file is closed only after them (a chunk after a
            # failed one is not written)
            await asyncio.wait(list(self.in_hand))
            self.in_hand.clear()
            raise
        self.in_hand.popleft()
        report = self.report
        for name, count in chunk.per_table.items():
            report.per_table[name] += count
        report.records += chunk.records
        report.chunks += 1
        log.info("committed %d records to %s (%s), next offsets %s", chunk.records, self.warehouse.path,
                 ", ".join(f"{count} {name}" for name, count in chunk.per_table.items()),
                 ", ".join(f"{t}:{p}={o}" for (t, p), o in sorted(chunk.offsets.items())))


class ChunkNotWritten(Exception):
    pass


async def _run(kafka: Any, warehouse: Warehouse, topics: dict[str, str], tables: Sequence[Table],
               ends: dict[TopicPartition, int], report: LoadReport, *, stop: asyncio.Event, follow: bool,
               chunk_records: int, progress: Progress | None) -> None:
    table_of = {topic: name for name, topic in topics.items()}
    pending = Chunk(table_of)
    first_pending = 0.0
    writer = Writer(warehouse, tables, report)

    async def write() -> None:
        nonlocal pending
        await writer.write(pending)
        pending = Chunk(table_of)

    async def at_end() -> bool:
        return all([await kafka.position(tp) >= end for tp, end in ends.items()])

    try:
        while not stop.is_set():
            if not follow and not pending.records and await at_end():
                break
            batch = await kafka.getmany(timeout_ms=200,
                                        max_records=max(1, min(FETCH_RECORDS, chunk_records - pending.records)))
            for tp, records in batch.items():
                if records:
                    if not pending.records:
                        first_pending = time.monotonic()
                    pending.add(tp, records)
            full = pending.records >= chunk_records
            if pending.records and (full or (not follow and await at_end())
                                    or (follow and time.monotonic() - first_pending >= FOLLOW_FLUSH_SECONDS)):
                await write()
            await writer.written(wait=False)
            if progress is not None:
                progress.update(report, following=follow and await at_end())
        if pending.records:
            await write()
    finally:
        await writer.written()
