"""The identity change log's table and the person_history view on DuckDB files built from records, no broker:
both kinds of row in their columns, repeats collapse per (user_id, version), each version's interval ends where
the next begins, and the mapping as of a time is the one of the interval holding it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson

from tests.warehouse.test_views import Topics, load, mapping, query

MODEL = "persons-1"
AS_OF = ("SELECT user_id, person_id, via FROM person_history WHERE valid_from <= {t} "
         "AND (valid_to IS NULL OR valid_to > {t}) AND person_id IS NOT NULL ORDER BY user_id")


def user(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def change(user_id: str, version: int, op: str, person: str | None, previous: str | None, at: int | None,
           event_time: int | None = None, via: str | None = "login", **more: Any) -> dict[str, Any]:
    """A mapping row as the worker writes it (`at`: its processing time, ms)."""
    return {"kind": "mapping", "user_id": user_id, "version": version, "model": MODEL, "op": op, "person_id": person,
            "previous_person_id": previous, "via": None if person is None else via, "device_id": f"d-{user_id[:4]}",
            "record_id": f"raw:0:{version}:0", "event_time": event_time if event_time is not None else at,
            "processed_time": at, **more}


def link(user_id: str, version: int, person: str, key: str, value_hash: str) -> dict[str, Any]:
    return {"kind": "link", "user_id": user_id, "version": version, "model": MODEL, "person_id": person, "key": key,
            "value_hash": value_hash}


def test_both_kinds_of_row_land_in_their_columns(tmp_path: Path) -> None:
    t = Topics()
    u = user("u")
    t.send("identity_changes", u, change(u, 1, "created", "p", None, 1000, 990, via="identity",
                                         identity_key="$identity_mobile"))
    t.send("identity_changes", u, link(u, 1, "p", "$identity_mobile", user("138")))
    t.send("identity_changes", u, change(u, 2, "unmapped", None, "p", None, 2000, conflict=True, record_id=None)
           | {"line": 7})
    path = tmp_path / "w.duckdb"
    load(path, t.records)
    columns = ("kind, op, user_id, person_id, previous_person_id, via, identity_key, device_id, conflict, version, "
               "record_id, line, event_time, processed_time, model, key, value_hash")
    rows = query(path, f"SELECT {columns} FROM identity_changes ORDER BY kafka_offset")
    device = f"d-{u[:4]}"
    assert rows == [
        ("mapping", "created", u, "p", None, "identity", "$identity_mobile", device, None, 1, "raw:0:1:0", None,
         990, 1000, MODEL, None, None),
        ("link", None, u, "p", None, None, None, None, None, 1, None, None, None, None, MODEL, "$identity_mobile",
         user("138")),
        ("mapping", "unmapped", u, None, "p", None, None, device, True, 2, None, 7, 2000, None, MODEL, None, None),
    ]
    assert [orjson.loads(v) for (v,) in query(path, "SELECT value_json FROM identity_changes ORDER BY kafka_offset")
            ] == [orjson.loads(r.value or b"") for r in t.records]
    assert query(path, "SELECT DISTINCT kafka_key FROM identity_changes") == [(u,)]


def history(t: Topics) -> tuple[str, str]:
    """Two users: a's mapping created at 1000, moved to another person at 2000, ended at 3000, created again at
    4000; b's created at 1500 and unchanged. Each mapping row followed by its link row."""
    a, b = user("a"), user("b")
    for row in (change(a, 1, "created", "p1", None, 1000), change(b, 1, "created", "p2", None, 1500),
                change(a, 2, "remapped", "p2", "p1", 2000), change(a, 3, "unmapped", None, "p2", 3000),
                change(a, 4, "created", "p3", None, 4000)):
        t.send("identity_changes", row["user_id"], row)
        if row["person_id"] is not None:
            t.send("identity_changes", row["user_id"], link(row["user_id"], row["version"], row["person_id"],
                                                            "$identity_login_id", row["person_id"]))
    return a, b


def test_person_history_holds_an_interval_per_version(tmp_path: Path) -> None:
    t = Topics()
    a, b = history(t)
    path = tmp_path / "w.duckdb"
    load(path, t.records)
    got = query(path, "SELECT user_id, version, op, person_id, previous_person_id, valid_from, valid_to, record_id, "
                      "model FROM person_history ORDER BY user_id, version")
    assert got == sorted([
        (a, 1, "created", "p1", None, 1000, 2000, "raw:0:1:0", MODEL),
        (a, 2, "remapped", "p2", "p1", 2000, 3000, "raw:0:2:0", MODEL),
        (a, 3, "unmapped", None, "p2", 3000, 4000, "raw:0:3:0", MODEL),
        (a, 4, "created", "p3", None, 4000, None, "raw:0:4:0", MODEL),
        (b, 1, "created", "p2", None, 1500, None, "raw:0:1:0", MODEL),
    ])


def test_the_mapping_as_of_a_time(tmp_path: Path) -> None:
    t = Topics()
    a, b = history(t)
    path = tmp_path / "w.duckdb"
    load(path, t.records)

    def as_of(ms: int) -> dict[str, str]:
        return {u: p for u, p, _ in query(path, AS_OF.format(t=ms))}

    assert as_of(999) == {}
    assert as_of(1000) == {a: "p1"}
    assert as_of(1999) == {a: "p1", b: "p2"}
    assert as_of(2000) == {a: "p2", b: "p2"}  # the two devices' users were one person then
    assert as_of(3500) == {b: "p2"}  # a was its own person
    assert as_of(4000) == as_of(10**13) == {a: "p3", b: "p2"}


def test_repeats_collapse_and_the_current_mapping_is_persons_latest(tmp_path: Path) -> None:
    t = Topics()
    a, b = history(t)
    for record in list(t.records)[::2]:  # at-least-once: rows written again after a crash, the same bytes
        t.again(record)
    t.send("persons", a, mapping(a, "p3", f"d-{a[:4]}"))
    t.send("persons", b, mapping(b, "p2", f"d-{b[:4]}"))
    path = tmp_path / "w.duckdb"
    for chunk in (1, 3, 1000):  # a row and its repeat in one chunk or in two
        load(path, t.records, chunk)
        assert query(path, "SELECT COUNT(*) FROM identity_changes")[0][0] == len(t.records) - 2
        assert query(path, "SELECT user_id, version, COUNT(*) FROM person_history GROUP BY ALL HAVING COUNT(*) > 1"
                     ) == []
        assert query(path, "SELECT COUNT(*) FROM person_history")[0][0] == 5
        assert query(path, AS_OF.format(t=10**13)) == query(
            path, "SELECT user_id, person_id, via FROM persons_latest ORDER BY user_id")
        path.unlink()


def test_valid_from_falls_back_to_the_client_time_and_never_goes_back(tmp_path: Path) -> None:
    """Replay's rows have no processing time: the client's clock decides, and it can go back."""
    t = Topics()
    u = user("c")
    for row in (change(u, 1, "created", "p1", None, None, 5000), change(u, 2, "remapped", "p2", "p1", None, 3000),
                change(u, 3, "remapped", "p3", "p2", None, None), change(u, 4, "remapped", "p4", "p3", None, 9000)):
        t.send("identity_changes", u, row)
    path = tmp_path / "w.duckdb"
    load(path, t.records)
    assert query(path, "SELECT version, valid_from, valid_to FROM person_history ORDER BY version") == [
        (1, 5000, 5000), (2, 5000, 5000), (3, 5000, 9000), (4, 9000, None)]
    for ms, person in ((4999, None), (5000, "p3"), (8999, "p3"), (9000, "p4")):
        assert [p for _, p, _ in query(path, AS_OF.format(t=ms))] == ([person] if person else [])
