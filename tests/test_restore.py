"""`streams.state.restore` on a real RocksDB database: changelog records and the persisted offset in one write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict

from streams.state.restore import newer_than, write_records


@dataclass
class Record:
    offset: int
    key: bytes | None
    value: bytes | None


class Store:
    """What the restore needs of Faust's store: one database per partition and the offset key."""

    offset_key = b"\xffoffset"

    def __init__(self, path: Path) -> None:
        self.dbs: dict[int, Rdict] = {}
        self.path = path

    def _db_for_partition(self, partition: int) -> Any:
        if partition not in self.dbs:
            self.dbs[partition] = Rdict(str(self.path / f"p{partition}.db"), Options(raw_mode=True))
        return self.dbs[partition]


def test_records_and_offset_are_written_together(tmp_path: Path) -> None:
    store = Store(tmp_path)
    db = store._db_for_partition(2)
    db[b"gone"] = b"old"
    records = [Record(10, b"a", b"1"), Record(11, b"b", b"2"), Record(12, b"a", b"3"),
               Record(13, b"gone", None), Record(14, None, b"no key")]
    assert write_records(store, 2, records) == 14
    assert db[b"a"] == b"3"  # the later record of a key wins
    assert db[b"b"] == b"2"
    assert db.get(b"gone") is None  # a record without a value deletes
    assert db[store.offset_key] == b"14"  # the store's own offset key, the last offset
    assert sorted(k for k in db.keys()) == sorted([b"a", b"b", store.offset_key])  # noqa: SIM118
    assert 1 not in store.dbs  # other partitions untouched
    for d in store.dbs.values():
        d.close()


def test_records_read_again_after_a_seek_back_are_left_out() -> None:
    records = [Record(o, b"k", b"v") for o in (5, 6, 7)]
    assert newer_than(records, None) is records
    assert newer_than(records, 4) is records
    assert [r.offset for r in newer_than(records, 5)] == [6, 7]
    assert list(newer_than(records, 7)) == []
