"""The Faust worker: the raw topic in, enriched records and dead letters out, device state in a RocksDB table.

Here the app is built: its topics, the device and persons tables, the batch step and the consumer
(`streams.worker.consumer`) that feeds whole fetched batches to it instead of handing Faust one event at a
time. Faust keeps what it is good at: the consumer group and its partition assignment, the tables' RocksDB
stores, their changelogs and recovery (`streams.worker.recovery`), the web server. What it is slow at (an
Event, a task and an await per record; a RocksDB write and a changelog record per table assignment) is what
the batch step replaces. Start-up checks: `streams.worker.startup`.

`python -m streams worker` runs it; `faust -A streams.worker.app worker` works too (settings from STREAMS_*), with
the same start-up checks, exit codes and isolation from Faust's own environment variables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, cast

import faust

from streams import config
from streams.config import EX_CONFIG, SettingError, Settings
from streams.enrich import Enricher
from streams.gcpolicy import tune_gc
from streams.kafka.transactions import PartitionProducers, transactional_producer
from streams.state.devicestore import DeviceTable
from streams.state.keys import OFFSET_KEY
from streams.state.store import write_batch
from streams.worker.batch import Pipeline
from streams.worker.consumer import BatchConsumer
from streams.worker.names import PERSONS_TABLE, TABLE, topic_names
from streams.worker.recovery import StreamsTableManager
from streams.worker.retries import Retries
from streams.worker.startup import (
    ConfigurationError,
    Layout,
    controller_node,
    credentials,
    forbid_topic_auto_creation,
    prepare_topics,
)

log = logging.getLogger(__name__)



class StreamsApp(faust.App):
    streams_pipeline: Pipeline
    streams_settings: Settings
    streams_table: Any
    streams_persons_table: Any  # None: the persons stage is off

    async def _stop_consumer(self) -> None:
        # let the batch in flight finish (or not start) before Faust revokes the tables on shutdown
        consumer = self._consumer
        if isinstance(consumer, BatchConsumer):
            async with consumer.batch_lock:
                await super()._stop_consumer()
                if consumer.pipeline.transactions is not None:
                    await consumer.pipeline.transactions.close_all()
        else:
            await super()._stop_consumer()


def create_app(settings: Settings, layout: Layout) -> StreamsApp:
    partitions = layout.partitions
    topics = topic_names(settings, partitions, layout.outputs)
    app = StreamsApp(
        settings.group,
        broker=[f"kafka://{b.strip()}" for b in settings.brokers.split(",")],
        broker_credentials=credentials(settings),
        store="rocksdb://",
        datadir=settings.state_dir,
        topic_partitions=partitions,
        # the changelog, repartition and Faust's leader topic get the same replication as the others
        topic_replication_factor=layout.replication,
        key_serializer="raw",
        value_serializer="raw",
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_host=settings.web_bind,
        web_enabled=True,
        web_tables_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=settings.batch_records,
        consumer_max_fetch_size=8 << 20,
        producer_linger_ms=5,
        producer_max_batch_size=1 << 20,
        # an output, dead letter or state counts as written once every in-sync replica has it
        producer_acks=-1,
        stream_wait_empty=False,
        # a worker that died gives its partitions up after this long (Faust's default is 60 s)
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=max(1.0, settings.session_timeout / 4),
        # each partition's states kept by as many other workers (it needs as many more in the group to show)
        table_standby_replicas=settings.standby_replicas,
        # Faust's own exactly-once (a producer buffer per partition, a transaction open at all times) stays
        # off: with --processing-guarantee exactly_once the batch step commits its own transactions
        processing_guarantee="at_least_once",
        TableManager=StreamsTableManager,
        Table=DeviceTable,
        # the URL the group's other workers route device lookups to (Faust's assignor shares it)
        canonical_url=settings.web_url,
        logging_config=None,
        # only STREAMS_* variables configure the worker: Faust would otherwise read BROKER_URL, WEB_PORT,
        # PROCESSING_GUARANTEE... from the environment and let them override what is passed here
        env={},
    )
    cast(Any, app.transport).Consumer = BatchConsumer
    cast(Any, app.transport)._get_controller_node = controller_node

    raw = app.topic(topics.raw, key_type=bytes, value_type=bytes)
    repartition = app.topic(topics.repartition, partitions=partitions, internal=True, key_type=bytes,
                            value_type=bytes)
    table = app.Table(
        TABLE,
        partitions=partitions,
        key_type=bytes,
        value_type=bytes,
        options={
            "block_cache_size": settings.rocksdb_cache_mb << 20,
            "block_cache_compressed_size": 0,
            # 10 bits a key: ~1% false positives (Faust's 3 bits: ~14%). Most devices of a large population
            # have nothing stored, and a false positive costs a read of a data block for nothing
            "bloom_filter_size": 10,
            "write_buffer_size": 16 << 20,
            "max_write_buffer_number": 2,
        },
    )
    # subscribe to the inputs without an agent: BatchConsumer reads them
    app.topics.add(raw)
    app.topics.add(repartition)
    persons_table = None
    if topics.persons_repartition is not None:
        # the persons stage: its repartition topic, and a second table (pairs' claims, the persons index),
        # partitioned like the first, so that Faust gives partition p of every input and table to one worker
        app.topics.add(app.topic(topics.persons_repartition, partitions=partitions, internal=True,
                                 key_type=bytes, value_type=bytes))
        persons_table = app.Table(PERSONS_TABLE, partitions=partitions, key_type=bytes, value_type=bytes,
                                  options={"block_cache_size": 8 << 20, "block_cache_compressed_size": 0,
                                           "bloom_filter_size": 10, "write_buffer_size": 8 << 20,
                                           "max_write_buffer_number": 2})

    faust_producer = cast(Any, app.producer)

    async def producer() -> Any:
        # the aiokafka producer under Faust's; a batch can arrive before Faust has started it
        for _ in range(600):
            started = faust_producer._producer
            if started is not None:
                return started
            await asyncio.sleep(0.05)
        raise RuntimeError("Faust's producer did not start within 30 s")

    pipeline = Pipeline(
        Enricher(settings.enrich_settings()),
        topics,
        producer,
        db_for_partition=lambda p: cast(Any, table.data)._db_for_partition(p),
        write_batch=write_batch,
        changelog_offset_key=OFFSET_KEY,
        cache_size=settings.cache_devices,
        partitioner=settings.partitioner,
        # in both modes: the state is written in each partition's transactions, which its next owner fences
        transactions=PartitionProducers(settings.group, transactional_producer(settings.brokers,
                                                                                settings.kafka_options())),
        exactly_once=settings.exactly_once,
        group=settings.group,
        persons_db_for_partition=(None if persons_table is None
                                  else lambda p: cast(Any, persons_table.data)._db_for_partition(p)),
    )
    BatchConsumer.pipeline = pipeline
    BatchConsumer.retries = Retries(isolate_after=settings.batch_retries)
    app.streams_pipeline = pipeline
    app.streams_settings = settings
    app.streams_table = table
    app.streams_persons_table = persons_table
    return app


# -- running it --------------------------------------------------------------------------------------------


def quiet_loggers(level: str) -> None:
    """Faust leaves its loggers at DEBUG and filters in the handler: building the records costs CPU."""
    numeric = getattr(logging, level.upper(), logging.WARNING)
    for name in ("", "faust", "mode", "aiokafka", "kafka", "rocksdict", "streams"):
        logging.getLogger(name).setLevel(numeric)


def run_worker(settings: Settings, extend: Callable[[StreamsApp], None] | None = None) -> int:
    """Run the worker until it is stopped; `extend` adds to the app first (the CLI adds the web views)."""
    quiet_loggers(settings.log_level)
    layout = start_up(settings)
    if isinstance(layout, int):
        return layout
    app = create_app(settings, layout)
    if extend is not None:
        extend(app)
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False)
    quiet_loggers(settings.log_level)
    tune_gc()
    worker.execute_from_commandline()
    return 0


def built_on_first_use(extend: Callable[[StreamsApp], None] | None = None) -> Callable[[str], Any]:
    """A module's `__getattr__` for `faust -A MODULE worker`: its `app`, built on first use from the
    environment's settings (and `extend`ed)."""
    built: list[StreamsApp] = []

    def attribute(name: str) -> Any:
        if name != "app":
            raise AttributeError(name)
        if not built:
            app = from_environment()
            if extend is not None:
                extend(app)
            built.append(app)
        return built[0]

    return attribute


# `faust -A streams.worker.app worker`: the worker without its HTTP views
__getattr__ = built_on_first_use()


def start_up(settings: Settings) -> Layout | int:
    """The start-up checks of every entry point: the topics prepared (or refused), no topic created by a client
    afterwards. The layout, or the exit code after a line on stderr: 78 (EX_CONFIG) when restarting will not
    help, 1 when Kafka did not answer."""
    forbid_topic_auto_creation()
    try:
        return asyncio.run(prepare_topics(settings))
    except (ConfigurationError, SettingError) as e:
        print(f"streams worker: {e}", file=sys.stderr)
        return EX_CONFIG
    except Exception as e:
        print(f"streams worker: cannot reach Kafka at {settings.brokers}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def from_environment() -> StreamsApp:
    """The app as `faust -A` finds it: settings from STREAMS_* variables (checked as `python -m streams worker`
    checks them), topics prepared at import. A failed check exits as that command does."""
    without_faust_environment()
    try:
        settings = Settings.load()
        settings.check_files()
    except SettingError as e:
        print(f"streams worker: {e}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    quiet_loggers(settings.log_level)
    layout = start_up(settings)
    if isinstance(layout, int):
        raise SystemExit(layout)
    return create_app(settings, layout)


# -- Faust's own environment variables under `faust -A` -------------------------------------------------------


def without_faust_environment() -> None:
    """`faust -A streams.worker.app worker` (and `streams.web`) imports Faust, which reads FAUST_* and F_*
    variables (its working and data directories, event loop, debug mode, web transport) before this module is
    imported: too late to drop them, as `python -m streams worker` does before it imports Faust. When the
    process started with any of them, run the same command line again without them (the same process id), after
    a line on stderr for each, as `python -m streams worker` says it ignores them; FAUST_WORKDIR (F_WORKDIR),
    which Faust has acted on already, is refused (EX_CONFIG). Faust's CLI sets F_DATADIR itself: only the
    environment the process started with counts."""
    started_with = _initial_environment()
    ignored = config.faust_variables(started_with)
    if not ignored:
        return
    moved = sorted({"FAUST_WORKDIR", "F_WORKDIR"} & set(ignored))
    if moved:
        # Faust's CLI has moved into that directory already, and the one the command started in is lost (PWD may
        # be a parent's): a relative state directory would be read from the wrong place
        print(f"streams worker: Faust has changed the working directory to {' / '.join(moved)} already: unset it, "
              "or run `python -m streams worker`, which ignores it", file=sys.stderr)
        raise SystemExit(EX_CONFIG)
    for name in ignored:
        print(f"streams worker: {config.FAUST_IGNORED.format(name)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {k: v for k, v in started_with.items() if k not in ignored})


def _initial_environment() -> dict[str, str]:
    """The environment the process was started with (Linux: /proc/self/environ, which later changes leave
    alone); elsewhere the current one without the variables Faust's CLI sets itself."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        faust_sets = ("F_DATADIR", "F_WORKDIR", "FAUST_DATADIR", "FAUST_LOOP")
        return {k: v for k, v in os.environ.items() if k not in faust_sets}
    pairs = (os.fsdecode(entry).partition("=") for entry in raw.split(b"\0") if entry)
    return {name: value for name, _, value in pairs}
