"""make bench's runs: the main run (the ceilings, the baseline, the worker in both modes, the peers, latency,
replay, correctness and the persons stage on one input), and the persons stage's part alone (--persons-only).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from harness.bench_loader import measure_loader, worker_sources
from harness.bench_run import BENCH_DIR, Plan, Run
from harness.broker import HarnessError, load_topic
from harness.ceilings import CEILINGS, check_peers, measure_ceilings, measure_peers, versus_lines
from harness.digest import compare, explained, file_digest
from harness.inputs import generate, input_path, write_prefix
from harness.latency import measure_latency
from harness.measure import measure_baseline, measure_worker
from harness.persons import measure_persons, persons_reference
from harness.replay import ReplayRun, replay_result, run_replay
from harness.report import ratio, table


def same_bytes(a: ReplayRun, b: ReplayRun) -> bool:
    return hashlib.sha256(a.output.read_bytes()).digest() == hashlib.sha256(b.output.read_bytes()).digest()


async def bench(run: Run, plan: Plan) -> int:
    took, names = run.took, run.names
    with run.timed("peers-build", "the peers: Kafka Streams' jar (built by Maven when missing), Quix Streams"):
        jar = await asyncio.to_thread(check_peers)
    with run.timed("inputs", "generating the inputs (cached under .cache/bench)"):
        async def cached(kind: str, records: int, devices: int, seed: int, tag: bool = False) -> Path:
            path = input_path(BENCH_DIR, kind, records, devices, seed)
            return await asyncio.to_thread(generate, path, records, devices, seed, tag=tag)

        main_in = await cached("main", plan.records, plan.devices, plan.seed)
        wide_in = await cached("wide", plan.records, plan.wide_devices, plan.seed + 1)
        latency_in = await cached("latency", plan.latency_records + 500, max(1000, plan.latency_rate),
                                  plan.seed + 2, tag=True)
        # the persons stage's input: as many device IDs as records (the same file as wide_in by default)
        persons_in = await cached("wide", plan.records, plan.records, plan.seed + 1)
        prefix_in = run.run_dir / "prefix.jsonl"
        write_prefix(main_in, prefix_in, plan.baseline_records)
        empty_in = run.run_dir / "empty.jsonl"
        empty_in.touch()

    with run.timed("replay", "replay (offline: the reference output, its speed and memory)"):
        startup = await run_replay(run.run_dir, "empty", empty_in)  # the interpreter's start, to subtract
        memory = await run_replay(run.run_dir, "memory", main_in)
        jobs = await run_replay(run.run_dir, "jobs", main_in, jobs=2)
        state_main = await run_replay(run.run_dir, "state", main_in, run.run_dir / "replay-state")
        state_wide = await run_replay(run.run_dir, "state-wide", wide_in, run.run_dir / "replay-state-wide")
        prefix = await run_replay(run.run_dir, "prefix", prefix_in)
        persons_ref = await persons_reference(names, persons_in)
        reference = await asyncio.to_thread(file_digest, memory)
        prefix_reference = await asyncio.to_thread(file_digest, prefix)
        state_same, jobs_same = same_bytes(memory, state_main), same_bytes(memory, jobs)
        for r in (jobs, state_wide, state_main):
            r.output.unlink()

    kafka = await run.connect()
    raw, prefix_raw, persons_raw = names.topic("raw"), names.topic("prefix.raw"), names.topic("persons.raw")
    with run.timed("load", "loading the raw topics"):
        await kafka.create_topics([raw, prefix_raw, persons_raw])
        loaded, load_seconds = await load_topic(kafka.brokers, raw, main_in)
        await load_topic(kafka.brokers, prefix_raw, prefix_in)
        await load_topic(kafka.brokers, persons_raw, persons_in)
        if loaded != plan.records:
            raise HarnessError(f"loaded {loaded:,} records, expected {plan.records:,}")

    with run.timed("ceilings", f"the ceilings: bare aiokafka passthroughs, {' then '.join(CEILINGS)}"):
        ceilings = await measure_ceilings(kafka, names, raw, plan.records)
    with run.timed("baseline", f"the baseline: stock Faust agent on the first {plan.baseline_records:,} records"):
        baseline, baseline_digest = await measure_baseline(kafka, names, prefix_raw, plan.baseline_records, prefix)
    with run.timed("worker", "the worker, end to end"):
        worker, worker_digest = await measure_worker(kafka, names, raw, plan.records, memory)
    peers = await measure_peers(kafka, names, raw, plan.records, jar, took)
    with run.timed("worker-eos", "the worker in exactly-once mode, end to end"):
        eos, eos_digest = await measure_worker(kafka, names, raw, plan.records, memory, "exactly_once")
    with run.timed("compare", "correctness: the worker's output against replay's"):
        verdict = await explained(compare(reference, worker_digest, "worker"), kafka.brokers,
                                  names.topic("worker.enriched"), memory.output)
        eos_verdict = await explained(compare(reference, eos_digest, "worker (exactly-once)"), kafka.brokers,
                                      names.topic("worker-eos.enriched"), memory.output)
        verdict.lines += eos_verdict.lines
        verdict.ok = verdict.ok and eos_verdict.ok
        baseline_verdict = compare(prefix_reference, baseline_digest, "baseline")
    with run.timed("latency", f"latency at {plan.latency_rate:,} records/s for {plan.latency_seconds:g}s"):
        latency = await measure_latency(kafka, names, plan, latency_in, warmup=500)
    with run.timed("loader", "the loader against a bare consume of the worker's outputs"):
        loader_lines, loader_failures = await measure_loader(names, kafka.brokers, worker_sources(names),
                                                             "the worker's outputs")
    with run.timed("persons", f"the persons stage off and on, {plan.records:,} records over as many device IDs "
                   f"({plan.persons_pairs} pairs, alternating)"):
        persons_lines, persons_failures = await measure_persons(kafka, names, persons_raw, persons_ref,
                                                                plan.persons_pairs, plan.persons_timeout,
                                                                plan.records)

    startup_cpu = startup.cpu_seconds
    results = [
        *ceilings.values(), baseline, worker, peers.kstreams, peers.quix, eos,
        replay_result("replay (state in memory)", memory, "all", "JSONL file in and out, no broker", startup_cpu),
        replay_result("replay --jobs 2", jobs, "all", "devices split between 2 processes; CPU of all, RSS of "
                      "the merging one", startup_cpu),
        replay_result(f"replay --state-dir, {plan.devices:,} devices", state_main, "all",
                      "RocksDB state behind a 100,000-device cache", startup_cpu),
        replay_result(f"replay --state-dir, {plan.wide_devices:,} devices", state_wide, "other input",
                      f"{plan.wide_devices // plan.devices}x the devices, same record count", startup_cpu),
    ]
    size = f"{plan.records:,} records over {plan.devices:,} devices, seed {plan.seed}" + (
        ", --quick" if plan.quick else "")
    dead = ", ".join(f"{r} {n:,}" for r, n in sorted(reference.reasons().items()))
    report = [
        f"## make bench: {time.strftime('%Y-%m-%d %H:%M')}, {size}",
        "",
        f"Input: {memory.records:,} raw records -> {memory.enriched:,} enriched records and "
        f"{memory.dead_letters:,} dead letters ({dead}).",
        "",
        *table(results),
        "",
        f"- **worker / baseline: {ratio(worker.rate, baseline.rate)}x the events/s**, "
        f"{ratio(baseline.cpu_us, worker.cpu_us)}x less CPU per event "
        f"(the baseline ran on the first {plan.baseline_records:,} records only: it is slow).",
        *versus_lines(worker, ceilings, peers),
        f"- worker / replay (memory): {ratio(worker.rate, memory.rate)} of the events/s.",
        f"- **exactly-once / at-least-once: {ratio(eos.rate, worker.rate)} of the events/s**, "
        f"{ratio(eos.cpu_us, worker.cpu_us)}x the CPU per event (four transactions a batch, one per partition).",
        f"- Added latency of the worker at {latency.rate:,.0f} records/s for {latency.seconds:.1f}s "
        f"(asked {plan.latency_rate:,}/s), output append time - input append time over {latency.samples:,} "
        f"records: **p50 {latency.p50:.0f} ms, p99 {latency.p99:.0f} ms**, max {latency.max:.0f} ms; the "
        f"worker used {latency.worker_cpu:.2f} CPU cores meanwhile.",
        f"- Replay RSS against devices: {state_main.peak_rss_mib:,.0f} MiB at {plan.devices:,} devices, "
        f"{state_wide.peak_rss_mib:,.0f} MiB at {plan.wide_devices:,} "
        f"({ratio(state_wide.peak_rss_mib, state_main.peak_rss_mib)}x for "
        f"{plan.wide_devices // plan.devices}x the devices); in memory {memory.peak_rss_mib:,.0f} MiB. "
        f"Replay with --state-dir gave the same bytes as in memory: {'yes' if state_same else 'NO'}; "
        f"with --jobs 2: {'yes' if jobs_same else 'NO'}.",
        f"- Load: {loaded:,} records into {raw} in {load_seconds:.1f}s ({loaded / load_seconds:,.0f}/s).",
        "",
        "Correctness: " + ("PASS. " if verdict.ok else "**FAIL**. ") + " ".join(verdict.lines),
        "Baseline check (same engine, so it must match replay of its prefix): "
        + ("same output. " if baseline_verdict.ok else "DIFFERENT: ") + " ".join(baseline_verdict.lines[:2]),
        "",
        "How: events/s of the Kafka runs = input records / (last - first output record's broker append "
        "time), topics with LogAppendTime; the window starts after the first fetched batch is done, for "
        "all alike. CPU = the process's user+sys in that window (sampled from /proc every 0.05 s). "
        "Replay: records/s from its own summary line, CPU from wait4 minus a replay of an empty file "
        f"({startup_cpu:.2f}s). Peak RSS = the process's VmHWM (its last sample, at most 0.05 s before it ended). "
        "Each run has its own "
        "topics, group and state directory, one after the other, on the same broker.",
        "",
        *persons_lines,
        "",
        *loader_lines,
    ]
    failures = [] if state_same and jobs_same else ["replay's output changed with --state-dir or --jobs"]
    if not verdict.ok:
        failures += ["the worker's output differs from replay's for the same input", *verdict.lines]
    return run.finish(report, "last.md", failures + persons_failures + loader_failures)


async def persons_only(run: Run, records: int, seed: int, pairs: int, timeout: float) -> int:
    """make bench's persons part alone: `records` over as many device IDs, the worker with the persons stage off
    then on, `pairs` times. Report in .cache/bench/last-persons.md."""
    with run.timed("inputs", "generating the input (cached under .cache/bench)"):
        src = await asyncio.to_thread(generate, input_path(BENCH_DIR, "wide", records, records, seed + 1), records,
                                      records, seed + 1)
    with run.timed("replay", "replay --persons: the reference output and mapping"):
        ref = await persons_reference(run.names, src)
    kafka = await run.connect()
    raw = run.names.topic("persons.raw")
    with run.timed("load", "loading the raw topic"):
        await kafka.create_topics([raw])
        loaded, load_seconds = await load_topic(kafka.brokers, raw, src)
        if loaded != records:
            raise HarnessError(f"loaded {loaded:,} records, expected {records:,}")
    with run.timed("persons", f"the persons stage off and on ({pairs} pair(s), alternating)"):
        lines, failures = await measure_persons(kafka, run.names, raw, ref, pairs, timeout, records)
    dead = ", ".join(f"{r} {n:,}" for r, n in sorted(ref.digest.reasons().items()))
    report = [
        f"## bench.py --persons-only: {time.strftime('%Y-%m-%d %H:%M')}, seed {seed + 1}",
        "",
        f"Input: {ref.replay.records:,} raw records -> {ref.replay.enriched:,} enriched records and "
        f"{ref.replay.dead_letters:,} dead letters ({dead}); {loaded:,} loaded in {load_seconds:.1f}s.",
        "",
        *lines,
    ]
    return run.finish(report, "last-persons.md", failures)
