"""The identity engine against a small model of identity.md, driven by a hypothesis state machine.

What lives here: `Device` and `model_apply`, a model of identity.md §1-§4 written from the spec alone (a plain
record per device, the spec's validation rules, its tables of keys), and `IdentityMachine`, which has one
`@rule` per action, sends the same raw record to the engine (`apply`) and to the enrich step
(`Enricher.step`), and compares every emitted record, every rejection and the public fields of the state
with the model. Nothing in the model calls `streams.identity` to work out what to expect.

Values come from small pools on purpose: logins equal to the anonymous ID, re-binding a key, unbinding the
pair a login ID is made of and repeated logins only happen when values collide. Pool entries starting with
`@` name a value of the device's current state (`@anon` is its anonymous ID) and are resolved per record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from streams import codec
from streams.enrich import Enricher, MemoryStore, Outcome
from streams.identity import DeviceState, Rejected, Settings, apply

# -- the spec's tables (identity.md §1, §3), copied by hand: the model must not read the engine's ---------

LOGIN_KEY = "$identity_login_id"
ANON_KEY = "$identity_anonymous_id"
DEFAULT_KEYS: dict[str, str | None] = {
    "mp-wechat": "$identity_mp_id",
    "mp-alipay": "$identity_ali_mp_id",
    "web": "$identity_cookie_id",
    "mp-jd": None,  # no global user association
}
WECHAT_LOGIN_REFUSED = frozenset(
    {"$mp_id", "$mp_openid", "$identity_mp_openid", "$identity_mp_unionid", "$mp_unionid"}
)
RESERVED_WORDS = frozenset(
    {
        "distinct_id", "original_id", "device_id", "time", "properties", "id", "first_id", "second_id",
        "users", "events", "event", "user_id", "date", "datetime",
    }
)  # fmt: skip
KEY_PATTERN = re.compile(r"[a-zA-Z_$][a-zA-Z0-9_$]{0,99}")
# what JavaScript's trim() removes (the web rule "not blank after trimming", and the hash of §4)
JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
MAX_SAFE_INTEGER = 2**53 - 1
HASH_TYPES = ("SHA-256", "SHA256", "sha256", "sha-256")
AUTH_NAMES = {"UNKNOWN": 0, "AUTHENTICATED": 1, "LOGGED_OUT": 2}
LOGIN_CUSTOMER_ID_TYPE = "userid"  # Settings' default
PROFILE_TYPES = (
    "profile_set", "profile_set_once", "profile_increment", "profile_append", "profile_unset", "profile_delete",
)  # fmt: skip

# the fields identity.md §2 says every record carries (or leaves out); compared exactly
IDENTITY_FIELDS = (
    "type", "event", "distinct_id", "anonymous_id", "login_id", "original_id", "identities", "customer_ids",
)  # fmt: skip
PASSED_THROUGH = ("device_id", "platform", "properties", "time")


class _Absent:
    """A field the raw record leaves out (None would be JSON null)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()

# -- the model ---------------------------------------------------------------------------------------------

CustomerEntry = tuple[Any, int, str | None]  # id (None: an entry without id), authState, hashType


@dataclass
class Device:
    device_id: str
    platform: str
    anonymous_id: str
    default_id: str
    login_key: str | None = None
    login_value: str | None = None
    bound: dict[str, str] = field(default_factory=dict)
    customer_ids: dict[str, CustomerEntry] = field(default_factory=dict)

    @property
    def web(self) -> bool:
        return self.platform == "web"

    @property
    def default_key(self) -> str | None:
        return DEFAULT_KEYS[self.platform]

    @property
    def associates(self) -> bool:
        return self.default_key is not None

    @property
    def login_id(self) -> str | None:
        """§2: the login value, prefixed with its key unless the key is the plain login ID's."""
        match self.login_key, self.login_value:
            case _, None:
                return None
            case key, value if key == LOGIN_KEY:
                return value
            case key, value:
                return f"{key}+{value}"
        return None

    @property
    def distinct_id(self) -> str:
        return self.login_id or self.anonymous_id

    def stored_identities(self) -> dict[str, str]:
        """Default ID, the login pair, the bound IDs: §2's identities without the anonymous ID."""
        assert self.default_key is not None
        logged_in = self.login_key is not None and self.login_value is not None
        login = {self.login_key: self.login_value} if logged_in else {}
        return {self.default_key: self.default_id} | login | self.bound

    def stamp(self) -> dict[str, Any]:
        """The identity fields of §2 that a record of this state carries."""
        out: dict[str, Any] = {"distinct_id": self.distinct_id, "anonymous_id": self.anonymous_id}
        if self.login_id is not None:
            out["login_id"] = self.login_id
        if self.associates:
            out["identities"] = self.stored_identities() | {ANON_KEY: self.anonymous_id}
        visible = {t: visible_customer_id(e) for t, e in self.customer_ids.items() if e[0] is not None}
        if visible:
            out["customer_ids"] = visible
        return out

    def log_out(self) -> None:
        self.login_key = self.login_value = None
        self.bound = {}


def visible_customer_id(entry: CustomerEntry) -> dict[str, Any]:
    id_, auth, hash_type = entry
    out: dict[str, Any] = {"id": id_, "authState": auth}
    if hash_type is not None:
        out["hashType"] = hash_type
    return out


@dataclass
class Expected:
    """What the model says a valid raw record does: the device afterwards and the records it emits."""

    device: Device
    records: list[dict[str, Any]]
    # which generated ID the engine must have made: "anonymous" (web identify()), "reset", or None
    generated: str | None = None


class ModelRejects(Exception):
    """The model says the record is bad input; `fields` holds every field it found at fault."""

    def __init__(self, fields: set[str]) -> None:
        super().__init__(", ".join(sorted(fields)))
        self.fields = fields


class Checks:
    """Collects the offending fields of one record, so that one rejection names them all."""

    def __init__(self) -> None:
        self.bad: set[str] = set()

    def fail(self, name: str) -> None:
        self.bad.add(name)

    def done(self) -> None:
        if self.bad:
            raise ModelRejects(self.bad)


def is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def js_string(x: int | float) -> str:
    """JavaScript's String(number), enough of it for the pools' numbers (fractions without an exponent,
    integers below 1e21): a number is a double there, so a big integer is written as the nearest double's
    shortest digits, padded with zeros (2^64 + 1 gives "18446744073709552000")."""
    f = float(x)
    if not f.is_integer():
        return repr(f)
    text = repr(abs(f))
    if "e" in text:
        mantissa, _, exponent = text.partition("e")
        digits = mantissa.replace(".", "")
        text = digits + "0" * (int(exponent) + 1 - len(digits))
    return ("-" if f < 0 else "") + text.removesuffix(".0")


def decimal_string(x: int | float) -> str:
    """§3 "IDs": a non-negative integer "turned into its decimal string", digit for digit."""
    return str(int(x))


def valid_string(x: str, web: bool) -> bool:
    if web:
        return x.strip(JS_WHITESPACE) != ""
    return 1 <= len(x) <= 255  # the pools hold no character beyond the BMP


def check_id(x: object, name: str, web: bool, checks: Checks) -> str | None:
    """§3 "IDs" (identify, login); web: any number, any non-blank string."""
    if isinstance(x, str):
        if valid_string(x, web):
            return x
    elif is_number(x):
        assert isinstance(x, int | float)
        if web:  # "any number (written as JavaScript's String() writes it)"
            return js_string(x)
        if float(x).is_integer() and x >= 0:
            return decimal_string(x)
    checks.fail(name)
    return None


def check_value(x: object, name: str, web: bool, checks: Checks, *, strings_only: bool = False) -> str | None:
    """§3 "Values" (bind/unbind values, the reset id); web bind/unbind take strings only."""
    if isinstance(x, str):
        if valid_string(x, web):
            return x
    elif is_number(x) and not (web and strings_only):
        assert isinstance(x, int | float)
        if web or not (float(x).is_integer() and abs(x) > MAX_SAFE_INTEGER):
            return js_string(x)
    checks.fail(name)
    return None


def check_key(x: object, name: str, web: bool, checks: Checks) -> str | None:
    """§3 "Keys": the pattern, and no reserved word (compared without case; `device_id` is fine on web)."""
    if isinstance(x, str) and KEY_PATTERN.fullmatch(x):
        low = x.lower()
        reserved = low in RESERVED_WORDS and not (web and low == "device_id")
        if not reserved and not low.startswith(("user_group", "user_tag")):
            return x
    checks.fail(name)
    return None


def check_envelope(raw: dict[str, Any], checks: Checks) -> None:
    if "properties" in raw and not isinstance(raw["properties"], dict):
        checks.fail("properties")
    if "time" in raw and not (isinstance(raw["time"], int) and not isinstance(raw["time"], bool)):
        checks.fail("time")


# persons.md §1, written from the spec's text with Python's uuid module
PERSON_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:streams:person")


def user_id_of(device_id: str, dev: Any) -> str:
    """The user ID of a model device: its login user while logged in, else its device user."""
    if dev.login_id is not None:
        return str(uuid.uuid5(PERSON_NAMESPACE, "login:" + dev.login_id))
    return str(uuid.uuid5(PERSON_NAMESPACE, f"device:{len(device_id)}:{device_id}{dev.default_id}"))


def record(dev: Device, type_: str, event_name: str | None, **overrides: Any) -> dict[str, Any]:
    """A record as §2 stamps it; an override of None removes the field."""
    out = dev.stamp() | {"type": type_} | ({} if event_name is None else {"event": event_name}) | overrides
    return {name: value for name, value in out.items() if value is not None or name not in overrides}


# -- the actions, one function each (identity.md §3, §4) ------------------------------------------------

Action = Callable[[Device, dict[str, Any], Checks], Expected]


def m_track(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    name = raw.get("event")
    if not isinstance(name, str) or name == "":  # enriched.schema.json: an event name is never empty
        checks.fail("event")
    checks.done()
    assert isinstance(name, str)
    return Expected(dev, [record(dev, "track", name)])


def m_profile(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    checks.done()
    return Expected(dev, [record(dev, raw["action"], None)])


def m_identify(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    if "id" not in raw:
        if not dev.web:  # only the Web SDK's identify() makes an ID
            checks.fail("id")
        checks.done()
        return Expected(dev, [], generated="anonymous")
    new_id = check_id(raw["id"], "id", dev.web, checks)
    checks.done()
    assert new_id is not None
    if dev.login_value is not None:
        event("identify: while logged in")
    dev.anonymous_id = new_id  # while logged in distinct_id stays the login ID (it is derived)
    return Expected(dev, [])


def login_key_of(dev: Device, raw: dict[str, Any], checks: Checks) -> str:
    if "key" not in raw:
        return LOGIN_KEY
    key = check_key(raw["key"], "key", dev.web, checks)
    if key is None:
        return LOGIN_KEY
    refused = {ANON_KEY}
    if dev.default_key is not None:
        refused.add(dev.default_key)
    if dev.platform == "mp-wechat":
        refused |= WECHAT_LOGIN_REFUSED
    if key in refused or (not dev.associates and key != LOGIN_KEY):
        checks.fail("key")
    return key


def m_login(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    key = login_key_of(dev, raw, checks)
    id_ = check_id(raw.get("id", ABSENT), "id", dev.web, checks)
    checks.done()
    assert id_ is not None
    return Expected(dev, log_in(dev, key, id_))


def log_in(dev: Device, key: str, id_: str) -> list[dict[str, Any]]:
    """login(id) under `key`, validated: the no-op rules, else `$SignUp` (§3 login, and its platform rules)."""
    logged_in = dev.login_value is not None
    if (dev.login_key, dev.login_value) == (key, id_):
        event("login: no-op, the current login")
        return []
    if not dev.associates:
        if id_ == dev.distinct_id:
            event("login: no-op, distinct_id (no association)")
            return []
    elif id_ == dev.anonymous_id:
        if not dev.web or not logged_in or key == dev.login_key or key in dev.bound:
            event("login: no-op, the anonymous ID")
            return []
        event("login: web, the anonymous ID under a new key while logged in")
    if logged_in:
        event("login: while logged in")
    signup_identities = None
    if dev.associates:
        signup_identities = dev.stored_identities() | {key: id_} | {ANON_KEY: dev.anonymous_id}
    original_id = dev.anonymous_id
    dev.login_key, dev.login_value, dev.bound = key, id_, {}
    return [record(dev, "track_signup", "$SignUp", original_id=original_id, identities=signup_identities)]


def m_bind(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    if not dev.associates:
        checks.fail("action")
    key = check_key(raw.get("key", ABSENT), "key", dev.web, checks)
    refused = {LOGIN_KEY, ANON_KEY, dev.default_key, dev.login_key}
    if dev.platform == "mp-wechat":
        refused.add("$mp_id")
    if key in refused:
        checks.fail("key")
    value = check_value(raw.get("value", ABSENT), "value", dev.web, checks, strings_only=True)
    checks.done()
    assert key is not None and value is not None
    if key in dev.bound:
        event("bind: a bound key again")
    dev.bound[key] = value
    return Expected(dev, [record(dev, "track_id_bind", "$BindID")])


def m_unbind(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    if not dev.associates:
        checks.fail("action")
    key = check_key(raw.get("key", ABSENT), "key", dev.web, checks)
    if key in (LOGIN_KEY, ANON_KEY):
        checks.fail("key")
    value = check_value(raw.get("value", ABSENT), "value", dev.web, checks, strings_only=True)
    checks.done()
    assert key is not None and value is not None
    # web: the implicit logout needs the pair among the identities: the login's own pair or a bound pair
    held = (key, value) == (dev.login_key, dev.login_value) or dev.bound.get(key) == value
    if dev.bound.get(key) == value:
        del dev.bound[key]
    if dev.login_id == f"{key}+{value}":
        event(f"unbind: the login ID's pair, held={held}, web={dev.web}")
        if held or not dev.web:
            dev.login_key = dev.login_value = None  # the bound IDs stay
    return Expected(dev, [record(dev, "track_id_unbind", "$UnbindID", identities={key: value}, login_id=None)])


def m_logout(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    checks.done()
    dev.log_out()
    return Expected(dev, [])


def m_reset_anonymous_id(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    if not dev.associates:
        checks.fail("action")
    new_id = None
    if "id" in raw:
        new_id = check_value(raw["id"], "id", dev.web, checks)
    checks.done()
    if dev.login_value is not None:  # refused while logged in, once the record was valid
        event("reset: while logged in")
        return Expected(dev, [])
    if new_id is None:
        return Expected(dev, [], generated="reset")
    dev.anonymous_id = dev.default_id = new_id
    return Expected(dev, [])


def customer_id_of(x: object, name: str, checks: Checks) -> Any:
    """§4: a usable id, or None for "" / 0 / false / null / missing; arrays and objects are refused."""
    if x is None or x is False or x is ABSENT or x == "" or (is_number(x) and x == 0):
        return None
    if x is True or isinstance(x, str) or is_number(x):
        return x
    checks.fail(name)
    return None


def auth_state_of(entry: dict[str, Any], name: str, checks: Checks) -> int:
    value = entry.get("authState", 0)
    if isinstance(value, str) and value in AUTH_NAMES:
        return AUTH_NAMES[value]
    if is_number(value) and value in (0, 1, 2):
        return int(value)
    checks.fail(name)
    return 0


def hashed(id_: Any, hash_type: str | None) -> tuple[Any, str | None]:
    """§4: with `hash`, the id becomes the hex SHA-256 of its trimmed, lowercased text, in UTF-8."""
    if id_ is None or hash_type is None:
        return id_, None
    text = "true" if id_ is True else js_string(id_) if is_number(id_) else str(id_)
    return hashlib.sha256(text.strip(JS_WHITESPACE).lower().encode()).hexdigest(), hash_type


def customer_entry(value: object, name: str, hash_type: str | None, checks: Checks) -> CustomerEntry | None:
    """One type's value as an entry to store, or None for a falsy scalar (the type keeps its entry)."""
    if value is None or isinstance(value, list):
        checks.fail(name)
        return None
    if isinstance(value, dict):
        if "hashType" in value:
            checks.fail(name)
        id_ = customer_id_of(value.get("id", ABSENT), name, checks)
        auth = auth_state_of(value, name, checks)
        new_id, new_hash = hashed(id_, hash_type)
        return new_id, auth, new_hash
    id_ = customer_id_of(value, name, checks)
    if id_ is None:
        return None
    new_id, new_hash = hashed(id_, hash_type)
    return new_id, 0, new_hash


def m_set_customer_ids(dev: Device, raw: dict[str, Any], checks: Checks) -> Expected:
    hash_type = raw.get("hash")
    if "hash" in raw and not (isinstance(hash_type, str) and hash_type in HASH_TYPES):
        checks.fail("hash")
        hash_type = None
    given = raw.get("customer_ids", ABSENT)
    updates: dict[str, CustomerEntry | None] = {}
    if isinstance(given, dict):
        for type_, value in given.items():
            updates[type_] = customer_entry(value, "customer_ids", hash_type, checks)
    else:
        checks.fail("customer_ids")
    bridge = updates.get(LOGIN_CUSTOMER_ID_TYPE)
    login_id = None
    if bridge is not None and bridge[1] == 1 and bridge[0] is not None:
        # the login bridge: the id as stored, a number as its decimal string, must be a valid login ID
        login_id = check_id(bridge[0], "customer_ids", dev.web, checks)
    checks.done()
    for type_, entry in updates.items():
        if entry is not None:
            dev.customer_ids[type_] = entry
    if login_id is not None:
        event("customer IDs: bridge login")
        return Expected(dev, log_in(dev, LOGIN_KEY, login_id))
    if bridge is not None and bridge[1] == 2:
        event(f"customer IDs: bridge logout, logged in={dev.login_value is not None}")
        dev.log_out()
    return Expected(dev, [])


ACTIONS: dict[str, Action] = {
    "track": m_track,
    "identify": m_identify,
    "login": m_login,
    "bind": m_bind,
    "unbind": m_unbind,
    "logout": m_logout,
    "reset_anonymous_id": m_reset_anonymous_id,
    "set_customer_ids": m_set_customer_ids,
    **dict.fromkeys(PROFILE_TYPES, m_profile),
}


def model_apply(dev: Device, raw: dict[str, Any]) -> Expected:
    """One raw record on a copy of `dev`: what identity.md says happens, or `ModelRejects`."""
    checks = Checks()
    if raw.get("device_id") != dev.device_id:
        checks.fail("device_id")  # the machine only sends a foreign device_id when it is invalid
    if raw.get("platform") not in DEFAULT_KEYS:
        checks.fail("platform")
    action = ACTIONS.get(raw.get("action", "track"))
    if action is None:
        checks.fail("action")
        checks.done()
    assert action is not None
    check_envelope(raw, checks)
    return action(copy.deepcopy(dev), raw, checks)


# -- value pools ----------------------------------------------------------------------------------------

LONG = "x" * 256


def pool(common: tuple[Any, ...], odd: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """Mostly `common` values (valid on most platforms, and colliding), now and then an `odd` one (refused
    on some platform or on all)."""
    return st.sampled_from(common * 3 + odd)


ID_COMMON: tuple[Any, ...] = (
    "u1", "u2", "e1", "$identity_email+e1", "@anon", "@anon", "@default", "@login_value", "@login_id",
    "@default_pair", 7, "7", 2.0,
)  # fmt: skip
# 2^53 + 1 and 2^64 + 1: non-negative integers, so valid IDs whose decimal strings a double cannot hold (and the
# second one no 64-bit integer either)
ID_ODD: tuple[Any, ...] = (
    MAX_SAFE_INTEGER + 2, 2**64 + 1, -1, 1.5, "  u1 ", "   ", "", LONG, None, True, {"id": "u1"},
)  # fmt: skip
VALUE_COMMON: tuple[Any, ...] = ("v1", "e1", "@anon", "@default", "@login_value")
VALUE_ODD: tuple[Any, ...] = (
    7, -5, 1.5, 2.0, MAX_SAFE_INTEGER, MAX_SAFE_INTEGER + 1, "  ", "", LONG, None, True,
)  # fmt: skip
BIND_KEY_COMMON: tuple[Any, ...] = (
    "$identity_email", "$identity_mobile", "k_custom", "$IDENTITY_LOGIN_ID", "$identity_cookie_id",
    "$identity_mp_id", "$mp_id", "@login_key", "k" * 100,
)  # fmt: skip
BIND_KEY_ODD: tuple[Any, ...] = (
    "device_id", "@default_key", LOGIN_KEY, ANON_KEY, "date", "Event", "user_group_a", "USER_TAG1", "1abc",
    "a b", "", "k" * 101, 5, None,
)  # fmt: skip
LOGIN_KEY_COMMON: tuple[Any, ...] = (
    LOGIN_KEY, "$identity_email", "$identity_mobile", "$IDENTITY_LOGIN_ID", "@login_key", "$mp_id",
)  # fmt: skip
LOGIN_KEY_ODD: tuple[Any, ...] = (
    "device_id", "$identity_cookie_id", "@default_key", ANON_KEY, "$mp_openid", "$identity_mp_unionid", "date",
    "Event", "1abc", "", "k" * 101, 5,
)  # fmt: skip
ids = pool(ID_COMMON, ID_ODD)
values = pool(VALUE_COMMON, VALUE_ODD)
bind_keys = pool(BIND_KEY_COMMON, BIND_KEY_ODD)
login_keys = pool(LOGIN_KEY_COMMON, LOGIN_KEY_ODD)

EVENTS: tuple[Any, ...] = ("buy", "$MPViewScreen")
PROPERTIES: tuple[Any, ...] = (ABSENT, {}, {"price": 1, "tags": ["a"]})
TIMES: tuple[Any, ...] = (ABSENT, 1_700_000_000_000, 0, -1)
# what `bad_envelope` breaks in an otherwise good record (ABSENT: the field left out)
BROKEN_ENVELOPES: dict[str, dict[str, Any]] = {
    "unknown action": {"action": "sign_in"},
    "action in other case": {"action": "Track"},
    "action not a string": {"action": 5},
    "unknown platform": {"platform": "mp-wechat-mini"},
    "platform null": {"platform": None},
    "device_id empty": {"device_id": ""},
    "device_id too long": {"device_id": "d" * 256},
    "device_id a number": {"device_id": 5},
    "event missing": {"event": ABSENT},
    "event empty": {"event": ""},
    "event a number": {"event": 5},
    "event null": {"event": None},
    "properties an array": {"properties": []},
    "properties a string": {"properties": "p"},
    "properties null": {"properties": None},
    "time a float": {"time": 1.5},
    "time a string": {"time": "1"},
    "time a boolean": {"time": True},
    "time null": {"time": None},
}

CUSTOMER_TYPES = ("userid", "dpuuid", "__proto__", "constructor")
CUSTOMER_SCALAR_COMMON: tuple[Any, ...] = (
    "c1", "u1", " U1 ", "@anon", 12345, 7, 1.5, -3, True, LONG, "", 0, False,
)  # fmt: skip
CUSTOMER_SCALAR_ODD: tuple[Any, ...] = (None, [], ["c1"])
CUSTOMER_ID_COMMON: tuple[Any, ...] = (
    "c1", "u1", " U1 ", "@anon", "@login_value", 12345, 1.5, -3, True, LONG, "", 0, False, None, ABSENT,
)  # fmt: skip
CUSTOMER_ID_ODD: tuple[Any, ...] = ([], {"id": "c1"})
AUTH_COMMON: tuple[Any, ...] = (ABSENT, 0, 1, 2, "UNKNOWN", "AUTHENTICATED", "LOGGED_OUT")
AUTH_ODD: tuple[Any, ...] = (None, 3, -1, "2", "authenticated", True)
HASH_COMMON: tuple[Any, ...] = (ABSENT, ABSENT, *HASH_TYPES)
HASH_ODD: tuple[Any, ...] = ("md5", "", "SHA-512", ["SHA-256"])
PLATFORM_POOL = tuple(DEFAULT_KEYS)
DEVICES = ("dev-a", "dev-b", "dev-c")


def customer_object(id_: Any, auth: Any, with_hash_type: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if id_ is not ABSENT:
        entry["id"] = id_
    if auth is not ABSENT:
        entry["authState"] = auth
    if with_hash_type:
        entry["hashType"] = "SHA-256"  # refused inside an entry (§4)
    return entry


customer_values = st.one_of(
    pool(CUSTOMER_SCALAR_COMMON, CUSTOMER_SCALAR_ODD),
    st.builds(
        customer_object,
        pool(CUSTOMER_ID_COMMON, CUSTOMER_ID_ODD),
        pool(AUTH_COMMON, AUTH_ODD),
        st.sampled_from((False,) * 9 + (True,)),  # a hashType inside an entry: now and then
    ),
)
customer_id_maps = st.one_of(
    st.dictionaries(st.sampled_from(CUSTOMER_TYPES), customer_values, max_size=3),
    st.sampled_from([ABSENT, [], "c1", None, 5]),  # no object: bad input (§4)
)


def resolve(x: Any, dev: Device) -> Any:
    """Pool entries naming the device's current values (`@anon`, ...) become those values."""
    if isinstance(x, dict):
        return {k: resolve(v, dev) for k, v in x.items()}
    if not isinstance(x, str) or not x.startswith("@"):
        return x
    default_key = dev.default_key or "$identity_mp_id"
    return {
        "@anon": dev.anonymous_id,
        "@default": dev.default_id,
        "@login_value": dev.login_value or "u1",
        "@login_id": dev.login_id or "u1",
        "@default_pair": f"{default_key}+{dev.default_id}",
        "@default_key": default_key,
        "@login_key": dev.login_key or "$identity_email",
    }[x]


def canonical(x: Any) -> str:
    """Type-exact comparison (1, 1.0 and true differ in JSON); key order does not matter (§2). The stdlib
    writes integers of any size."""
    return json.dumps(x, sort_keys=True)


def project(rec: dict[str, Any]) -> dict[str, Any]:
    return {name: rec[name] for name in IDENTITY_FIELDS if name in rec}


def state_fields(state: DeviceState) -> dict[str, Any]:
    """A state's public fields, in the model's terms (bound IDs and customer IDs in their order)."""
    return {
        "anonymous_id": state.anonymous_id,
        "default_id": state.default_id,
        "login": (state.login_key, state.login_value),
        "bound": list(state.bound),
        "customer_ids": [(t, c.id, c.auth_state, c.hash_type) for t, c in state.customer_ids],
    }


def model_fields(dev: Device) -> dict[str, Any]:
    return {
        "anonymous_id": dev.anonymous_id,
        "default_id": dev.default_id,
        "login": (dev.login_key, dev.login_value),
        "bound": list(dev.bound.items()),
        "customer_ids": [(t, *e) for t, e in dev.customer_ids.items()],
    }


def is_uuid(x: str) -> bool:
    try:
        return str(uuid.UUID(x)) == x
    except ValueError:
        return False


SETTINGS = Settings()


def source(offset: int) -> dict[str, Any]:
    """Where a raw record came from, in the dead-letter schema's Kafka form."""
    return {"topic": "raw", "partition": 0, "offset": offset}


class IdentityMachine(RuleBasedStateMachine):
    """Three devices on three of the four platforms; every record goes to the engine, the enrich step and the
    model, and all three must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, Device] = {}
        self.states: dict[str, DeviceState | None] = {}
        self.store = MemoryStore()
        self.enricher = Enricher()
        # every raw record sent, and what the enrich step made of it: replayed at teardown (§5)
        self.log: list[tuple[bytes, Outcome]] = []
        self.generated: set[str] = set()
        # per device: its default ID as last seen, and whether the last record was a reset (§2)
        self.last_default: dict[str, str] = {}
        self.last_was_reset: dict[str, bool] = {}

    @initialize(platforms=st.permutations(PLATFORM_POOL))
    def devices(self, platforms: list[str]) -> None:
        for device_id, platform in zip(DEVICES, platforms, strict=False):
            self.models[device_id] = Device(device_id, platform, device_id, device_id)
            self.states[device_id] = None
            self.last_default[device_id] = device_id
            self.last_was_reset[device_id] = False

    # -- driving one record ---------------------------------------------------------------------------

    def send(self, device_id: str, fields: dict[str, Any]) -> None:
        """Build the raw record (ABSENT fields left out, `@` names resolved), run it, check the outcome."""
        dev = self.models[device_id]
        raw: dict[str, Any] = {"device_id": device_id, "platform": dev.platform}
        raw.update({k: resolve(v, dev) for k, v in fields.items() if v is not ABSENT})
        self.run(device_id, raw)

    def run(self, device_id: str, raw: dict[str, Any]) -> None:
        dev = self.models[device_id]
        # the stdlib writes any integer (orjson stops at 64 bits); the model reads what the producer sent, the
        # engine what the decoder gives
        data = json.dumps(raw, separators=(",", ":")).encode()
        wire = codec.decode(data)
        old = self.states[device_id]
        try:
            expected: Expected | None = model_apply(dev, raw)
            at_fault: set[str] = set()
        except ModelRejects as r:
            expected, at_fault = None, r.fields
        event(f"{wire.get('action', 'track')} on {dev.platform}: " + ("refused" if expected is None else "taken"))
        try:
            new, records = apply(old, wire, SETTINGS)
        except Rejected as e:
            assert expected is None, f"the engine refused a valid record: {raw!r}: {e}"
            assert e.field.split(".")[0] in at_fault, f"{raw!r}: engine blames {e.field!r}, model {at_fault}"
            self.check_enrich_refuses(data, e)
            return
        assert expected is not None, f"the engine took a record the spec refuses ({at_fault}): {raw!r}"
        self.check_generated(expected, new)
        self.check_records(raw, expected.records, records)
        self.check_enrich_takes(data, records, user_id_of(device_id, expected.device))
        self.models[device_id] = expected.device
        self.states[device_id] = new
        self.last_was_reset[device_id] = raw.get("action") == "reset_anonymous_id"

    def check_generated(self, expected: Expected, new: DeviceState) -> None:
        """A generated ID is a UUID never seen before (a fresh counter value); the model takes it over."""
        if expected.generated is None:
            return
        made = new.anonymous_id
        assert is_uuid(made), f"generated ID {made!r} is no UUID"
        assert made not in self.generated, f"generated ID {made!r} was generated before"
        self.generated.add(made)
        event(f"generated ID: {expected.generated}")
        expected.device.anonymous_id = made
        if expected.generated == "reset":
            expected.device.default_id = made
            assert new.default_id == made

    def check_records(
        self, raw: dict[str, Any], expected: list[dict[str, Any]], got: list[dict[str, Any]]
    ) -> None:
        assert len(got) == len(expected), f"{raw!r}: expected {len(expected)} records, got {got!r}"
        for want, rec in zip(expected, got, strict=True):
            assert canonical(project(rec)) == canonical(want), f"{raw!r}:\n got  {project(rec)!r}\n want {want!r}"
            assert set(rec) <= {*IDENTITY_FIELDS, *PASSED_THROUGH}, f"unexpected fields in {rec!r}"
            assert rec["device_id"] == raw["device_id"] and rec["platform"] == raw["platform"]
            for name in ("properties", "time"):
                if name in rec:
                    assert canonical(rec[name]) == canonical(raw[name])

    def enrich(self, data: bytes) -> Outcome:
        outcome = self.enricher.step(data, source(len(self.log)), self.store)
        self.log.append((data, outcome))
        return outcome

    def snapshot(self) -> dict[str, bytes]:
        return {d: codec.encode_state(s) for d, s in self.store.states.items()}

    def check_enrich_refuses(self, data: bytes, rejected: Rejected) -> None:
        """The enrich step dead-letters what `apply` refuses, for the same reason, and changes no state."""
        before = self.snapshot()
        outcome = self.enrich(data)
        assert outcome.records == [] and outcome.dead_letter is not None
        letter = orjson.loads(outcome.dead_letter)
        assert (letter["reason"], letter["field"]) == (rejected.reason.value, rejected.field)
        assert self.snapshot() == before

    def check_enrich_takes(self, data: bytes, records: list[dict[str, Any]], user_id: str) -> None:
        """The enrich step writes the records `apply` made, byte for byte, plus the user ID of the device as
        the model has it after the record (persons.md §1) and the record id the worker derives from the source
        (topic:partition:offset:n)."""
        offset = len(self.log)
        outcome = self.enrich(data)
        assert outcome.dead_letter is None, outcome.dead_letter
        assert outcome.records == [codec.dumps({**r, "user_id": user_id, "record_id": f"raw:0:{offset}:{i}"})
                                   for i, r in enumerate(records)]

    # -- one rule per action ------------------------------------------------------------------------------

    device = st.sampled_from(DEVICES)

    @rule(device=device, name=st.sampled_from(EVENTS), properties=st.sampled_from(PROPERTIES),
          time=st.sampled_from(TIMES))
    def track(self, device: str, name: str, properties: Any, time: Any) -> None:
        self.send(device, {"action": "track", "event": name, "properties": properties, "time": time})

    @rule(device=device, type_=st.sampled_from(PROFILE_TYPES), properties=st.sampled_from(PROPERTIES))
    def profile(self, device: str, type_: str, properties: Any) -> None:
        self.send(device, {"action": type_, "properties": properties})

    @rule(device=device, id_=ids | st.just(ABSENT))
    def identify(self, device: str, id_: Any) -> None:
        self.send(device, {"action": "identify", "id": id_})

    @rule(device=device, id_=ids)
    def login(self, device: str, id_: Any) -> None:
        self.send(device, {"action": "login", "id": id_})

    @rule(device=device, key=login_keys, id_=ids)
    def login_with_key(self, device: str, key: Any, id_: Any) -> None:
        self.send(device, {"action": "login", "key": key, "id": id_})

    @rule(device=device, key=bind_keys, value=values)
    def bind(self, device: str, key: Any, value: Any) -> None:
        self.send(device, {"action": "bind", "key": key, "value": value})

    @rule(device=device, key=bind_keys, value=values)
    def unbind(self, device: str, key: Any, value: Any) -> None:
        self.send(device, {"action": "unbind", "key": key, "value": value})

    @rule(device=device)
    def unbind_login_id(self, device: str) -> None:
        """Unbind the key and value whose `key+value` is the login ID (§3 unbind's implicit logout)."""
        login_id = self.models[device].login_id or "$identity_email+e1"
        key, _, value = login_id.partition("+")
        if not value:  # a login ID without "+": unbinding its own pair, which unbind refuses
            key, value = LOGIN_KEY, login_id
        self.send(device, {"action": "unbind", "key": key, "value": value})

    @rule(device=device)
    def logout(self, device: str) -> None:
        self.send(device, {"action": "logout"})

    @rule(device=device, id_=pool((ABSENT, ABSENT, "r1", *VALUE_COMMON), (*VALUE_ODD, "@login_id")))
    def reset_anonymous_id(self, device: str, id_: Any) -> None:
        self.send(device, {"action": "reset_anonymous_id", "id": id_})

    @rule(device=device, customer_ids=customer_id_maps, hash_=pool(HASH_COMMON, HASH_ODD))
    def set_customer_ids(self, device: str, customer_ids: Any, hash_: Any) -> None:
        self.send(device, {"action": "set_customer_ids", "customer_ids": customer_ids, "hash": hash_})

    @rule(device=device, id_=ids | st.sampled_from((12345, ABSENT)), auth=st.sampled_from(AUTH_COMMON),
          hash_=st.sampled_from(HASH_COMMON), scalar=st.booleans())
    def set_userid(self, device: str, id_: Any, auth: Any, hash_: Any, scalar: bool) -> None:
        """The login-type bridge of §4: `userid` AUTHENTICATED is a login, LOGGED_OUT a logout."""
        value = id_ if scalar and id_ is not ABSENT else customer_object(id_, auth, False)
        self.send(device, {"action": "set_customer_ids", "customer_ids": {LOGIN_CUSTOMER_ID_TYPE: value},
                           "hash": hash_})

    @rule(device=device, action=st.sampled_from(("track", "profile_set", "logout")),
          broken=st.sampled_from(sorted(BROKEN_ENVELOPES)))
    def bad_envelope(self, device: str, action: str, broken: str) -> None:
        """A good record with one envelope field broken (§3: `action`, `platform`, `device_id`, `event`,
        `properties`, `time`); the model decides whether it still passes (an `event` only matters to track)."""
        dev = self.models[device]
        raw: dict[str, Any] = {"device_id": device, "platform": dev.platform, "action": action, "event": "buy"}
        raw.update(BROKEN_ENVELOPES[broken])
        self.run(device, {k: v for k, v in raw.items() if v is not ABSENT})

    # -- invariants -------------------------------------------------------------------------------------

    @invariant()
    def distinct_id_is_login_or_anonymous(self) -> None:
        """A probe `track` on each device: distinct_id is the login ID while logged in, else the anonymous ID,
        and the whole stamp is the model's."""
        for device_id, dev in self.models.items():
            probe = {"device_id": device_id, "platform": dev.platform, "event": "probe"}
            _, records = apply(self.states[device_id], probe, SETTINGS)
            want = dev.login_id if dev.login_value is not None else dev.anonymous_id
            assert records[0]["distinct_id"] == want
            assert canonical(project(records[0])) == canonical(record(dev, "track", "probe"))

    @invariant()
    def state_is_the_models(self) -> None:
        for device_id, dev in self.models.items():
            state = self.states[device_id] or DeviceState.new(device_id)
            assert state_fields(state) == model_fields(dev)

    @invariant()
    def default_id_changes_only_on_reset(self) -> None:
        for device_id, state in self.states.items():
            default = device_id if state is None else state.default_id
            if default != self.last_default[device_id]:
                assert self.last_was_reset[device_id], f"{device_id}: default ID changed without a reset"
            self.last_default[device_id] = default

    def teardown(self) -> None:
        """Determinism (§5): the same input through a fresh enrich step gives byte-identical output."""
        store, enricher = MemoryStore(), Enricher()
        for offset, (data, outcome) in enumerate(self.log):
            again = enricher.step(data, source(offset), store)
            assert again.records == outcome.records and again.dead_letter == outcome.dead_letter, data
        assert {d: codec.encode_state(s) for d, s in store.states.items()} == {
            d: codec.encode_state(s) for d, s in self.store.states.items()
        }


IdentityMachine.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIdentityModel = IdentityMachine.TestCase
