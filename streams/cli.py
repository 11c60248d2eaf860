"""The command line: `python -m streams COMMAND` (or `streams COMMAND`).

Lives here: argument parsing and the exit codes; each command calls into its module. Settings come from
`config.Settings`: a flag beats its environment variable, which beats the default. A setting that cannot be
right (an unknown STREAMS_* variable, a value out of range, a TLS file that cannot be read) stops every command
that reads settings with one line on stderr and exit code 78 (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from streams import config

REPLAY_EXAMPLES = """examples:
  python -m streams replay --input streams/samples/seed.jsonl --output - --dead-letter dead.jsonl
  python -m streams replay --input day1.jsonl --output out1.jsonl --dead-letter dead1.jsonl --state-dir state/
  python -m streams replay --input big.jsonl --output out.jsonl --dead-letter dead.jsonl --jobs 2
  python -m streams replay --input day1.jsonl --output out.jsonl --dead-letter dead.jsonl --persons persons.jsonl
  cat raw.jsonl | python -m streams replay --input - --output - --dead-letter /dev/null --default-platform web
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streams",
        description="Identity enrichment for client analytics events (Sensors Data IDM 3.0, Adobe customer IDs).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = commands.add_parser(
        "replay",
        help="enrich a JSONL file offline, no broker",
        description="Read raw records (JSON lines) in order; write enriched records and dead letters.",
        epilog=REPLAY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("--input", required=True, metavar="PATH", help="raw records, JSONL ('-' = stdin)")
    replay.add_argument("--output", required=True, metavar="PATH", help="enriched records, JSONL ('-' = stdout)")
    replay.add_argument("--dead-letter", required=True, metavar="PATH", help="dead letters, JSONL")
    replay.add_argument("--state-dir", metavar="DIR",
                        help="keep device state in RocksDB here; a later run continues from it (default: memory)")
    replay.add_argument("--persons", dest="persons_file", metavar="PATH",
                        help="write the final persons mapping here: one JSON object per device user that has one, "
                        "sorted by user_id (persons.md §4)")
    replay.add_argument("--identity-changes", dest="changes_file", metavar="PATH",
                        help="write the identity change log here: a row per change of a device user's mapping, "
                        "and the identifiers that link it (schemas/identity-change.schema.json)")
    replay.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    config.add_arguments(replay, "replay")

    worker = commands.add_parser(
        "worker",
        help="enrich the raw topic continuously (Faust, RocksDB state)",
        description="Consume the raw topic, enrich, produce to the enriched and dead-letter topics. Device state "
        "lives in a RocksDB-backed Faust table with a changelog topic; stop with Ctrl-C or SIGTERM.",
        epilog="examples:\n  python -m streams worker\n"
        "  python -m streams worker --brokers kafka1:9092,kafka2:9092 --group enricher --state-dir /var/lib/streams\n"
        "  STREAMS_RAW_TOPIC=app.events python -m streams worker --web-port 6067",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_arguments(worker, "worker")

    lookup(commands, "state", "device_id", "the device ID (the raw records' device_id)",
           help="print a device's identity state, asked of a running worker",
           description="Ask a running worker (any worker of the group: the request is routed to the one that owns "
           "the device's partition) for a device's current identity state, and print it as JSON.",
           epilog="examples:\n  python -m streams state 1712042794795-4430041-097b46dd83f7da8-29832842\n"
           "  python -m streams state web-visitor-7f3c --url http://10.0.0.5:6066")
    lookup(commands, "person", "user_id", "a device user's ID (the user_id of its enriched records, a UUID)",
           help="print a device user's persons mapping, asked of a running worker",
           description="Ask a running worker (any worker of the group: the request is routed to the one that owns "
           "the user ID's\npartition of the persons index) for a device user's persons mapping (persons.md §4), and "
           "print it as JSON:\nthe mapping record, or person_id null and conflict true when the pairs it claims have "
           "several owners.\nA user ID without a mapping (a login user, or a device user mapped to no one) is its "
           "own person: exit code 1.",
           epilog="examples:\n  python -m streams person 0c6f7a4e-2d3b-5e8f-9a1c-4b7d2e6f8a90\n"
           "  python -m streams person 0c6f7a4e-2d3b-5e8f-9a1c-4b7d2e6f8a90 --url http://10.0.0.5:6066")

    from streams.kafka import commands as kafka_commands

    kafka_commands.add_commands(commands)

    from streams.warehouse import command as warehouse_command

    warehouse_command.add_command(commands)

    bench = commands.add_parser(
        "bench",
        help="measure the worker against a bare passthrough and a stock Faust agent (make bench)",
        description="Run scripts/bench.py: generate a stream, load it into the broker, measure a bare aiokafka "
        "passthrough, a stock Faust agent, the worker and replay side by side, check that the worker's output "
        "equals replay's, and print the table (also written to .cache/bench/last.md). Arguments after `bench` "
        "go to the script.",
        epilog="examples:\n  python -m streams bench --quick\n  python -m streams bench --records 2000000 "
        "--devices 500000\n  python -m streams bench -- --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="scripts/bench.py's own options")
    return parser


def lookup(commands: Any, name: str, argument: str, argument_help: str, **texts: str) -> None:
    """A command that asks a running worker for one thing by its key, over HTTP."""
    parser = commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **texts)
    parser.add_argument(argument, help=argument_help)
    parser.add_argument("--url", help="a worker's web address (default: http://WEB_BIND:WEB_PORT from the settings)")
    config.add_arguments(parser, "state")


# the commands that connect to Kafka: the files their settings name are read before they start
KAFKA_COMMANDS = ("worker", "produce", "tail", "load")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":  # the benchmark sets up its own settings
        return run_bench(args)
    if args.command == "worker":
        drop_faust_environment()
    try:
        settings = config.Settings.load(os.environ, args)
        if args.command in KAFKA_COMMANDS:
            settings.check_files()
    except config.SettingError as e:
        print(f"streams {args.command}: {e}", file=sys.stderr)
        return config.EX_CONFIG
    if args.command == "replay":
        return run_replay(args, settings)
    if args.command == "state":
        return run_state(args, settings)
    if args.command == "person":
        return run_person(args, settings)
    if args.command in ("produce", "tail"):
        from streams.kafka import commands as kafka_commands

        return kafka_commands.run(args, settings)
    if args.command == "load":
        from streams.warehouse import command as warehouse_command

        try:
            return warehouse_command.run(args, settings)
        except warehouse_command.errors() as e:
            return failed("load", e)
    if args.command == "worker":
        from streams import web
        from streams.worker.app import run_worker

        return run_worker(settings, web.install)
    parser.error(f"unknown command {args.command}")
    return 2


def drop_faust_environment() -> None:
    """Only STREAMS_* variables configure the worker. Faust reads FAUST_* and F_* variables when it is
    imported (its web port, data dir, event loop: a Kubernetes service named `faust-web` injects
    FAUST_WEB_PORT=tcp://...), before any setting of ours applies; the app is built with an empty
    environment for the rest (`streams.worker.app`)."""
    for name in config.faust_variables(os.environ):
        print(f"streams worker: {config.FAUST_IGNORED.format(name)}", file=sys.stderr)
        del os.environ[name]


def run_replay(args: argparse.Namespace, settings: config.Settings) -> int:
    from streams.gcpolicy import tune_gc
    from streams.offline.jobs import MAX_JOBS
    from streams.offline.replay import replay

    tune_gc()
    if not 1 <= settings.replay_jobs <= MAX_JOBS or (settings.replay_jobs > 1 and args.state_dir):
        print(f"streams replay: --jobs takes 1 to {MAX_JOBS}, and more than 1 keeps the states in memory "
              "(no --state-dir)", file=sys.stderr)
        return 2
    try:
        replay(
            args.input,
            args.output,
            args.dead_letter,
            settings.enrich_settings(),
            state_dir=args.state_dir,
            progress=None if args.quiet else sys.stderr,
            cache_devices=settings.cache_devices,
            jobs=settings.replay_jobs,
            persons_path=args.persons_file,
            changes_path=args.changes_file,
        )
    except (ValueError, OSError, KeyboardInterrupt) as e:
        return failed("replay", e)
    return 0


def failed(command: str, error: BaseException, code: int = 1) -> int:
    """A command's failure as one line on stderr, no traceback; its exit code (`code` for what is not a file's
    fault, a wrong argument's or an interruption)."""
    if isinstance(error, KeyboardInterrupt):
        print(f"streams {command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(error, OSError) and error.filename:
        print(f"streams {command}: {error.strerror or error}: {error.filename}", file=sys.stderr)
        return 1
    print(f"streams {command}: {error}", file=sys.stderr)
    return 2 if isinstance(error, ValueError) else code


def run_bench(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    if not script.is_file():
        print(f"streams bench: {script} is not here: the benchmark runs from a clone of the repository",
              file=sys.stderr)
        return 1
    extra = [a for a in args.args if a != "--"]
    return subprocess.call([sys.executable, str(script), *extra])


def run_state(args: argparse.Namespace, settings: config.Settings) -> int:
    return ask_worker("state", args.url, settings, "devices", args.device_id,
                      lambda body: f"{args.device_id}: no identity state stored")


def run_person(args: argparse.Namespace, settings: config.Settings) -> int:
    return ask_worker("person", args.url, settings, "persons", args.user_id,
                      lambda body: f"{args.user_id}: {body.get('error', 'no persons mapping')}")


def ask_worker(command: str, url: str | None, settings: config.Settings, view: str, key: str,
               not_found: Callable[[dict[str, Any]], str]) -> int:
    """GET a worker's lookup `/VIEW/KEY` and print the JSON it answers: 0; 1 when it has none (`not_found`
    says so, from the answer's body), when it refuses, or when no worker answers."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    base = url or f"http://{settings.web_bind}:{settings.web_port}"
    target = f"{base.rstrip('/')}/{view}/{urllib.parse.quote(key, safe='')}"
    try:
        with urllib.request.urlopen(target, timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        answer = _json_object(e.read())
        if e.code == 404:
            print(f"streams {command}: {not_found(answer)}", file=sys.stderr)
            return 1
        detail = f": {answer['error']}" if isinstance(answer.get("error"), str) else ""
        print(f"streams {command}: {target}: HTTP {e.code} {e.reason}{detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"streams {command}: no worker answers at {base} ({getattr(e, 'reason', e)})", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0


def _json_object(data: bytes) -> dict[str, Any]:
    import json

    try:
        loaded = json.loads(data)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
