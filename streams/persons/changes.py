"""The identity change log's rows (schemas/identity-change.schema.json), as pure rules: what a change of a device
user's mapping says, and which identifiers link the user to its person.

A change is decided where the mapping is decided: the worker's persons index (one writer per user ID), or
replay's record-by-record run. Both build the same rows from the same `Change`; only the trigger's fields and
the processing time are the shell's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..identity.platforms import LOGIN_KEY
from .claims import split_pair
from .device import DevicePersons
from .ids import UserIds
from .mapping import LOGIN, Mapping

# The identity model's version: rows of two models are told apart by it. It changes whenever the identity or
# persons rules change (tests/persons/test_changes.py keeps a digest of those rules' source and fails until it
# is raised with them).
MODEL_VERSION = "2026.12.1"

CREATED, REMAPPED, UNMAPPED = "created", "remapped", "unmapped"


def op_of(old: Mapping | None, new: Mapping | None) -> str | None:
    """The row a mapping change writes, or None: no change.

    | before  | after          | op       |
    |---------|----------------|----------|
    | none    | a mapping      | created  |
    | mapping | another one    | remapped |
    | mapping | none           | unmapped |
    | same    | same           | (none)   |
    """
    if old == new:
        return None
    if old is None:
        return CREATED
    if new is None:
        return UNMAPPED
    return REMAPPED


@dataclass(frozen=True, slots=True)
class Trigger:
    """The record that caused a change, as far as the shell knows it."""

    record_id: str | None = None  # the worker's enriched record ID (topic:partition:offset:index)
    event_time: int | None = None  # the record's client time, ms
    line: int | None = None  # replay: the input line

    @classmethod
    def of_record(cls, record: Any, line: int | None = None) -> Trigger:
        """The trigger an emitted record names (its `record_id` and `time`, when it has them)."""
        record_id = record.get("record_id")
        time = record.get("time")
        return cls(record_id if type(record_id) is str else None,
                   time if type(time) is int else None, line)


NO_TRIGGER = Trigger()


def links_of(persons: DevicePersons, user: str, mapping: Mapping | None, ids: UserIds,
             owner_of: Callable[[str], str | None]) -> list[tuple[str, str]]:
    """The identifiers that link `user` to its mapping's person, each as (key, salted hash of the value), sorted:
    by login, the login ID, whose hash is the person ID itself; by identity, every pair the user claims that the
    person owns."""
    if mapping is None:
        return []
    if mapping.via == LOGIN:
        return [(LOGIN_KEY, mapping.person_id)]
    out = []
    for pair, claimants in persons.claims.items():
        if claimants.get(user) is False and owner_of(pair) == mapping.person_id:
            out.append((split_pair(pair)[0], ids.pair_hash(pair)))
    return sorted(out)


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a device user's mapping, with what the shell knows of its cause."""

    user_id: str
    old: Mapping | None
    new: Mapping | None
    conflict: bool  # `new` is None because the user's claimed pairs have several owners
    links: tuple[tuple[str, str], ...]
    trigger: Trigger

    def rows(self, version: int, processed_time: int | None) -> list[dict[str, Any]]:
        """The change's rows, in the schema's order of keys: the mapping row, then its link rows."""
        op = op_of(self.old, self.new)
        assert op is not None, "no change"
        new, old, trigger = self.new, self.old, self.trigger
        row: dict[str, Any] = {
            "kind": "mapping", "op": op, "user_id": self.user_id,
            "person_id": new.person_id if new is not None else None,
            "previous_person_id": old.person_id if old is not None else None,
            "via": new.via if new is not None else None,
        }
        if new is not None and new.identity_key is not None:
            row["identity_key"] = new.identity_key
        row["device_id"] = (new or old).device_id  # type: ignore[union-attr]
        if self.conflict:
            row["conflict"] = True
        row["version"] = version
        row["record_id"] = trigger.record_id
        if trigger.line is not None:
            row["line"] = trigger.line
        row["event_time"] = trigger.event_time
        row["processed_time"] = processed_time
        row["model"] = MODEL_VERSION
        out = [row]
        if new is not None:
            out.extend({"kind": "link", "user_id": self.user_id, "person_id": new.person_id, "version": version,
                        "key": key, "value_hash": value_hash, "model": MODEL_VERSION}
                       for key, value_hash in self.links)
        return out
