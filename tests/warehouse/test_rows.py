"""A chunk's records reach their columns as the tables define them, whatever their bytes: DuckDB reads the values'
JSON, and what it puts in each column is compared here with the definition done again in Python (a field of
the column's type, else NULL), over odd values (no JSON, no object, invalid UTF-8, the separator of the chunk's
text in a key or a value, numbers too large for their column, tombstones in an append-only topic)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from streams.warehouse.staging import SEPARATOR, joined, numbers
from streams.warehouse.tables import DEAD_LETTERS, ENRICHED, Column, Table
from tests.warehouse.test_views import FakeRecord, Topics, load, query


def python_value(value: bytes | None) -> dict[str, Any]:
    """The value's JSON object; {} for a tombstone, no JSON, or no object (Python's json: any integer). A name
    given twice has its first value, as DuckDB reads it."""
    if value is None:
        return {}
    try:
        loaded = json.loads(value.decode("utf-8", "replace"), object_pairs_hook=first_of_each)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def first_of_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in pairs:
        found.setdefault(name, value)
    return found


def python_column(value: dict[str, Any], column: Column) -> Any:
    found: Any = value
    for step in column.steps:
        if not isinstance(found, dict):
            return None
        found = found.get(step)
    if column.type == "VARCHAR":
        return found if isinstance(found, str) else None
    if column.type == "BOOLEAN":
        return found if isinstance(found, bool) else None
    bits = 64 if column.type == "BIGINT" else 32
    fits = isinstance(found, int) and not isinstance(found, bool) and -(1 << bits - 1) <= found < 1 << bits - 1
    return found if fits else None


def expected_rows(table: Table, records: list[FakeRecord]) -> list[tuple[Any, ...]]:
    def text(data: bytes | None) -> str | None:
        return None if data is None else data.decode("utf-8", "replace")

    return sorted((r.topic, r.partition, r.offset, r.timestamp, text(r.key),
                   *(python_column(python_value(r.value), c) for c in table.columns), text(r.value))
                  for r in records)


ODD_VALUES: list[bytes | None] = [
    None, b"", b"no json", b"[1, 2]", b'"a string"', b"42", b"null", b"{", b"\xff\xfe{}",
    b'{"device_id": "caf\xc3\xa9 \xe8\xae\xbe\xe5\xa4\x87", "user_id": "\xff\xfe", "time": 1}',
    b'{"device_id": "a\x1eb", "event": "x\\u001ey", "time": -5}',
    b'{"device_id": "\xee\x80\x80 private use", "time": 9223372036854775807}',
    b'{"time": 9223372036854775808, "type": true, "event": null, "platform": ["web"], "user_id": {"a": 1}}',
    b'{"time": -9223372036854775808, "record_id": "r", "login_id": 12, "original_id": 1.5}',
    b'{"time": 18446744073709551616, "distinct_id": "", "anonymous_id": "\\"quoted\\""}',
    b'{"time": 1.0, "identities": {"$identity_mobile": "138", "$identity_email": 5, "$identity_x": null}}',
    b'{"identities": ["not", "an", "object"], "device_id": "d"}',
    b'{"identities": "no object", "device_id": "d\\nline"}',
    b'{"device_id": "d", "identities": {"$identity_cookie_id": "c\\u001e", "$identity_anonymous_id": "c"}}',
    b'  {"device_id": "padded"}  ',
]
DEAD_VALUES: list[bytes | None] = [
    b'{"reason": "not_json", "source": {"topic": "raw", "partition": 2, "offset": 9}, "raw_truncated": true}',
    b'{"reason": 1, "source": {"topic": 7, "partition": 2147483648, "offset": -1}, "raw_truncated": "yes"}',
    b'{"source": "raw", "raw_truncated": false, "raw": "\\u0000x"}',
    b'{"source": {"partition": -2147483648, "offset": 9223372036854775807}, "field": "a\xffb"}',
    b'{"source": null}', None, b"\x1e",
]
KEYS: list[str | None] = [None, "", "d", "a\x1eb", "caf\u00e9", "\ue000"]


def random_value(rng: random.Random) -> bytes:
    """A JSON object with the columns' fields of any JSON type (no repeated name: DuckDB keeps a repeated name's
    first value, Python its last)."""
    choices: list[Any] = ["s", "", "é\u4e2d", 0, -1, 7, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64 + 1, 1.5, True,
                          False, None, [1, "a"], {"k": "v"}]
    value = {c.name: rng.choice(choices) for c in ENRICHED.columns if rng.random() < 0.8}
    if rng.random() < 0.5:
        value["identities"] = {f"$identity_{i}": rng.choice(choices) for i in range(rng.randint(0, 3))}
    return json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()


def loaded(tmp_path: Path, table: Table, values: list[bytes | None], chunk: int) -> tuple[Path, list[FakeRecord]]:
    t = Topics()
    rng = random.Random(5)
    for i, value in enumerate(values):
        t.send(table.name, KEYS[i % len(KEYS)], value)
    records = [r if i % 7 else FakeRecord(r.topic, r.partition, r.offset, r.key, r.value, None)
               for i, r in enumerate(t.records)]
    rng.shuffle(records)  # in the chunks in any order: each record's place is its own
    path = tmp_path / f"{table.name}-{chunk}.duckdb"
    load(path, records, chunk)
    return path, records


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_the_columns_are_the_tables_definition(tmp_path: Path, chunk: int) -> None:
    rng = random.Random(11)
    values = [*ODD_VALUES, *(random_value(rng) for _ in range(400))]
    for table, table_values in ((ENRICHED, values), (DEAD_LETTERS, DEAD_VALUES)):
        path, records = loaded(tmp_path, table, table_values, chunk)
        got = query(path, f"SELECT * FROM {table.name}")
        assert sorted(got) == expected_rows(table, records)


def test_the_identities_are_the_string_members(tmp_path: Path) -> None:
    rng = random.Random(12)
    values = [*ODD_VALUES, *(random_value(rng) for _ in range(400))]
    path, records = loaded(tmp_path, ENRICHED, values, 50)
    expected = []
    for r in records:
        value = python_value(r.value)
        pairs = value.get("identities")
        head = tuple(python_column(value, Column(name)) for name in ("record_id", "device_id", "user_id"))
        if isinstance(pairs, dict):
            expected += [(r.topic, r.partition, r.offset, *head, k, v) for k, v in pairs.items() if isinstance(v, str)]
    assert sorted(query(path, "SELECT * FROM enriched_identities")) == sorted(expected)
    assert len(expected) > 40


def test_a_separator_found_in_the_data_is_replaced() -> None:
    text, separator, nulls = joined([b"a", None, b"b\x1ec", b""])
    assert separator != SEPARATOR and separator not in "ab\x1ec"
    assert text.split(separator) == ["a", "", "b\x1ec", ""] and nulls == [1]
    assert joined([b"\xff", b"x"]) == ("\ufffd\x1ex", SEPARATOR, [])
    assert numbers([1, None, -3]) == "1,,-3"
