"""make bench: how fast the worker is, measured side by side with what it is compared with, on one input.

One run, one deterministic input (seeded), and every figure next to its reference from the same run, because
the machine is small and shared: absolute numbers move from run to run, ratios much less.

1. generate a realistic raw stream (JSONL under .cache/bench/, reused when it exists);
2. load it into a fresh raw topic, keyed by device_id;
3. measure, each on fresh output topics, consumer group and state directory, one after the other:
   - the ceilings: a bare aiokafka consume-and-produce passthrough (no logic at all), twice, each named by
     its delivery contract: fire-and-forget (acks=1, offsets committed without waiting for acks) and
     at-least-once (acks=all, offsets committed only after the outputs are acknowledged: the worker's);
   - the baseline: a stock Faust agent around the same engine (scripts/bench_baseline.py), on a prefix;
   - the worker end to end (`python -m streams worker`), its CPU per event and peak RSS;
   - the peers, the same shape of work at their default settings (bench/peers/): a Kafka Streams app (its jar
     built by Maven on first use into .cache/bench-peers/) and a Quix Streams app, each a RocksDB store
     with a changelog keyed by device, one output per input carrying the device's running identity;
   - the worker's added latency at a fixed lower input rate;
   - `python -m streams replay` offline, and its RSS with `--state-dir` at 1x and 10x the devices;
   - correctness: the worker's output must equal replay's for the same input (fields the schema marks
     "worker output only" set aside and checked on their own), else FAIL and exit 1;
   - the persons stage: --records over as many device IDs (their own raw topic), the worker with
     STREAMS_PERSONS=off then on, alternating, twice; the on/off ratio of events/s, and each run's output
     against replay's, the persons topic's final mapping against `replay --persons`'s (polled until it
     settles), how long it took to settle after the enriched output, and how many device users it maps;
4. print a markdown table and write it to .cache/bench/last.md.

Throughput of a consumer = input records / (last - first output record's broker append time): the output
topics are created with message.timestamp.type=LogAppendTime, so the broker's clock stamps them.

    .venv/bin/python scripts/bench.py [--records N] [--devices D] [--quick] [--keep]

`--persons-only` runs only the persons stage's part (report in .cache/bench/last-persons.md):

    .venv/bin/python scripts/bench.py --persons-only [--records N] [--persons-pairs N] [--persons-timeout S]

`--loader-only` runs only the loader's part: `python -m streams load` beside a bare consume of the same topics,
here replay's outputs of the main input (report in .cache/bench/last-loader.md):

    .venv/bin/python scripts/bench.py --loader-only [--records N] [--devices D]

`--scale` (make bench-scale) runs the scale runs instead, each beside its own ceiling and checked against
replay: (a) --records (default 1,000,000) over as many device IDs; (b) --state-devices (default 10,000,000)
logged in through the worker, which is restarted on its state, then --records over them; (c) two workers in
one group against one on (a)'s input; the peers beside (a). Report in .cache/bench/last-scale.md.

    .venv/bin/python scripts/bench.py --scale [--records N] [--state-devices N] [--brokers HOST:PORT] [--keep]

`--profile` samples the worker with py-spy, default settings, and says where its CPU goes per event, by stage:
(a) 200,000 records over 20,000 devices, (b) --records (default 1,000,000) over as many device IDs, (c) with
--state-devices, that many devices in state first (report in .cache/bench/last-profile.md):

    .venv/bin/python scripts/bench.py --profile [--records N] [--state-devices N]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable

from harness.bench_loader import bare_consume_main, loader_only
from harness.bench_main import bench, persons_only
from harness.bench_run import TROUBLE, Plan, run_mode
from harness.bench_scale import SCALE_STATE_DEVICES, SCALE_WIDE_DEVICES, bench_scale
from harness.broker import BROKERS
from harness.ceilings import CEILINGS, WORKER_CONTRACT, passthrough
from harness.persons import PERSONS_PAIRS, PERSONS_TIMEOUT
from harness.profile import profile_bench


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, help="raw records (default 1,000,000; --quick 200,000)")
    parser.add_argument("--devices", type=int, help="devices (default 100,000; --quick 20,000)")
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--brokers", default=BROKERS)
    parser.add_argument("--baseline-records", type=int,
                        help="records the stock Faust baseline runs on (default 50,000; --quick 20,000)")
    parser.add_argument("--latency-rate", type=int, default=5000, help="records/s of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep this run's directory under .cache/bench")
    parser.add_argument("--scale", action="store_true",
                        help="the scale runs instead (make bench-scale): --records over as many device IDs, then "
                        "--state-devices logged in first and --records over them, and two workers against one")
    parser.add_argument("--persons-only", action="store_true",
                        help="only the persons stage's part of make bench: --records (default 1,000,000) over as "
                        "many device IDs, the worker with STREAMS_PERSONS=off then on, --persons-pairs times "
                        "(.cache/bench/last-persons.md)")
    parser.add_argument("--persons-pairs", type=int, default=PERSONS_PAIRS,
                        help=f"off/on pairs of the persons stage's runs (default {PERSONS_PAIRS})")
    parser.add_argument("--persons-timeout", type=float, default=PERSONS_TIMEOUT,
                        help=f"seconds the persons topic has to settle after the enriched output (default "
                        f"{PERSONS_TIMEOUT:.0f})")
    parser.add_argument("--state-devices", type=int,
                        help=f"devices in state for --scale (default {SCALE_STATE_DEVICES:,}); with --profile, its "
                        "case (c) (none by default)")
    parser.add_argument("--profile", action="store_true",
                        help="where the worker's CPU goes per event, by stage, sampled by py-spy with the default "
                        "settings (.cache/bench/last-profile.md)")
    parser.add_argument("--loader-only", action="store_true",
                        help="only the loader's part of make bench: python -m streams load beside a bare consume "
                        "of the same topics, replay's outputs of the main input (.cache/bench/last-loader.md)")
    parser.add_argument("--bare-consume", nargs=2, metavar=("BROKERS", "TOPICS"),
                        help=argparse.SUPPRESS)  # the loader part's bare consume, a child process
    parser.add_argument("--passthrough", nargs=4, metavar=("BROKERS", "GROUP", "SOURCE", "TARGET"),
                        help=argparse.SUPPRESS)  # a ceiling's child process
    parser.add_argument("--passthrough-contract", choices=CEILINGS, default=WORKER_CONTRACT,
                        help=argparse.SUPPRESS)  # what that passthrough waits for
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.passthrough:
        brokers, group, source, target = args.passthrough
        asyncio.run(passthrough(brokers, group, source, target, args.passthrough_contract))
        return 0
    if args.bare_consume:
        return bare_consume_main(*args.bare_consume)
    TROUBLE.install()
    if args.scale:  # on the broker given: none is started for it
        records = args.records or SCALE_WIDE_DEVICES
        return asyncio.run(with_signals(run_mode(args.brokers, args.keep, lambda run: bench_scale(
            run, records, args.state_devices or SCALE_STATE_DEVICES, args.seed), start_broker=False)))
    if args.profile:
        return asyncio.run(with_signals(run_mode(args.brokers, args.keep, lambda run: profile_bench(
            run, args.records or SCALE_WIDE_DEVICES, args.seed, args.state_devices))))
    records = args.records or (200_000 if args.quick else 1_000_000)
    if args.persons_only:
        return asyncio.run(with_signals(run_mode(args.brokers, args.keep, lambda run: persons_only(
            run, records, args.seed, args.persons_pairs, args.persons_timeout))))
    devices = args.devices or (20_000 if args.quick else 100_000)
    if args.loader_only:
        return asyncio.run(with_signals(run_mode(args.brokers, args.keep, lambda run: loader_only(
            run, records, devices, args.seed))))
    plan = Plan(records=records, devices=devices,
                baseline_records=min(records, args.baseline_records or (20_000 if args.quick else 50_000)),
                wide_devices=devices * 10, latency_rate=args.latency_rate, latency_seconds=args.latency_seconds,
                seed=args.seed, quick=args.quick, persons_pairs=args.persons_pairs,
                persons_timeout=args.persons_timeout)
    return asyncio.run(with_signals(run_mode(args.brokers, args.keep, lambda run: bench(run, plan))))


async def with_signals(run: Awaitable[int]) -> int:
    """SIGTERM cancels the run like Ctrl-C does, so the teardown stops the children and deletes the topics."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run


if __name__ == "__main__":
    sys.exit(main())
