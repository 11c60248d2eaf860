"""Persons: one key per person across devices (spec persons.md), as pure rules over emitted records.

Rules of this package, as of `streams.identity`:
1. It knows nothing of Kafka, Faust, files or clocks: the standard library and `streams.identity` only.
   Bytes are `streams.codec`'s business; where the states live is the shells'.
2. Two levels: `UserIds` stamps every record with a `user_id` from its device alone (§1); the rest resolves
   device users into login users from the set of claims across devices (§2-§4).
3. Per device (`device.py`): what the device claims, its first sign-up per default ID, the owners it was told
   of. Per pair (`pairs.py`): which devices claim it, as whom, and its owner. Both are sets, so the result never
   depends on the order in which different devices' records arrive.
"""

from .claims import BLOCKED_VALUES, claimable_pairs, pair_key, split_pair
from .device import DevicePersons, DeviceStep, mapping_of, mappings, observe, on_owner
from .ids import UserIds
from .mapping import Mapping
from .pairs import Entry, PairView, claim, owner_of_entries

__all__ = [
    "BLOCKED_VALUES",
    "DevicePersons",
    "DeviceStep",
    "Entry",
    "Mapping",
    "PairView",
    "UserIds",
    "claim",
    "claimable_pairs",
    "mapping_of",
    "mappings",
    "observe",
    "on_owner",
    "owner_of_entries",
    "pair_key",
    "split_pair",
]
