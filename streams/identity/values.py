"""How the SDKs read the values a record carries: IDs, bound values, identity keys.

Lives here: JavaScript's `String(number)` and `trim()`, string length in UTF-16 code units (what the SDKs'
`.length` counts), and the validators of identity.md §3 for IDs, values and keys, for the mini-program rules
and for the Web rules. Each validator returns the normalised string or raises `Rejected`.
Not here: which keys an action refuses (that is per action and per platform: `actions.py`).
"""

from __future__ import annotations

import math
import re

from .errors import Reason, Rejected

MAX_SAFE_INTEGER = 2**53 - 1
MAX_ID_LENGTH = 255

# ECMAScript WhiteSpace and LineTerminator: what String.prototype.trim() removes (Python's strip() differs)
JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)

KEY_PATTERN = re.compile(r"[a-zA-Z_$][a-zA-Z0-9_$]{0,99}")
RESERVED_WORDS = frozenset(
    {
        "distinct_id", "original_id", "device_id", "time", "properties", "id", "first_id", "second_id",
        "users", "events", "event", "user_id", "date", "datetime",
    }
)  # fmt: skip
RESERVED_PREFIXES = ("user_group", "user_tag")
DIGITS = re.compile(r"[0-9]+")


def js_trim(s: str) -> str:
    return s.strip(JS_WHITESPACE)


def utf16_length(s: str) -> int:
    if s.isascii():
        return len(s)
    return len(s) + sum(1 for c in s if ord(c) > 0xFFFF)


def is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def js_number(x: int | float) -> str:
    """`String(x)` in JavaScript: a JSON integer is a double there, printed in its shortest round-trip form."""
    f = float(x)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "Infinity" if f > 0 else "-Infinity"
    if f == 0:
        return "0"
    sign = "-" if f < 0 else ""
    mantissa, _, exp = repr(abs(f)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    # n: where the decimal point sits relative to the first significant digit (ECMA-262 Number::toString)
    n = len(whole) + int(exp or 0) - (len(whole + frac) - len((whole + frac).lstrip("0")))
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * -n + digits
    else:
        e = n - 1
        tail = f"e{'+' if e >= 0 else '-'}{abs(e)}"
        body = (digits if k == 1 else digits[0] + "." + digits[1:]) + tail
    return sign + body


def _checked_length(s: str, field: str) -> str:
    if s == "":
        raise Rejected(Reason.EMPTY_VALUE, field, "must not be empty")
    if utf16_length(s) > MAX_ID_LENGTH:
        raise Rejected(Reason.TOO_LONG, field, f"longer than {MAX_ID_LENGTH} characters")
    return s


def _web_string(s: str, field: str) -> str:
    if not js_trim(s):
        raise Rejected(Reason.EMPTY_VALUE, field, "must not be empty or blank")
    return s


def identity_id(x: object, field: str, *, web: bool) -> str:
    """An ID for identify and login (identity.md §3 "IDs"; Web: any number or non-blank string)."""
    if isinstance(x, str):
        return _web_string(x, field) if web else _checked_length(x, field)
    if is_number(x):
        assert isinstance(x, int | float)
        if web:
            return js_number(x)
        # the exact decimal of an integer: beyond 2^53 JavaScript would round it, and the ID would not be
        # the one the producer sent
        s = str(x) if isinstance(x, int) else js_number(x)
        if DIGITS.fullmatch(s):
            return s
        raise Rejected(Reason.INVALID_NUMBER, field, f"a number ID must be a non-negative integer, got {s}")
    raise Rejected(Reason.WRONG_TYPE, field, f"must be a string or a number, got {type_name(x)}")


def identity_value(x: object, field: str, *, web: bool, strings_only: bool = False) -> str:
    """A bound value or a reset ID (identity.md §3 "Values"; on the Web bind/unbind take strings only)."""
    if isinstance(x, str):
        return _web_string(x, field) if web else _checked_length(x, field)
    if is_number(x) and not (web and strings_only):
        assert isinstance(x, int | float)
        if not web and float(x).is_integer() and abs(x) > MAX_SAFE_INTEGER:
            raise Rejected(Reason.INVALID_NUMBER, field, "an integer beyond ±(2^53 - 1) is not a safe value")
        return js_number(x)
    wanted = "a string" if web and strings_only else "a string or a number"
    raise Rejected(Reason.WRONG_TYPE, field, f"must be {wanted}, got {type_name(x)}")


def identity_key(x: object, field: str, *, web: bool) -> str:
    """An identity key name: the SDKs' key pattern, and not a reserved word (compared without case)."""
    if not isinstance(x, str):
        raise Rejected(Reason.WRONG_TYPE, field, f"must be a string, got {type_name(x)}")
    if not KEY_PATTERN.fullmatch(x):
        shown = x if len(x) <= 40 else x[:40] + "…"
        raise Rejected(
            Reason.INVALID_KEY,
            field,
            f"{shown!r} is no key: 1-100 letters, digits, _ or $, not starting with a digit",
        )
    low = x.lower()
    if (low in RESERVED_WORDS and not (web and low == "device_id")) or low.startswith(RESERVED_PREFIXES):
        raise Rejected(Reason.RESERVED_KEY, field, f"{x!r} is a reserved word")
    return x


def type_name(x: object) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "boolean"
    if is_number(x):
        return "number"
    if isinstance(x, str):
        return "string"
    if isinstance(x, list):
        return "array"
    if isinstance(x, dict):
        return "object"
    return type(x).__name__
