"""The persons stage (persons.md §4, "Worker"): a foreign-key join across partitions, as Kafka Streams builds
one, inside the worker's batch step.

Three kinds of message travel through one internal topic, each keyed so that it lands where its state is:
1. a device's claims on a pair (`claim`), keyed by the pair, to the partition that keeps the pair's claims
   (the persons table, `streams.state.pairs`);
2. the pair's owner (`owner`), keyed by the device ID, back to the device's partition, where its device
   users' claims live (in the device's stored state);
3. a device user's mapping (`user`), keyed by its user ID, to the partition that keeps the persons index and
   writes the persons topic: one writer per key, in the order of one log, so the topic's last value per key
   is the mapping. A value is written only when it differs from the last one written.

Every message says what holds now, not what changed: the same message twice, or a run of them again after a
crash, ends in the same state. The device and pair rules are `streams.persons`'s; here is only where each
runs and what it sends.

Knows the messages and the tables' layout; the commit stage sends what is put in the partition's state outbox
and makes the writes durable with the rest of the batch, in the partition's transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from streams import codec
from streams.enrich import EnrichSettings, Outcome
from streams.identity import Reason, Rejected
from streams.persons import DevicePersons, UserIds, claim, mapping_of, observe, on_owner
from streams.persons.changes import NO_TRIGGER, Change, Trigger, links_of
from streams.persons.device import NOTHING, may_claim
from streams.state.keys import INTERNAL
from streams.worker.send import Message, put
from streams.worker.stages.route import dead_letter

if TYPE_CHECKING:
    from streams.worker.batch import Run
    from streams.worker.stages.route import KafkaRecord
from streams.state.pairs import StoredPairs

log = logging.getLogger(__name__)

HEADER = "streams-persons"
# what caused the message (`codec.encode_cause`), with the identity change log on: a header, so that the values
# stay what a release without the log writes and reads (it can run again on this state: README, "Upgrading")
CAUSE_HEADER = "streams-cause"
CLAIM, OWNER, USER = b"claim", b"owner", b"user"
# per persons-table partition: the counts /metrics shows, kept with the partition's pairs
STATS_KEY = INTERNAL + b"persons-stats"
STATS = ("claims", "owned_pairs", "shared_pairs", "via_login", "via_identity", "conflicts")

# (topic, partition, (key, value, headers)): what the stage asks the pipeline to send
Send = Callable[[str, int, tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]], None]
# what watches the persons index's changes (the identity change log): the change, when it was decided (the
# broker timestamp of the message that carried it, ms), and where to send what it writes
Watcher = Callable[[Change, int | None, Send], None]


class Devices:
    """What the stage needs of the device side of a partition (`streams.state.transaction.PartitionState`)."""

    def persons(self, device_id: str) -> DevicePersons | None: ...

    def put_persons(self, device_id: str, persons: DevicePersons) -> None: ...


@dataclass
class PersonsCounters:
    """What the stage did in a batch; the worker's metrics add them up."""

    # the messages it sent, by kind
    claim_messages: int = 0
    owner_messages: int = 0
    user_messages: int = 0
    # what it wrote to the persons topic
    mappings_written: int = 0
    tombstones_written: int = 0
    # what it could not read, and the claims and sign-ups a device at its bound did not make
    # (streams.persons.device)
    unreadable: int = 0
    refused_claims: int = 0
    # the identity change log's rows written (its stage, `streams.worker.stages.changes`)
    change_rows: int = 0

    def add(self, other: PersonsCounters) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Route:
    """Where the stage's messages go, and how keys are placed (the producers' partitioner)."""

    repartition: str
    persons: str
    partitions: int
    persons_partitions: int
    key_hash: Callable[[str], int]


@dataclass
class PartitionPersons:
    """One partition number's persons work in a batch: the device side (over the device states of the
    partition) and the pair side (over the persons table's partition)."""

    partition: int
    settings: EnrichSettings
    ids: UserIds
    route: Route
    pairs: StoredPairs
    stats: dict[str, int]
    counters: PersonsCounters = field(default_factory=PersonsCounters)
    # device -> its device users whose mapping may have changed in this batch, each with what caused it last
    # (None: causes are not carried)
    touched: dict[str, dict[str, Trigger | None]] = field(default_factory=dict)
    stats_changed: bool = False
    # what watches the index's changes; with one, the messages carry the causes and links it writes
    watchers: list[Watcher] = field(default_factory=list)

    # -- the device side --------------------------------------------------------------------------------

    def observe(self, devices: Any, outcome: Outcome, send: Send) -> None:
        """After a record was enriched: its claims, releases and sign-ups."""
        device_id, emitted = outcome.device_id, outcome.emitted
        if not emitted or (not self.settings.identity.hashed_keys and not may_claim(emitted)):
            return
        if device_id is None or outcome.before is None or outcome.after is None:
            return
        old: list[DevicePersons | None] = []

        def load() -> DevicePersons | None:
            old.append(devices.persons(device_id))
            return old[0]

        step = observe(load, device_id, self.ids, outcome.before, outcome.after, outcome.record or {},
                       emitted, self.settings.identity.hashed_keys)
        if step is None:
            return
        self.counters.refused_claims += step.refused
        if step.persons is (old[0] if old else None):
            return
        devices.put_persons(device_id, step.persons)
        before = old[0] if old else None
        self._count("claims", step.persons.claim_count() - (before.claim_count() if before else 0))
        route = self.route
        cause = Trigger.of_record(emitted[0]) if self.watchers else None
        headers = _headers(CLAIM, cause)
        for pair, entry in step.changes.items():
            send(route.repartition, route.key_hash(pair) % route.partitions,
                 (pair.encode(), codec.encode_claim(device_id, entry), headers))
            self.counters.claim_messages += 1
        if step.users:
            self.touched.setdefault(device_id, {}).update(dict.fromkeys(step.users, cause))

    def on_owner(self, devices: Any, device_id: str, value: bytes, cause: Trigger | None = None) -> None:
        pair, owner = codec.decode_owner(value)
        persons = devices.persons(device_id)
        if persons is None:
            return
        new, users = on_owner(persons, pair, owner)
        if new is not persons:
            devices.put_persons(device_id, new)
        if users:
            self.touched.setdefault(device_id, {}).update(dict.fromkeys(users, self._cause(cause)))

    def finish(self, devices: Any, send: Send) -> None:
        """The batch's device users whose mapping may have changed: their mapping now, to the index."""
        route = self.route
        for device_id, users in self.touched.items():
            persons = devices.persons(device_id) or NOTHING
            for user in sorted(users):
                mapping, conflict = mapping_of(persons, device_id, user, persons.owners.get)
                cause = self._cause(users[user])
                links = links_of(persons, user, mapping, self.ids, persons.owners.get) if cause is not None else ()
                send(route.repartition, route.key_hash(user) % route.partitions,
                     (user.encode(), codec.encode_user(mapping, conflict), _headers(USER, cause, links)))
                self.counters.user_messages += 1
        self.touched.clear()

    # -- the pair side and the index ----------------------------------------------------------------------

    def on_claim(self, pair: str, value: bytes, send: Send, cause: Trigger | None = None) -> None:
        device_id, entry = codec.decode_claim(value)
        headers = _headers(OWNER, self._cause(cause))
        before = self.pairs.summary(pair)
        answers = claim(self.pairs, pair, device_id, entry, self.settings.person_max_devices)
        after = self.pairs.summary(pair)
        if after != before:
            self._count("owned_pairs", (after.owner is not None) - (before.owner is not None))
            self._count("shared_pairs", after.shared - before.shared)
        route = self.route
        for device, owner in answers:
            send(route.repartition, route.key_hash(device) % route.partitions,
                 (device.encode(), codec.encode_owner(pair, owner), headers))
            self.counters.owner_messages += 1

    def on_user(self, user: str, value: bytes, send: Send, timestamp: int | None = None,
                cause: Trigger | None = None, links: tuple[tuple[str, str], ...] = ()) -> None:
        mapping, conflict = codec.decode_user(value)
        stored = self.pairs.user(user)
        old, old_conflict = codec.decode_user(stored) if stored is not None else (None, False)
        if (mapping, conflict) == (old, old_conflict):
            return
        route = self.route
        target = route.key_hash(user) % route.persons_partitions
        if mapping != old:
            if mapping is not None:
                send(route.persons, target, (user.encode(), codec.encode_mapping(mapping), None))
                self.counters.mappings_written += 1
            else:
                send(route.persons, target, (user.encode(), None, None))  # the tombstone: no mapping now
                self.counters.tombstones_written += 1
        if self.watchers and mapping != old:
            change = Change(user, old, mapping, conflict, links, cause or NO_TRIGGER)
            for watch in self.watchers:
                watch(change, timestamp, send)
        self.pairs.put_user(user, codec.encode_user(mapping, conflict) if mapping is not None or conflict else None)
        for name, was, now in (("via_login", old is not None and old.via == "login",
                                mapping is not None and mapping.via == "login"),
                               ("via_identity", old is not None and old.via == "identity",
                                mapping is not None and mapping.via == "identity"),
                               ("conflicts", old_conflict, conflict)):
            self._count(name, now - was)

    def apply(self, devices: Any, kind: bytes, key: bytes, value: bytes, send: Send,
              timestamp: int | None = None, cause: bytes | None = None) -> None:
        """A record of the persons repartition topic, by its kind, applied whole or not at all: its writes to the
        pairs are taken back, and what it would send or count is dropped, when it fails midway. A pair whose
        owner changed in the table with its devices never told would stay wrong for good. (The device side
        writes once, last: `on_owner`.)"""
        held: list[tuple[str, int, Message]] = []
        saved = dict(self.stats), self.stats_changed
        counters, self.counters = self.counters, PersonsCounters()
        self.pairs.savepoint()
        try:
            self._apply(devices, kind, key.decode(), value, lambda *message: held.append(message), timestamp,
                        cause)
        except BaseException:
            self.pairs.rollback()
            self.stats.clear()
            self.stats.update(saved[0])
            self.stats_changed = saved[1]
            raise
        finally:
            self.counters, applied = counters, self.counters
        self.pairs.release()
        counters.add(applied)
        for topic, partition, message in held:
            send(topic, partition, message)

    def _apply(self, devices: Any, kind: bytes, key: str, value: bytes, send: Send, timestamp: int | None,
               cause_header: bytes | None) -> None:
        cause, links = codec.decode_cause(cause_header) if cause_header is not None else (None, ())
        if kind == CLAIM:
            self.on_claim(key, value, send, cause)
        elif kind == USER:
            self.on_user(key, value, send, timestamp, cause, links)
        elif kind == OWNER:
            self.on_owner(devices, key, value, cause)
        else:
            raise ValueError(f"unknown persons message kind {kind[:32]!r}")

    def _cause(self, cause: Trigger | None) -> Trigger | None:
        """What a message passes on of its cause: nothing without a watcher; with one, a cause always (a message
        from before the watcher came names none)."""
        return (cause or NO_TRIGGER) if self.watchers else None

    # -- what the batch makes durable ----------------------------------------------------------------------

    def _count(self, name: str, delta: int) -> None:
        if delta:
            self.stats[name] = self.stats.get(name, 0) + delta
            self.stats_changed = True

    def encoded(self) -> list[tuple[bytes, bytes | None]]:
        items = self.pairs.take()
        if self.stats_changed:
            items.append((STATS_KEY, codec.dumps(self.stats)))
            self.stats_changed = False
        return items


def stored_stats(data: Any) -> dict[str, int]:
    if not isinstance(data, bytes):
        return {}
    try:
        loaded = codec.load_json(data)
        return {k: int(v) for k, v in loaded.items() if k in STATS}
    except Exception as e:
        log.error("the persons stats of a partition cannot be read (%s); counting from zero", type(e).__name__)
        return {}


def kind_of(headers: Any, header: str = HEADER) -> bytes | None:
    for name, value in headers or ():
        if name == header:
            return bytes(value)
    return None


def _headers(kind: bytes, cause: Trigger | None, links: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()
             ) -> list[tuple[str, bytes]]:
    if cause is None:
        return [(HEADER, kind)]
    return [(HEADER, kind), (CAUSE_HEADER, codec.encode_cause(cause, links))]


# -- the stage in the batch step ------------------------------------------------------------------------------


def begin(run: Run, p: int) -> None:
    """Partition p's persons work for this batch, watching what the device stage emits (when the stage is on)."""
    step = run.step
    if step.persons_db_for_partition is None:
        return
    t = step.topics
    assert t.persons_repartition is not None and t.persons is not None
    db = step.persons_db_for_partition(p)
    stats = step.person_stats.get(p)
    if stats is None:
        stats = stored_stats(db.get(STATS_KEY))
    route = Route(t.persons_repartition, t.persons, t.partitions, t.persons_partitions or t.partitions,
                  step.key_hash)
    stage = run.persons[p] = PartitionPersons(p, step.enricher.settings, step.user_ids, route,
                                              StoredPairs(cast(Any, db)), dict(stats), run.persons_counters)
    state, send = run.states[p], _sender(run, p)
    run.observers.setdefault(p, []).append(lambda outcome: stage.observe(state, outcome, send))


def messages(run: Run, p: int) -> None:
    """Partition p's messages of the persons repartition topic, then its device users' mappings."""
    tp, records = run.parts[p][2]
    stage = run.persons.get(p)
    state, send = run.states[p], _sender(run, p)
    if stage is not None:
        for rec in records:
            _message(run, p, stage, state, rec, send)
    run.read(tp, records)
    if stage is not None:
        stage.finish(state, send)


def _sender(run: Run, p: int) -> Callable[[str, int, Message], None]:
    outbox = run.state_outbox(p)

    def send(topic: str, partition: int, message: Message) -> None:
        put(outbox, topic, partition, message)

    return send


def _message(run: Run, p: int, stage: PartitionPersons, state: Any, rec: KafkaRecord, send: Send) -> None:
    """A record of the persons repartition topic. Ours alone write it; one that cannot be read or applied (or,
    in quarantine, any) is kept as an `internal_error` dead letter with its place, never half-applied, and
    the partition goes on."""
    try:
        if run.quarantine:
            raise Rejected(Reason.INTERNAL_ERROR, "", "the worker failed on this persons message alone; kept as "
                           "it was, the pairs untouched")
        kind = kind_of(rec.headers)
        if kind is None or rec.key is None or rec.value is None:
            raise Rejected(Reason.INTERNAL_ERROR, "", "not a persons message: no kind header, key or value")
        stage.apply(state, kind, rec.key, rec.value, send, getattr(rec, "timestamp", None),
                    kind_of(rec.headers, CAUSE_HEADER))
    except Exception as e:
        stage.counters.unreadable += 1
        log.error("partition %d: persons message at offset %d not applied (%s: %s); kept as a dead letter",
                  rec.partition, rec.offset, type(e).__name__, str(e)[:200])
        source = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
        dead_letter(run, p, e, rec.value or b"", source, None, rec.partition)
