"""bench.py --profile: where the worker's CPU goes per event, by stage, with the default settings (the persons
stage and the identity change log on, at-least-once), on the bench's generated inputs: (a) 200,000 records over
20,000 devices (make bench --quick's input), (b) --records over as many device IDs, and, when --state-devices is
given, (c) that many devices logged in through the worker, which is restarted on its state, then --records
over them (make bench-scale's (b)). Report in .cache/bench/last-profile.md; the samples (collapsed stacks,
which flamegraph.pl and speedscope read) beside it.

py-spy samples the worker from its first output record until its group has committed the input: the window
make bench measures the worker over. Every sample goes to one place by its innermost frame that PLACES knows
(self), and to the stage of the batch step it runs under (total: the frame Pipeline.process called). A
sample's CPU is its thread's CPU in the window (from /proc) over the thread's samples: py-spy samples a thread
that is runnable as often as one that runs, and the threads are not equally so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import ROOT
from harness.bench_run import BENCH_DIR, PYTHON, STALL_SECONDS, Names, Run
from harness.broker import HarnessError, Kafka, clean_env, load_topic
from harness.children import CLK_TCK, Child
from harness.inputs import generate, generate_over, generate_preload, input_path
from harness.measure import append_span, measure_workers, wait_consumed, worker_child
from harness.report import code_version, fmt

RATE = 100  # samples a second
# py-spy stops the worker for each sample. With --nonblocking it reads the stacks while the worker runs: a tenth
# of them came out torn and dropped, and of the rest, up to 9 points of the shares moved from the innermost frames
# (orjson, the engine) to their callers (route, Pipeline.process). Stopping it costs the worker 10-20% of its
# events/s (1M records over 1M device IDs), not the places its CPU goes
SPY_OPTIONS = ("--rate", str(RATE), "--format", "raw", "--threads", "--full-filenames")

# Where a sample's CPU goes: the first place, in this order, that matches its innermost frame that any place
# matches (by the frame's file; a C extension's work shows in the frame that called it). The stages of the
# batch step first, then what they call, then what runs around them
PLACES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("plan", ("/streams/worker/stages/plan.py",)),
    ("route", ("/streams/worker/stages/route.py",)),
    ("devices: the engine", ("/streams/worker/stages/devices.py", "/streams/enrich.py", "/streams/identity/")),
    # every enriched record carries its user's ID, the persons stage on or off: not the stage's cost
    ("user IDs (UUIDv5)", ("/streams/persons/ids.py",)),
    ("persons stage, change log", ("/streams/worker/stages/persons.py", "/streams/worker/stages/changes.py",
                                   "/streams/persons/")),
    ("send and commit", ("/streams/worker/stages/commit.py", "/streams/worker/send.py",
                         "/streams/kafka/transactions.py")),
    ("batch step: begin, prefetch, end", ("/streams/worker/batch.py",)),
    ("codec: decode, encode (orjson)", ("/streams/codec.py",)),
    ("state: RocksDB reads, writes, cache", ("/streams/state/", "/rocksdict/")),
    ("partitioner hashes (murmur2)", ("/streams/kafka/keyhash.py", "/streams/kafka/partitioners.py",
                                      "/streams/kafka/murmur2.py")),
    ("consumer loop", ("/streams/worker/consumer.py",)),
    ("aiokafka consumer: fetch, decode, offsets", ("/aiokafka/consumer/", "/aiokafka/record/")),
    ("aiokafka producer", ("/aiokafka/producer/",)),
    ("aiokafka connections, protocol", ("/aiokafka/",)),
    ("Faust, asyncio: the event loop", ("/faust/", "/mode/", "/asyncio/", "/selectors.py")),
    ("other streams code", ("/streams/",)),
)
OTHER = "other"
NATIVE_THREADS = "RocksDB's own threads (flush, compaction)"  # no Python in them: py-spy sees none
UNSAMPLED = "Python threads without a sample"
ROWS = [*(name for name, _ in PLACES), OTHER, NATIVE_THREADS, UNSAMPLED]
BATCH_STEP = ("Pipeline.process", "/streams/worker/batch.py")
# The garbage collector runs in whatever frame allocated, where py-spy cannot tell it apart (but with --native,
# which slowed the worker by a quarter): a hook in the worker, which `site` imports from PYTHONPATH, times each
# collection and writes them out at exit
GC_HOOK = """\
import atexit, gc, time
spans = []
def timed(phase, info, clock=time.perf_counter):
    if phase == "start":
        spans.append([time.time(), clock(), info["generation"]])
    else:
        spans[-1][1] = clock() - spans[-1][1]
gc.callbacks.append(timed)
atexit.register(lambda: open(@LOG@, "w").write("".join(f"{w} {d} {g}\\n" for w, d, g in spans)))
"""
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
THREAD = re.compile(r"^thread \((?P<tid>0x[0-9a-fA-F]+|\d+)\)(?::\s*(?P<name>.*))?")


def place_of(file: str) -> str | None:
    for name, fragments in PLACES:
        if any(f in file for f in fragments):
            return name
    return None


@dataclass
class Frame:
    function: str
    file: str

    @classmethod
    def parse(cls, text: str) -> Frame:
        m = FRAME.match(text)
        return cls(m["function"], m["file"]) if m else cls(text, "")

    def short(self) -> str:
        """The file as its package names it."""
        file = self.file
        for prefix in ("/site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
            file = file.split(prefix)[-1]
        return f"{self.function} ({file})"


def waiting(frames: Sequence[Frame]) -> bool:
    """The event loop blocked in epoll: py-spy may count that as active, but it takes no CPU."""
    return bool(frames) and frames[-1].file.endswith("/selectors.py") and frames[-1].function.endswith("select")


@dataclass
class Profile:
    """One window's samples, attributed; CPU seconds by place."""

    cpu: float = 0.0  # every thread's, in the window
    self_cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    total_cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    samples: Counter[str] = field(default_factory=Counter)  # by self place
    # (innermost known frame, place) -> CPU
    hot: defaultdict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    waits: int = 0  # samples dropped: blocked in epoll
    threads: dict[int, str] = field(default_factory=dict)  # py-spy's names of the threads it sampled
    thread_cpu: list[tuple[str, float, int]] = field(default_factory=list)  # name, CPU seconds, samples

    def share(self, cpu: float) -> float:
        return cpu / self.cpu if self.cpu else 0.0


Stack = tuple[int, str, list[Frame], int]  # thread ID and name, frames from the outermost, samples


def parse(lines: Iterable[str]) -> list[Stack]:
    """py-spy's raw output (`thread (TID): NAME;outermost frame;...;innermost frame COUNT`)."""
    stacks = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        head, *frames = stack.split(";")
        m = THREAD.match(head)
        stacks.append((int(m["tid"], 0) if m else 0, (m and m["name"]) or "?", [Frame.parse(f) for f in frames],
                       int(count)))
    return stacks


def attribute(stacks: Sequence[Stack], before: dict[int, tuple[str, float]],
              after: dict[int, tuple[str, float]]) -> Profile:
    """Each sample's CPU to its self place and its stage; the threads' CPU from the snapshots around the window."""
    profile = Profile()
    per_thread: Counter[int] = Counter()
    kept = []
    for tid, name, frames, count in stacks:
        profile.threads[tid] = name
        if waiting(frames):
            profile.waits += count
            continue
        per_thread[tid] += count
        kept.append((tid, frames, count))
    cpu = {tid: seconds - before.get(tid, ("", 0.0))[1] for tid, (_, seconds) in after.items()}
    profile.cpu = sum(cpu.values())
    profile.thread_cpu = [(profile.threads.get(tid, after[tid][0]), seconds, per_thread[tid])
                          for tid, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]) if seconds > 0]
    for tid, frames, count in kept:
        weight = count * cpu.get(tid, 0.0) / per_thread[tid]
        own, known = OTHER, None
        for frame in reversed(frames):
            found = place_of(frame.file)
            if found is not None:
                own, known = found, frame
                break
        stage = own  # outside the batch step: its own place
        for i, frame in enumerate(frames):
            if frame.function == BATCH_STEP[0] and frame.file.endswith(BATCH_STEP[1]):
                stage = place_of(frames[min(i + 1, len(frames) - 1)].file) or OTHER
                break
        profile.self_cpu[own] += weight
        profile.total_cpu[stage] += weight
        profile.samples[own] += count
        profile.hot[(known.short() if known else (frames[-1].short() if frames else "?"), own)] += weight
    for tid, seconds in cpu.items():
        if tid not in per_thread and seconds > 0:
            row = NATIVE_THREADS if after[tid][0].startswith("rocksdb") else UNSAMPLED
            profile.self_cpu[row] += seconds
            profile.total_cpu[row] += seconds
    return profile


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of the process: its name and CPU seconds so far."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            threads[int(task.name)] = ((task / "comm").read_text().strip(),
                                       (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return threads


def py_spy() -> str:
    beside = Path(PYTHON).with_name("py-spy")  # the virtualenv's, whatever PATH says
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise HarnessError("py-spy is not installed: pip install -e '.[dev]' (or pip install py-spy)")
    return found


@dataclass
class Case:
    title: str
    events: int
    seconds: float  # the outputs' append span
    cpu: float  # the worker's, in that span
    rss_mib: float
    spy_cpu: float  # py-spy's own, over its whole run
    spy_log: str
    stacks: Path
    profile: Profile
    gc: tuple[float, int, int] | None  # the collector in the span: seconds, collections, full ones

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.events * 1e6


async def profile_worker(kafka: Kafka, names: Names, label: str, title: str, raw: str, records: int, *,
                         group: str | None = None, state: str | None = None, committed: int | None = None) -> Case:
    """A worker with the default settings on `raw`, sampled by py-spy from its first output until its group
    has committed `committed` records (default `records`: a fresh group)."""
    enriched, dead = names.topic(f"{label}.enriched"), names.topic(f"{label}.dead-letter")
    await kafka.create_topics([enriched, dead])
    hook, gc_log = names.run_dir / f"{label}-gc-hook", names.run_dir / f"{label}-gc.txt"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GC_HOOK.replace("@LOG@", repr(str(gc_log))))
    with environ(PYTHONPATH=str(hook)):
        worker = worker_child(kafka, names, label, raw, enriched, dead, group=group or label, state=state or label)
    started = time.monotonic()
    while await kafka.count([enriched, dead]) == 0:
        if not worker.alive() or time.monotonic() - started > STALL_SECONDS:
            raise HarnessError(f"the worker gave no output; the end of {worker.log}:\n{worker.tail()}")
        await asyncio.sleep(0.1)
    stacks = BENCH_DIR / f"last-profile-{label}.txt"
    stacks.unlink(missing_ok=True)  # a last run's, which a py-spy that failed would leave standing
    spy = Child("py-spy", [py_spy(), "record", "--pid", str(worker.pid), *SPY_OPTIONS, "--output", str(stacks)],
                clean_env(), names.run_dir / f"{label}-py-spy.log")
    before = thread_cpu(worker.pid)
    await wait_consumed(kafka, worker, names.group(group or label), raw, committed or records, [enriched, dead],
                        None)
    after = thread_cpu(worker.pid)
    spy.send(signal.SIGINT)
    await asyncio.to_thread(spy.wait)
    first, last = await append_span(kafka.brokers, [enriched, dead])
    cpu = worker.cpu_at(last) - worker.cpu_at(first)
    worker.stop()
    if not stacks.exists():
        raise HarnessError(f"py-spy wrote no samples ({spy.returncode}); {spy.log}:\n{spy.tail()}")
    summary = re.search(r"Samples: \d+ Errors: \d+", spy.text())
    profile = attribute(parse(stacks.read_text().splitlines()), before, after)
    return Case(title, records, last - first, cpu, worker.peak_rss_mib, spy.cpu_total,
                summary.group(0) if summary else "", stacks, profile, collections(gc_log, first, last))


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """The harness's environment with `values` while the block starts its children."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def collections(log: Path, first: float, last: float) -> tuple[float, int, int] | None:
    """What GC_HOOK timed between `first` and `last` (wall clock): seconds, collections, full ones. None when
    the worker did not exit cleanly enough to write it."""
    if not log.exists():
        return None
    spans = [(float(w), float(d), int(g)) for w, d, g in (line.split() for line in log.read_text().splitlines())]
    spans = [s for s in spans if first <= s[0] <= last]
    return sum(d for _, d, _ in spans), len(spans), sum(1 for *_, g in spans if g == 2)


def case_report(case: Case) -> list[str]:
    p, per_event = case.profile, case.cpu_us
    lines = [f"### {case.title}", "",
             f"The worker: **{fmt(case.events / case.seconds)} events/s, {per_event:.1f} µs of CPU per event** "
             f"over {case.seconds:.1f}s (peak RSS {case.rss_mib:,.0f} MiB); py-spy {case.spy_log} "
             f"({p.waits:,} waiting in epoll, left out), its own CPU {case.spy_cpu / case.events * 1e6:.1f} µs "
             f"per event (not the worker's). Samples: `{case.stacks.relative_to(ROOT)}`. The threads' CPU in the "
             "sampled window: " + ", ".join(f"{name} {cpu:.2f}s ({n:,} samples)" for name, cpu, n in p.thread_cpu)
             + ".", "",
             "| stage | samples | self: share | self: µs/event | total: share | total: µs/event |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        own, total = p.self_cpu.get(row, 0.0), p.total_cpu.get(row, 0.0)
        if own or total:
            lines.append(f"| {row} | {p.samples.get(row, 0):,} | {p.share(own):.1%} | {p.share(own) * per_event:.1f} "
                         f"| {p.share(total):.1%} | {p.share(total) * per_event:.1f} |")
    if case.gc is None:
        lines += ["", "The garbage collector: not measured (the worker did not exit cleanly)."]
    else:
        seconds, count, full = case.gc
        lines += ["", f"The garbage collector: {seconds / case.cpu:.1%} of the CPU ({seconds / case.events * 1e6:.1f} "
                  f"µs per event, {count:,} collections, {full:,} of them full), inside the places above that "
                  "allocated."]
    lines += ["", "Hottest places (the innermost frame a place knows, by its CPU):", ""]
    for (frame, row), cpu in sorted(p.hot.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"- {p.share(cpu):.1%} ({p.share(cpu) * per_event:.1f} µs) `{frame}`: {row}")
    return [*lines, ""]


async def profile_bench(run: Run, records: int, seed: int, state_devices: int | None) -> int:
    """(a) the --quick input, (b) `records` over as many device IDs, (c) with `state_devices`: that many devices
    in state first, then `records` over them; each profiled."""
    names, cases = run.names, []
    with run.timed("inputs", "generating the inputs (cached under .cache/bench)"):
        quick_in = await asyncio.to_thread(generate, input_path(BENCH_DIR, "main", 200_000, 20_000, seed), 200_000,
                                           20_000, seed)
        wide_in = await asyncio.to_thread(generate, input_path(BENCH_DIR, "wide", records, records, seed + 1),
                                          records, records, seed + 1)
        if state_devices:
            preload_in = await asyncio.to_thread(
                generate_preload, input_path(BENCH_DIR, "preload", state_devices, state_devices, seed + 3),
                state_devices, seed + 3)
            over_in = await asyncio.to_thread(
                generate_over, input_path(BENCH_DIR, "over", records, state_devices, seed + 3), records,
                state_devices, seed + 3)
    kafka = await run.connect()
    for label, src, count, title in (
            ("a", quick_in, 200_000, "(a) 200,000 records over 20,000 devices"),
            ("b", wide_in, records, f"(b) {records:,} records over {records:,} device IDs")):
        raw = names.topic(f"{label}.raw")
        with run.timed(f"{label}-load", f"loading {src.name}"):
            await kafka.create_topics([raw])
            await load_topic(kafka.brokers, raw, src)
        with run.timed(label, f"{title}: the worker, sampled by py-spy"):
            cases.append(await profile_worker(kafka, names, label, title, raw, count))
    if state_devices:
        raw = names.topic("c.raw")
        with run.timed("c-load", f"(c) the worker logs in {state_devices:,} devices (not sampled)"):
            await kafka.create_topics([raw])
            await load_topic(kafka.brokers, raw, preload_in)
            await measure_workers(kafka, names, "c-preload", raw, state_devices, 0, group="c", state="c",
                                  digest=False)
            await load_topic(kafka.brokers, raw, over_in)
        title = f"(c) {records:,} records over {state_devices:,} devices in state"
        with run.timed("c", f"{title}: the worker, restarted on its state, sampled by py-spy"):
            cases.append(await profile_worker(kafka, names, "c", title, raw, records, group="c", state="c",
                                              committed=state_devices + records))
    command = " ".join(["python", "scripts/bench.py", *sys.argv[1:]])
    report = [
        f"## bench.py --profile: {time.strftime('%Y-%m-%d %H:%M')}, seed {seed}, code {code_version()}", "",
        f"`{command}`: the worker with the default settings, sampled by `py-spy record --pid <worker> "
        f"{' '.join(SPY_OPTIONS)}` from its first output until its group had committed the input.", "",
        *(line for case in cases for line in case_report(case)),
        "How: self = the place of a sample's innermost frame that the table of places in "
        "scripts/harness/profile.py knows (a library's work in the frame of ours that called it, e.g. orjson "
        "in codec, rocksdict in state); total = the stage of the batch step the sample ran under (the frame "
        "Pipeline.process called), else its self place. A sample's CPU is its thread's CPU in the window "
        "(/proc) over the thread's samples; µs/event = share × the worker's CPU per event over its outputs' "
        "append span, as make bench measures it. The garbage collector's work shows in the frame that "
        "allocated.",
    ]
    if not state_devices:
        report += ["", "(c) millions of devices in state: `python scripts/bench.py --profile --state-devices "
                   "10000000` (logs them in through the worker first: 10,000,000 records more, 10-30 minutes here)."]
    return run.finish(report, "last-profile.md", [])
