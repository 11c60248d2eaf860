"""The commit stage: a worker that lost its partition without being told writes no state over its next owner's."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import orjson
import pytest

from tests.fakes import DB, TP, Broker, Crash, Record
from tests.worker.steps import T, pipeline, recover


def test_a_worker_that_lost_its_partition_without_being_told_writes_no_state() -> None:
    """A worker cut off from the network past the session timeout still holds its partitions in memory; their
    next owner opens their producers, which fences its own. Once back, its next batch sends its outputs (copies
    of what the next owner writes), but none of its state lands, in Kafka or in its RocksDB."""
    broker = Broker(random.Random(0))
    old_dbs: dict[int, DB] = defaultdict(DB)
    old = pipeline(broker, old_dbs)
    p = old.partition_for("dev-g")

    def record(offset: int, **action: str) -> Record:
        return Record(T.raw, p, offset, b"dev-g", orjson.dumps({"device_id": "dev-g", "platform": "web", **action}))

    asyncio.run(old.process({TP(T.raw, p): [record(0, action="login", id="u1")]}, {}))
    broker.committed[(T.raw, p)] = 1
    # the group gave p to another worker, which fenced the old one's producer and rebuilt p's state
    new_dbs: dict[int, DB] = defaultdict(DB)
    new = pipeline(broker, new_dbs)
    recover(broker, new_dbs)
    asyncio.run(new.process({TP(T.raw, p): [record(1, action="logout"), record(2, event="e")]}, {}))
    changelog = [(r.key, r.value) for r in broker.visible(T.changelog, p)]
    old_state = dict(old_dbs[p])
    with pytest.raises(Crash, match="fenced"):
        asyncio.run(old.process({TP(T.raw, p): [record(1, action="logout"), record(2, event="e")]}, {}))
    assert [(r.key, r.value) for r in broker.visible(T.changelog, p)] == changelog
    assert dict(old_dbs[p]) == old_state
    assert not old.transactions.holds([p])  # type: ignore[union-attr]
    # what the old worker did send are byte-identical copies of the new owner's outputs
    outputs = [r.value for r in broker.logs[(T.enriched, p)]]
    assert len(outputs) == 3 and outputs[2] == outputs[1]
