"""The loaded tables and the views of schemas/sql/ on DuckDB files built from records, no broker: repeats
collapse per record_id, the person is the current mapping or the user itself, tombstones delete, the identity
graph holds each device's current identifiers, and a chunk is written whole or not at all."""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from streams.config import Settings
from streams.offline.replay import replay
from streams.warehouse import staging
from streams.warehouse.database import Warehouse, WarehouseError
from streams.warehouse.tables import TABLES, Table, by_table, rows_of
from tests.integration import kit

TOPICS = {"enriched": "e", "dead_letters": "d", "persons": "p", "identity_changes": "c"}
PARTITIONS = 4


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = 1_712_000_000_000


class Topics:
    """Records as the worker's topics hold them: keyed, a partition per key, offsets in order."""

    def __init__(self) -> None:
        self.records: list[FakeRecord] = []
        self.next: Counter[tuple[str, int]] = Counter()

    def send(self, table: str, key: str | None, value: bytes | dict[str, Any] | None) -> FakeRecord:
        topic = TOPICS[table]
        partition = zlib.crc32((key or "").encode()) % PARTITIONS
        data = orjson.dumps(value) if isinstance(value, dict) else value
        record = FakeRecord(topic, partition, self.next[(topic, partition)], None if key is None else key.encode(),
                            data)
        self.next[(topic, partition)] += 1
        self.records.append(record)
        return record

    def again(self, record: FakeRecord) -> FakeRecord:
        """The same bytes once more, after the others (at-least-once after a crash)."""
        return self.send(next(t for t, n in TOPICS.items() if n == record.topic), record.key and record.key.decode(),
                         record.value)


def load(path: Path, records: Sequence[FakeRecord], chunk: int = 1000) -> None:
    """Write `records` as the loader does: per chunk, the rows and the offsets after them."""
    with Warehouse(str(path)) as warehouse:
        for start in range(0, len(records), chunk):
            part = records[start:start + chunk]
            groups = by_table(TABLES, TOPICS, part)
            rows = {name: rows_of(next(t for t in TABLES if t.name == name), rs) for name, rs in groups.items()}
            warehouse.write(rows, {(r.topic, r.partition): r.offset + 1 for r in part})


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()


def enriched(device: str, user: str, n: int, type_: str = "track", **more: Any) -> dict[str, Any]:
    record = {"distinct_id": device, "anonymous_id": device, "type": type_, "event": "view", "time": n,
              "device_id": device, "platform": "web", "user_id": user, "record_id": f"raw:0:{n}:0"}
    return {**record, **more}


def mapping(user: str, person: str, device: str, via: str = "login") -> dict[str, Any]:
    return {"user_id": user, "person_id": person, "via": via, "device_id": device}


# -- the tables and views -----------------------------------------------------------------------------


def test_the_file_holds_the_tables_the_offsets_and_the_views(tmp_path: Path) -> None:
    load(tmp_path / "w.duckdb", [])
    names = {(name, kind) for name, kind in query(tmp_path / "w.duckdb",
             "SELECT table_name, table_type FROM information_schema.tables")}
    assert names == {("enriched", "BASE TABLE"), ("enriched_identities", "BASE TABLE"),
                     ("dead_letters", "BASE TABLE"), ("persons", "BASE TABLE"), ("identity_changes", "BASE TABLE"),
                     ("load_offsets", "BASE TABLE"), ("persons_latest", "VIEW"), ("events_with_person", "VIEW"),
                     ("identity_graph", "VIEW"), ("person_history", "VIEW")}
    # opened again (a re-run): nothing changes, nothing fails
    load(tmp_path / "w.duckdb", [])


def test_events_with_person_collapses_repeats_and_takes_the_current_person(tmp_path: Path) -> None:
    t = Topics()
    first = t.send("enriched", "A", enriched("A", "dev-user-a", 1))
    t.send("enriched", "A", enriched("A", "login-x", 2, "track_signup", login_id="x", original_id="A"))
    t.send("enriched", "B", enriched("B", "dev-user-b", 3))
    t.again(first)  # a repeat: the same bytes, the same record_id
    t.again(first)
    t.send("persons", "dev-user-a", mapping("dev-user-a", "login-x", "A"))
    path = tmp_path / "w.duckdb"
    load(path, t.records)
    assert query(path, "SELECT COUNT(*) FROM enriched")[0][0] == 5
    rows = query(path, "SELECT record_id, user_id, person_id, kafka_offset FROM events_with_person ORDER BY record_id")
    assert rows == [("raw:0:1:0", "dev-user-a", "login-x", first.offset),
                    ("raw:0:2:0", "login-x", "login-x", 1),
                    ("raw:0:3:0", "dev-user-b", "dev-user-b", 0)]


def test_persons_keeps_the_latest_per_key_and_a_tombstone_deletes(tmp_path: Path) -> None:
    t = Topics()
    t.send("persons", "u1", mapping("u1", "p1", "A", "identity") | {"identity_key": "$identity_mobile"})
    t.send("persons", "u2", mapping("u2", "p2", "B"))
    t.send("persons", "u1", mapping("u1", "p3", "A", "identity") | {"identity_key": "$identity_email"})
    t.send("persons", "u2", None)  # the mapping ended
    t.send("persons", "u3", mapping("u3", "p1", "C"))
    t.send("persons", "u3", None)
    t.send("persons", "u3", mapping("u3", "p4", "C"))
    for chunk in (1, 2, 1000):  # a key's records in one chunk or across chunks
        path = tmp_path / f"w{chunk}.duckdb"
        load(path, t.records, chunk)
        assert query(path, "SELECT * FROM persons_latest ORDER BY user_id") == [
            ("u1", "p3", "identity", "A", "$identity_email"), ("u3", "p4", "login", "C", None)]
        assert query(path, "SELECT COUNT(*) FROM persons")[0][0] == 2


def test_identity_graph_holds_each_devices_current_identifiers(tmp_path: Path) -> None:
    t = Topics()
    ids = {"$identity_cookie_id": "A", "$identity_anonymous_id": "A"}
    # device A binds a phone and an email, then unbinds the phone: the last record, an $UnbindID, carries only it
    t.send("enriched", "A", enriched("A", "ua", 1, identities=ids))
    t.send("enriched", "A", enriched("A", "ua", 2, "track_id_bind",
                                     identities=ids | {"$identity_mobile": "138", "$identity_email": "a@x"}))
    t.send("enriched", "A", enriched("A", "ua", 3, "track_id_unbind", identities={"$identity_mobile": "138"}))
    # device B: unbinds the phone, binds it again; its device user maps to login user L
    t.send("enriched", "B", enriched("B", "ub", 4, "track_id_unbind", identities={"$identity_mobile": "139"}))
    t.send("enriched", "B", enriched("B", "ub", 5, "track_id_bind", identities={"$identity_mobile": "139"}))
    # device C logged in as L: the same login pair as L's other device
    c = t.send("enriched", "C", enriched("C", "L", 6, identities={"$identity_login_id": "l"}))
    t.send("enriched", "D", enriched("D", "L", 7, identities={"$identity_login_id": "l"}))
    t.again(c)
    t.send("persons", "ub", mapping("ub", "L", "B"))
    path = tmp_path / "w.duckdb"
    load(path, t.records)
    assert query(path, "SELECT * FROM identity_graph ORDER BY ALL") == [
        ("L", "$identity_login_id", "l", 2),
        ("L", "$identity_mobile", "139", 1),
        ("ua", "$identity_anonymous_id", "A", 1),
        ("ua", "$identity_cookie_id", "A", 1),
        ("ua", "$identity_email", "a@x", 1),
    ]


def test_nothing_is_lost_from_a_value_that_fits_no_column(tmp_path: Path) -> None:
    t = Topics()
    t.send("enriched", "A", enriched("A", "ua", 1, time="yesterday", device_id=7, extra={"kept": True}))
    t.send("enriched", "B", b"no json")
    t.send("enriched", "C", b"[1, 2]")
    t.send("dead_letters", None, {"reason": "not_json", "field": "", "detail": "...", "raw": "{",
                                  "source": {"topic": "raw", "partition": 2, "offset": 9}})
    path = tmp_path / "w.duckdb"
    load(path, t.records)
    rows = query(path, "SELECT kafka_key, device_id, time, value_json FROM enriched ORDER BY kafka_key")
    assert [(k, d, tm) for k, d, tm, _ in rows] == [("A", None, None), ("B", None, None), ("C", None, None)]
    assert [orjson.loads(v) if k == "A" else v for k, _, _, v in rows][1:] == ["no json", "[1, 2]"]
    assert orjson.loads(rows[0][3])["extra"] == {"kept": True}
    assert query(path, "SELECT reason, source_topic, source_partition, source_offset, raw, kafka_key "
                       "FROM dead_letters") == [("not_json", "raw", 2, 9, "{", None)]


def test_a_chunk_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Topics()
    for n in range(6):
        t.send("enriched", f"d{n}", enriched(f"d{n}", "u", n, identities={"$identity_cookie_id": f"d{n}"}))
        t.send("persons", f"u{n}", mapping(f"u{n}", "p", f"d{n}"))
    path = tmp_path / "w.duckdb"
    load(path, t.records[:4])
    insert = staging.insert

    def failing(con: Any, table: Table, *args: Any) -> None:
        insert(con, table, *args)
        if table.name == "persons":  # after the enriched rows, their identities and the persons deletions
            raise duckdb.IOException("disk full")

    monkeypatch.setattr(staging, "insert", failing)
    with pytest.raises(WarehouseError, match="disk full"):
        load(path, t.records[4:])
    monkeypatch.undo()
    assert query(path, "SELECT COUNT(*) FROM enriched")[0][0] == 2
    assert query(path, "SELECT COUNT(*) FROM persons")[0][0] == 2
    before = query(path, "SELECT * FROM load_offsets ORDER BY ALL")
    assert sum(offset for _, _, offset in before) == 4


def test_a_missing_views_folder_is_said(tmp_path: Path) -> None:
    with pytest.raises(WarehouseError, match="no view definitions"):
        Warehouse(str(tmp_path / "w.duckdb"), sql_dir=tmp_path)


# -- a whole stream: replay's records as the worker's topics would hold them ----------------------------


def stream(tmp_path: Path) -> tuple[Topics, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """kit.generate's input through replay (with --persons): its enriched records given record_ids, keyed by
    device, every fifth one repeated; its dead letters; its final mapping, with the tombstones of mappings that
    an earlier value wrote and that ended."""
    raw = kit.write_jsonl(tmp_path / "raw.jsonl", kit.generate(1500, 120, seed=3))
    out, dead, persons = tmp_path / "out.jsonl", tmp_path / "dead.jsonl", tmp_path / "persons.jsonl"
    replay(str(raw), str(out), str(dead), Settings().enrich_settings(), persons_path=str(persons))
    lines = out.read_bytes().splitlines()
    records = [orjson.loads(line) | {"record_id": f"raw:0:{n}:0"} for n, line in enumerate(lines)]
    final = {m["user_id"]: m for m in map(orjson.loads, persons.read_bytes().splitlines())}
    assert len(final) > 10
    t = Topics()
    for n, record in enumerate(records):
        sent = t.send("enriched", record["device_id"], record)
        if n % 5 == 0:
            t.again(sent)
    for line in dead.read_bytes().splitlines():
        t.send("dead_letters", None, line)
    for n, (user, m) in enumerate(sorted(final.items())):
        if n % 3 == 0:  # an earlier mapping of the same key, replaced
            t.send("persons", user, m | {"person_id": user})
    t.send("persons", "ended", mapping("ended", "p", "X"))
    for user, m in final.items():
        t.send("persons", user, m)
    t.send("persons", "ended", None)
    return t, records, final


def person_of(record: dict[str, Any], final: dict[str, dict[str, Any]]) -> str:
    m = final.get(record["user_id"])
    return str(m["person_id"] if m else record["user_id"])


def test_a_stream_loads_into_the_views(tmp_path: Path) -> None:
    t, records, final = stream(tmp_path)
    path = tmp_path / "w.duckdb"
    load(path, t.records, chunk=97)
    got = query(path, "SELECT user_id, person_id, via, device_id, identity_key FROM persons_latest ORDER BY user_id")
    assert got == [tuple(m.get(k) for k in ("user_id", "person_id", "via", "device_id", "identity_key"))
                   for _, m in sorted(final.items())]
    rows = query(path, "SELECT record_id, person_id, value_json FROM events_with_person")
    assert len(rows) == len(records) == len({r for r, _, _ in rows})
    assert {r: (orjson.loads(v), p) for r, p, v in rows} == {r["record_id"]: (r, person_of(r, final)) for r in records}
    assert query(path, "SELECT COUNT(*) FROM enriched")[0][0] == len(records) + -(-len(records) // 5)
    assert query(path, "SELECT COUNT(*) FROM dead_letters")[0][0] == len(by_kind(t, "d"))
    assert sorted(query(path, "SELECT * FROM identity_graph")) == expected_graph(records, final)


def by_kind(t: Topics, topic: str) -> list[FakeRecord]:
    return [r for r in t.records if r.topic == topic]


def expected_graph(records: Iterable[dict[str, Any]], final: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """identity_graph's definition again, in Python: per device, its latest record's pairs (not an $UnbindID's)
    less those unbound after it, under that record's person."""
    per_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        per_device[record["device_id"]].append(record)
    devices: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for device, rs in per_device.items():
        kept = [i for i, r in enumerate(rs) if r["type"] != "track_id_unbind"]
        if not kept:
            continue
        latest = rs[kept[-1]]
        unbound = {pair for r in rs[kept[-1] + 1:] for pair in r.get("identities", {}).items()}
        for pair in latest.get("identities", {}).items():
            if pair not in unbound:
                devices[(person_of(latest, final), *pair)].add(device)
    return sorted((*k, len(v)) for k, v in devices.items())


def test_any_chunking_gives_the_same_tables(tmp_path: Path) -> None:
    t, _, _ = stream(tmp_path)
    dumps = []
    for chunk in (7, 13, 10_000):
        path = tmp_path / f"w{chunk}.duckdb"
        load(path, t.records, chunk)
        dumps.append({name: query(path, f"SELECT * FROM {name} ORDER BY ALL")
                      for name in ("enriched", "enriched_identities", "dead_letters", "persons", "load_offsets",
                                   "events_with_person", "identity_graph")})
    assert dumps[0] == dumps[1] == dumps[2]
