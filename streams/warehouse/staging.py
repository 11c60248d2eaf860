"""A chunk's records of one table into its rows: the SQL that reads each value's JSON into the table's columns
(`_typed`), fed by the chunk's file (`files.ChunkFiles`), its rows staged in memory before the chunk's
transaction (`stage`), or, for a chunk the file cannot carry, by a few long string parameters that the SQL
splits inside the transaction (`joined`, `numbers`). Both routes run the same SQL on the records
(tests/warehouse/test_routes.py compares them); the file is several times cheaper.

Each value's JSON is parsed by DuckDB, twice (its fields' types, then their texts): parsing it in Python would
hold the GIL that the Kafka consumer needs meanwhile. DuckDB's `read_json` parses once, but its records would
reach the value as it came only by a side by side join with a second reader, which has to detect a line one of
them skips.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import duckdb

from streams.warehouse.files import ChunkFiles, quoted
from streams.warehouse.tables import VALUE_COLUMN, Column, Columns, Table

log = logging.getLogger(__name__)

SEPARATOR = "\x1e"  # between a chunk's keys or values: JSON text holds it only escaped
PLACE = ("kafka_topic", "kafka_partition", "kafka_offset", "kafka_timestamp", "kafka_key")
# the parameters' rows: $1 the topic; $2, $3, $4 the partitions, offsets and timestamps (`numbers`); $5, $6 and
# $7, $8 the keys and the values with their separators, $9 and $10 the positions of the None ones (`joined`); $11
# how many records
FROM_PARAMETERS = """split AS (
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
        )"""


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


def rows_sql(table: Table, kept: str, *, checked: bool, members: bool) -> str:
    """A query of the records' rows from `kept` (CTEs, the last one `kept`: the records' place, key and value):
    the place, the table's columns read from each value, the value as it came, and (`members`) each detail's
    object as text (`_members_0`...). Not `checked`: every value is taken for JSON, and one that is not fails
    the query (checking every value first would cost a third of the parsing, for a chunk that is rare)."""
    paths = [c.json_path for c in table.columns] + [f'$."{d.members}"' for d in table.details]
    path_list = "[" + ", ".join(f"'{p}'" for p in paths) + "]"
    own = len(table.columns)
    selected = [*PLACE, *(f"{_typed(c, i + 1)} AS {c.name}" for i, c in enumerate(table.columns)), VALUE_COLUMN.name]
    if members:
        selected += [f"CASE WHEN _types[{own + i + 1}] = 'OBJECT' THEN _texts[{own + i + 1}] END AS _members_{i}"
                     for i in range(len(table.details))]
    json = "CASE WHEN json_valid(value_json) THEN value_json END" if checked else "value_json"
    return f"""
        WITH {kept},
        parsed AS (
            -- each value parsed once for all the paths; a value that is no JSON has NULL in every column
            SELECT *, json_type(_json, {path_list}) AS _types, json_extract_string(_json, {path_list}) AS _texts
            FROM (SELECT *, {json} AS _json FROM kept) valid
        )
        SELECT {', '.join(selected)}
        FROM parsed"""


def detail_sql(table: Table, index: int, rows: str) -> str:
    """The rows of the table's `index`-th detail from the table `rows` (the place, the detail's copied columns,
    `_members_{index}`): one per string member of its object (a duplicate name makes it no map: no rows; the
    value's JSON keeps it)."""
    detail = table.details[index]
    return f"""
        SELECT kafka_topic, kafka_partition, kafka_offset, {', '.join(detail.copied)},
               _member.key AS {detail.key_column.name},
               json_extract_string(_member.value, '$') AS {detail.value_column.name}
        FROM (
            SELECT *, UNNEST(map_entries(json_transform(_members_{index}, '"MAP(VARCHAR, JSON)"'))) AS _member
            FROM {rows}
        ) members
        WHERE json_type(_member.value) = 'VARCHAR'"""


def stage(con: duckdb.DuckDBPyConnection, table: Table, records: Columns, files: ChunkFiles, target: str) -> bool:
    """The records' rows, read from their file, into the table `target` (their columns, the value, each
    detail's object), outside the chunk's transaction: what a file's records become does not depend on the
    file's tables. True; False when the file cannot carry them or DuckDB refuses it (the records then go from
    parameters, `insert`)."""
    if not files.write(records):
        return False
    kept = f"kept AS (SELECT {quoted(records.topic)} AS kafka_topic, * FROM {files.sql()})"
    try:
        con.execute(f"CREATE OR REPLACE TABLE {target} AS " + rows_sql(table, kept, checked=False, members=True))
    except (duckdb.InvalidInputException, duckdb.ConversionException) as e:
        log.info("%s: a chunk goes from parameters, DuckDB refused its file: %s", table.name,
                 str(e).splitlines()[0])
        return False
    return True


def insert(con: duckdb.DuckDBPyConnection, table: Table, records: Columns, staged: str | None) -> None:
    """The records' rows into the table and its details: from the table `staged` (`stage`), else from
    parameters, through the temp table `_rows`."""
    columns = ", ".join(c.name for c in table.all_columns())
    if staged is not None:
        con.execute(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {staged}")
        for i, detail in enumerate(table.details):
            con.execute(f"INSERT INTO {detail.name} BY NAME " + detail_sql(table, i, staged))
        return
    if not len(records):
        return
    keys, key_separator, no_keys = joined(records.keys)
    values, value_separator, no_values = joined(records.values)
    con.execute("CREATE OR REPLACE TEMP TABLE _rows AS " + rows_sql(table, FROM_PARAMETERS, checked=True,
                                                                   members=True),
                [records.topic, numbers(records.partitions), numbers(records.offsets), numbers(records.timestamps),
                 keys, key_separator, values, value_separator, no_keys, no_values, len(records)])
    con.execute(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM _rows")
    for i, detail in enumerate(table.details):
        con.execute(f"INSERT INTO {detail.name} BY NAME " + detail_sql(table, i, "_rows"))
