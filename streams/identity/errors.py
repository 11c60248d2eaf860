"""Why a raw record is refused: one reason enum with stable codes, and the one exception that carries it.

Lives here: `Reason` and `Rejected`. Raised anywhere in `identity/` or `codec`, caught in one place
(`streams.enrich`), which turns it into a dead-letter record. Codes are a contract with whoever reads the
dead-letter topic: never rename or reuse one; add new ones at the end.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # the bytes
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    # a field's form
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_VALUE = "empty_value"
    TOO_LONG = "too_long"
    INVALID_NUMBER = "invalid_number"
    # identity keys
    INVALID_KEY = "invalid_key"
    RESERVED_KEY = "reserved_key"
    REFUSED_KEY = "refused_key"
    # the envelope
    UNKNOWN_PLATFORM = "unknown_platform"
    UNKNOWN_ACTION = "unknown_action"
    UNSUPPORTED_ON_PLATFORM = "unsupported_on_platform"
    # customer IDs (Adobe)
    INVALID_AUTH_STATE = "invalid_auth_state"
    INVALID_HASH = "invalid_hash"
    INVALID_CUSTOMER_ID = "invalid_customer_id"
    INVALID_LOGIN_ID = "invalid_login_id"
    # the output side: the record was valid but cannot be written (e.g. a lone surrogate in a string)
    UNENCODABLE = "unencodable"
    # a defect of ours; kept rather than allowed to stop the worker
    INTERNAL_ERROR = "internal_error"
    # the worker: the device's stored state cannot be read (damaged or of an unknown format); the record is kept
    # and the device's state left as it is
    UNREADABLE_STATE = "unreadable_state"


class Rejected(Exception):
    """A raw record that is bad input. `field` names the offending field as a dotted path ("" = the record)."""

    __slots__ = ("detail", "field", "reason")

    def __init__(self, reason: Reason, field: str, detail: str) -> None:
        super().__init__(f"{reason}: {field or '<record>'}: {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail
