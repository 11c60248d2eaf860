"""The worker's HTTP face: Prometheus metrics and the live device and persons lookups, on Faust's web server.

Lives here: `install(app)`, which adds `GET /metrics`, `GET /devices/{device_id}` and `GET /persons/{user_id}`
(each lookup routed to the worker that owns the key's partition, as Faust's table views are), and the
Prometheus text rendering. Faust's raw `/table` dump stays off (`web_tables_enabled=False` in `streams.worker.app`).
`faust -A streams.web worker` runs the worker with these views (`faust -A streams.worker.app worker` without them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any, cast

from faust.types import TP
from faust.web import Request, Response, View
from yarl import URL

from streams import codec
from streams.state.keys import INTERNAL
from streams.state.restore import RestoreCounters
from streams.state.transaction import FORWARDED
from streams.worker.app import StreamsApp, built_on_first_use
from streams.worker.names import PERSONS_TABLE, TABLE, input_topics
from streams.worker.recovery import MarkerAwareRecovery
from streams.worker.stages.persons import STATS, STATS_KEY, stored_stats

STARTED = time.time()


def install(app: StreamsApp) -> None:

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.text(render_metrics(app), content_type="text/plain; version=0.0.4")

    @app.page("/health/live")
    class Live(View):
        async def get(self, request: Request) -> Response:
            status, body = health(app, time.monotonic(), ready=False)
            return self.json(body, status=status)

    @app.page("/health/ready")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            status, body = health(app, time.monotonic())
            return self.json(body, status=status)

    @app.page("/devices/{device_id}")
    class Device(View):
        async def get(self, request: Request, device_id: str) -> Response:
            partition = app.streams_pipeline.partition_for(device_id)
            owner = owner_url(app, partition)
            if owner is not None and owner != str(app.conf.canonical_url) and ROUTED not in request.headers:
                return await route(app, self, request, owner)
            status, body = device(app, device_id, partition)
            return self.json(body, status=status)

    @app.page("/persons/{user_id}")
    class Person(View):
        async def get(self, request: Request, user_id: str) -> Response:
            if app.streams_persons_table is None:
                return self.json({"user_id": user_id, "error": "the persons stage is off (STREAMS_PERSONS=off): "
                                  "this worker keeps no persons mapping"}, status=404)
            user = user_id.lower()
            if not USER_ID.fullmatch(user):
                return self.json({"user_id": user_id[:100], "error": "not a user ID: a user_id is a UUID as the "
                                  "enriched records carry it, e.g. 2f1f4a5e-8c4b-5f4e-9a53-5c1f1d0b2a77"},
                                 status=400)
            partition = app.streams_pipeline.partition_for(user)
            owner = owner_url(app, partition, PERSONS_TABLE)
            if owner is not None and owner != str(app.conf.canonical_url) and ROUTED not in request.headers:
                return await route(app, self, request, owner, "this user's mapping")
            status, body = person(app, user, partition)
            return self.json(body, status=status)


# set on a lookup one worker sends another: the receiver answers it itself, even when the group has moved the
# device meanwhile, so that two workers with different views of the assignment never send it back and forth
ROUTED = "X-Streams-Routed"


def owner_url(app: StreamsApp, partition: int, table: str = TABLE) -> str | None:
    """The advertised URL of the worker that holds the table partition, as the group's last assignment says."""
    # the assignor's map holds the table's changelog topic only
    for url, topics in app.router.table_metadata(table).items():
        if any(partition in partitions for partitions in topics.values()):
            return str(url)
    return None


async def route(app: StreamsApp, view: View, request: Request, owner: str, what: str = "this device") -> Response:
    """Ask the owner, and answer what it answers. The key's partition is the producers' partitioner's
    (`--partitioner`), which Faust's own table router does not know."""
    target = URL(owner).with_path(request.url.raw_path, encoded=True).with_query(request.url.query)
    try:
        async with app.http_client.get(target, headers={ROUTED: "1"}) as response:
            return view.text(await response.text(), content_type=response.content_type, status=response.status)
    except OSError as e:
        return view.json({"error": f"the worker that holds {what} ({owner}) does not answer: "
                          f"{type(e).__name__}"}, status=503)


# a user_id as the enriched records carry it (persons.md §1: `str(uuid5(...))`), any case
USER_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NOT_MAPPED = ("no persons mapping for this user ID: a login user is a person of its own, and a device user "
              "without a mapping (none yet, or its mapping ended) is its own person: its person ID is its user_id")


def person(app: StreamsApp, user_id: str, partition: int) -> tuple[int, dict[str, Any]]:
    """A device user's mapping from the persons index, as this worker (the owner of its partition) holds it:
    the HTTP status and the JSON body."""
    changelog = app.streams_pipeline.topics.persons_changelog
    assert changelog is not None
    unavailable = not_serving(app, changelog, partition)
    if unavailable is not None:
        return 503, {"user_id": user_id, "error": f"partition {partition} of the persons table {unavailable}: "
                     "ask again shortly"}
    db = cast(Any, app.streams_persons_table.data)._db_for_partition(partition)
    data = db.get(b"U" + user_id.encode())
    if not isinstance(data, bytes):
        return 404, {"user_id": user_id, "error": NOT_MAPPED}
    mapping, conflict = codec.decode_user(data)
    if mapping is not None:
        return 200, mapping.record()
    if conflict:
        # the pairs it claims have several owners: it maps to none of them (persons.md §4)
        return 200, {"user_id": user_id, "person_id": None, "conflict": True}
    return 404, {"user_id": user_id, "error": NOT_MAPPED}


def not_serving(app: StreamsApp, changelog: str, partition: int) -> str | None:
    """Why this worker cannot answer for a table partition now (None: it can): it is not the partition's
    active owner (a lookup routed here just before the group moved it, or no assignment yet), or the group
    is rebalancing (Faust's flag is up from the revocation until every partition taken over is rebuilt from
    its changelog)."""
    if not app.assignor.is_active(TP(changelog, partition)):
        return "is not held by this worker now (the group is assigning it)"
    if app.rebalancing:
        return "is not ready: the group is rebalancing, and this worker may be rebuilding it from its changelog"
    return None


def device(app: StreamsApp, device_id: str, partition: int) -> tuple[int, dict[str, Any]]:
    """A device's state as this worker holds it, the owner of its partition: the HTTP status and the JSON body.
    A partition it does not serve now answers 503, not a false 404 or a stale state."""
    unavailable = not_serving(app, app.streams_pipeline.topics.changelog, partition)
    if unavailable is not None:
        return 503, {"device_id": device_id, "error": f"partition {partition} of the device table {unavailable}: "
                     "ask again shortly"}
    found = lookup(app, device_id)
    if found is None:
        return 404, {"device_id": device_id, "error": "no identity state stored for this device (never seen, or "
                     "only records that change nothing)"}
    return 200, found


def lookup(app: StreamsApp, device_id: str) -> dict[str, Any] | None:
    """The device's state as this worker holds it (the owner of its partition)."""
    pipeline = app.streams_pipeline
    partition = pipeline.partition_for(device_id)
    entry = pipeline.cache.get((partition, device_id))
    if entry is None:
        db = cast(Any, app.streams_table.data)._db_for_partition(partition)
        data = db.get(device_id.encode())
        if not isinstance(data, bytes):
            return None
        entry = codec.decode_stored(data)
    # a cached entry also holds the device's persons part (`streams.state.transaction.Entry`)
    state, applied = entry[0], entry[1]
    return {"device_id": device_id, "partition": partition, **codec.state_as_json(state),
            "applied_offsets": {_log(key): o for key, o in sorted(applied.items())}}


def _log(key: int) -> str:
    """A watermark key (`streams.worker.batch.FORWARDED`) as people read it."""
    if key >= FORWARDED:
        return f"forwarded from {key - FORWARDED}"
    if key < 0:
        return f"repartition {-1 - key}"
    return str(key)


def render_metrics(app: StreamsApp) -> str:
    pipeline = app.streams_pipeline
    c = pipeline.counters
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP streams_{name} {help_}")
        out.append(f"# TYPE streams_{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"streams_{name}{{{text}}} {value}" if text else f"streams_{name} {value}")

    metric("records_in_total", "counter", "raw records read (incl. repartitioned ones)", [({}, c.records_in)])
    metric("enriched_out_total", "counter", "enriched records produced, by type",
           [({"type": t}, n) for t, n in sorted(c.enriched_out.items())])
    metric("dead_letters_total", "counter", "dead letters produced, by reason",
           [({"reason": r}, n) for r, n in sorted(c.dead_letters.items())])
    metric("repartitioned_total", "counter", "records forwarded to the repartition topic", [({}, c.forwarded)])
    metric("already_applied_total", "counter", "records skipped after a restart: the state already held them",
           [({}, c.skipped)])
    metric("state_writes_total", "counter", "device states written (RocksDB and changelog)", [({}, c.state_writes)])
    metric("batches_total", "counter", "batches processed", [({}, c.batches)])
    metric("batch_seconds_sum", "counter", "time spent processing batches", [({}, round(c.latency_sum, 6))])
    metric("batches_failed_total", "counter", "batches (or, exactly-once, partitions of one) that failed and are "
           "done again", [({}, c.failed_batches)])
    metric("transactions_total", "counter", "transactions committed (one per partition per batch that writes "
           "state, or with exactly-once per partition per batch)", [({}, c.transactions)])
    metric("record_age_seconds_max", "gauge", "age of the oldest record of the last batch when it was processed",
           [({}, round(c.last_record_age, 3))])
    metric("cache_hits_total", "counter", "device-state cache hits", [({}, c.cache_hits)])
    metric("cache_misses_total", "counter", "device-state cache misses (read from RocksDB)", [({}, c.cache_misses)])
    metric("unreadable_states_total", "counter", "stored device states that could not be decoded (the records "
           "of those devices became unreadable_state dead letters)", [({}, c.unreadable_states)])
    metric("batch_failures_in_a_row", "gauge", "consecutive failures of the batch step (0: the last batch "
           "succeeded); the pause before the next try doubles from 0.5 s up to 30 s",
           [({}, _failures_in_a_row(app))])
    restored = _restore_counters(app)
    metric("restored_records_total", "counter", "changelog records written to this worker's RocksDB: 'active' "
           "rebuilding a partition it took over, 'standby' keeping a copy of another worker's",
           [({"role": r}, n) for r, n in sorted(restored.records.items())])
    metric("restore_seconds_sum", "counter", "time spent writing restored changelog records",
           [({}, round(restored.seconds, 6))])
    metric("restored_offset", "gauge", "changelog offset a partition's local copy holds: 'active' of the last "
           "record of its rebuild, 'standby' of the last record a standby copy applied",
           [({"role": "active", "partition": str(p)}, o) for p, o in sorted(restored.offsets.items())]
           + [({"role": "standby", "partition": str(p)}, o) for p, o in sorted(_standby_positions(app).items())])
    metric("restore_started_after", "gauge", "per partition owned, the changelog offset its last rebuild started "
           "after (-1: from the beginning; a partition taken over from a standby copy starts where the copy was)",
           [({"partition": str(p)}, o) for p, o in sorted(restored.started_after.items())])
    metric("consumer_lag", "gauge", "records not yet processed, per input partition", _lag(app))
    metric("state_devices", "gauge", "devices with stored state in this worker's partitions (RocksDB estimate)",
           [({}, _devices(app))])
    metric("uptime_seconds", "gauge", "seconds since the worker started", [({}, round(time.time() - STARTED, 1))])
    stats = person_stats(app)
    if stats is not None:
        p = pipeline.persons_counters
        metric("person_claims", "gauge", "active claims made by the devices of this worker's partitions "
               "(persons.md §2)", [({}, stats["claims"])])
        metric("person_pairs", "gauge", "claimed pairs in this worker's partitions: 'owned' by one login user, "
               "'shared' by several or on more devices than STREAMS_PERSON_MAX_DEVICES (persons.md §3)",
               [({"state": "owned"}, stats["owned_pairs"]), ({"state": "shared"}, stats["shared_pairs"])])
        metric("person_device_users", "gauge", "device users mapped now, in this worker's partitions of the "
               "persons index, by how (persons.md §4)",
               [({"via": "login"}, stats["via_login"]), ({"via": "identity"}, stats["via_identity"])])
        metric("person_conflicts", "gauge", "device users in conflict now (owned pairs of several owners: mapped "
               "to none), in this worker's partitions of the persons index", [({}, stats["conflicts"])])
        metric("person_messages_total", "counter", "persons stage messages sent, by kind: a device's claims on a "
               "pair, a pair's owner back to a device, a device user's mapping to the index",
               [({"kind": "claim"}, p.claim_messages), ({"kind": "owner"}, p.owner_messages),
                ({"kind": "user"}, p.user_messages)])
        metric("person_mappings_written_total", "counter", "mappings written to the persons topic",
               [({}, p.mappings_written)])
        metric("person_tombstones_written_total", "counter", "tombstones written to the persons topic (a mapping "
               "that no longer holds)", [({}, p.tombstones_written)])
        metric("person_unreadable_messages_total", "counter", "persons stage messages that could not be applied "
               "(each kept as a dead letter)", [({}, p.unreadable)])
        metric("person_refused_claims_total", "counter", "claims and sign-ups not made: the device was at its "
               "bound (1,000 of each; an unbind makes room)", [({}, p.refused_claims)])
        metric("identity_change_rows_total", "counter", "rows appended to the identity change log (a mapping "
               "row per change, and its link rows)", [({}, p.change_rows)])
    return "\n".join(out) + "\n"


def person_stats(app: StreamsApp) -> dict[str, int] | None:
    """The persons stage's counts summed over the partitions this worker owns (None: the stage is off). A
    partition's counts are the stage's as of its last batch here, or, before its first batch since it came
    to this worker, as stored with its pairs (`streams.worker.stages.persons.STATS_KEY`)."""
    table = app.streams_persons_table
    if table is None:
        return None
    pipeline = app.streams_pipeline
    changelog = pipeline.topics.persons_changelog
    owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog}
    totals = dict.fromkeys(STATS, 0)
    for partition in sorted(owned | pipeline.person_stats.keys()):
        stats = pipeline.person_stats.get(partition)
        if stats is None:
            try:
                stats = stored_stats(cast(Any, table.data)._db_for_partition(partition).get(STATS_KEY))
            except Exception:
                continue
        for name in STATS:
            totals[name] += stats.get(name, 0)
    return totals


def _restore_counters(app: StreamsApp) -> RestoreCounters:
    recovery = cast(Any, app.tables).recovery
    return recovery.restore_counters if isinstance(recovery, MarkerAwareRecovery) else RestoreCounters()


def _standby_positions(app: StreamsApp) -> dict[int, int]:
    recovery = cast(Any, app.tables).recovery
    return recovery.standby_positions() if isinstance(recovery, MarkerAwareRecovery) else {}


# no batch completed this long while records wait: /health says the worker is stuck (an orchestrator restarts it)
STALL_SECONDS = 120.0


def health(app: StreamsApp, now: float, ready: bool = True) -> tuple[int, dict[str, Any]]:
    """Live (200) unless records wait in a partition this worker holds and no batch has completed for
    STALL_SECONDS (a worker retrying for ever, a partition stalled): 503, saying why; an orchestrator restarts
    it. Ready as well unless the group is rebalancing. A rebalance, however long its state rebuild, is not a
    stall: restarting the worker would only start the rebuild again. An idle worker is live and ready."""
    if app.rebalancing:
        if ready:
            return 503, {"status": "not ready", "reason": "the group is rebalancing"}
        return 200, {"status": "live", "reason": "the group is rebalancing"}
    lag = sum(value for _, value in _lag(app))
    idle = now - app.streams_pipeline.last_batch_at
    if lag > 0 and idle > STALL_SECONDS:
        return 503, {"status": "stalled", "reason": f"no batch completed for {idle:.0f}s while {lag:.0f} records "
                     f"wait", "lag": lag, "failed_batches_in_a_row": _failures_in_a_row(app)}
    return 200, {"status": "ready" if ready else "live", "lag": lag, "seconds_since_last_batch": round(idle, 1)}


def _lag(app: StreamsApp) -> list[tuple[dict[str, str], float]]:
    consumer = app.consumer
    mine = input_topics(app.streams_pipeline.topics)  # the persons repartition topic too
    samples: list[tuple[dict[str, str], float]] = []
    for tp in sorted(consumer.assignment()):
        if tp.topic not in mine:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:
            continue
        done = app.streams_pipeline.positions.get((tp.topic, tp.partition))
        if high is None:
            continue
        if done is None:
            committed = cast(Any, consumer)._committed_offset.get(tp)
            done = committed if committed is not None else 0
        samples.append(({"topic": tp.topic, "partition": str(tp.partition)}, max(high - done, 0)))
    return samples


def _devices(app: StreamsApp) -> int:
    store = cast(Any, app.streams_table.data)
    total = 0
    for db in list(getattr(store, "_dbs", {}).values()):
        try:
            # an estimate, less the internal keys, which sort after every device ID
            internal = sum(1 for _ in db.keys(from_key=INTERNAL))
            total += max(int(db.property_int_value("rocksdb.estimate-num-keys") or 0) - internal, 0)
        except Exception:
            continue
    return total


def _failures_in_a_row(app: StreamsApp) -> int:
    retries = getattr(app.consumer, "retries", None)
    return retries.failures if retries is not None else 0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# `faust -A streams.web worker`: the worker with its HTTP views
__getattr__ = built_on_first_use(install)
