"""Who owns a pair (persons.md §3), over any store of the pair's claims.

A pair's claims are kept per device (`Entry`: the login users that claim it from that device, and whether a
device user does), with a summary: how many devices claim it, how many of them as a login user, and the owner
as last computed. A claim message from a device replaces that device's entry whole, so the same message twice,
or a device's messages again from an earlier one, end in the same state.

The owner is looked for only while few enough devices claim the pair (`max_devices`): a pair claimed from a
million devices costs one entry and one summary update per message, never a scan. The owner can change only
while at most `max_devices + 1` devices claim it, so the devices told of a change are few too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol


class Entry(NamedTuple):
    """One device's claims on a pair. `logins`: the login users claiming it from there, the two smallest
    (two are enough to know the pair is shared: an unbind releases the device's claims all at once);
    `device_user`: whether a device user claims it from there (and so wants to hear of its owner)."""

    logins: tuple[str, ...]
    device_user: bool


class Summary(NamedTuple):
    devices: int  # devices with an entry
    login_devices: int  # entries with a login user
    owner: str | None  # as computed after the last change


EMPTY = Summary(0, 0, None)


class PairView(Protocol):
    def summary(self, pair: str) -> Summary: ...

    def entry(self, pair: str, device_id: str) -> Entry | None: ...

    def entries(self, pair: str) -> Iterable[tuple[str, Entry]]: ...

    def put_entry(self, pair: str, device_id: str, entry: Entry | None) -> None: ...

    def put_summary(self, pair: str, summary: Summary) -> None: ...


def owner_of_entries(entries: Iterable[Entry], devices: int, max_devices: int) -> str | None:
    """The pair's owner: the only login user claiming it, from no more than `max_devices` devices."""
    if devices > max_devices:
        return None
    owner = None
    for entry in entries:
        logins = entry.logins
        if not logins:
            continue
        if len(logins) > 1 or (owner is not None and logins[0] != owner):
            return None
        owner = logins[0]
    return owner


def claim(view: PairView, pair: str, device_id: str, entry: Entry | None,
          max_devices: int) -> list[tuple[str, str | None]]:
    """Apply a device's claims on `pair` (None: it released them). Returns the answers to send: (device,
    owner) for every device whose device user claims the pair when its owner changed, and for this device when
    its device user claims it (it asked)."""
    old = view.entry(pair, device_id)
    before = view.summary(pair)
    if entry == old:
        return [(device_id, before.owner)] if entry is not None and entry.device_user else []
    devices = before.devices + (entry is not None) - (old is not None)
    login_devices = (before.login_devices + (entry is not None and bool(entry.logins))
                     - (old is not None and bool(old.logins)))
    view.put_entry(pair, device_id, entry)
    owner = None
    if devices <= max_devices and login_devices:
        owner = owner_of_entries((e for _, e in view.entries(pair)), devices, max_devices)
    view.put_summary(pair, Summary(devices, login_devices, owner))
    if owner != before.owner:
        # at most max_devices + 1 devices claim it now: an owner needs at most max_devices on one side
        return [(d, owner) for d, e in view.entries(pair) if e.device_user]
    if entry is not None and entry.device_user:
        return [(device_id, owner)]
    return []


class MemoryPairs:
    """Pairs in dicts: replay, and tests."""

    def __init__(self) -> None:
        self.claims: dict[str, dict[str, Entry]] = {}
        self.summaries: dict[str, Summary] = {}

    def summary(self, pair: str) -> Summary:
        return self.summaries.get(pair, EMPTY)

    def entry(self, pair: str, device_id: str) -> Entry | None:
        entries = self.claims.get(pair)
        return None if entries is None else entries.get(device_id)

    def entries(self, pair: str) -> Iterable[tuple[str, Entry]]:
        return list(self.claims.get(pair, {}).items())

    def put_entry(self, pair: str, device_id: str, entry: Entry | None) -> None:
        if entry is None:
            entries = self.claims.get(pair)
            if entries is not None:
                entries.pop(device_id, None)
                if not entries:
                    del self.claims[pair]
        else:
            self.claims.setdefault(pair, {})[device_id] = entry

    def put_summary(self, pair: str, summary: Summary) -> None:
        if summary.devices:
            self.summaries[pair] = summary
        else:
            self.summaries.pop(pair, None)

    def owner(self, pair: str) -> str | None:
        return self.summary(pair).owner
