"""The DuckDB file: its tables, the offsets loaded so far, and the views of `schemas/sql/`.

A chunk's rows and the offsets they reach are written in one DuckDB transaction (`Warehouse.write`): after a
crash at any point the file holds every chunk committed before it, whole, and the offsets to go on from, so a
re-run neither loses nor repeats a row. Kafka's consumer-group offsets play no part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

from streams.warehouse.tables import TABLES, Column, Table, TableRows

# the views' portable SQL, one file a view, created in the order of their names
SQL_DIR = Path(__file__).resolve().parents[2] / "schemas" / "sql"
OFFSETS = "load_offsets"

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> the next offset to load


class WarehouseError(Exception):
    """The file cannot be opened or set up (another process holds it, the views' SQL is missing or fails)."""


def _create(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[Column]) -> None:
    con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(f'{c.name} {c.type}' for c in columns)})")
    # a file loaded by an earlier version gets the columns added since (NULL in its rows)
    for c in columns:
        con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {c.name} {c.type}")


def _insert(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[Column], rows: list[tuple[Any, ...]]) -> None:
    """Rows in one statement, a list per column (DuckDB's executemany goes row by row: a hundred times slower)."""
    if not rows:
        return
    values = ", ".join(f"CAST(UNNEST(${i + 1}) AS {c.type})" for i, c in enumerate(columns))
    con.execute(f"INSERT INTO {name} ({', '.join(c.name for c in columns)}) SELECT {values}",
                [list(column) for column in zip(*rows, strict=True)])


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
        views = view_files(sql_dir)
        try:
            self.con = duckdb.connect(path)
        except duckdb.Error as e:  # another process has it open, or it is no DuckDB file
            raise WarehouseError(f"cannot open {path}: {e}") from e
        try:
            self.con.begin()
            for table in tables:
                _create(self.con, table.name, table.all_columns())
                for detail in table.details:
                    _create(self.con, detail.name, detail.all_columns())
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
                table = self.tables[name]
                if rows.replaced_keys:
                    con.execute(f"DELETE FROM {name} WHERE kafka_key IN (SELECT UNNEST($1))", [rows.replaced_keys])
                _insert(con, name, table.all_columns(), rows.rows)
                for detail in table.details:
                    _insert(con, detail.name, detail.all_columns(), rows.details.get(detail.name, []))
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
