"""make bench-scale: millions of devices. (a) --records over as many device IDs; (b) --state-devices logged in
through the worker, which is restarted on its state, then --records over them; (c) two workers in one group
against one on (a)'s input; the peers beside (a); each beside its own ceiling and checked against replay.
"""

from __future__ import annotations

import asyncio
import time

from harness.bench_run import BENCH_DIR, Run
from harness.broker import load_topic
from harness.ceilings import WORKER_CONTRACT, check_peers, measure_ceiling, measure_peers, versus_lines
from harness.digest import file_digest, verdict_line
from harness.inputs import generate, generate_over, generate_preload, input_path
from harness.measure import measure_workers
from harness.replay import replay_result, run_replay
from harness.report import Result, fmt, ratio, table

SCALE_WIDE_DEVICES = 1_000_000  # (a) as many device IDs as records: most states absent or beyond any cache
SCALE_STATE_DEVICES = 10_000_000  # (b) devices in state before the measured records


async def bench_scale(run: Run, records: int, state_devices: int, seed: int) -> int:
    """(a) `records` over as many device IDs; (b) `state_devices` devices logged in first (through the
    worker, a restart, then) `records` over them; (c) two workers against one on (a)'s input."""
    names, run_dir = run.names, run.run_dir
    failures: list[str] = []
    with run.timed("peers-build", "the peers: Kafka Streams' jar (built by Maven when missing), Quix Streams"):
        jar = await asyncio.to_thread(check_peers)
    with run.timed("inputs", "generating the scale inputs (cached under .cache/bench; the first time takes "
                   "minutes)"):
        wide_in = await asyncio.to_thread(
            generate, input_path(BENCH_DIR, "wide", records, records, seed + 1), records, records, seed + 1)
        preload_in = await asyncio.to_thread(
            generate_preload, input_path(BENCH_DIR, "preload", state_devices, state_devices, seed + 3),
            state_devices, seed + 3)
        over_in = await asyncio.to_thread(
            generate_over, input_path(BENCH_DIR, "over", records, state_devices, seed + 3), records, state_devices,
            seed + 3)

    with run.timed("replay", "replay: the reference outputs"):
        wide_ref = await run_replay(run_dir, "wide", wide_in)
        wide_state = await run_replay(run_dir, "wide-state", wide_in, run_dir / "replay-wide-state")
        wide_same = wide_state.output.read_bytes() == wide_ref.output.read_bytes()
        wide_state.output.unlink()
        preload = await run_replay(run_dir, "preload", preload_in, run_dir / "replay-state-10m", discard=True)
        over_ref = await run_replay(run_dir, "over", over_in, run_dir / "replay-state-10m")
        wide_digest = await asyncio.to_thread(file_digest, wide_ref)
        over_digest = await asyncio.to_thread(file_digest, over_ref)
        if not wide_same:
            failures.append("replay --state-dir gave other bytes than replay in memory")

    kafka = await run.connect()
    wide_raw, over_raw, state_raw = names.topic("wide.raw"), names.topic("over.raw"), names.topic("state.raw")
    with run.timed("load", "loading the raw topics"):
        await kafka.create_topics([wide_raw, over_raw, state_raw])
        await load_topic(kafka.brokers, wide_raw, wide_in)
        await load_topic(kafka.brokers, over_raw, over_in)  # the ceiling of (b) reads the same records
        loaded, load_seconds = await load_topic(kafka.brokers, state_raw, preload_in)

    async def ceiling(case: str, raw: str, text: str) -> Result:
        with run.timed(f"{case}-ceiling", f"({case}) the ceiling on {text}"):
            result = await measure_ceiling(kafka, names, raw, records, f"{case}-ceiling")
            result.name = f"({case}) {result.name}"
            return result

    # (a) and (c)
    wide_out = wide_ref.enriched + wide_ref.dead_letters
    a_ceiling = await ceiling("a", wide_raw, f"{records:,} records over {records:,} devices")
    with run.timed("a-worker", "(a) the worker"):
        a_worker, digest = await measure_workers(
            kafka, names, "a-worker", wide_raw, records, wide_out, name="(a) worker, one process",
            note=f"{records:,} records over {records:,} device IDs")
        a_line = verdict_line(wide_digest, digest, "(a) worker", failures)
    a_peers = await measure_peers(kafka, names, wide_raw, records, jar, run.took, "a")
    with run.timed("c-workers", "(c) two workers in one group"):
        c_workers, digest = await measure_workers(
            kafka, names, "c-workers", wide_raw, records, wide_out, count=2,
            name="(c) two worker processes, one group", note="the same input; CPU of both, RSS of the larger")
        c_line = verdict_line(wide_digest, digest, "(c) two workers", failures)

    # (b)
    b_ceiling = await ceiling("b", over_raw, f"the {records:,} records over {state_devices:,} devices")
    with run.timed("b-preload", f"(b) the worker logs in {state_devices:,} devices"):
        # 10M records: counted, not digested (that would take minutes and gigabytes)
        b_preload, _ = await measure_workers(
            kafka, names, "b-preload", state_raw, state_devices, preload.enriched + preload.dead_letters,
            group="b-worker", state="b-worker", digest=False,
            name=f"(b) worker, loading: one login each for {state_devices:,} devices",
            note="every record a new device and a state write")
        counted = (await kafka.count([names.topic("b-preload.enriched")]),
                   await kafka.count([names.topic("b-preload.dead-letter")]))
        preload_line = (f"{counted[0]:,} enriched records and {counted[1]:,} dead letters; replay "
                        f"{preload.enriched:,} and {preload.dead_letters:,} (counted, not compared record "
                        "by record)")
        if counted != (preload.enriched, preload.dead_letters):
            failures.append(f"(b) loading: {preload_line}")
    with run.timed("b-worker", f"(b) the worker (restarted on its state) on {records:,} records"):
        await load_topic(kafka.brokers, state_raw, over_in)
        b_worker, digest = await measure_workers(
            kafka, names, "b-worker", state_raw, records, over_ref.enriched + over_ref.dead_letters,
            group="b-worker", state="b-worker", committed=state_devices + records,
            name=f"(b) worker, {state_devices:,} devices in state",
            note=f"restarted on the state the loading left; {records:,} records over those devices")
        b_line = verdict_line(over_digest, digest, "(b) worker", failures)

    empty_in = run_dir / "empty.jsonl"
    empty_in.touch()
    startup_cpu = (await run_replay(run_dir, "empty", empty_in)).cpu_seconds
    results = [
        a_ceiling, a_worker, a_peers.kstreams, a_peers.quix, c_workers, b_ceiling, b_preload, b_worker,
        replay_result(f"replay, {records:,} device IDs", wide_ref, "all", "state in memory", startup_cpu),
        replay_result(f"replay --state-dir, {records:,} device IDs", wide_state, "all", "RocksDB behind a "
                      "100,000-device cache", startup_cpu),
        replay_result(f"replay --state-dir, loading {state_devices:,} devices", preload, "all", "one login each",
                      startup_cpu),
        replay_result(f"replay --state-dir, {state_devices:,} devices in state", over_ref, "all",
                      f"{records:,} records over them", startup_cpu),
    ]
    report = [
        f"## make bench-scale: {time.strftime('%Y-%m-%d %H:%M')}, seed {seed}",
        "",
        *table(results),
        "",
        *versus_lines(a_worker, {WORKER_CONTRACT: a_ceiling}, a_peers, "(a) worker"),
        f"- (b) **worker / ceiling: {ratio(b_worker.rate, b_ceiling.rate)}** of the events/s with "
        f"{state_devices:,} devices in state ({ratio(b_worker.cpu_us, b_ceiling.cpu_us)}x its CPU per event); "
        f"**peak RSS {b_worker.peak_rss_mib:,.0f} MiB** (while loading them: {b_preload.peak_rss_mib:,.0f} MiB).",
        f"- (c) **two workers / one: {ratio(c_workers.rate, a_worker.rate)}** of the events/s "
        f"({fmt(c_workers.rate)} against {fmt(a_worker.rate)}), "
        f"{ratio(c_workers.cpu_us, a_worker.cpu_us)}x the CPU per event; two workers / ceiling "
        f"{ratio(c_workers.rate, a_ceiling.rate)}.",
        f"- Load: {loaded:,} logins into {state_raw} in {load_seconds:.1f}s ({loaded / load_seconds:,.0f}/s).",
        "",
        "Correctness:",
        f"- (a) {a_line}",
        f"- (b) {b_line}",
        f"- (c) {c_line}",
        f"- (b) loading: {preload_line}",
        f"- replay --state-dir, {records:,} device IDs, gave the bytes of replay in memory: "
        f"{'yes' if wide_same else 'NO'}.",
        "",
        "How: as `make bench` (events/s over the outputs' broker append times, CPU from /proc in that window, "
        "peak RSS = VmHWM). (b)'s worker logs every device in, is stopped (SIGTERM) and started again on "
        "the same group and state directory, then the records are appended to its raw topic; its output "
        "is compared with replay's of the same records after replay --state-dir has loaded the same "
        "logins. Each ceiling runs on its own copy of the measured records.",
    ]
    return run.finish(report, "last-scale.md", failures)
