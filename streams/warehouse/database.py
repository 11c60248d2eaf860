"""The DuckDB file: its tables, the offsets loaded so far, and the views of `schemas/sql/`.

A chunk's rows and the offsets they reach are written in one DuckDB transaction (`Warehouse.write`): after a
crash at any point the file holds every chunk committed before it, whole, and the offsets to go on from, so a
re-run neither loses nor repeats a row. Kafka's consumer-group offsets play no part.

A chunk reaches DuckDB as a few long strings (`joined`, `numbers`), which its SQL splits into rows and whose
values' JSON it reads (`staging_sql`): a Python list is turned into a column element by element, several µs
each, and parsing the values in Python would hold the GIL the Kafka consumer needs meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb

from streams.warehouse.tables import TABLES, VALUE_COLUMN, Column, Table, TableRows

# the views' portable SQL, one file a view, created in the order of their names
SQL_DIR = Path(__file__).resolve().parents[2] / "schemas" / "sql"
OFFSETS = "load_offsets"
SEPARATOR = "\x1e"  # between a chunk's keys or values: JSON text holds it only escaped
# DuckDB rewrites a table's last row group at each checkpoint, by default every 16 MiB of log: each row would be
# compressed several times over. The cost: the rows logged since the last checkpoint stay in memory (most of the
# loader's RSS), and the next open after a crash replays up to this much log.
CHECKPOINT_THRESHOLD = "256MB"

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> the next offset to load


class WarehouseError(Exception):
    """The file cannot be opened or set up (another process holds it, the views' SQL is missing or fails)."""


def _declared(c: Column) -> str:
    # the value as it came is most of a row and rarely read: zstd writes it several times faster than the
    # compression DuckDB would pick by trying each, for about the same size
    return f"{c.name} {c.type}" + (" USING COMPRESSION zstd" if c.name == VALUE_COLUMN.name else "")


def _create(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[Column]) -> None:
    con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(_declared(c) for c in columns)})")
    # a file loaded by an earlier version gets the columns added since (NULL in its rows)
    for c in columns:
        con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {c.name} {c.type}")


def joined(items: Sequence[bytes | None]) -> tuple[str, str, list[int]]:
    """The items decoded (UTF-8, an invalid sequence replaced) as one text, the separator that splits it back (a
    character none of them holds), and the positions of the items that are None (empty in the text)."""
    nulls = [i for i, item in enumerate(items) if item is None]
    parts = [b"" if item is None else item for item in items]
    text = SEPARATOR.encode().join(parts).decode("utf-8", "replace")
    if text.count(SEPARATOR) == len(parts) - 1:
        return text, SEPARATOR, nulls
    # the separator is ASCII, so it never ends inside a replaced sequence; another one, when it is in the data
    used = set(text)
    separator = next(chr(c) for c in range(0xE000, 0x110000) if chr(c) not in used and not 0xFFF0 <= c <= 0xFFFF)
    return separator.encode().join(parts).decode("utf-8", "replace"), separator, nulls


def numbers(items: Sequence[int | None]) -> str:
    return ",".join("" if n is None else str(n) for n in items)


def _typed(c: Column, i: int) -> str:
    """Column `c` from the i-th (from 1) of a row's JSON types and texts: NULL when the value is not of its type."""
    if c.type == "VARCHAR":
        return f"CASE WHEN _types[{i}] = 'VARCHAR' THEN _texts[{i}] END"
    if c.type == "BOOLEAN":
        return f"CASE WHEN _types[{i}] = 'BOOLEAN' THEN _texts[{i}] = 'true' END"
    # a JSON integer is BIGINT when negative, UBIGINT otherwise; one too large for the column is NULL
    return f"CASE WHEN _types[{i}] IN ('BIGINT', 'UBIGINT') THEN TRY_CAST(_texts[{i}] AS {c.type}) END"


def staging_sql(table: Table) -> str:
    """A chunk's records into the temp table `_rows`: the table's columns, read from each value, and each
    detail's object as text. Parameters: $1 the topic; $2, $3, $4 the partitions, offsets and timestamps
    (`numbers`); $5, $6 and $7, $8 the keys and the values with their separators, $9 and $10 the positions of the
    None ones (`joined`); $11 how many records."""
    paths = [c.json_path for c in table.columns] + [f'$."{d.members}"' for d in table.details]
    path_list = "[" + ", ".join(f"'{p}'" for p in paths) + "]"
    own = len(table.columns)
    selected = [*(f"{_typed(c, i + 1)} AS {c.name}" for i, c in enumerate(table.columns)), VALUE_COLUMN.name,
                *(f"CASE WHEN _types[{own + i + 1}] = 'OBJECT' THEN _texts[{own + i + 1}] END AS _members_{i}"
                  for i in range(len(table.details)))]
    return f"""
        CREATE OR REPLACE TEMP TABLE _rows AS
        WITH split AS (
            SELECT $1 AS kafka_topic,
                   CAST(UNNEST(string_split($2, ',')) AS INTEGER) AS kafka_partition,
                   CAST(UNNEST(string_split($3, ',')) AS BIGINT) AS kafka_offset,
                   TRY_CAST(UNNEST(string_split($4, ',')) AS BIGINT) AS kafka_timestamp,
                   UNNEST(string_split($5, $6)) AS _key,
                   UNNEST(string_split($7, $8)) AS _value,
                   UNNEST(range($11)) AS _row
        ),
        kept AS (
            SELECT kafka_topic, kafka_partition, kafka_offset, kafka_timestamp,
                   CASE WHEN NOT list_contains($9::BIGINT[], _row) THEN _key END AS kafka_key,
                   CASE WHEN NOT list_contains($10::BIGINT[], _row) THEN _value END AS value_json
            FROM split
        ),
        parsed AS (
            -- each value parsed once for all the paths; a value that is no JSON has NULL in every column
            SELECT *, json_type(_json, {path_list}) AS _types, json_extract_string(_json, {path_list}) AS _texts
            FROM (SELECT *, CASE WHEN json_valid(value_json) THEN value_json END AS _json FROM kept) valid
        )
        SELECT kafka_topic, kafka_partition, kafka_offset, kafka_timestamp, kafka_key, {', '.join(selected)}
        FROM parsed"""


def detail_sql(table: Table, index: int) -> str:
    """The rows of the table's `index`-th detail from `_rows`: one per string member of its object (a duplicate
    name makes it no map: no rows; the value's JSON keeps it)."""
    detail = table.details[index]
    return f"""
        INSERT INTO {detail.name} ({', '.join(c.name for c in table.detail_columns(detail))})
        SELECT kafka_topic, kafka_partition, kafka_offset, {', '.join(detail.copied)},
               _member.key, json_extract_string(_member.value, '$')
        FROM (
            SELECT *, UNNEST(map_entries(json_transform(_members_{index}, '"MAP(VARCHAR, JSON)"'))) AS _member
            FROM _rows
        ) members
        WHERE json_type(_member.value) = 'VARCHAR'"""


def _insert(con: duckdb.DuckDBPyConnection, table: Table, rows: TableRows, staging: str, details: list[str]) -> None:
    """The table's rows of a chunk, and its details' (`staging`, `details`: the table's `staging_sql` and
    `detail_sql`)."""
    records = rows.records
    if not records:
        return
    keys, key_separator, no_keys = joined([r.key for r in records])
    values, value_separator, no_values = joined([r.value for r in records])
    con.execute(staging, [records[0].topic, numbers([r.partition for r in records]),
                          numbers([r.offset for r in records]), numbers([r.timestamp for r in records]),
                          keys, key_separator, values, value_separator, no_keys, no_values, len(records)])
    columns = ", ".join(c.name for c in table.all_columns())
    con.execute(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM _rows")
    for sql in details:
        con.execute(sql)


def view_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    files = sorted(sql_dir.glob("*.sql"))
    if not files:
        raise WarehouseError(f"no view definitions in {sql_dir} (the repository's schemas/sql/)")
    return files


class Warehouse:
    """A DuckDB file with the loader's tables, its offsets and the views; `write` adds one chunk."""

    def __init__(self, path: str, tables: Sequence[Table] = TABLES, sql_dir: Path = SQL_DIR) -> None:
        self.path = path
        self.tables = {t.name: t for t in tables}
        self.staging = {t.name: staging_sql(t) for t in tables}
        self.details = {t.name: [detail_sql(t, i) for i in range(len(t.details))] for t in tables}
        views = view_files(sql_dir)
        try:
            self.con = duckdb.connect(path, config={"checkpoint_threshold": CHECKPOINT_THRESHOLD})
        except duckdb.Error as e:  # another process has it open, or it is no DuckDB file
            raise WarehouseError(f"cannot open {path}: {e}") from e
        try:
            self.con.begin()
            for table in tables:
                _create(self.con, table.name, table.all_columns())
                for detail in table.details:
                    _create(self.con, detail.name, table.detail_columns(detail))
            self.con.execute(f"CREATE TABLE IF NOT EXISTS {OFFSETS} (kafka_topic VARCHAR, kafka_partition INTEGER, "
                             "next_offset BIGINT, PRIMARY KEY (kafka_topic, kafka_partition))")
            for view in views:
                try:
                    self.con.execute(view.read_text())
                except duckdb.Error as e:
                    raise WarehouseError(f"{view}: {e}") from e
            self.con.commit()
        except BaseException:
            self.con.close()
            raise

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def offsets(self) -> Offsets:
        rows = self.con.execute(f"SELECT kafka_topic, kafka_partition, next_offset FROM {OFFSETS}").fetchall()
        return {(topic, partition): offset for topic, partition, offset in rows}

    def write(self, chunk: Mapping[str, TableRows], offsets: Offsets) -> None:
        """One chunk in one transaction: each table's rows (a latest-per-key table's replaced keys deleted
        first), its details' rows, and the offsets the chunk reaches. All or nothing."""
        con = self.con
        con.begin()
        try:
            for name, rows in chunk.items():
                if rows.replaced_keys:
                    keys, separator, _ = joined([k.encode() for k in rows.replaced_keys])
                    con.execute(f"DELETE FROM {name} WHERE kafka_key IN (SELECT UNNEST(string_split($1, $2)))",
                                [keys, separator])
                _insert(con, self.tables[name], rows, self.staging[name], self.details[name])
            if offsets:
                places = sorted(offsets)
                con.execute(
                    f"INSERT INTO {OFFSETS} SELECT UNNEST($1), UNNEST($2), UNNEST($3) "
                    "ON CONFLICT (kafka_topic, kafka_partition) DO UPDATE SET next_offset = excluded.next_offset",
                    [[t for t, _ in places], [p for _, p in places], [offsets[tp] for tp in places]],
                )
            con.commit()
        except BaseException as e:
            con.rollback()
            if isinstance(e, duckdb.Error):  # a full disk, the file damaged
                raise WarehouseError(f"cannot write to {self.path}: {e}") from e
            raise

    def count(self, name: str) -> int:
        row = self.con.execute(f"SELECT COUNT(*) FROM {name}").fetchone()
        return int(row[0]) if row else 0

