"""The device lookup of `streams.web`, over a stand-in for the app: a stored state, none, and a partition this
worker does not serve now (not held, or the group rebalancing) answered 503, never a false 404 or a stale 200."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from streams import codec, web
from streams.identity import DeviceState

CHANGELOG = "g-devices-changelog"


def app(stored: dict[int, dict[bytes, bytes]], *, actives: set[int], rebalancing: bool = False) -> Any:
    dbs = {p: SimpleNamespace(get=data.get) for p, data in stored.items()}
    tps = {TP(CHANGELOG, p) for p in actives}
    return SimpleNamespace(
        streams_table=SimpleNamespace(data=SimpleNamespace(_db_for_partition=dbs.__getitem__)),
        streams_pipeline=SimpleNamespace(topics=SimpleNamespace(changelog=CHANGELOG), cache=OrderedDict(),
                                         partition_for=lambda device_id: 1),
        assignor=SimpleNamespace(is_active=tps.__contains__),
        rebalancing=rebalancing,
    )


def test_a_stored_state_and_none() -> None:
    stored = {1: {b"dev-1": codec.encode_state(DeviceState.new("dev-1"))}}
    status, body = web.device(app(stored, actives={1}), "dev-1", 1)
    assert status == 200 and body["device_id"] == "dev-1" and body["partition"] == 1
    status, body = web.device(app(stored, actives={1}), "dev-2", 1)
    assert status == 404 and "no identity state stored" in body["error"]


def test_a_partition_not_served_now_is_503_even_with_a_state_left_in_rocksdb() -> None:
    stored = {1: {b"dev-1": codec.encode_state(DeviceState.new("dev-1"))}}
    status, body = web.device(app(stored, actives={0, 2}), "dev-1", 1)
    assert status == 503 and "partition 1" in body["error"] and "not held by this worker" in body["error"]
    status, body = web.device(app(stored, actives={1}, rebalancing=True), "dev-1", 1)
    assert status == 503 and "rebalancing" in body["error"]


def health_app(*, rebalancing: bool = False, high: int = 10, done: int = 10, last_batch_at: float = 0.0) -> Any:
    topics = SimpleNamespace(raw="r", repartition="r-rep", persons_repartition="p-rep")
    tps = [TP("r", 0), TP("p-rep", 0), TP("g-devices-changelog", 0)]
    return SimpleNamespace(
        rebalancing=rebalancing,
        consumer=SimpleNamespace(assignment=lambda: tps, highwater=lambda tp: high, retries=None),
        streams_pipeline=SimpleNamespace(topics=topics, last_batch_at=last_batch_at,
                                         positions={("r", 0): done, ("p-rep", 0): done}),
    )


def test_health_is_ready_idle_or_busy_and_503_when_stalled_or_rebalancing() -> None:
    assert web.health(health_app(), now=1000.0)[0] == 200  # nothing waits: idle for long is fine
    assert web.health(health_app(done=4, last_batch_at=990.0), now=1000.0)[0] == 200  # busy
    status, body = web.health(health_app(done=4), now=web.STALL_SECONDS + 1)
    # the persons repartition topic's lag counts too (6 + 6), the changelog's does not
    assert status == 503 and body["status"] == "stalled" and body["lag"] == 12, body
    assert web.health(health_app(rebalancing=True), now=1.0)[0] == 503
    # live: a rebalance (a long state rebuild) is no reason for a restart; a stall is
    assert web.health(health_app(rebalancing=True, done=4), now=1000.0, ready=False)[0] == 200
    assert web.health(health_app(done=4), now=web.STALL_SECONDS + 1, ready=False)[0] == 503
