"""What an enriched record claims (persons.md §2): the rules as tables.

A pair is named by its key: `identity key + "+" + value`. Identity keys never hold a "+" (identity.md §3: the
pattern `^[a-zA-Z_$][a-zA-Z0-9_$]{0,99}$`), so the name splits back at its first "+".
"""

from __future__ import annotations

from collections.abc import Mapping as MappingType
from typing import Any

from ..identity import PLATFORMS
from ..identity.platforms import ANONYMOUS_KEY, LOGIN_KEY

# pairs that never claim: the default IDs of every platform (identity.md §1), the anonymous ID, the login ID
UNCLAIMED_KEYS: frozenset[str] = frozenset(
    {p.default_key for p in PLATFORMS.values() if p.default_key is not None} | {ANONYMOUS_KEY, LOGIN_KEY})

# placeholders a client sends for "no value": claiming them would merge strangers. Compared after strip, lower
BLOCKED_VALUES: frozenset[str] = frozenset(
    {"", "null", "undefined", "none", "nil", "0", "-1", "anonymous", "unknown", "[object object]"})

# record types that claim nothing whatever they carry (a $SignUp made while logged in is decided by the caller)
NO_CLAIMS = "track_id_unbind"


def pair_key(key: str, value: str) -> str:
    return key + "+" + value


def split_pair(pair: str) -> tuple[str, str]:
    key, _, value = pair.partition("+")
    return key, value


def is_blocked_value(value: Any) -> bool:
    """The block test on the value a client sent: a string, or a number (0 and -1 are placeholders)."""
    if type(value) is str:
        return value.strip().lower() in BLOCKED_VALUES
    if type(value) in (int, float):
        return bool(value == 0 or value == -1)
    return False


def claimable_pairs(identities: MappingType[str, str] | None, hashed_keys: frozenset[str],
                    blocked: frozenset[str]) -> list[str]:
    """The pairs of a record's `identities` that it claims (but for the record type, which the caller checks).
    `blocked`: pairs of hashed keys whose value was a placeholder when the client sent it (the hash hides it)."""
    if not identities:
        return []
    out = []
    for key, value in identities.items():
        if key in UNCLAIMED_KEYS:
            continue
        if key in hashed_keys:
            pair = pair_key(key, value)
            if pair in blocked:
                continue
        elif value.strip().lower() in BLOCKED_VALUES:
            continue
        else:
            pair = pair_key(key, value)
        out.append(pair)
    return out
