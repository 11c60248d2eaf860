"""The loaded tables: one definition per topic, and the rows a chunk of Kafka records makes of them (pure: no I/O).

Every topic's table starts with the record's place and key (`kafka_topic`, `kafka_partition`, `kafka_offset`,
`kafka_timestamp`, `kafka_key`: prefixed, as PARTITION and OFFSET are reserved words in several warehouses), then
the fields read from its JSON value, then the value itself (`value_json`), so that nothing is lost: a field not
in a column, a value that is no JSON object, a value of a field that is not of its column's type (NULL in the
column). A topic table keeps every record; a compacted topic's (`latest_per_key`) keeps the latest record per
key, a tombstone deleting it. A detail table holds rows made from each record (the enriched records'
`identities`, one row a pair), with the record's place to join on.

A new topic (the identity change log) is one `Table` more in `TABLES`, naming the setting of its topic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

Row = tuple[Any, ...]

SQL_TYPES = ("VARCHAR", "BIGINT", "INTEGER", "BOOLEAN")


class Record(Protocol):
    """What the loader reads of a Kafka record (aiokafka's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "VARCHAR"
    path: tuple[str, ...] = ()  # where in the value's JSON object; () = the field of the column's name

    def __post_init__(self) -> None:
        if self.type not in SQL_TYPES:
            raise ValueError(f"column {self.name}: {self.type} is not one of {SQL_TYPES}")

    def read(self, value: dict[str, Any]) -> Any:
        found: Any = value
        for step in self.path or (self.name,):
            if not isinstance(found, dict):
                return None
            found = found.get(step)
        return typed(found, self.type)


def typed(value: Any, sql_type: str) -> Any:
    """`value` when it is of the SQL type, else None (the value's JSON keeps it)."""
    if sql_type == "VARCHAR":
        return value if isinstance(value, str) else None
    if sql_type == "BOOLEAN":
        return value if isinstance(value, bool) else None
    bits = 64 if sql_type == "BIGINT" else 32
    ok = isinstance(value, int) and not isinstance(value, bool) and -(1 << (bits - 1)) <= value < 1 << (bits - 1)
    return value if ok else None


# every topic table's first columns, then its own, then the value as it came
KAFKA_COLUMNS = (Column("kafka_topic"), Column("kafka_partition", "INTEGER"), Column("kafka_offset", "BIGINT"),
                 Column("kafka_timestamp", "BIGINT"), Column("kafka_key"))
VALUE_COLUMN = Column("value_json")
# a detail table's first columns: the place of the record it comes from
PLACE_COLUMNS = KAFKA_COLUMNS[:3]


@dataclass(frozen=True)
class Detail:
    """A table of rows made from each record of a topic (several, or none, per record)."""

    name: str
    columns: tuple[Column, ...]  # after PLACE_COLUMNS
    rows: Callable[[dict[str, Any]], list[Row]]
    description: str = ""

    def all_columns(self) -> tuple[Column, ...]:
        return (*PLACE_COLUMNS, *self.columns)


@dataclass(frozen=True)
class Table:
    """A topic loaded into a table."""

    name: str
    topic_setting: str  # the attribute of config.Settings that names the topic
    columns: tuple[Column, ...]  # after KAFKA_COLUMNS, before VALUE_COLUMN
    latest_per_key: bool = False  # a compacted topic: one row per key, the latest; a tombstone deletes it
    details: tuple[Detail, ...] = ()
    description: str = ""

    def all_columns(self) -> tuple[Column, ...]:
        return (*KAFKA_COLUMNS, *self.columns, VALUE_COLUMN)


def _identities(value: dict[str, Any]) -> list[Row]:
    identities = value.get("identities")
    if not isinstance(identities, dict):
        return []
    head = tuple(typed(value.get(name), "VARCHAR") for name in ("record_id", "device_id", "user_id"))
    return [(*head, key, pair) for key, pair in identities.items() if isinstance(pair, str)]


ENRICHED = Table(
    "enriched", "enriched_topic",
    (Column("record_id"), Column("device_id"), Column("user_id"), Column("distinct_id"), Column("anonymous_id"),
     Column("login_id"), Column("original_id"), Column("platform"), Column("type"), Column("event"),
     Column("time", "BIGINT")),
    details=(Detail("enriched_identities", (Column("record_id"), Column("device_id"), Column("user_id"),
                                           Column("identity_key"), Column("identity_value")), _identities,
                    "one row per pair of an enriched record's identities"),),
    description="one row per record of the enriched topic (at-least-once repeats included)",
)
DEAD_LETTERS = Table(
    "dead_letters", "dead_letter_topic",
    (Column("reason"), Column("field"), Column("detail"), Column("device_id"),
     Column("source_topic", path=("source", "topic")), Column("source_partition", "INTEGER", ("source", "partition")),
     Column("source_offset", "BIGINT", ("source", "offset")), Column("raw"), Column("raw_encoding"),
     Column("raw_truncated", "BOOLEAN")),
    description="one row per record of the dead-letter topic",
)
PERSONS = Table(
    "persons", "persons_topic",
    (Column("user_id"), Column("person_id"), Column("via"), Column("device_id"), Column("identity_key")),
    latest_per_key=True,
    description="the persons topic as the compacted topic holds it: the latest mapping per user_id (its key), "
    "a tombstone deleting it",
)
TABLES: tuple[Table, ...] = (ENRICHED, DEAD_LETTERS, PERSONS)


def decoded(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "replace")


def json_object(value: bytes | None) -> dict[str, Any]:
    """The record's value as a JSON object; {} for a tombstone, no JSON, or JSON that is no object."""
    if value is None:
        return {}
    try:
        loaded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


@dataclass
class TableRows:
    """What one chunk does to a table and its details: rows to insert, and (a latest-per-key table) the keys
    whose rows are deleted first."""

    rows: list[Row] = field(default_factory=list)
    replaced_keys: list[str] = field(default_factory=list)
    details: dict[str, list[Row]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.rows) + len(self.replaced_keys)


def rows_of(table: Table, records: Sequence[Record]) -> TableRows:
    """The rows `records` (of the table's topic, in each partition's offset order) make."""
    if table.latest_per_key:
        latest: dict[str, Record] = {}
        unkeyed = []  # (a compacted topic refuses records without key)
        for record in records:
            key = decoded(record.key)
            if key is None:
                unkeyed.append(record)
            else:
                latest.pop(key, None)  # in the order of each key's latest record
                latest[key] = record
        out = TableRows(replaced_keys=list(latest))
        records = [r for r in [*unkeyed, *latest.values()] if r.value is not None]
    else:
        out = TableRows()
    out.details = {d.name: [] for d in table.details}
    for record in records:
        value = json_object(record.value)
        out.rows.append((record.topic, record.partition, record.offset, record.timestamp, decoded(record.key),
                         *(c.read(value) for c in table.columns), decoded(record.value)))
        place = (record.topic, record.partition, record.offset)
        for detail in table.details:
            out.details[detail.name].extend((*place, *row) for row in detail.rows(value))
    return out


def by_table(tables: Iterable[Table], topics: dict[str, str], records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records by the name of the table of their topic (`topics`: table name -> topic name)."""
    table_of = {topics[t.name]: t.name for t in tables if t.name in topics}
    out: dict[str, list[Record]] = {}
    for record in records:
        out.setdefault(table_of[record.topic], []).append(record)
    return out
