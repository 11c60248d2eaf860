"""One device's part in the persons model (persons.md §2, §4): its claims, its first sign-up per default ID,
the owners the pair stage told it of, and the mapping of each of its device users.

`DevicePersons` is replaced, never changed in place: a batch that fails leaves the cached one as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from collections.abc import Mapping as MappingType
from dataclasses import dataclass, field
from typing import Any

from ..identity import DeviceState
from .claims import NO_CLAIMS, claimable_pairs, is_blocked_value, pair_key, split_pair
from .ids import UserIds
from .mapping import IDENTITY, LOGIN, Mapping
from .pairs import Entry


@dataclass(frozen=True, slots=True)
class DevicePersons:
    # pair -> {claimant user ID: whether it is a login user}: the device's active claims
    claims: MappingType[str, MappingType[str, bool]] = field(default_factory=dict)
    # device user -> the login user of the first $SignUp the device emitted while that user's default ID was its own
    signups: MappingType[str, str] = field(default_factory=dict)
    # pair -> its owner, as the pair stage last answered (pairs a device user here claims, and that have one)
    owners: MappingType[str, str] = field(default_factory=dict)
    # pairs of hashed keys whose value the client sent was a placeholder: the hash no longer shows it
    blocked: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.claims or self.signups or self.owners or self.blocked)

    def device_users(self) -> set[str]:
        users = set(self.signups)
        for claimants in self.claims.values():
            users.update(c for c, login in claimants.items() if not login)
        return users

    def entry(self, pair: str) -> Entry | None:
        """What the pair stage keeps of this device's claims on `pair`."""
        return _entry(self.claims.get(pair))

    def claim_count(self) -> int:
        return sum(len(c) for c in self.claims.values())


NOTHING = DevicePersons()

# Bounds on one device's persons part, which is stored inside its state: without them a client that binds ever
# new values (binding a key to another value releases nothing) or resets and logs in again and again would grow
# the state past what Kafka takes in one changelog record, and stop its partition. A device at a bound makes no
# new claims (or sign-ups) until an unbind releases some; the rules stay the device's own, whatever the others do
MAX_CLAIMS = 1000  # (pair, claimant) claims held at once
MAX_SIGNUPS = 1000  # device users with a first sign-up (one per default ID the device had)


@dataclass(slots=True)
class DeviceStep:
    """What one raw record did to its device's persons part."""

    persons: DevicePersons
    # pair -> the device's entry to send to the pair stage (None: it released the pair)
    changes: dict[str, Entry | None]
    # device users whose mapping may have changed
    users: set[str]
    # claims and sign-ups not made: the device was at its bound
    refused: int = 0


def may_claim(emitted: Sequence[MappingType[str, Any]]) -> bool:
    """Whether records can claim, release or sign up: most records (tracks of a device with nothing bound) are
    told apart here, before any call or lookup more."""
    for r in emitted:
        kind = r["type"]
        if kind == "track_signup" or kind == NO_CLAIMS:
            return True
        identities = r.get("identities")
        if identities is not None and len(identities) > 2:  # beyond the default and anonymous IDs
            return True
    return False


def observe(load: Callable[[], DevicePersons | None], device_id: str, ids: UserIds, before: DeviceState,
            after: DeviceState, raw: MappingType[str, Any], emitted: Sequence[MappingType[str, Any]],
            hashed_keys: frozenset[str] = frozenset()) -> DeviceStep | None:
    """The claims, releases and sign-ups of one raw record's emitted records (all stamped with `after`).
    None when it has none, without calling `load` (most records: tracks of a device that claims nothing)."""
    if not hashed_keys and not may_claim(emitted):
        return None
    placeholder = None
    action = raw.get("action")
    if hashed_keys and action in ("bind", "login") and raw.get("key") in hashed_keys and (
            is_blocked_value(raw.get("value" if action == "bind" else "id"))) and any(
            r["type"] == ("track_id_bind" if action == "bind" else "track_signup") for r in emitted):
        # only a bind or login that took effect: a login that changed nothing leaves the device's login as it was
        key = raw["key"]
        value = dict(after.bound).get(key) if raw["action"] == "bind" else (
            after.login_value if after.login_key == key else None)
        if value is not None:
            placeholder = pair_key(key, value)
    work: list[tuple[str, Any]] = []
    for r in emitted:
        kind = r["type"]
        if kind == NO_CLAIMS:
            ids_ = r.get("identities")
            if ids_:
                work.extend(("release", pair_key(k, v)) for k, v in ids_.items())
            continue
        if kind == "track_signup":
            work.append(("signup", r["user_id"]))
            if before.logged_in:  # the previous login's pairs: they belong to the previous user
                continue
        identities = r.get("identities")
        if identities and len(identities) > 2:  # beyond the default and anonymous IDs
            work.append(("claim", r))
    if not work and placeholder is None:
        return None
    persons = load() or NOTHING
    if placeholder is not None and placeholder not in persons.blocked:
        persons = _replace(persons, blocked=persons.blocked | {placeholder})
    claims: dict[str, MappingType[str, bool]] | None = None
    owners: dict[str, str] | None = None
    signups: dict[str, str] | None = None
    touched: set[str] = set()
    old_entries: dict[str, Entry | None] = {}
    logged_in = after.logged_in
    claim_count = -1  # counted when first needed
    refused = 0
    for what, item in work:
        if what == "signup":
            device_user = ids.device_user(device_id, after.default_id)
            if device_user not in persons.signups and (signups is None or device_user not in signups):
                if len(signups if signups is not None else persons.signups) >= MAX_SIGNUPS:
                    refused += 1
                    continue
                if signups is None:
                    signups = dict(persons.signups)
                signups[device_user] = item
                touched.add(device_user)
            continue
        current = claims if claims is not None else persons.claims
        if what == "release":
            claimants = current.get(item)
            if claimants is None:
                continue
            if claims is None:
                claims = dict(persons.claims)
            old_entries.setdefault(item, _entry(claimants))
            del claims[item]
            if claim_count >= 0:
                claim_count -= len(claimants)
            touched.update(c for c, login in claimants.items() if not login)
            current_owners = owners if owners is not None else persons.owners
            if item in current_owners:
                if owners is None:
                    owners = dict(persons.owners)
                del owners[item]
            continue
        record = item
        claimant = record["user_id"]
        for pair in claimable_pairs(record["identities"], hashed_keys, persons.blocked):
            claimants = current.get(pair)
            if claimants is not None and claimant in claimants:
                continue
            if claim_count < 0:
                claim_count = sum(len(c) for c in current.values())
            if claim_count >= MAX_CLAIMS:
                refused += 1
                continue
            claim_count += 1
            if claims is None:
                claims = dict(persons.claims)
                current = claims
            old_entries.setdefault(pair, _entry(claimants))
            claims[pair] = {**(claimants or {}), claimant: logged_in}
            if not logged_in:
                touched.add(claimant)
    if claims is None and signups is None and owners is None:
        if placeholder is None and not refused:
            return None
        return DeviceStep(persons, {}, set(), refused)
    persons = _replace(persons, claims=claims, signups=signups, owners=owners)
    changes = {}
    for pair, old in old_entries.items():
        new = persons.entry(pair)
        if new != old:
            changes[pair] = new
    return DeviceStep(persons, changes, touched, refused)


def on_owner(persons: DevicePersons, pair: str, owner: str | None) -> tuple[DevicePersons, set[str]]:
    """The pair stage's answer: `pair`'s owner now. Kept only while a device user here claims the pair (an
    answer can arrive after the device released it); returns the device users whose mapping it may change."""
    claimants = persons.claims.get(pair)
    if not claimants or all(claimants.values()):
        return persons, set()
    if persons.owners.get(pair) == owner:
        return persons, set()
    owners = dict(persons.owners)
    if owner is None:
        del owners[pair]
    else:
        owners[pair] = owner
    return _replace(persons, owners=owners), {c for c, login in claimants.items() if not login}


def mapping_of(persons: DevicePersons, device_id: str, user: str,
               owner_of: Callable[[str], str | None]) -> tuple[Mapping | None, bool]:
    """Device user `user`'s mapping (§4), and whether it is in conflict (owned pairs of several owners)."""
    person = persons.signups.get(user)
    if person is not None:
        return Mapping(user, person, LOGIN, device_id), False
    owned: dict[str, list[str]] = {}
    for pair, claimants in persons.claims.items():
        if claimants.get(user) is False:
            owner = owner_of(pair)
            if owner is not None:
                owned.setdefault(owner, []).append(pair)
    if len(owned) != 1:
        return None, len(owned) > 1
    (person, pairs), = owned.items()
    first = min(pairs, key=lambda p: p.encode("utf-8", "surrogatepass"))
    return Mapping(user, person, IDENTITY, device_id, split_pair(first)[0]), False


def mappings(persons: DevicePersons, device_id: str, users: Iterable[str] | None = None,
             owner_of: Callable[[str], str | None] | None = None) -> dict[str, tuple[Mapping | None, bool]]:
    """The mapping of each of `users` (default: every device user of the device); owners as the device was told
    (`owner_of` None) or from elsewhere (replay asks its pair table)."""
    lookup = owner_of if owner_of is not None else persons.owners.get
    return {u: mapping_of(persons, device_id, u, lookup)
            for u in (users if users is not None else persons.device_users())}


def _entry(claimants: MappingType[str, bool] | None) -> Entry | None:
    if not claimants:
        return None
    return Entry(tuple(sorted(c for c, login in claimants.items() if login)[:2]), not all(claimants.values()))


def _replace(persons: DevicePersons, *, claims: Any = None, signups: Any = None, owners: Any = None,
             blocked: frozenset[str] | None = None) -> DevicePersons:
    return DevicePersons(
        claims=persons.claims if claims is None else claims,
        signups=persons.signups if signups is None else signups,
        owners=persons.owners if owners is None else owners,
        blocked=persons.blocked if blocked is None else blocked,
    )
