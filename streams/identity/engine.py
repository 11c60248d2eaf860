"""The engine: one raw record and a device's state in, the new state and the records to emit out.

Lives here: the envelope every record shares (device_id, platform, action, event, properties, time),
checked before any action runs, and `apply`, the one entry point. Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .actions import ACTIONS, Context, Record, Settings, Step
from .errors import Reason, Rejected
from .platforms import PLATFORMS, Platform
from .state import DeviceState
from .values import type_name

MAX_DEVICE_ID_LENGTH = 255
EMPTY: dict[str, Any] = {}
_ABSENT: Any = object()


def device_id_of(raw: Mapping[str, Any]) -> str:
    """The device a raw record belongs to: the key its state lives under."""
    device_id = raw.get("device_id")
    if device_id is None:
        raise Rejected(Reason.MISSING_FIELD, "device_id", "every record needs `device_id`")
    if not isinstance(device_id, str):
        raise Rejected(Reason.WRONG_TYPE, "device_id", f"must be a string, got {type_name(device_id)}")
    if device_id == "":
        raise Rejected(Reason.EMPTY_VALUE, "device_id", "must not be empty")
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise Rejected(Reason.TOO_LONG, "device_id", f"longer than {MAX_DEVICE_ID_LENGTH} characters")
    return device_id


def platform_of(raw: Mapping[str, Any], default: str | None) -> Platform:
    name = raw.get("platform", default)
    if name is None:
        raise Rejected(Reason.MISSING_FIELD, "platform", "needs `platform` (or a configured default platform)")
    platform = PLATFORMS.get(name) if type(name) is str else None
    if platform is None:
        raise Rejected(Reason.UNKNOWN_PLATFORM, "platform", f"unknown platform {str(name)[:64]!r}")
    return platform


def check_envelope(raw: Mapping[str, Any]) -> None:
    # `type(x) is` rather than isinstance: JSON gives exact types, and bool must not pass for int
    properties = raw.get("properties", EMPTY)
    if type(properties) is not dict:
        raise Rejected(Reason.WRONG_TYPE, "properties", f"must be an object, got {type_name(properties)}")
    time = raw.get("time", 0)
    if type(time) is not int:
        raise Rejected(Reason.WRONG_TYPE, "time", f"must be an integer (ms), got {type_name(time)}")


def apply(
    state: DeviceState | None,
    raw: Mapping[str, Any],
    settings: Settings,
    default_platform: str | None = None,
    device_id: str | None = None,
) -> Step:
    """Apply one raw record (a decoded JSON object) to its device's state (None: a device not seen yet).
    Returns the new state (the same object when nothing changed) and the records to emit, or raises
    `Rejected`, in which case nothing changed."""
    if device_id is None:
        device_id = device_id_of(raw)
    platform = platform_of(raw, default_platform)
    action_name = raw.get("action", "track")
    action = ACTIONS.get(action_name) if type(action_name) is str else None
    if action is None:
        raise Rejected(Reason.UNKNOWN_ACTION, "action", f"unknown action {str(action_name)[:64]!r}")
    check_envelope(raw)
    if state is None:
        state = DeviceState.new(device_id)
    return action(Context(state, raw, platform, device_id, settings))


def plain_track(
    state: DeviceState, raw: Mapping[str, Any], default_platform: str | None, device_id: str
) -> Record | None:
    """What `apply` emits for an ordinary track, in one function: tracks are most of the traffic, and the
    action table, the envelope checks and the context cost more than the track itself. None for any other
    record (another action, a field `apply` would refuse), which `apply` then decides. A track changes no
    state, so the state stays `state`. Tested to agree with `apply` on any record."""
    if raw.get("action", "track") != "track":
        return None
    name = raw.get("platform", default_platform)
    platform = PLATFORMS.get(name) if type(name) is str else None
    event = raw.get("event")
    if platform is None or type(event) is not str or not event:
        return None
    properties = raw.get("properties", _ABSENT)
    time = raw.get("time", _ABSENT)
    if properties is not _ABSENT and type(properties) is not dict:
        return None
    if time is not _ABSENT and type(time) is not int:
        return None
    out = state.stamp(platform).copy()
    out["type"] = "track"
    out["event"] = event
    if properties is not _ABSENT:
        out["properties"] = properties
    if time is not _ABSENT:
        out["time"] = time
    out["device_id"] = device_id
    return out


__all__ = ["Record", "Settings", "apply", "device_id_of", "plain_track"]
