"""Adobe customer IDs (identity.md §4): what `set_customer_ids` takes, and how it merges.

Lives here: parsing a record's `customer_ids` and `hash` into entries (validation first: one bad entry
refuses the whole record), the SHA-256 option, and the merge (a mentioned type is replaced whole, in place;
unmentioned types stay). Not here: the login bridge (it is a login or a logout: `actions.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from .errors import Reason, Rejected
from .state import CustomerId, CustomerIdValue
from .values import is_number, js_number, js_trim, type_name

AUTH_STATES: dict[str, int] = {"UNKNOWN": 0, "AUTHENTICATED": 1, "LOGGED_OUT": 2}
UNKNOWN, AUTHENTICATED, LOGGED_OUT = 0, 1, 2
HASH_TYPES = frozenset({"SHA-256", "SHA256", "sha256", "sha-256"})

# an entry to store, or None: a falsy scalar ("", 0, false), which leaves the type's entry as it was
Update = tuple[str, CustomerId | None]


def parse(customer_ids: object, hash_type: object) -> list[Update]:
    if not isinstance(customer_ids, dict):
        raise Rejected(Reason.WRONG_TYPE, "customer_ids", f"must be an object, got {type_name(customer_ids)}")
    if hash_type is not None and not (isinstance(hash_type, str) and hash_type in HASH_TYPES):
        raise Rejected(Reason.INVALID_HASH, "hash", f"must be one of {', '.join(sorted(HASH_TYPES))}")
    hashing = hash_type if isinstance(hash_type, str) else None
    return [(t, _entry(v, f"customer_ids.{t}", hashing)) for t, v in customer_ids.items()]


def _entry(value: object, field: str, hash_type: str | None) -> CustomerId | None:
    if value is None:
        raise Rejected(Reason.INVALID_CUSTOMER_ID, field, "must not be null")
    if isinstance(value, dict):
        if "hashType" in value:
            raise Rejected(Reason.INVALID_HASH, f"{field}.hashType", "hash the whole record with `hash`")
        id_ = _id(value.get("id"), f"{field}.id")
        auth = _auth_state(value, f"{field}.authState")
        return _hashed(id_, auth, hash_type)
    if isinstance(value, list):
        raise Rejected(Reason.INVALID_CUSTOMER_ID, field, "must be an id or an object {id, authState}, got array")
    id_ = _id(value, field)
    return None if id_ is None else _hashed(id_, UNKNOWN, hash_type)


def _id(value: object, field: str) -> CustomerIdValue | None:
    """A usable id, or None for the falsy ones (missing, null, "", 0, false): an entry without id."""
    if value is None or value is False or value == "" or (is_number(value) and value == 0):
        return None
    if value is True or isinstance(value, str) or is_number(value):
        assert isinstance(value, str | int | float)
        return value
    raise Rejected(Reason.INVALID_CUSTOMER_ID, field, f"must be a string, a number or true, got {type_name(value)}")


def _auth_state(entry: Mapping[str, object], field: str) -> int:
    if "authState" not in entry:
        return UNKNOWN
    value = entry["authState"]
    if isinstance(value, str) and value in AUTH_STATES:
        return AUTH_STATES[value]
    if is_number(value) and value in (0, 1, 2):
        assert isinstance(value, int | float)
        return int(value)
    raise Rejected(
        Reason.INVALID_AUTH_STATE, field, "must be 0, 1, 2, UNKNOWN, AUTHENTICATED or LOGGED_OUT"
    )


def _hashed(id_: CustomerIdValue | None, auth: int, hash_type: str | None) -> CustomerId:
    if id_ is None or hash_type is None:
        return CustomerId(id_, auth)
    if isinstance(id_, str):
        text = id_
    else:
        text = "true" if id_ is True else js_number(id_)
    # ECID hashes Latin-1 bytes and gives up above U+00FF; we hash UTF-8 (identity.md §4, deliberate)
    digest = hashlib.sha256(js_trim(text).lower().encode("utf-8", "surrogatepass")).hexdigest()
    return CustomerId(digest, auth, hash_type)


def merge(
    current: tuple[tuple[str, CustomerId], ...], updates: list[Update]
) -> tuple[tuple[str, CustomerId], ...]:
    merged = dict(current)
    for type_, entry in updates:
        if entry is not None:
            merged[type_] = entry  # in place when present: a re-set type keeps its position
    return tuple(merged.items())
