"""Who owns a pair (persons.md §3), over any store of the pair's claims.

A pair's claims are kept per device (`Entry`: the login users that claim it from that device, and whether a
device user does), with a summary: the owner as last computed, so that a change is seen. A claim message from
a device replaces that device's entry whole, so the same message twice, or a device's messages again from an
earlier one, end in the same state.

Nothing is counted: the owner is decided from the pair's first `max_devices + 2` entries (more than
`max_devices` devices: no owner), read again on each message. A count kept beside the entries could disagree
with them after a crash cut a batch's changelog writes short; a read cannot. A pair claimed from a million
devices still costs one entry and a short read per message. The owner changes only while at most
`max_devices + 1` devices claim the pair, so the devices told of a change are few too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol


class Entry(NamedTuple):
    """One device's claims on a pair. `logins`: the login users that claim it from there, the two smallest
    (two are enough to know the pair is shared: an unbind releases the device's claims all at once);
    `device_user`: whether a device user claims it from there (and so wants to hear of its owner)."""

    logins: tuple[str, ...]
    device_user: bool


class Summary(NamedTuple):
    owner: str | None  # as computed after the last message
    shared: bool  # claimed by login users, and no owner (among the entries read)


EMPTY = Summary(None, False)


class PairView(Protocol):
    def summary(self, pair: str) -> Summary: ...

    def entry(self, pair: str, device_id: str) -> Entry | None: ...

    def entries(self, pair: str, limit: int | None = None) -> Sequence[tuple[str, Entry]]: ...

    def put_entry(self, pair: str, device_id: str, entry: Entry | None) -> None: ...

    def put_summary(self, pair: str, summary: Summary | None) -> None: ...


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
    if view.entry(pair, device_id) != entry:
        view.put_entry(pair, device_id, entry)
    before = view.summary(pair)
    limit = max_devices + 2
    entries = view.entries(pair, limit)
    owner = owner_of_entries((e for _, e in entries), len(entries), max_devices)
    after = Summary(owner, owner is None and any(e.logins for _, e in entries))
    if after != before:
        view.put_summary(pair, after if entries else None)
    if owner != before.owner:
        if len(entries) == limit:
            # only after a crash left the summary behind its entries: tell every device
            entries = view.entries(pair)
        return [(d, owner) for d, e in entries if e.device_user]
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

    def entries(self, pair: str, limit: int | None = None) -> Sequence[tuple[str, Entry]]:
        items = self.claims.get(pair, {}).items()
        if limit is None or len(items) <= limit:
            return list(items)
        out = []
        for item in items:
            out.append(item)
            if len(out) == limit:
                break
        return out

    def put_entry(self, pair: str, device_id: str, entry: Entry | None) -> None:
        if entry is None:
            entries = self.claims.get(pair)
            if entries is not None:
                entries.pop(device_id, None)
                if not entries:
                    del self.claims[pair]
        else:
            self.claims.setdefault(pair, {})[device_id] = entry

    def put_summary(self, pair: str, summary: Summary | None) -> None:
        if summary is not None:
            self.summaries[pair] = summary
        else:
            self.summaries.pop(pair, None)

    def owner(self, pair: str) -> str | None:
        return self.summary(pair).owner
