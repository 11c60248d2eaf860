"""The plan stage (at-least-once): forwarded records wait for the raw log the first time, a pending plan holds back
what came after it, and damaged internal keys (the plan, the applied marks) never stop the partition."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streams.state.keys import APPLIED_KEY, PLAN_KEY
from streams.worker.stages.route import SOURCE_HEADER
from tests.fakes import TP, Record
from tests.worker.steps import T, fresh


def test_forwarded_records_wait_for_the_raw_log_the_first_time_then_every_batch_has_a_plan() -> None:
    broker, dbs, worker = fresh(1)
    p = worker.partition_for("dev-a")
    value = orjson.dumps({"device_id": "dev-a", "platform": "web", "event": "e"})
    forwarded = Record(T.repartition, p, 0, b"dev-a", value, [(SOURCE_HEADER, f"raw/{(p + 1) % 3}/9".encode())])
    direct = [Record(T.raw, p, o, b"dev-a", value) for o in range(4, 8)]
    ends = {(T.raw, p): 8, (T.repartition, p): 1}

    # without a plan: the raw log's records up to its end (8) go first; the forwarded one waits
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): direct[:1]}, {}, ends))
    assert result.commit == {TP(T.raw, p): 5} and result.rewind == {TP(T.repartition, p): 0}
    changelog = broker.logs[(T.changelog, p)]
    assert (changelog[0].key, changelog[0].value) == (PLAN_KEY, b"8,0") and dbs[p][PLAN_KEY] == b"8,0"
    # still short of 8: the forwarded record waits again
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): direct[1:3]},
                                        {(T.raw, p): 7, (T.repartition, p): 1}, ends))
    assert result.commit == {TP(T.raw, p): 7} and result.rewind == {TP(T.repartition, p): 0}
    # the last raw record of the plan, then the forwarded one, under a new plan written before their outputs
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): direct[3:]},
                                        {(T.raw, p): 8, (T.repartition, p): 1}, ends))
    assert result.commit == {TP(T.raw, p): 8} and result.rewind == {TP(T.repartition, p): 0}
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded]}, {(T.raw, p): 8, (T.repartition, p): 1},
                                        ends))
    assert result.commit == {TP(T.repartition, p): 1} and not result.rewind
    assert dbs[p][PLAN_KEY] == b"8,1"
    enriched = [orjson.loads(r.value or b"") for r in broker.logs[(T.enriched, p)]]
    assert [r["record_id"] for r in enriched] == [*(f"raw:{p}:{o}:0" for o in range(4, 8)), f"raw:{(p + 1) % 3}:9:0"]


def test_a_pending_plan_holds_back_what_came_after_it() -> None:
    """After a crash, raw records past the plan wait until the plan's forwarded records are applied."""
    _, dbs, worker = fresh(2)
    p = worker.partition_for("dev-a")
    dbs[p][PLAN_KEY] = b"5,1"
    value = orjson.dumps({"device_id": "dev-a", "platform": "web", "event": "e"})
    raw = [Record(T.raw, p, o, b"dev-a", value) for o in (4, 5, 6)]
    result = asyncio.run(worker.process({TP(T.raw, p): raw}, {(T.repartition, p): 0, (T.raw, p): 7}))
    assert result.commit == {TP(T.raw, p): 5} and result.rewind == {TP(T.raw, p): 5}
    forwarded = Record(T.repartition, p, 0, b"dev-a", value, [(SOURCE_HEADER, b"raw/0/3")])
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded], TP(T.raw, p): raw[1:]},
                                        {(T.repartition, p): 1, (T.raw, p): 7}))
    assert result.commit == {TP(T.repartition, p): 1} and result.rewind == {TP(T.raw, p): 5}
    result = asyncio.run(worker.process({TP(T.raw, p): raw[1:]}, {(T.repartition, p): 1, (T.raw, p): 7}))
    assert result.commit == {TP(T.raw, p): 7} and not result.rewind
    assert dbs[p][PLAN_KEY] == b"7,1"


@pytest.mark.parametrize("key", [APPLIED_KEY, PLAN_KEY])
def test_damaged_internal_keys_do_not_stop_the_partition(key: bytes) -> None:
    broker, dbs, worker = fresh(0)
    p = worker.partition_for("dev-d")
    dbs[p][key] = b"\x00garbage"
    value = orjson.dumps({"device_id": "dev-d", "platform": "web", "event": "e"})
    forwarded = Record(T.repartition, p, 0, b"dev-d", value, [(SOURCE_HEADER, b"raw/0/1")])
    batch = {TP(T.raw, p): [Record(T.raw, p, 0, b"dev-d", value)], TP(T.repartition, p): [forwarded]}
    ends = {(T.raw, p): 1, (T.repartition, p): 1}
    result = asyncio.run(worker.process(batch, {}, ends))
    assert result.commit == {TP(T.raw, p): 1}
    result = asyncio.run(worker.process({TP(T.repartition, p): [forwarded]}, {(T.raw, p): 1}, ends))
    assert result.commit == {TP(T.repartition, p): 1}
    assert len(broker.logs[(T.enriched, p)]) == 2
