"""Replay on several cores: the devices split between job processes, the outputs merged back in input order.

Lives here: `route` (which job a raw line's device belongs to, without a full parse for ordinary lines) and
`ReplayJobs`, the processes and the order of results. A device's records all go to one job, in input order,
and each job runs the same `Enricher.step` over its own in-memory states, so the output is byte for byte
that of one process: the merge writes each line's results where the line was.

Knows processes and queues; the files and the counts stay in `streams.replay`.
"""

from __future__ import annotations

import multiprocessing
import queue
import re
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from .enrich import Enricher, EnrichSettings, MemoryStore
from .gcpolicy import tune_gc

# `"device_id": "<no quote>"`. Inside a JSON string every quote is escaped, so in a line without a backslash
# this pattern matches only a key; a line with a backslash (an escaped key or value may spell the device ID
# differently) or where the key occurs more than once (a nested object, a repeated key) is parsed in full.
_DEVICE_ID = re.compile(rb'"device_id"\s*:\s*"([^"]*)"')
_KEY = b'"device_id"'

# a job's answer for one line: the enriched records' bytes joined by newlines (b"" when there are none) and
# how many they are, or a dead letter (count -1)
Result = tuple[bytes, int]


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


def _job(settings: EnrichSettings, inbox: Any, outbox: Any) -> None:
    tune_gc()
    step = Enricher(settings).step
    store = MemoryStore()
    while True:
        chunk = inbox.get()
        if chunk is None:
            return
        numbers, lines = chunk
        results: list[Result] = []
        for n, raw in zip(numbers, lines, strict=True):
            outcome = step(raw, {"line": n}, store)
            if outcome.dead_letter is not None:
                results.append((outcome.dead_letter, -1))
            else:
                results.append((b"\n".join(outcome.records), len(outcome.records)))
        outbox.put(results)


class ReplayJobs:
    """`jobs` processes; `run` takes chunks of (line number, raw line) and yields each line's result, in
    order."""

    IN_FLIGHT = 3  # chunks sent ahead of the one being merged: the jobs never wait for the merge

    def __init__(self, settings: EnrichSettings, jobs: int) -> None:
        context = multiprocessing.get_context("fork")
        self.jobs = jobs
        self.inboxes = [context.Queue() for _ in range(jobs)]
        self.outboxes = [context.Queue() for _ in range(jobs)]
        self.processes = [context.Process(target=_job, args=(settings, i, o), daemon=True)
                          for i, o in zip(self.inboxes, self.outboxes, strict=True)]
        for p in self.processes:
            p.start()

    def run(self, chunks: Iterable[list[tuple[int, bytes]]]) -> Iterator[Result]:
        pending: deque[list[int]] = deque()  # per chunk sent: the job of each of its lines
        for chunk in chunks:
            pending.append(self._send(chunk))
            if len(pending) > self.IN_FLIGHT:
                yield from self._merge(pending.popleft())
        while pending:
            yield from self._merge(pending.popleft())

    def _send(self, chunk: list[tuple[int, bytes]]) -> list[int]:
        jobs = self.jobs
        owners = [route(raw, jobs) for _, raw in chunk]
        numbers: list[list[int]] = [[] for _ in range(jobs)]
        lines: list[list[bytes]] = [[] for _ in range(jobs)]
        for owner, (n, raw) in zip(owners, chunk, strict=True):
            numbers[owner].append(n)
            lines[owner].append(raw)
        for k in range(jobs):
            self.inboxes[k].put((numbers[k], lines[k]))
        return owners

    def _merge(self, owners: list[int]) -> Iterator[Result]:
        answers = [iter(self._receive(k)) for k in range(self.jobs)]
        for owner in owners:
            yield next(answers[owner])

    def _receive(self, k: int) -> list[Result]:
        while True:
            try:
                results: list[Result] = self.outboxes[k].get(timeout=5.0)
                return results
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
