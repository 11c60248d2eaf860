"""The identity engine: Sensors Data's global user association and Adobe's customer IDs, as a pure state machine.

Rules of this package:
1. It knows nothing of Kafka, Faust, files, clocks or randomness: it imports the standard library only.
   Bytes are `streams.codec`'s business; state storage is the shells'.
2. A device's state is an immutable `DeviceState`. `apply(state, raw, settings)` gives the new state and the
   records to emit, or raises `Rejected` and nothing changed. Same input, same output, always.
3. Rules are tables: `platforms.PLATFORMS` (one row per platform), `actions.ACTIONS` (one row per action),
   `errors.Reason` (one stable code per kind of bad input).
4. The behaviour is identity.md's: the seeds' examples first, then the spec, then what the vendors' SDKs do.
"""

from .actions import ACTIONS, Record, Settings
from .engine import apply, device_id_of, plain_track, platform_of
from .errors import Reason, Rejected
from .platforms import PLATFORMS, Platform
from .state import CustomerId, DeviceState

__all__ = [
    "ACTIONS",
    "PLATFORMS",
    "CustomerId",
    "DeviceState",
    "Platform",
    "Reason",
    "Record",
    "Rejected",
    "Settings",
    "apply",
    "device_id_of",
    "plain_track",
    "platform_of",
]
