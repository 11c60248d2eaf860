"""A chunk reaches DuckDB through a file (`files.ChunkFiles`) when each of its records is safe in a line, else
through parameters; a chunk whose file DuckDB refuses is written again through parameters. Both routes give
the same rows, whatever the values: each odd value is loaded within a chunk of ordinary ones, both ways, and
the tables compared with each other and with the tables' definition done again in Python (test_rows.py)."""

from __future__ import annotations

import json
import os
import random
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.warehouse import staging
from streams.warehouse.database import Warehouse
from streams.warehouse.files import ChunkFiles, scratch_dir
from streams.warehouse.tables import DEAD_LETTERS, ENRICHED, Columns, Table, rows_of
from tests.warehouse.test_rows import DEAD_VALUES, expected_rows, python_column, python_value, random_value
from tests.warehouse.test_views import TOPICS, FakeRecord, Topics, load, query, stream

DUMPED = ("enriched", "enriched_identities", "dead_letters", "persons", "identity_changes", "load_offsets")

# values a line carries, that DuckDB reads as the tables define them
READ: list[bytes] = [
    b"[1, 2]", b'"a string"', b"42", b"null", b"  {\"device_id\": \"padded\"}  ",
    b'{"device_id": "caf\xc3\xa9 \xe8\xae\xbe\xe5\xa4\x87", "time": 1}',
    b'{"device_id": "a", "device_id": "repeated", "user_id": "u"}',
    b'{"device_id": "x\\u001ey\\n\\"quoted\\"", "event": "\\ud83d\\ude00", "time": -5}',
    b'{"time": 9223372036854775808, "type": true, "event": null, "platform": ["web"], "user_id": {"a": 1}}',
    b'{"time": -9223372036854775808, "record_id": "r", "login_id": 12, "original_id": 1.5}',
    b'{"time": 18446744073709551616, "distinct_id": "", "anonymous_id": "-0"}',
    b'{"time": 1.0, "identities": {"$identity_mobile": "138", "$identity_email": 5, "$identity_x": null}}',
    b'{"time": -0, "identities": {"$identity_a": "x", "$identity_a": "y"}}',
    b'{"time": 1e3, "identities": ["not", "an", "object"], "device_id": "d"}',
    b'{"identities": {"$identity_cookie_id": "c\\u001e\\t", "$identity_anonymous_id": "\\u00e9"}}',
]
# values a line carries, that DuckDB refuses: the chunk is written again through parameters
REFUSED: list[bytes] = [
    b"no json", b"{", b"\xef\xbb\xbf{\"device_id\": \"a byte order mark\"}",
    b'{"device_id": "a\x1fb"}',  # the field delimiter: a field too many
    b'{"device_id": "\xff\xfe"}', b'{"device_id": "\xed\xa0\x80 a surrogate"}',  # no UTF-8
    b'{"device_id": "' + b"x" * (3 * 1024 * 1024) + b'"}',  # longer than the reader's longest line
]
CARRIED = READ + REFUSED
# what no line carries: each chunk holding one goes through parameters
NOT_CARRIED: list[bytes | None] = [
    None, b"", b'{"device_id": "new\nline"}', b'{"device_id": "carriage\rreturn"}', b'{"device_id": "nul\x00"}',
    b'{"device_id": "d"}\n', b"\n",
]


class Routes:
    """What each table's chunk went through: 'file', 'parameters' (the file could not carry it) or 'refused' (the
    file was refused, then parameters)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, files: bool) -> None:
        self.taken: Counter[str] = Counter()
        self.carried = False
        write, stage = ChunkFiles.write, staging.stage

        def counted_write(files_: ChunkFiles, records: Columns) -> bool:
            self.carried = files and write(files_, records)
            self.taken["file" if self.carried else "parameters"] += 1
            return self.carried

        def counted_stage(*args: Any) -> bool:
            staged = stage(*args)
            if self.carried and not staged:
                self.taken["refused"] += 1
            return staged

        monkeypatch.setattr(ChunkFiles, "write", counted_write)
        monkeypatch.setattr(staging, "stage", counted_stage)


Routing = Callable[[bool], Routes]


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> Routing:
    """Counts the routes from here on; `files=False`: none through a file."""

    def make(files: bool) -> Routes:
        monkeypatch.undo()
        return Routes(monkeypatch, files)

    return make


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    return {name: query(path, f"SELECT * FROM {name} ORDER BY ALL") for name in DUMPED}


def ordinary(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [random_value(rng) for _ in range(n)]


def records_of(table: Table, values: list[bytes | None]) -> list[FakeRecord]:
    t = Topics()
    for i, value in enumerate(values):
        t.send(table.name, f"key-{i % 9}", value)
    return t.records


def both_ways(tmp_path: Path, routes: Routing, records: list[FakeRecord], chunk: int,
              name: str) -> tuple[dict[str, Any], Counter[str]]:
    """The records loaded through a file where it carries them, then through parameters only: the tables
    (equal) and the routes the first load took."""
    taken = routes(True)
    load(tmp_path / f"{name}-file.duckdb", records, chunk)
    routes(False)
    load(tmp_path / f"{name}-parameters.duckdb", records, chunk)
    by_file, by_parameters = dump(tmp_path / f"{name}-file.duckdb"), dump(tmp_path / f"{name}-parameters.duckdb")
    assert by_file == by_parameters
    return by_file, taken.taken


def test_a_chunk_of_ordinary_records_goes_through_the_file(tmp_path: Path, routes: Routing) -> None:
    records = records_of(ENRICHED, [*ordinary(300, 1)])  # type: ignore[list-item]
    tables, taken = both_ways(tmp_path, routes, records, 100, "ordinary")
    assert taken == {"file": 3}
    assert sorted(tables["enriched"]) == expected_rows(ENRICHED, records)


@pytest.mark.parametrize("odd", range(len(CARRIED)), ids=lambda i: CARRIED[i][:30].decode("utf-8", "replace"))
def test_an_odd_value_a_line_carries_gives_the_same_rows(tmp_path: Path, routes: Routing, odd: int) -> None:
    values: list[bytes | None] = [*ordinary(20, odd), CARRIED[odd], *ordinary(20, odd + 100)]
    records = records_of(ENRICHED, values)
    tables, taken = both_ways(tmp_path, routes, records, 1000, "odd")
    assert taken == ({"file": 1, "refused": 1} if CARRIED[odd] in REFUSED else {"file": 1})
    assert sorted(tables["enriched"]) == expected_rows(ENRICHED, records)
    assert sorted(tables["enriched_identities"]) == expected_identities(records)


@pytest.mark.parametrize("odd", range(len(NOT_CARRIED)), ids=lambda i: repr(NOT_CARRIED[i])[:30])
def test_a_value_no_line_carries_sends_its_chunk_through_parameters(tmp_path: Path, routes: Routing, odd: int) -> None:
    values = [*ordinary(20, odd), NOT_CARRIED[odd], *ordinary(20, odd + 100)]
    records = records_of(ENRICHED, values)
    tables, taken = both_ways(tmp_path, routes, records, 1000, "unsafe")
    assert taken == {"parameters": 1}
    assert sorted(tables["enriched"]) == expected_rows(ENRICHED, records)


@pytest.mark.parametrize("change", ["key", "empty key", "no key", "no timestamp"])
def test_a_key_or_timestamp_no_line_carries(tmp_path: Path, routes: Routing, change: str) -> None:
    records = records_of(DEAD_LETTERS, [DEAD_VALUES[i] for i in (0, 1, 2, 4)])
    first = records[0]
    records[0] = FakeRecord(first.topic, first.partition, first.offset,
                            {"key": b"a\nb", "empty key": b"", "no key": None}.get(change, first.key), first.value,
                            None if change == "no timestamp" else first.timestamp)
    tables, taken = both_ways(tmp_path, routes, records, 1000, "key")
    assert taken == ({"file": 1} if change == "no key" else {"parameters": 1})
    assert sorted(tables["dead_letters"]) == expected_rows(DEAD_LETTERS, records)


def test_a_refused_file_is_written_again_through_parameters(tmp_path: Path, routes: Routing) -> None:
    records = records_of(ENRICHED, [*ordinary(50, 7), b'{"device_id": "\xff"}', *ordinary(50, 8)])  # type: ignore[list-item]
    tables, taken = both_ways(tmp_path, routes, records, 1000, "refused")
    assert taken == {"file": 1, "refused": 1}
    assert len(tables["enriched"]) == 101


def test_a_stream_loads_the_same_both_ways(tmp_path: Path, routes: Routing) -> None:
    t, _, _ = stream(tmp_path)
    _, taken = both_ways(tmp_path, routes, t.records, 500, "stream")
    assert set(taken) == {"file"}


def expected_identities(records: list[FakeRecord]) -> list[tuple[Any, ...]]:
    expected = []
    for r in records:
        value = python_value(r.value)
        pairs = value.get("identities")
        head = [python_column(value, c) for c in ENRICHED.columns[:3]]
        if isinstance(pairs, dict) and not repeated_names(r.value or b""):
            expected += [(r.topic, r.partition, r.offset, *head, k, v) for k, v in pairs.items() if isinstance(v, str)]
    return sorted(expected)


def repeated_names(value: bytes) -> bool:
    """Whether the value's identities repeat a name (then no map: no rows)."""
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        names = [k for k, _ in items]
        if len(set(names)) < len(names) and any(k.startswith("$identity") for k in names):
            found = True
        return dict(items)

    try:
        json.loads(value.decode("utf-8", "replace"), object_pairs_hook=pairs)
    except ValueError:
        return False
    return found


def test_the_file_lives_in_a_directory_of_the_users_own_and_goes_at_close(tmp_path: Path) -> None:
    directory = scratch_dir()
    info = os.lstat(directory)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
    path = tmp_path / "w.duckdb"
    with Warehouse(str(path)) as warehouse:
        load_one(warehouse)
        assert warehouse.files.path.exists() and warehouse.files.path.parent == directory
    assert not warehouse.files.path.exists()


def load_one(warehouse: Warehouse) -> None:
    records = Columns(TOPICS["enriched"])
    records.add([FakeRecord(TOPICS["enriched"], 0, 0, b"k", b'{"device_id": "d"}')])
    warehouse.write({"enriched": rows_of(ENRICHED, records)}, {(TOPICS["enriched"], 0): 1})
