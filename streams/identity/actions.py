"""What each action does: the action table of identity.md §3 and §4.

Lives here: one function per action, `(Context) -> Step`, and `ACTIONS`, the table that names them. Each
function validates first and builds a new `DeviceState`; since states are immutable, a `Rejected` raised at
any point leaves the device as it was. Adding an action is adding a function and a row.
Not here: the envelope (device_id, platform, action, event, properties, time: `engine.py`), value rules
(`values.py`), customer-ID parsing (`customer_ids.py`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import customer_ids
from .errors import Reason, Rejected
from .platforms import ANONYMOUS_KEY, LOGIN_KEY, Platform
from .state import DeviceState
from .values import identity_id, identity_key, identity_value

Record = dict[str, Any]
# the new state, and the records to emit (each: the event type, the event name, and where it differs from
# the usual stamp, the fields that replace it)
Step = tuple[DeviceState, list[Record]]

# generated IDs are UUIDs derived from the device ID and a per-device counter: replaying the same input
# gives the same IDs (identity.md §3, §5)
GENERATED_ID_NAMESPACE = uuid.UUID("5b0c1f1e-8f43-4c5e-9d61-6a1f2a3b9c07")


@dataclass(frozen=True, slots=True)
class Settings:
    # the customer-ID type whose AUTHENTICATED id is a login and whose LOGGED_OUT is a logout; "" = none
    login_customer_id_type: str = "userid"
    # identity keys whose values are replaced by their SHA-256 (hex) as soon as they are read: the state,
    # its changelog and every output then hold only the hash (e.g. $identity_mobile, $identity_email)
    hashed_keys: frozenset[str] = frozenset()

    def protect(self, key: str, value: str) -> str:
        if key in self.hashed_keys:
            return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        return value


class Context:
    """What an action sees. A plain slotted class: one is built per record, and a frozen dataclass's
    __init__ costs several times more."""

    __slots__ = ("device_id", "platform", "raw", "settings", "state")

    def __init__(
        self, state: DeviceState, raw: Mapping[str, Any], platform: Platform, device_id: str, settings: Settings
    ) -> None:
        self.state = state
        self.raw = raw
        self.platform = platform
        self.device_id = device_id
        self.settings = settings


def emit(
    state: DeviceState, ctx: Context, type_: str, event: str | None, **overrides: Any
) -> Record:
    """A record stamped with `state`'s identity, plus what the raw record carries through."""
    out = state.stamp(ctx.platform).copy()
    out["type"] = type_
    if event is not None:
        out["event"] = event
    raw = ctx.raw
    properties = raw.get("properties")
    if properties is not None:
        out["properties"] = properties
    time = raw.get("time")
    if time is not None:
        out["time"] = time
    out["device_id"] = ctx.device_id
    if overrides:
        for name, value in overrides.items():
            if value is None:
                out.pop(name, None)
            else:
                out[name] = value
    return out


def required(ctx: Context, field: str) -> Any:
    if field not in ctx.raw:
        raise Rejected(Reason.MISSING_FIELD, field, f"{ctx.raw.get('action', 'track')} needs `{field}`")
    return ctx.raw[field]


def needs_association(ctx: Context) -> None:
    if not ctx.platform.associates:
        raise Rejected(
            Reason.UNSUPPORTED_ON_PLATFORM,
            "action",
            f"{ctx.platform.name} has no global user association: no {ctx.raw.get('action')}",
        )


def refuse(key: str, refused: set[str] | frozenset[str], field: str, action: str) -> None:
    if key in refused:
        raise Rejected(Reason.REFUSED_KEY, field, f"{action} does not take the key {key!r}")


def generated_id(ctx: Context) -> tuple[str, int]:
    n = ctx.state.generated + 1
    return str(uuid.uuid5(GENERATED_ID_NAMESPACE, f"{ctx.device_id}\x00{n}")), n


# -- the actions -----------------------------------------------------------------------------------------


def track(ctx: Context) -> Step:
    event = ctx.raw.get("event")
    if not isinstance(event, str) or event == "":
        required(ctx, "event")  # absent: missing_field
        raise Rejected(Reason.WRONG_TYPE if not isinstance(event, str) else Reason.EMPTY_VALUE, "event",
                       "track needs a non-empty string `event`")
    return ctx.state, [emit(ctx.state, ctx, "track", event)]


def profile(type_: str) -> Callable[[Context], Step]:
    def run(ctx: Context) -> Step:
        return ctx.state, [emit(ctx.state, ctx, type_, None)]

    run.__name__ = type_
    return run


def identify(ctx: Context) -> Step:
    s = ctx.state
    if "id" not in ctx.raw and ctx.platform.web:
        # the Web SDK's identify() with no argument makes a new anonymous ID (not a new default ID)
        new_id, n = generated_id(ctx)
        return replace(s, anonymous_id=new_id, generated=n), []
    new_id = identity_id(required(ctx, "id"), "id", web=ctx.platform.web)
    if new_id == s.anonymous_id:
        return s, []
    return replace(s, anonymous_id=new_id), []


def login(ctx: Context) -> Step:
    p = ctx.platform
    key = LOGIN_KEY
    if "key" in ctx.raw:
        key = identity_key(ctx.raw["key"], "key", web=p.web)
        if key != LOGIN_KEY and not p.associates:
            raise Rejected(Reason.UNSUPPORTED_ON_PLATFORM, "key",
                           f"{p.name} has no global user association: log in without a key")
        refuse(key, {ANONYMOUS_KEY, p.default_key or ANONYMOUS_KEY} | p.login_refused, "key", "login")
    id_ = ctx.settings.protect(key, identity_id(required(ctx, "id"), "id", web=p.web))
    return log_in(ctx, ctx.state, key, id_)


def log_in(ctx: Context, s: DeviceState, key: str, id_: str) -> Step:
    """login(id) under `key` on a valid key and id: the no-op rules, then `$SignUp`."""
    p = ctx.platform
    if s.login_key == key and s.login_value == id_:
        return s, []
    if not p.associates:
        if id_ == s.distinct_id:  # those SDKs have no anonymous-ID rule, only "same distinct_id"
            return s, []
    elif id_ == s.anonymous_id and (
        not p.web or not s.logged_in or key == s.login_key or any(k == key for k, _ in s.bound)
    ):
        return s, []
    signup_identities = None
    if p.associates:
        signup_identities = s.stored_identities(p)
        signup_identities[key] = id_
        signup_identities[ANONYMOUS_KEY] = s.anonymous_id
    new = replace(s, login_key=key, login_value=id_, bound=())
    record = emit(new, ctx, "track_signup", "$SignUp", original_id=s.anonymous_id, identities=signup_identities)
    return new, [record]


def log_out(s: DeviceState) -> DeviceState:
    if not s.logged_in and not s.bound:
        return s
    return replace(s, login_key=None, login_value=None, bound=())


def logout(ctx: Context) -> Step:
    return log_out(ctx.state), []


def bind(ctx: Context) -> Step:
    needs_association(ctx)
    p, s = ctx.platform, ctx.state
    key = identity_key(required(ctx, "key"), "key", web=p.web)
    refused = {LOGIN_KEY, ANONYMOUS_KEY, p.default_key or LOGIN_KEY} | p.bind_refused
    if s.login_key is not None:
        refused.add(s.login_key)
    refuse(key, refused, "key", "bind")
    value = ctx.settings.protect(key, identity_value(required(ctx, "value"), "value", web=p.web, strings_only=True))
    bound = dict(s.bound)
    bound[key] = value
    new = replace(s, bound=tuple(bound.items()))
    return new, [emit(new, ctx, "track_id_bind", "$BindID")]


def unbind(ctx: Context) -> Step:
    needs_association(ctx)
    p, s = ctx.platform, ctx.state
    key = identity_key(required(ctx, "key"), "key", web=p.web)
    refuse(key, {LOGIN_KEY, ANONYMOUS_KEY}, "key", "unbind")
    value = ctx.settings.protect(key, identity_value(required(ctx, "value"), "value", web=p.web, strings_only=True))
    pair = (key, value)
    new = s
    if pair in s.bound:
        new = replace(new, bound=tuple(b for b in s.bound if b != pair))
    # the implicit logout: unbinding the pair the login ID is made of. The Web SDK only looks when the pair
    # is among the device's identities; the mini-program SDKs always do
    held = pair == (s.login_key, s.login_value) or pair in s.bound
    if s.login_id == f"{key}+{value}" and (held or not p.web):
        new = replace(new, login_key=None, login_value=None)
    record = emit(new, ctx, "track_id_unbind", "$UnbindID", identities={key: value}, login_id=None)
    return new, [record]


def reset_anonymous_id(ctx: Context) -> Step:
    needs_association(ctx)
    p, s = ctx.platform, ctx.state
    if "id" in ctx.raw:
        new_id = identity_value(ctx.raw["id"], "id", web=p.web)
        n = s.generated
    else:
        new_id, n = generated_id(ctx)
    if s.logged_in:  # the SDKs refuse it while logged in, once the call itself was valid
        return s, []
    return replace(s, anonymous_id=new_id, default_id=new_id, generated=n), []


def set_customer_ids(ctx: Context) -> Step:
    s = ctx.state
    updates = customer_ids.parse(required(ctx, "customer_ids"), ctx.raw.get("hash"))
    login_type = ctx.settings.login_customer_id_type
    bridge = None
    if login_type:
        for type_, entry in updates:
            if type_ == login_type and entry is not None:
                bridge = entry
    login_id = None
    if bridge is not None and bridge.auth_state == customer_ids.AUTHENTICATED and bridge.id is not None:
        try:
            login_id = identity_id(bridge.id, f"customer_ids.{login_type}.id", web=ctx.platform.web)
        except Rejected as e:
            raise Rejected(Reason.INVALID_LOGIN_ID, e.field,
                           f"an AUTHENTICATED {login_type} is a login, and its id is no login ID: {e.detail}") from e
    new = s
    if any(entry is not None for _, entry in updates):
        new = replace(s, customer_ids=customer_ids.merge(s.customer_ids, updates))
    if login_id is not None:
        return log_in(ctx, new, LOGIN_KEY, login_id)
    if bridge is not None and bridge.auth_state == customer_ids.LOGGED_OUT:
        return log_out(new), []
    return new, []


ACTIONS: dict[str, Callable[[Context], Step]] = {
    "track": track,
    "identify": identify,
    "login": login,
    "bind": bind,
    "unbind": unbind,
    "logout": logout,
    "reset_anonymous_id": reset_anonymous_id,
    "set_customer_ids": set_customer_ids,
    **{t: profile(t) for t in (
        "profile_set", "profile_set_once", "profile_increment", "profile_append", "profile_unset",
        "profile_delete",
    )},
}
