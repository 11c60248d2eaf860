"""Replay on several cores: the devices split between job processes, the outputs merged back in input order.

Lives here: `owners` (which job each line of a block belongs to, without parsing ordinary lines) and
`ReplayJobs`, the processes and the order of results. The input moves in blocks of whole lines (about a MiB):
the merging process reads a block, finds each line's job from the start of the line, and tells every job
where the block is and who owns which line; the jobs read the block from the file themselves (from a pipe,
it comes to them through their queues), run the same `Enricher.step` over their own lines and their own
in-memory states, and answer with one output per line they own. A device's records all go to one job, in
input order, so the merge, which puts each line's output where the line was, gives byte for byte the output
of one process. Per record the merging process only reads the start of a line and takes one item of a list:
the jobs carry the cost.

Knows processes and queues; the files and the counts stay in `streams.offline.replay`.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import queue
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from streams.enrich import Enricher, EnrichSettings, MemoryStore, Outcome, StateStore
from streams.gcpolicy import tune_gc
from streams.offline.persons import OfflinePersons, merge

MAX_JOBS = 64
Step = Callable[[bytes, Mapping[str, Any], StateStore], Outcome]
NOBODY = 255  # the owner of a blank line: it holds no record

# `"device_id": "<no quote>"`. Inside a JSON string every quote is escaped, so in a line without a backslash
# this pattern matches only a key; a line with a backslash (an escaped key or value may spell the device ID
# differently) or where the key occurs more than once (a nested object, a repeated key) is parsed in full.
_DEVICE_ID = re.compile(rb'"device_id"\s*:\s*"([^"]*)"')
_KEY = b'"device_id"'
# how producers usually write a record: the device ID first. Such a line's key is read by slicing
_LEAD = b'{"device_id":"'


def route(raw: bytes, jobs: int) -> int:
    """The job of the line's device: a stable hash of its device ID, the same for every spelling of it."""
    m = _DEVICE_ID.search(raw) if b"\\" not in raw else None
    if m is not None and raw.count(_KEY) == 1:
        key = m.group(1)
    else:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return 0  # a dead letter: no device, no state
        device_id = record.get("device_id") if type(record) is dict else None
        if type(device_id) is not str:
            return 0
        try:
            key = device_id.encode()
        except UnicodeEncodeError:
            return 0  # a lone surrogate: refused by the engine (before any state)
    return zlib.crc32(key) % jobs


def owners(lines: list[bytes], block: bytes, jobs: int) -> bytes:
    """`route` of every line of `block` (split into `lines`), NOBODY for a blank one; one byte each.

    Most lines start with the device ID: their key is the bytes up to the next quote, provided it is the
    line's only `"device_id"` and is spelled plainly. Per line only the start is looked at; the rest is
    checked on the whole block where it can be: no `\\u` escape in it (the only way to spell the key
    `device_id` otherwise), and as many `"device_id"` in it as the lines read this way plus what the other
    lines hold (if the counts agree, no such line has a second one; if not, each line is counted). A line
    that holds no record (not JSON, say) may get any job: it touches no state."""
    lead, crc = _LEAD, zlib.crc32
    keys = [line[14:line.find(b'"', 14)] if line.startswith(lead) else None for line in lines]
    if b"\\" in block:
        if b"\\u" in block:
            keys = [None if k is None or b"\\u" in line else k for k, line in zip(keys, lines, strict=True)]
        # an escape inside the key spells it differently from the plain bytes
        keys = [None if k is None or b"\\" in k else k for k in keys]
    others = [i for i, k in enumerate(keys) if k is None]
    expected = len(lines) - len(others) + sum(lines[i].count(_KEY) for i in others)
    if block.count(_KEY) != expected:  # some line read by its start has a second one: find which
        keys = [None if k is None or line.count(_KEY) != 1 else k for k, line in zip(keys, lines, strict=True)]
        others = [i for i, k in enumerate(keys) if k is None]
    out = bytearray([crc(k) % jobs if k is not None else 0 for k in keys])
    for i in others:
        line = lines[i]
        out[i] = route(line, jobs) if line and not line.isspace() else NOBODY
    return bytes(out)


@dataclass(slots=True)
class Answer:
    """A job's work on one block: per line it owns, in order, its enriched records each followed by a
    newline (b"" for none, and for a dead letter); the dead letters with their line numbers; the counts."""

    outputs: list[bytes]
    dead: list[tuple[int, bytes]]
    records: int
    enriched: int


# what a job is sent at the end, when the persons mapping is wanted: its devices' part and their claims
PERSONS = "persons"


def _job(settings: EnrichSettings, k: int, path: str | None, inbox: Any, outbox: Any, persons: bool) -> None:
    tune_gc()
    step: Step = Enricher(settings).step
    store = MemoryStore()
    if persons:
        offline = OfflinePersons(settings)
        enrich = step

        def observed(raw: bytes, source: Mapping[str, Any], store: StateStore) -> Outcome:
            outcome = enrich(raw, source, store)
            offline.observe(outcome)
            return outcome

        step = observed
    fd = os.open(path, os.O_RDONLY) if path is not None else -1
    try:
        while (work := inbox.get()) is not None:
            if work == PERSONS:
                outbox.put(offline.export())
                continue
            first, block, owner_of = work
            if type(block) is tuple:  # (offset, length) in the input file: read here rather than piped
                offset, length = block
                block = os.pread(fd, length, offset)
            outbox.put(_enrich_block(k, first, block, owner_of, step, store))
    finally:
        if fd >= 0:
            os.close(fd)


def _enrich_block(k: int, first: int, block: bytes, owner_of: bytes, step: Step, store: StateStore) -> Answer:
    """Job `k`'s lines of a block through the step."""
    lines = block.split(b"\n")
    outputs: list[bytes] = []
    dead: list[tuple[int, bytes]] = []
    enriched = 0
    source = {"line": 0}  # one dict, refilled: a dead letter copies it
    for i in [i for i, o in enumerate(owner_of) if o == k]:
        n = source["line"] = first + i
        outcome = step(lines[i], source, store)
        if outcome.dead_letter is not None:
            dead.append((n, outcome.dead_letter))
            outputs.append(b"")
            continue
        records = outcome.records
        if len(records) == 1:
            outputs.append(records[0] + b"\n")
        elif records:
            outputs.append(b"\n".join(records) + b"\n")
        else:
            outputs.append(b"")
        enriched += len(records)
    return Answer(outputs, dead, len(outputs), enriched)


def _nothing() -> bytes:
    return b""


@dataclass(slots=True)
class Merged:
    """One block's result, in input order: the enriched output to write, the dead letters, the counts."""

    enriched_bytes: bytes
    dead_letters: list[bytes]
    records: int
    enriched: int


class ReplayJobs:
    """`jobs` processes; `run` takes blocks of whole lines (each with its first line number) and yields each
    block's merged result, in order."""

    IN_FLIGHT = 3  # blocks sent ahead of the one being merged: the jobs never wait for the merge

    def __init__(self, settings: EnrichSettings, jobs: int, path: str | None = None, persons: bool = False) -> None:
        """`path`: the input, when it is a file the jobs can read blocks of themselves. `persons`: the jobs
        run the persons stage too (`persons()` at the end)."""
        if not 1 < jobs <= MAX_JOBS:
            raise ValueError(f"replay jobs: 2 to {MAX_JOBS}, not {jobs}")
        context = multiprocessing.get_context("fork")
        self.jobs = jobs
        self.path = path
        self.max_devices = settings.person_max_devices
        self.inboxes = [context.Queue() for _ in range(jobs)]
        self.outboxes = [context.Queue() for _ in range(jobs)]
        self.processes = [context.Process(target=_job, args=(settings, k, path, i, o, persons),
                                            daemon=True)
                          for k, (i, o) in enumerate(zip(self.inboxes, self.outboxes, strict=True))]
        for p in self.processes:
            p.start()

    def run(self, blocks: Iterable[tuple[int, int, bytes]]) -> Iterator[Merged]:
        """`blocks`: (first line number, offset in the input, the block)."""
        pending: deque[bytes] = deque()  # per block sent: the owner of each of its lines
        for first, offset, block in blocks:
            pending.append(self._send(first, offset, block))
            if len(pending) > self.IN_FLIGHT:
                yield self._merge(pending.popleft())
        while pending:
            yield self._merge(pending.popleft())

    def _send(self, first: int, offset: int, block: bytes) -> bytes:
        lines = block.split(b"\n")
        owner_of = owners(lines, block, self.jobs)
        work = (first, (offset, len(block)) if self.path is not None else block, owner_of)
        for inbox in self.inboxes:
            inbox.put(work)
        return owner_of

    def _merge(self, owner_of: bytes) -> Merged:
        answers = [self._receive(k) for k in range(self.jobs)]
        nexts = [iter(a.outputs).__next__ for a in answers]
        nexts.extend([_nothing] * (NOBODY + 1 - len(nexts)))  # a blank line
        enriched_bytes = b"".join([nexts[o]() for o in owner_of])
        dead = [letter for _, letter in heapq.merge(*(a.dead for a in answers))] if any(
            a.dead for a in answers) else []
        return Merged(enriched_bytes, dead, sum(a.records for a in answers), sum(a.enriched for a in answers))

    def persons(self) -> list[bytes]:
        """The final persons mapping, once every block has been merged: the jobs' parts joined."""
        for inbox in self.inboxes:
            inbox.put(PERSONS)
        return merge((self._receive(k) for k in range(self.jobs)), self.max_devices)

    def _receive(self, k: int) -> Any:
        while True:
            try:
                return self.outboxes[k].get(timeout=5.0)
            except queue.Empty:  # is the job still there?
                if not self.processes[k].is_alive():
                    raise RuntimeError(f"replay job {k} died (exit code {self.processes[k].exitcode})") from None

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
