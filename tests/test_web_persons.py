"""The persons lookup and the persons gauges of `streams.web`, over a stand-in for the app: what is answered
for a mapping, a conflict, nothing, a partition this worker does not hold, and while the group rebalances;
which partitions' counts the gauges add up."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from faust.types import TP

from streams import codec, web
from streams.persons.mapping import Mapping
from streams.worker.stages.persons import STATS_KEY

CHANGELOG = "g-persons-changelog"
USER = "6b0f3c1e-8a4d-5b2e-9c7f-0d1e2f3a4b5c"


def app(stored: dict[int, dict[bytes, bytes]], *, actives: set[int], rebalancing: bool = False,
        person_stats: dict[int, dict[str, int]] | None = None, persons: bool = True) -> Any:
    dbs = {p: SimpleNamespace(get=data.get) for p, data in stored.items()}
    tps = {TP(CHANGELOG, p) for p in actives}
    return SimpleNamespace(
        streams_persons_table=SimpleNamespace(data=SimpleNamespace(_db_for_partition=dbs.__getitem__))
        if persons else None,
        streams_pipeline=SimpleNamespace(topics=SimpleNamespace(persons_changelog=CHANGELOG),
                                         person_stats=person_stats or {}),
        assignor=SimpleNamespace(is_active=tps.__contains__, assigned_actives=lambda: tps | {TP("raw", 3)}),
        rebalancing=rebalancing,
    )


def test_a_mapping_a_conflict_and_none() -> None:
    mapping = Mapping(USER, "0f7e6d5c-4b3a-5291-8f0e-1d2c3b4a5968", "identity", "dev-1", "$identity_mobile")
    other = USER.replace("6b", "7b", 1)
    stored = {2: {b"U" + USER.encode(): codec.encode_user(mapping, False),
                  b"U" + other.encode(): codec.encode_user(None, True)}}
    a = app(stored, actives={2})
    assert web.person(a, USER, 2) == (200, mapping.record())
    assert web.person(a, other, 2) == (200, {"user_id": other, "person_id": None, "conflict": True})
    status, body = web.person(a, USER.replace("6b", "8b", 1), 2)
    assert status == 404
    assert "a login user is a person of its own" in body["error"]
    assert "a device user without a mapping" in body["error"] and "is its own person" in body["error"]


def test_a_partition_not_held_or_being_rebalanced_is_503() -> None:
    stored = {2: {b"U" + USER.encode(): codec.encode_user(None, True)}}
    status, body = web.person(app(stored, actives={1}), USER, 2)
    assert status == 503 and "partition 2" in body["error"] and "not held by this worker" in body["error"]
    status, body = web.person(app(stored, actives={2}, rebalancing=True), USER, 2)
    assert status == 503 and "rebalancing" in body["error"]


def test_gauges_add_the_partitions_held_from_the_last_batch_or_the_table() -> None:
    stats = {"claims": 5, "owned_pairs": 2, "shared_pairs": 1, "via_login": 3, "via_identity": 1, "conflicts": 1}
    stored = {
        0: {STATS_KEY: codec.dumps({**stats, "claims": 100})},  # older than the stage's counts of the last batch
        1: {STATS_KEY: codec.dumps(stats)},  # no batch since it came here
        2: {},  # nothing stored yet
        3: {STATS_KEY: codec.dumps(stats)},  # another worker's
    }
    a = app(stored, actives={0, 1, 2}, person_stats={0: stats})
    assert web.person_stats(a) == {k: 2 * v for k, v in stats.items()}
    assert web.person_stats(app({}, actives=set(), persons=False)) is None
