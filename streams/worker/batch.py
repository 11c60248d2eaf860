"""The worker's batch step: a fetched batch of Kafka records through its stages, with the device table written
once per device per batch and nothing acknowledged before what it depends on is durable.

`Pipeline.process` reads as the stages, each a module of `streams.worker.stages`:

1. `plan` (at-least-once): once forwarded records reach a partition, how far the batch goes in its raw and
   repartition logs, made durable before any output (a batch done again must meet the same states);
2. `route`: per record, skip what the partition's marks say is applied; decode; a record keyed by its device
   ID in the partition that ID hashes to goes on, any other is forwarded, unchanged, to the repartition topic;
3. `devices`: enrich each record against the batch's state transaction (`streams.state.transaction`), skipping
   what the device's stored state already holds; outputs and dead letters into the outbox; the persons stage
   watches what each record emitted;
4. `persons`: the persons stage's messages (claims, owners' answers, mappings) between partitions; `changes`
   watches its index and appends a row per change of a mapping to the identity change log;
5. `commit`: produce the outputs (`streams.worker.send`) and wait for the acks; then per partition, in one
   transaction of its own producer, the changed states, the marks and the persons messages (which fences a
   worker that lost the partition without being told); then RocksDB. Exactly-once: the partition's outputs
   and input offsets join its transaction. The caller commits the input offsets (at-least-once).

A crash anywhere replays the batch from the last commit: outputs repeat byte for byte (the engine is
deterministic and reads the state as it was), and records the stored state already holds are skipped.

Knows Kafka records and the producer; knows nothing of Faust's App (`streams.worker.app` wires it in).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.enrich import Enricher
from streams.kafka.keyhash import KeyHashes
from streams.kafka.transactions import PartitionProducers
from streams.persons import UserIds
from streams.state.transaction import Applied, PartitionDB, PartitionState
from streams.worker.names import Topics
from streams.worker.send import Message, Outbox
from streams.worker.stages import changes, commit, devices, persons, plan, route
from streams.worker.stages.commit import BatchFailed
from streams.worker.stages.persons import OWNER, PartitionPersons, PersonsCounters, kind_of
from streams.worker.stages.route import KafkaRecord, Part


@dataclass
class Counters:
    records_in: int = 0
    enriched_out: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0
    skipped: int = 0
    batches: int = 0
    failed_batches: int = 0  # done again from their start (a send, a write or a transaction failed)
    transactions: int = 0  # committed
    state_writes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    unreadable_states: int = 0  # stored device states that could not be decoded (their records: dead letters)
    latency_sum: float = 0.0
    last_record_age: float = 0.0

    def add(self, batch: Counters) -> None:
        self.records_in += batch.records_in
        _merge(self.enriched_out, batch.enriched_out)
        _merge(self.dead_letters, batch.dead_letters)
        self.forwarded += batch.forwarded
        self.skipped += batch.skipped
        self.batches += batch.batches
        self.state_writes += batch.state_writes
        self.latency_sum += batch.latency_sum
        if batch.last_record_age:
            self.last_record_age = batch.last_record_age

    def dead_letter(self, reason: str) -> None:
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1


def _merge(into: dict[str, int], more: dict[str, int]) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


@dataclass
class BatchResult:
    commit: dict[Any, int]  # tp -> the next offset, for what the batch applied
    rewind: dict[Any, int]  # tp -> the offset to fetch again: records held back for a later batch


@dataclass
class Run:
    """One batch on its way through the stages: what each stage reads, and what it leaves for the next."""

    step: Pipeline
    positions: Mapping[tuple[str, int], int]  # the consumer's position in each input partition
    ends: Mapping[tuple[str, int], int]  # each input partition's end offset, as the consumer last saw it
    quarantine: bool  # every record becomes an `internal_error` dead letter, the state untouched
    # per table partition: its raw records, its repartitioned ones and its persons messages
    parts: dict[int, tuple[Part, Part, Part]]
    started: float = field(default_factory=time.monotonic)
    # this batch's counts, added to the worker's only when the batch completed: a batch done again after a
    # failure or a rebalance is counted once
    counters: Counters = field(default_factory=Counters)
    persons_counters: PersonsCounters = field(default_factory=PersonsCounters)
    states: dict[int, PartitionState] = field(default_factory=dict)
    persons: dict[int, PartitionPersons] = field(default_factory=dict)
    # what to produce, per owner and (topic, partition), in order: sent as whole batches once the records are
    # applied. The owner is the input partition number whose transaction carries it (exactly-once);
    # at-least-once has one producer and one owner
    outboxes: dict[int, Outbox] = field(default_factory=dict)
    # at-least-once: per partition, what its state transaction carries besides the changelogs (the persons
    # stage's messages); exactly-once's transaction carries the partition's whole outbox
    fenced: dict[int, Outbox] = field(default_factory=dict)
    commit: dict[Any, int] = field(default_factory=dict)  # tp -> the next offset to commit
    rewind: dict[Any, int] = field(default_factory=dict)  # tp -> the offset to fetch again
    plans: dict[int, bytes] = field(default_factory=dict)  # at-least-once: per partition, its plan to write first
    # per partition, what watches each enriched record's outcome (the persons stage)
    observers: dict[int, list[Callable[[Any], None]]] = field(default_factory=dict)

    def outbox(self, p: int) -> Outbox:
        """Where partition p's outputs, dead letters and forwards go."""
        owner = p if self.step.exactly_once else 0
        found = self.outboxes.get(owner)
        if found is None:
            found = self.outboxes[owner] = {}
        return found

    def state_outbox(self, p: int) -> Outbox:
        """Where partition p's state messages go (the persons stage's): they say what holds now, and a late copy
        from a worker that lost the partition would undo what its next owner said since: fenced with the state."""
        return self.outbox(p) if self.step.exactly_once else self.fenced.setdefault(p, {})

    def read(self, tp: Any, records: Sequence[KafkaRecord]) -> None:
        """The records of `tp` were handed to their stage: commit past them."""
        if records:
            self.commit[tp] = records[-1].offset + 1
            self.step.positions[(tp.topic, tp.partition)] = records[-1].offset + 1


class Pipeline:
    def __init__(
        self,
        enricher: Enricher,
        topics: Topics,
        producer: Callable[[], Awaitable[Any]],
        db_for_partition: Callable[[int], PartitionDB],
        write_batch: Callable[[Iterable[tuple[bytes, bytes | None]]], Any],
        changelog_offset_key: bytes,
        cache_size: int = 100_000,
        transactions: PartitionProducers | None = None,
        exactly_once: bool = False,
        group: str = "",
        partitioner: str = "murmur2",
        persons_db_for_partition: Callable[[int], PartitionDB] | None = None,
    ) -> None:
        self.enricher = enricher
        self.topics = topics
        self.producer = producer  # the started aiokafka producer
        self.db_for_partition = db_for_partition
        self.write_batch = write_batch
        self.offset_key = changelog_offset_key
        # one transactional producer per owned partition, in both modes: a partition's state is written in its
        # producer's transactions, so that whoever owns it next fences every write of this worker's still in
        # flight (`streams.kafka.transactions`). Exactly-once puts the partition's outputs and input offsets in
        # them too
        self.transactions = transactions
        self.exactly_once = exactly_once
        self.group = group
        # (partition, device ID) -> (state, applied offsets), or None: nothing stored (see PartitionState)
        self.cache: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self.cache_size = cache_size
        self.counters = Counters()
        # (topic, partition) -> the next offset to process: what the lag metric measures against
        self.positions: dict[tuple[str, int], int] = {}
        self.last_batch_at = time.monotonic()  # when a batch last completed (or the worker started): /health
        self.key_hashes = KeyHashes(200_000, partitioner)
        self.applied: dict[int, Applied] = {}  # per owned table partition, as of the last batch
        # the persons stage (`streams.worker.stages.persons`): on when its topics are named and its table given
        self.persons_db_for_partition = persons_db_for_partition if topics.persons_repartition else None
        self.user_ids = UserIds(enricher.settings.person_salt)
        self.person_stats: dict[int, dict[str, int]] = {}  # per owned partition, as of the last batch
        self.persons_counters = PersonsCounters()

    async def process(self, batch: Mapping[Any, Sequence[KafkaRecord]],
                      positions: Mapping[tuple[str, int], int] | None = None,
                      ends: Mapping[tuple[str, int], int] | None = None,
                      quarantine: bool = False) -> BatchResult:
        """Apply one fetched batch; returns the offsets to commit (tp -> next offset) and the records held back
        for a later batch (tp -> offset to fetch again). Raises when a send fails: nothing of the batch is then
        written or committed, and the caller seeks back. `positions`: the consumer's position in each input
        partition, (topic, partition) -> next offset; `ends`: each one's end offset (high watermark) as the
        consumer last saw it. `quarantine`: every record becomes an `internal_error` dead letter, the state
        untouched (a record that made its batch fail on its own)."""
        run = self.begin(batch, positions or {}, ends or {}, quarantine)
        for p in run.parts:
            plan.order(run, p)  # at-least-once: how far this batch goes, durable before any output
            persons.begin(run, p)  # the persons stage watches what the device stage emits
            changes.begin(run, p)  # the identity change log watches the persons index
            for item in route.records(run, p):  # skip what is applied, decode, forward what belongs elsewhere
                devices.apply(run, p, item)  # enrich: outputs, dead letters, the device's new state
            persons.messages(run, p)  # claims, owners' answers and mappings between partitions
        await commit.commit(run)  # send; then the state, fenced (exactly-once: with the outputs and offsets)
        return self.end(run)

    def begin(self, batch: Mapping[Any, Sequence[KafkaRecord]], positions: Mapping[tuple[str, int], int],
              ends: Mapping[tuple[str, int], int], quarantine: bool) -> Run:
        """The batch's partitions, each with its state transaction, and its devices' states read ahead."""
        run = Run(self, positions, ends, quarantine, route.by_partition(batch, self.topics))
        for p in run.parts:
            state = run.states[p] = PartitionState(p, self.db_for_partition(p), self.cache, self.cache_size,
                                                   self.counters, self.applied.get(p))
            # kept from batch to batch (dropped with the partition's cache when a batch fails): a batch that
            # changes no state writes none, and the next state written must hold what it applied too
            self.applied[p] = state.applied
        self.prepare(batch, run.states)
        return run

    def end(self, run: Run) -> BatchResult:
        for p, stage in run.persons.items():
            self.person_stats[p] = stage.stats
        self.persons_counters.add(run.persons_counters)
        counters = run.counters
        counters.batches = 1
        counters.state_writes = sum(s.written for s in run.states.values())
        self.last_batch_at = time.monotonic()
        counters.latency_sum = self.last_batch_at - run.started
        self.counters.add(counters)
        return BatchResult(run.commit, run.rewind)

    def key_hash(self, device_id: str) -> int:
        """The producers' partitioner's hash of the key (`streams.kafka.partitioners`), cached: murmur2 is
        Python and would otherwise run for every record sent."""
        return self.key_hashes.get(device_id)

    def prepare(self, batch: Mapping[Any, Sequence[KafkaRecord]], states: dict[int, PartitionState]) -> None:
        """Before a batch runs: hash its devices together and read their states with one multi-get per
        partition, from the records' keys (a raw record is keyed by its device ID). Only caches are filled:
        a record keyed otherwise finds its device hashed and read when it comes."""
        keys: dict[int, list[str]] = {}
        for tp, records in batch.items():
            if tp.topic == self.topics.persons_repartition:
                # of the persons stage's messages, only the owners' answers are keyed by a device ID
                records = [rec for rec in records if kind_of(rec.headers) == OWNER]
            # a key that is no UTF-8 is no device ID: what it decodes to (with U+FFFD) is read in vain, and
            # the record is refused or forwarded
            keys.setdefault(tp.partition, []).extend(
                [rec.key.decode(errors="replace") for rec in records if rec.key is not None])
        self.key_hashes.prepare(d for found in keys.values() for d in found)
        n = self.topics.partitions
        for p, found in keys.items():
            hash_of = self.key_hashes.get
            # only the devices that belong here: a record in the wrong partition is forwarded, not applied
            states[p].prefetch(d for d in found if hash_of(d) % n == p)

    def partition_for(self, device_id: str) -> int:
        """The partition of the table (and of the raw topic) this device belongs to."""
        return self.key_hash(device_id) % self.topics.partitions

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """A partition left this worker (or may have: a failed batch): its cached states, marks and persons
        figures may go stale under its next owner."""
        gone = set(partitions)
        for p in gone:
            self.applied.pop(p, None)
            self.person_stats.pop(p, None)
        for key in [k for k in self.cache if k[0] in gone]:
            del self.cache[key]


__all__ = ["BatchFailed", "BatchResult", "Counters", "KafkaRecord", "Message", "Pipeline", "Run"]
