"""The DuckDB file: its tables, the offsets loaded so far, and the views of `schemas/sql/`.

A chunk's rows and the offsets they reach are written in one DuckDB transaction (`Warehouse.write`): after a
crash at any point the file holds every chunk committed before it, whole, and the offsets to go on from, so a
re-run neither loses nor repeats a row. Kafka's consumer-group offsets play no part.

A chunk reaches DuckDB as a file (`files.py`), its rows staged in an in-memory database before its transaction
(`Warehouse.stage`, while the loader writes the chunk before), or as long string parameters when a file cannot
carry it; DuckDB reads its values' JSON into the tables' columns (`staging.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb

from streams.warehouse import staging
from streams.warehouse.files import ChunkFiles, quoted
from streams.warehouse.staging import joined
from streams.warehouse.tables import TABLES, VALUE_COLUMN, Column, Table, TableRows

# the views' portable SQL, one file a view, created in the order of their names
SQL_DIR = Path(__file__).resolve().parents[2] / "schemas" / "sql"
OFFSETS = "load_offsets"
# A transaction that appends a row group or more to a table writes them to the file compressed, once, and logs
# only where they are; smaller appends are logged whole, kept in memory, and compressed at the next checkpoint,
# with the table's last row group written again each time. A chunk (CHUNK_RECORDS) fills a few row groups of
# this size; DuckDB's default, 122,880 rows, would take chunks of twice that, and their records in memory.
ROW_GROUP_ROWS = 32_768
CHECKPOINT_THRESHOLD = "64MB"
# DuckDB keeps the blocks it wrote in memory until it needs the room: without a limit, the whole file would. The
# two chunks in hand (one staged, one being written) take about 250 MB of it; larger ones (--chunk-records) spill
# to FILE.duckdb.tmp.
MEMORY_LIMIT = "384MB"
# the loader runs its own threads, a chunk staged while the one before is written: DuckDB's, on these statements,
# added CPU and took none of the time off
THREADS = 1

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> the next offset to load
Staged = dict[str, str]  # table name -> the table its chunk's rows are staged in
STAGE = "stage"  # the in-memory database of the staged rows


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
        self.files = ChunkFiles(path)
        views = view_files(sql_dir)
        # the file attached rather than opened: the row group size is an option of ATTACH
        self.con = duckdb.connect(config={"checkpoint_threshold": CHECKPOINT_THRESHOLD, "memory_limit": MEMORY_LIMIT,
                                          "temp_directory": f"{path}.tmp", "threads": THREADS})
        try:
            try:
                self.con.execute(f"ATTACH {quoted(path)} AS warehouse (ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
            except duckdb.Error as e:  # another process has it open, or it is no DuckDB file
                raise WarehouseError(f"cannot open {path}: {e}") from e
            self.con.execute("USE warehouse")
            self.con.execute(f"ATTACH ':memory:' AS {STAGE}")
            self.stage_con = self.con.cursor()
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
        self.stage_con.close()
        self.con.close()
        self.files.remove()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def offsets(self) -> Offsets:
        rows = self.con.execute(f"SELECT kafka_topic, kafka_partition, next_offset FROM {OFFSETS}").fetchall()
        return {(topic, partition): offset for topic, partition, offset in rows}

    def stage(self, chunk: Mapping[str, TableRows], slot: int = 0) -> Staged:
        """Each table's rows of the chunk read from its file into the in-memory database `stage`, as tables
        `stage.<table>_<slot>`, on a connection of their own: the loader stages a chunk while the one before is
        written (`write`), in the other slot. The tables the file could not carry are left to `write`."""
        staged = {}
        for name, rows in chunk.items():
            target = f"{STAGE}.{name}_{slot}"
            if len(rows.records) and staging.stage(self.stage_con, self.tables[name], rows.records, self.files, target):
                staged[name] = target
        return staged

    def write(self, chunk: Mapping[str, TableRows], offsets: Offsets, staged: Staged | None = None) -> None:
        """One chunk in one transaction: each table's rows (a latest-per-key table's replaced keys deleted
        first), its details' rows, and the offsets the chunk reaches. All or nothing. The rows come from
        `staged` (`stage`; the chunk is staged here when not), or from parameters."""
        if staged is None:
            staged = self.stage(chunk)
        con = self.con
        con.begin()
        try:
            for name, rows in chunk.items():
                if rows.replaced_keys:
                    keys, separator, _ = joined([k.encode() for k in rows.replaced_keys])
                    con.execute(f"DELETE FROM {name} WHERE kafka_key IN (SELECT UNNEST(string_split($1, $2)))",
                                [keys, separator])
                staging.insert(con, self.tables[name], rows.records, staged.get(name))
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
        finally:
            for table in staged.values():  # their memory
                con.execute(f"DROP TABLE IF EXISTS {table}")

    def count(self, name: str) -> int:
        row = self.con.execute(f"SELECT COUNT(*) FROM {name}").fetchone()
        return int(row[0]) if row else 0

