"""The one step both shells share: a raw record's bytes and its device's state in; enriched records' bytes,
or one dead letter, out; the device's state updated.

Lives here: `Enricher.step`, where every rejection (and any defect of ours) becomes a dead letter, and the
`StateStore` interface the shells implement (a dict for replay, RocksDB, the worker's per-batch
transaction over its Faust table). It never touches a file, a socket or a clock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import codec
from .identity import DeviceState, Reason, Rejected, Settings, apply, device_id_of

log = logging.getLogger(__name__)


class StateStore(Protocol):
    def get(self, device_id: str) -> DeviceState | None: ...

    def put(self, device_id: str, state: DeviceState) -> None: ...


class MemoryStore:
    """Device states in a dict: replay without `--state-dir`, and tests."""

    def __init__(self) -> None:
        self.states: dict[str, DeviceState] = {}

    def get(self, device_id: str) -> DeviceState | None:
        return self.states.get(device_id)

    def put(self, device_id: str, state: DeviceState) -> None:
        self.states[device_id] = state


@dataclass(frozen=True, slots=True)
class EnrichSettings:
    identity: Settings = field(default_factory=Settings)
    default_platform: str | None = None
    max_record_bytes: int = codec.DEFAULT_MAX_RECORD_BYTES


@dataclass(slots=True)
class Outcome:
    device_id: str | None
    records: list[bytes]
    dead_letter: bytes | None = None
    # what was emitted (record types) or why not (the dead letter's reason): for counting, without decoding
    types: list[str] = field(default_factory=list)
    reason: str | None = None


class Enricher:
    def __init__(self, settings: EnrichSettings | None = None) -> None:
        self.settings = settings or EnrichSettings()

    def step(
        self, raw: bytes, source: Mapping[str, Any], store: StateStore, record: dict[str, Any] | None = None
    ) -> Outcome:
        """Enrich one raw record (`record`: its bytes already decoded, when the caller had to look inside).
        Never raises: bad input, and any defect, come back as a dead letter."""
        s = self.settings
        device_id = None
        try:
            if record is None:
                record = codec.decode(raw, s.max_record_bytes)
            device_id = device_id_of(record)
            state = store.get(device_id)
            if state is None:
                state = DeviceState.new(device_id)
            new, emitted = apply(state, record, s.identity, s.default_platform, device_id)
            encoded = codec.encode_all(emitted)
        except Rejected as e:
            return Outcome(device_id, [], codec.dead_letter(e, raw, source, device_id), reason=e.reason.value)
        except Exception as e:  # a defect of ours must not stop the stream: keep the record and say so
            # the message may hold identity values, so only the type goes to the log
            log.error("internal error on a record (%s); kept as a dead letter", type(e).__name__)
            rejected = Rejected(Reason.INTERNAL_ERROR, "", type(e).__name__)
            return Outcome(device_id, [], codec.dead_letter(rejected, raw, source, device_id),
                           reason=rejected.reason.value)
        if new is not state:
            store.put(device_id, new)
        return Outcome(device_id, encoded, types=[r["type"] for r in emitted])
