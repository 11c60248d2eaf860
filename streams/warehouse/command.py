"""The `load` command: the enriched, dead-letter, persons and identity change log topics into a DuckDB file,
settings from `config.Settings` (brokers, topic names, SASL/TLS) as `tail` and `produce` take them."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from typing import Any

from aiokafka.errors import KafkaError

from streams import config
from streams.config import Settings
from streams.warehouse import CHUNK_RECORDS
from streams.warehouse.database import WarehouseError
from streams.warehouse.load import NothingToLoad

GC_THRESHOLD = 100_000  # allocations between collections of the youngest generation: more than a fetch's records

LOAD_EXAMPLES = """examples:
  python -m streams load --into warehouse.duckdb            # what the topics hold now, then stop
  python -m streams load --into warehouse.duckdb --follow   # and go on loading until Ctrl-C or SIGTERM
  python -m streams load --into w.duckdb --brokers kafka1:9092 --enriched-topic app.enriched
  duckdb warehouse.duckdb "SELECT person_id, count(*) FROM events_with_person GROUP BY 1"
"""


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    texts: dict[str, Any] = {
        "help": "load the enriched, dead-letter, persons and identity change log topics into a DuckDB file",
        "description": (
            "Read the enriched, dead-letter, persons and identity change log topics (committed records only) into\n"
            "the tables enriched, enriched_identities, dead_letters, persons and identity_changes of a DuckDB\n"
            "file, and create the views of schemas/sql/ (persons_latest, events_with_person, identity_graph,\n"
            "person_history). A topic that does not exist is skipped. Each chunk of records is written with the\n"
            "offsets it reaches in one transaction: a run killed at any point and run again neither loses nor\n"
            "repeats a row. Reads up to the end offsets seen at the start, or with --follow until interrupted."
        ),
        "epilog": LOAD_EXAMPLES,
    }
    parser = commands.add_parser("load", formatter_class=argparse.RawDescriptionHelpFormatter, **texts)
    parser.add_argument("--into", required=True, metavar="PATH", help="the DuckDB file (created when missing)")
    parser.add_argument("--follow", action="store_true",
                        help="keep loading new records until Ctrl-C or SIGTERM (the chunk in hand is written)")
    parser.add_argument("--chunk-records", type=int, metavar="N", default=CHUNK_RECORDS,
                        help=f"records per transaction (default {CHUNK_RECORDS:,})")
    parser.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    config.add_arguments(parser, "kafka")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run `load`; the exit code. Raises one of `errors()` for a failure the command line reports in one line."""

    from streams.warehouse.load import load

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.chunk_records < 1:
        print("streams load: --chunk-records must be 1 or more", file=sys.stderr)
        return 2
    # aiokafka builds a fetch's records (two objects each the collector tracks) before it returns any: with the
    # default threshold the collector runs every 700 of them, each time over all those still alive, for a fifth
    # of the time reading takes. Records are freed as soon as they are copied, by their reference counts
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    try:
        asyncio.run(load(settings, args.into, follow=args.follow, chunk_records=args.chunk_records,
                         progress=None if args.quiet else sys.stderr))
    except KafkaError as e:
        raise LoadFailed(f"Kafka at {settings.brokers}: {e}") from e
    return 0


class LoadFailed(Exception):
    pass


def errors() -> tuple[type[BaseException], ...]:
    """What `run` may raise for the command line to report: nothing to load, the database refused, Kafka, a file
    (imported here: the command line's other commands need neither DuckDB nor the loader)."""

    return LoadFailed, NothingToLoad, WarehouseError, OSError, KeyboardInterrupt
