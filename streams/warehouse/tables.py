"""The loaded tables: one definition per topic, and what a chunk of Kafka records does to them (pure: no I/O).

Every topic's table starts with the record's place and key (`kafka_topic`, `kafka_partition`, `kafka_offset`,
`kafka_timestamp`, `kafka_key`: prefixed, as PARTITION and OFFSET are reserved words in several warehouses), then
the fields read from its JSON value, then the value itself (`value_json`), so that nothing is lost: a field not
in a column, a value that is no JSON object, a value of a field that is not of its column's type (NULL in the
column). A topic table keeps every record; a compacted topic's (`latest_per_key`) keeps the latest record per
key, a tombstone deleting it. A detail table holds rows made from each record (the enriched records'
`identities`, one row a string member), with the record's place to join on.

The fields are read by DuckDB (`staging.py`), a chunk at a time: parsing each value in Python, under the GIL
the Kafka consumer needs, cost the load most of its speed. A new topic is one `Table` more in `TABLES`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

SQL_TYPES = ("VARCHAR", "BIGINT", "INTEGER", "BOOLEAN")
_FIELD = re.compile(r"^[A-Za-z0-9_$]+$")  # quoted in JSON paths as they are: no quote to escape


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
        if not all(_FIELD.match(step) for step in self.steps):
            raise ValueError(f"column {self.name}: {self.steps} holds a field name that needs escaping")

    @property
    def steps(self) -> tuple[str, ...]:
        return self.path or (self.name,)

    @property
    def json_path(self) -> str:
        return "$" + "".join(f'."{step}"' for step in self.steps)


# every topic table's first columns, then its own, then the value as it came
KAFKA_COLUMNS = (Column("kafka_topic"), Column("kafka_partition", "INTEGER"), Column("kafka_offset", "BIGINT"),
                 Column("kafka_timestamp", "BIGINT"), Column("kafka_key"))
VALUE_COLUMN = Column("value_json")
# a detail table's first columns: the place of the record it comes from
PLACE_COLUMNS = KAFKA_COLUMNS[:3]


@dataclass(frozen=True)
class Detail:
    """A table of rows made from each record of a topic: one per string member of the JSON object in the value's
    field `members` (none when it is no object), with some of the record's columns (`copied`)."""

    name: str
    copied: tuple[str, ...]  # names of the table's own columns
    members: str  # the field that holds the object
    key_column: Column
    value_column: Column
    description: str = ""

    def __post_init__(self) -> None:
        if not _FIELD.match(self.members):
            raise ValueError(f"detail {self.name}: {self.members} needs escaping")


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

    def detail_columns(self, detail: Detail) -> tuple[Column, ...]:
        own = {c.name: c for c in self.columns}
        return (*PLACE_COLUMNS, *(own[name] for name in detail.copied), detail.key_column, detail.value_column)


ENRICHED = Table(
    "enriched", "enriched_topic",
    (Column("record_id"), Column("device_id"), Column("user_id"), Column("distinct_id"), Column("anonymous_id"),
     Column("login_id"), Column("original_id"), Column("platform"), Column("type"), Column("event"),
     Column("time", "BIGINT")),
    details=(Detail("enriched_identities", ("record_id", "device_id", "user_id"), "identities",
                    Column("identity_key"), Column("identity_value"),
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
# both kinds of row of schemas/identity-change.schema.json in one table: a field the kind has not is NULL
IDENTITY_CHANGES = Table(
    "identity_changes", "identity_changes_topic",
    (Column("kind"), Column("op"), Column("user_id"), Column("person_id"), Column("previous_person_id"),
     Column("via"), Column("identity_key"), Column("device_id"), Column("conflict", "BOOLEAN"),
     Column("version", "BIGINT"), Column("record_id"), Column("line", "BIGINT"), Column("event_time", "BIGINT"),
     Column("processed_time", "BIGINT"), Column("model"), Column("key"), Column("value_hash")),
    description="one row per record of the identity change log (at-least-once repeats included)",
)
TABLES: tuple[Table, ...] = (ENRICHED, DEAD_LETTERS, PERSONS, IDENTITY_CHANGES)


@dataclass
class Columns:
    """Records of one topic, column by column. The loader keeps a chunk's records so, and drops aiokafka's
    record objects as it reads them: those are tracked by Python's garbage collector, which would scan a
    chunk's worth at each full collection, and weigh several times their bytes."""

    topic: str
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    timestamps: list[int | None] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)

    def add(self, records: Sequence[Record]) -> None:
        self.partitions += [r.partition for r in records]
        self.offsets += [r.offset for r in records]
        self.timestamps += [r.timestamp for r in records]
        self.keys += [r.key for r in records]
        self.values += [r.value for r in records]

    def take(self, positions: Iterable[int]) -> Columns:
        """The records at `positions`, in their order."""
        taken = Columns(self.topic)
        for i in positions:
            taken.partitions.append(self.partitions[i])
            taken.offsets.append(self.offsets[i])
            taken.timestamps.append(self.timestamps[i])
            taken.keys.append(self.keys[i])
            taken.values.append(self.values[i])
        return taken

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass
class TableRows:
    """What one chunk does to a table and its details: the records whose rows are inserted, and (a
    latest-per-key table) the keys whose rows are deleted first."""

    records: Columns
    replaced_keys: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.records) + len(self.replaced_keys)


def rows_of(table: Table, records: Columns) -> TableRows:
    """What `records` (of the table's topic, in each partition's offset order) do to the table."""
    if not table.latest_per_key:
        return TableRows(records)
    latest: dict[str, int] = {}
    unkeyed = []  # (a compacted topic refuses records without key)
    for i, key in enumerate(records.keys):
        if key is None:
            unkeyed.append(i)
        else:
            text = key.decode("utf-8", "replace")
            latest.pop(text, None)  # in the order of each key's latest record
            latest[text] = i
    kept = [i for i in [*unkeyed, *latest.values()] if records.values[i] is not None]
    return TableRows(records.take(kept), list(latest))


def by_table(tables: Iterable[Table], topics: dict[str, str], records: Iterable[Record]) -> dict[str, Columns]:
    """Records by the name of the table of their topic (`topics`: table name -> topic name)."""
    table_of = {topics[t.name]: t.name for t in tables if t.name in topics}
    out: dict[str, Columns] = {}
    for record in records:
        out.setdefault(table_of[record.topic], Columns(record.topic)).add([record])
    return out
