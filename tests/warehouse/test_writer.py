"""The loader's writer: a chunk staged while the one before is written, the chunks written in order, each in its
slot, and a failure stops the chunks after it (a later chunk written past a failed one would store offsets
beyond rows never written), with no thread left running on the file."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Mapping

import pytest
from aiokafka import TopicPartition

from streams.warehouse.database import Offsets, Staged, WarehouseError
from streams.warehouse.load import Chunk, LoadReport, Writer
from streams.warehouse.tables import TABLES, TableRows
from tests.warehouse.test_views import TOPICS, FakeRecord


class FakeWarehouse:
    """Records what the writer asks, in which slot, and whether a chunk's staging overlapped a write."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.path = "fake.duckdb"
        self.fail_at = fail_at
        self.staged: list[tuple[int, int]] = []  # (chunk, slot)
        self.written: list[int] = []
        self.busy = 0
        self.overlapped = False
        self.lock = threading.Lock()
        self.rng = random.Random(3)

    def _chunk(self, chunk: Mapping[str, TableRows]) -> int:
        return next(iter(chunk.values())).records.offsets[0]

    def _work(self) -> None:
        with self.lock:
            self.busy += 1
            self.overlapped |= self.busy > 1
        time.sleep(self.rng.uniform(0.001, 0.02))
        with self.lock:
            self.busy -= 1

    def stage(self, chunk: Mapping[str, TableRows], slot: int = 0) -> Staged:
        self._work()
        self.staged.append((self._chunk(chunk), slot))
        return {}

    def write(self, chunk: Mapping[str, TableRows], offsets: Offsets, staged: Staged | None = None) -> None:
        self._work()
        n = self._chunk(chunk)
        if n == self.fail_at:
            raise WarehouseError("disk full")
        self.written.append(n)


def chunk(n: int) -> Chunk:
    """A chunk of one record, at offset n."""
    c = Chunk({TOPICS["enriched"]: "enriched"})
    c.add(TopicPartition(TOPICS["enriched"], 0), [FakeRecord(TOPICS["enriched"], 0, n, b"k", b"{}")])
    return c


def run(warehouse: FakeWarehouse, chunks: int) -> LoadReport:
    report = LoadReport(per_table={t.name: 0 for t in TABLES})

    async def scenario() -> None:
        writer = Writer(warehouse, TABLES, report)  # type: ignore[arg-type]
        try:
            for n in range(chunks):
                await writer.write(chunk(n))
                await writer.written(wait=False)
        finally:
            await writer.written()

    asyncio.run(scenario())
    return report


def test_the_chunks_are_written_in_order_each_staged_while_the_one_before_is_written() -> None:
    warehouse = FakeWarehouse()
    report = run(warehouse, 12)
    assert warehouse.written == list(range(12))
    assert warehouse.staged == [(n, n % 2) for n in range(12)]
    assert warehouse.overlapped
    assert report.chunks == 12 and report.records == 12 and report.per_table["enriched"] == 12


def test_a_failed_chunk_stops_the_ones_after_it() -> None:
    warehouse = FakeWarehouse(fail_at=3)
    with pytest.raises(WarehouseError, match="disk full"):
        run(warehouse, 12)
    assert warehouse.written == [0, 1, 2]
    assert warehouse.busy == 0  # nothing left running on the file
