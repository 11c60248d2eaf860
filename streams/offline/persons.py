"""The persons stage without a broker: replay's claims, pairs and final mapping (persons.md §4, "Replay").

Lives here: `OfflinePersons`, fed every outcome of the enrich step in input order, holding each device's
persons part and the pair claims in memory, or in replay's RocksDB database (`--state-dir`: the claims persist
from run to run), and `final`, the mapping of every device user that has one, sorted by user ID. With
`--jobs`, each job keeps its own devices' part; `merge` joins them (a pair's claims are per device, and each
device is in one job), so the file is the same bytes as one process writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from streams import codec
from streams.enrich import EnrichSettings, Outcome
from streams.persons import DevicePersons, Mapping, UserIds, claim, mapping_of, mappings, observe, owner_of_entries
from streams.persons.changes import Change, Trigger, links_of
from streams.persons.device import NOTHING, may_claim
from streams.persons.pairs import Entry, MemoryPairs, Summary
from streams.state.pairs import StoredPairs

# replay's persons keys in its device database: after a byte no device ID's UTF-8 starts with
PREFIX = b"\xfe"


class OfflinePersons:
    """`changes`: keep the identity change log (`change_rows` holds its rows until taken). Replay decides each
    change after the record that caused it, with the pairs' owners as they stand then: the worker, which decides
    them per batch and as owners' answers arrive, may skip a mapping replay writes, or write one that held
    between two of its messages; the last row per user agrees."""

    def __init__(self, settings: EnrichSettings, db: Any = None, changes: bool = False) -> None:
        self.ids = UserIds(settings.person_salt)
        self.max_devices = settings.person_max_devices
        self.hashed_keys = settings.identity.hashed_keys
        self.devices: dict[str, DevicePersons] = {}  # in memory; with a database, the batch's changed ones
        self.stored = StoredPairs(db, PREFIX) if db is not None else None
        self.pairs: MemoryPairs | StoredPairs = self.stored if self.stored is not None else MemoryPairs()
        self.changes = changes
        self.change_rows: list[bytes] = []
        # in memory: per device user, its mapping as the log last said and its version (with a database, the
        # index's keys hold them, as the worker's do)
        self.users: dict[str, tuple[Mapping | None, int]] = {}

    def _load(self, device_id: str) -> DevicePersons | None:
        persons = self.devices.get(device_id)
        if persons is None and self.stored is not None:
            data = self.stored.device(device_id)
            if data is not None:
                persons = codec.decode_device_persons(data)
        return persons

    def observe(self, outcome: Outcome, line: int | None = None) -> None:
        emitted, device_id = outcome.emitted, outcome.device_id
        if not emitted or (not self.hashed_keys and not may_claim(emitted)):
            return
        if device_id is None or outcome.before is None or outcome.after is None:
            return
        step = observe(lambda: self._load(device_id), device_id, self.ids, outcome.before, outcome.after,
                       outcome.record or {}, emitted, self.hashed_keys)
        if step is None:
            return
        self.devices[device_id] = step.persons
        touched: dict[str, set[str]] = {device_id: step.users} if step.users else {}
        for pair, entry in step.changes.items():
            for device, _ in claim(self.pairs, pair, device_id, entry, self.max_devices):
                claimants = (self._load(device) or NOTHING).claims.get(pair, {})
                touched.setdefault(device, set()).update(c for c, login in claimants.items() if not login)
        if self.changes and touched:
            self._log(touched, Trigger.of_record(emitted[0], line))

    def _owner(self, pair: str) -> str | None:
        owner: str | None = self.pairs.summary(pair).owner
        return owner

    def _log(self, touched: dict[str, set[str]], trigger: Trigger) -> None:
        """The mappings the record changed, with the pairs' owners as they stand now, each as the log's rows."""
        for device_id in sorted(touched):
            persons = self._load(device_id) or NOTHING
            for user in sorted(touched[device_id]):
                mapping, conflict = mapping_of(persons, device_id, user, self._owner)
                old, version = self._user(user)
                if mapping == old:
                    continue
                links = links_of(persons, user, mapping, self.ids, self._owner)
                change = Change(user, old, mapping, conflict, tuple(links), trigger)
                self.change_rows += codec.encode_rows(change.rows(version + 1, None))
                self._put_user(user, mapping, version + 1)

    def _user(self, user: str) -> tuple[Mapping | None, int]:
        if self.stored is None:
            return self.users.get(user, (None, 0))
        data = self.stored.user(user)
        return (codec.decode_user(data)[0] if data is not None else None), self.stored.version(user)

    def _put_user(self, user: str, mapping: Mapping | None, version: int) -> None:
        if self.stored is None:
            self.users[user] = (mapping, version)
            return
        self.stored.put_user(user, codec.encode_user(mapping, False) if mapping is not None else None)
        self.stored.put_version(user, version)

    def take_changes(self) -> list[bytes]:
        rows, self.change_rows = self.change_rows, []
        return rows

    def flush(self) -> list[tuple[bytes, bytes | None]]:
        """With a database: the changed devices' parts and pairs, to write (and forgotten here)."""
        if self.stored is None:
            return []
        for device_id, persons in self.devices.items():
            self.stored.put_device(device_id, codec.encode_device_persons(persons) if persons else None)
        self.devices.clear()
        return self.stored.take()

    def parts(self) -> Iterator[tuple[str, DevicePersons]]:
        if self.stored is None:
            yield from self.devices.items()
            return
        for device_id, data in self.stored.devices():
            persons = codec.decode_device_persons(data)
            if persons is not None:
                yield device_id, persons

    def final(self) -> list[bytes]:
        """Every device user's mapping, one record each, sorted by user ID."""
        return final_mapping(self.parts(), self.pairs.summary)

    def export(self) -> tuple[list[tuple[str, DevicePersons]], dict[str, dict[str, Entry]]]:
        """A job's part (in memory), for `merge`."""
        assert isinstance(self.pairs, MemoryPairs)
        return list(self.devices.items()), self.pairs.claims


def merge(parts: Iterable[tuple[list[tuple[str, DevicePersons]], dict[str, dict[str, Entry]]]],
          max_devices: int) -> list[bytes]:
    """The final mapping from every job's devices and claims."""
    devices: list[tuple[str, DevicePersons]] = []
    claims: dict[str, dict[str, Entry]] = {}
    for job_devices, job_claims in parts:
        devices.extend(job_devices)
        for pair, entries in job_claims.items():
            claims.setdefault(pair, {}).update(entries)
    owners: dict[str, str | None] = {}

    def summary(pair: str) -> Summary:
        if pair not in owners:
            entries = claims.get(pair, {})
            owners[pair] = owner_of_entries(entries.values(), len(entries), max_devices)
        return Summary(owners[pair], False)

    return final_mapping(devices, summary)


def final_mapping(devices: Iterable[tuple[str, DevicePersons]], summary: Any) -> list[bytes]:
    def owner_of(pair: str) -> str | None:
        owner: str | None = summary(pair).owner
        return owner

    found: list[Mapping] = []
    for device_id, persons in devices:
        for mapping, _ in mappings(persons, device_id, owner_of=owner_of).values():
            if mapping is not None:
                found.append(mapping)
    found.sort(key=lambda m: m.user_id)
    return [codec.encode_mapping(m) for m in found]
