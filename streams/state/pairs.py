"""Pair claims and the persons index in a key-value database (the worker's persons table, replay's state).

Lives here: the key layout, and `StoredPairs`, a `PairView` over one database partition that reads through
the writes of the batch under way and hands them out once (`take`), as the device states are handled. Keys:
- `S` + pair: the pair's summary (devices, devices with a login user, owner);
- `E` + the pair's length (4 bytes) + pair + device ID: that device's claims on the pair. A pair's entries
  sit together, so that its devices are read with one seek;
- `U` + user ID: the mapping last written to the persons topic for a device user (or its conflict);
- `V` + user ID: the identity change log's last version for a device user (written with the log on);
- `D` + device ID: replay only, a device's persons part (the worker keeps it in the device's state).
All after an optional prefix (replay keeps them in its device database, after 0xFE: no device ID's UTF-8
starts with it). Pairs are `key+value` with a key that never holds "+" (`streams.persons.claims`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from streams import codec
from streams.persons.pairs import EMPTY, Entry, Summary


class KeyValueDB(Protocol):
    """What this needs of a rocksdict.Rdict opened in raw mode."""

    def get(self, key: Any) -> Any: ...

    def items(self, backwards: bool = False, from_key: Any = None) -> Iterator[tuple[Any, Any]]: ...


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_ABSENT = object()  # a savepoint's record of a key the batch had not written


class StoredPairs:
    def __init__(self, db: KeyValueDB, prefix: bytes = b"") -> None:
        self.db = db
        self.prefix = prefix
        self.dirty: dict[bytes, bytes | None] = {}
        # per pair's entry prefix, the devices written in this batch: a pair's entries are read with its
        # stored ones, without a look at every write of the batch
        self._dirty_entries: dict[bytes, dict[bytes, bytes | None]] = {}
        # since the savepoint: each written key's value in the batch before it (`rollback` puts them back)
        self._undo: dict[bytes, object] | None = None

    # -- one message, whole or not at all -------------------------------------------------------------------

    def savepoint(self) -> None:
        """From here, the writes can be taken back (`rollback`) until `release`."""
        self._undo = {}

    def release(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        """The batch's writes as they were at the savepoint."""
        undo, self._undo = self._undo or {}, None
        for key, old in undo.items():
            if old is _ABSENT:
                self.dirty.pop(key, None)
            else:
                self.dirty[key] = old  # type: ignore[assignment]
        for start, devices in self._dirty_entries.items():
            for device in [d for d in devices if start + d in undo]:
                if start + device in self.dirty:
                    devices[device] = self.dirty[start + device]
                else:
                    del devices[device]

    def _write(self, key: bytes, value: bytes | None) -> None:
        if self._undo is not None and key not in self._undo:
            self._undo[key] = self.dirty.get(key, _ABSENT)
        self.dirty[key] = value

    def _get(self, key: bytes) -> bytes | None:
        if key in self.dirty:
            return self.dirty[key]
        value = self.db.get(key)
        return value if isinstance(value, bytes) else None

    def _entry_prefix(self, pair: str) -> bytes:
        b = _bytes(pair)
        return self.prefix + b"E" + len(b).to_bytes(4, "big") + b

    def summary(self, pair: str) -> Summary:
        data = self._get(self.prefix + b"S" + _bytes(pair))
        return EMPTY if data is None else codec.decode_summary(data)

    def entry(self, pair: str, device_id: str) -> Entry | None:
        data = self._get(self._entry_prefix(pair) + _bytes(device_id))
        return None if data is None else codec.decode_entry(data)

    def entries(self, pair: str, limit: int | None = None) -> Sequence[tuple[str, Entry]]:
        """The pair's first `limit` entries by device ID (bytes), the batch's writes included."""
        start = self._entry_prefix(pair)
        dirty = self._dirty_entries.get(start, {})
        wanted = None if limit is None else limit + len(dirty)  # the batch may have deleted some of them
        found: dict[bytes, bytes | None] = {}
        for key, value in self.db.items(from_key=start):
            if not key.startswith(start) or (wanted is not None and len(found) >= wanted):
                break
            found[key[len(start):]] = value
        found.update(dirty)
        out = [(d.decode("utf-8", "surrogatepass"), codec.decode_entry(v)) for d, v in sorted(found.items())
               if v is not None]
        return out if limit is None else out[:limit]

    def put_entry(self, pair: str, device_id: str, entry: Entry | None) -> None:
        start = self._entry_prefix(pair)
        device = _bytes(device_id)
        value = None if entry is None else codec.encode_entry(entry)
        self._write(start + device, value)
        self._dirty_entries.setdefault(start, {})[device] = value

    def put_summary(self, pair: str, summary: Summary | None) -> None:
        self._write(self.prefix + b"S" + _bytes(pair), None if summary is None else codec.encode_summary(summary))

    def user(self, user_id: str) -> bytes | None:
        """The persons index: what was last written for a device user."""
        return self._get(self.prefix + b"U" + _bytes(user_id))

    def put_user(self, user_id: str, value: bytes | None) -> None:
        self._write(self.prefix + b"U" + _bytes(user_id), value)

    def version(self, user_id: str) -> int:
        """The identity change log's last version for a device user (0: none yet)."""
        data = self._get(self.prefix + b"V" + _bytes(user_id))
        return int(data) if data is not None else 0

    def put_version(self, user_id: str, version: int) -> None:
        self._write(self.prefix + b"V" + _bytes(user_id), str(version).encode())

    def device(self, device_id: str) -> bytes | None:
        return self._get(self.prefix + b"D" + _bytes(device_id))

    def put_device(self, device_id: str, value: bytes | None) -> None:
        self._write(self.prefix + b"D" + _bytes(device_id), value)

    def take(self) -> list[tuple[bytes, bytes | None]]:
        """The batch's writes (None: a deletion), forgotten here: the caller makes them durable."""
        items = list(self.dirty.items())
        self.dirty.clear()
        self._dirty_entries.clear()
        return items

    def devices(self) -> Iterator[tuple[str, bytes]]:
        """Every stored device's persons part (replay's final mapping)."""
        start = self.prefix + b"D"
        for key, value in self.db.items(from_key=start):
            if not key.startswith(start):
                break
            yield key[len(start):].decode("utf-8", "surrogatepass"), value
