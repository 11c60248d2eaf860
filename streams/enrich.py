"""The one step both shells share: a raw record's bytes and its device's state in; enriched records' bytes,
or one dead letter, out; the device's state updated.

Lives here: `Enricher.step`, where every rejection (and any defect of ours) becomes a dead letter, and the
`StateStore` interface the shells implement (a dict for replay, RocksDB, the worker's per-batch
transaction over its Faust table). It never touches a file, a socket or a clock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from streams import codec
from streams.identity import DeviceState, Reason, Rejected, Settings, apply, device_id_of, plain_track
from streams.persons import UserIds

log = logging.getLogger(__name__)


class StateStore(Protocol):
    def get(self, device_id: str) -> DeviceState | None: ...

    def put(self, device_id: str, state: DeviceState) -> None: ...


class MemoryStore:
    """Device states in a dict: replay without `--state-dir`, and tests."""

    def __init__(self) -> None:
        self.states: dict[str, DeviceState] = {}
        # the dict's own methods: one lookup per record, no Python call around it
        self.get = self.states.get
        self.put = self.states.__setitem__


@dataclass(frozen=True, slots=True)
class EnrichSettings:
    identity: Settings = field(default_factory=Settings)
    default_platform: str | None = None
    max_record_bytes: int = codec.DEFAULT_MAX_RECORD_BYTES
    person_salt: str = ""  # salts the user IDs (persons.md §1)
    person_max_devices: int = 50  # a pair claimed from more devices has no owner (persons.md §3)
    persons: bool = True  # the persons mapping stage (user_id is stamped either way)


class Outcome:
    """What one raw record became: enriched records' bytes, or one dead letter. A plain slotted class: one
    is built per record."""

    __slots__ = ("after", "before", "dead_letter", "device_id", "emitted", "reason", "record", "records")

    def __init__(
        self,
        device_id: str | None,
        records: list[bytes],
        dead_letter: bytes | None = None,
        emitted: list[dict[str, Any]] | None = None,
        reason: str | None = None,
        before: DeviceState | None = None,
        after: DeviceState | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.device_id = device_id
        self.records = records
        self.dead_letter = dead_letter
        self.emitted = emitted
        self.reason = reason  # the dead letter's reason code
        # the device's state before and after the record, and the record decoded: what the persons step reads
        self.before = before
        self.after = after
        self.record = record

    @property
    def types(self) -> list[str]:
        return [r["type"] for r in self.emitted] if self.emitted else []


FRESH_STATES = 100_000


class Enricher:
    def __init__(self, settings: EnrichSettings | None = None) -> None:
        self.settings = settings or EnrichSettings()
        # states of devices with nothing stored: immutable and the same for every store, so one object per
        # device serves its records (and its cached identity stamp) until the device changes. An OrderedDict,
        # not a dict: removing a plain dict's first entry leaves a dead slot that every later `next(iter(d))`
        # walks past, so each eviction cost more than the last (78% of the worker's CPU at 1M devices)
        self._fresh: OrderedDict[str, DeviceState] = OrderedDict()
        self.user_ids = UserIds(self.settings.person_salt)

    def user_id(self, device_id: str, state: DeviceState) -> str:
        """persons.md §1: the login user while logged in, else the device user of the device's default ID."""
        login_id = state.login_id
        if login_id is not None:
            return self.user_ids.login_user(login_id)
        return self.user_ids.device_user(device_id, state.default_id)

    def fresh_state(self, device_id: str) -> DeviceState:
        fresh = self._fresh
        state = fresh.get(device_id)
        if state is None:
            if len(fresh) >= FRESH_STATES:
                fresh.popitem(last=False)  # the oldest: a FIFO bound is enough for a cache of defaults
            state = fresh[device_id] = DeviceState.new(device_id)
        return state

    def step(
        self, raw: bytes, source: Mapping[str, Any], store: StateStore, record: dict[str, Any] | None = None
    ) -> Outcome:
        """Enrich one raw record (`record`: its bytes already decoded, when the caller had to look inside).
        Never raises: bad input, and any defect, come back as a dead letter."""
        s = self.settings
        device_id = None
        encode = codec.encode
        try:
            if record is None:
                record = codec.decode(raw, s.max_record_bytes)
            device_id = device_id_of(record)
            state = store.get(device_id)
            if state is None:
                state = self._fresh.get(device_id) or self.fresh_state(device_id)
            track = plain_track(state, record, s.default_platform, device_id)
            if track is not None:
                new, emitted = state, [track]
            else:
                new, emitted = apply(state, record, s.identity, s.default_platform, device_id)
            if emitted:
                user_id = self.user_id(device_id, new)
                for r in emitted:
                    r["user_id"] = user_id
            if emitted and "offset" in source:
                # at-least-once: a record written again after a crash is byte-identical to the first copy,
                # and its id tells a warehouse it is the same record
                prefix = f"{source['topic']}:{source['partition']}:{source['offset']}:"
                for i, r in enumerate(emitted):
                    r["record_id"] = prefix + str(i)
            if len(emitted) == 1:  # most records
                encoded = [encode(emitted[0])]
            else:
                encoded = [encode(r) for r in emitted]
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
        return Outcome(device_id, encoded, None, emitted, None, state, new, record)
