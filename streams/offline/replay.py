"""Offline replay: the product without a broker. JSONL raw records in, enriched JSONL and dead letters out.

Lives here: the file shell around `Enricher.step`: reading lines in order, writing outputs in order, the
state (in memory, or in RocksDB with `--state-dir` so that a later run continues where this one stopped),
and the progress report. Same step as the worker, so the same input gives the same bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from streams.enrich import Enricher, EnrichSettings, MemoryStore, StateStore
from streams.offline.jobs import ReplayJobs
from streams.offline.persons import OfflinePersons
from streams.progress import ProgressLine
from streams.state.store import CachedStore, RocksBackend

# lines between writes of the RocksDB state (its write-back cache holds the changed states until then)
FLUSH_EVERY = 50_000
# lines whose devices' states are read from RocksDB together, in one multi-get, before they run
PREFETCH_LINES = 1024

# how producers usually write a record: the device ID first (its key then read by slicing); else the first
# `"device_id": "..."` in the line. Either may be wrong (an escaped or nested key): it only warms the cache
_LEAD = b'{"device_id":"'
_DEVICE_ID = re.compile(rb'"device_id"\s*:\s*"([^"]*)"')


@dataclass
class Counts:
    """What a replay has read and written so far, for its progress line and its summary."""

    lines: int
    records: int
    enriched: int
    dead_letters: int

    @classmethod
    def none(cls) -> Counts:
        return cls(lines=0, records=0, enriched=0, dead_letters=0)


class Progress:
    """Replay's progress line: records, dead letters and rate, and with a file's size the share read."""

    def __init__(self, stream: TextIO, total_bytes: int | None, interval: float | None = None) -> None:
        self.line = ProgressLine("replay", stream, interval)
        self.total = total_bytes

    def update(self, counts: Counts, position: int) -> None:
        elapsed = self.line.due()
        if elapsed is None:
            return
        rate = ProgressLine.rate(counts.records, elapsed)
        text = f"{counts.records:,} records, {counts.dead_letters:,} dead letters, {rate:,.0f}/s"
        self.line.show(text, elapsed, position / self.total if self.total and position else None)

    def finish(self, counts: Counts) -> None:
        elapsed = self.line.elapsed()
        self.line.finish(f"{counts.records:,} records in, {counts.enriched:,} enriched out, "
                         f"{counts.dead_letters:,} dead letters, {elapsed:.1f}s "
                         f"({ProgressLine.rate(counts.records, elapsed):,.0f} records/s)")


@contextlib.contextmanager
def _open_out(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
    else:
        with open(path, "wb", buffering=1 << 20) as f:
            yield f


@contextlib.contextmanager
def _open_in(path: str) -> Iterator[tuple[BinaryIO, int | None]]:
    if path == "-":
        yield sys.stdin.buffer, None
    else:
        with open(path, "rb", buffering=1 << 20) as f:
            size = os.fstat(f.fileno()).st_size
            yield f, size or None


def replay(
    input_path: str,
    output_path: str,
    dead_letter_path: str,
    settings: EnrichSettings,
    state_dir: str | None = None,
    progress: TextIO | None = None,
    cache_devices: int = 100_000,
    progress_interval: float | None = None,
    jobs: int = 1,
    persons_path: str | None = None,
    changes_path: str | None = None,
) -> Counts:
    """`persons_path`: where the final persons mapping goes (persons.md §4); `changes_path`: where the identity
    change log goes (schemas/identity-change.schema.json), in the order replay decides the changes. With
    `state_dir` the persons stage runs whenever it is on (`settings.persons`), so that the claims, and the log's
    last mapping and version per user, persist for a later run that asks."""
    if persons_path is not None and not settings.persons:
        raise ValueError("--persons needs the persons stage on (STREAMS_PERSONS=on)")
    if changes_path is not None and not settings.persons:
        raise ValueError("--identity-changes needs the persons stage on (STREAMS_PERSONS=on)")
    if jobs > 1:
        if state_dir:
            raise ValueError("several jobs keep their device states in memory: --jobs takes no --state-dir")
        if changes_path is not None:
            # a change depends on the owners of pairs, which any device may claim: one job alone cannot see them
            raise ValueError("--identity-changes runs in one process: --jobs takes no --identity-changes")
        return _replay_in_jobs(input_path, output_path, dead_letter_path, settings, jobs, progress,
                               progress_interval, persons_path)
    enricher = Enricher(settings)
    backend = RocksBackend(state_dir) if state_dir else None
    store: StateStore = CachedStore(backend, cache_devices) if backend else MemoryStore()
    persons = None
    if persons_path is not None or changes_path is not None or (backend is not None and settings.persons):
        persons = OfflinePersons(settings, backend.db if backend is not None else None,
                                 changes=changes_path is not None or backend is not None)
    counts = Counts.none()
    try:
        with _open_in(input_path) as (src, size), _open_out(output_path) as out, \
                _open_out(dead_letter_path) as dead, _open_out(changes_path or os.devnull) as changes:
            report = Progress(progress, size, progress_interval) if progress is not None else None
            step = enricher.step
            # enriched records not yet written: written together every 64 lines (one write, not two a record)
            pending: list[bytes] = []
            records = enriched = dead_letters = n = 0

            def catch_up() -> None:
                if pending:
                    pending.append(b"")
                    out.write(b"\n".join(pending))
                    pending.clear()
                if persons is not None and persons.change_rows:
                    rows = persons.take_changes()
                    if changes_path is not None:
                        changes.write(b"".join(row + b"\n" for row in rows))
                counts.lines, counts.records, counts.enriched, counts.dead_letters = n, records, enriched, dead_letters

            source = {"line": 0}  # one dict, refilled: a dead letter copies it
            lines = _prefetching(src, store) if isinstance(store, CachedStore) else src
            for n, line in enumerate(lines, 1):
                raw = line[:-1] if line.endswith(b"\n") else line
                if not raw or raw.isspace():
                    continue  # a blank line holds no record
                records += 1
                source["line"] = n
                outcome = step(raw, source, store)
                if outcome.dead_letter is not None:
                    dead_letters += 1
                    dead.write(outcome.dead_letter + b"\n")
                else:
                    produced = outcome.records
                    enriched += len(produced)
                    pending += produced
                    if persons is not None:
                        persons.observe(outcome, n)
                if n & 63 == 0 and pending:  # ~12 KiB: below the size where a joined buffer costs an mmap
                    pending.append(b"")
                    out.write(b"\n".join(pending))
                    pending.clear()
                if n % 1024 == 0:
                    catch_up()
                    if report is not None:
                        report.update(counts, src.tell() if size else 0)
                if n % FLUSH_EVERY == 0 and isinstance(store, CachedStore):
                    # the outputs on disk before the states that follow from them
                    catch_up()
                    out.flush()
                    dead.flush()
                    changes.flush()
                    store.flush()
                    _flush_persons(persons, backend)
            catch_up()
            if isinstance(store, CachedStore):
                out.flush()
                dead.flush()
                changes.flush()
                store.flush()
                _flush_persons(persons, backend)
            if persons is not None and persons_path is not None:
                _write_lines(persons_path, persons.final())
            if report is not None:
                report.finish(counts)
    finally:
        if backend is not None:
            backend.close()
    return counts


def _flush_persons(persons: OfflinePersons | None, backend: RocksBackend | None) -> None:
    if persons is not None and backend is not None:
        backend.write_raw(persons.flush())


def _write_lines(path: str, lines: list[bytes]) -> None:
    with _open_out(path) as f:
        for line in lines:
            f.write(line + b"\n")


def _prefetching(src: Iterable[bytes], store: CachedStore) -> Iterator[bytes]:
    """The lines of `src`; before each PREFETCH_LINES of them run, their devices' states are read at once.
    At a million devices most are beyond the cache, and a RocksDB read per record cost more than the record."""
    lines = iter(src)
    while True:
        block = list(itertools.islice(lines, PREFETCH_LINES))
        if not block:
            return
        store.prefetch(_device_ids(block))
        yield from block


def _device_ids(lines: list[bytes]) -> list[str]:
    lead, pattern = _LEAD, _DEVICE_ID
    keys = [line[14:line.find(b'"', 14)] if line.startswith(lead) else None for line in lines]
    ids = []
    for key, line in zip(keys, lines, strict=True):
        if key is None:
            m = pattern.search(line)
            if m is None:
                continue
            key = m.group(1)
        ids.append(key.decode(errors="replace"))
    return ids


BLOCK_BYTES = 1 << 20


def blocks(src: BinaryIO, counts: Counts, size: int = BLOCK_BYTES) -> Iterator[tuple[int, int, bytes]]:
    """The input as blocks of whole lines, each with the number of its first line and its offset
    (`counts.lines`: the lines read so far). A block ends with its last line's newline, if it has one."""
    first, offset = 1, 0
    while True:
        block = src.read(size)
        if not block:
            return
        if not block.endswith(b"\n"):
            block += src.readline()  # the rest of its last line
        lines = block.count(b"\n") + (not block.endswith(b"\n"))
        counts.lines = first + lines - 1
        yield first, offset, block
        first, offset = first + lines, offset + len(block)


def _replay_in_jobs(input_path: str, output_path: str, dead_letter_path: str, settings: EnrichSettings, jobs: int,
                    progress: TextIO | None, progress_interval: float | None,
                    persons_path: str | None = None) -> Counts:
    """The same replay with the devices split between `jobs` processes (`streams.offline.jobs`)."""
    counts = Counts.none()
    # a file the jobs read themselves (piping every block to every job costs more than the reading)
    runner = ReplayJobs(settings, jobs, input_path if input_path != "-" and os.path.isfile(input_path) else None,
                        persons=persons_path is not None)
    try:
        with _open_in(input_path) as (src, size), _open_out(output_path) as out, \
                _open_out(dead_letter_path) as dead:
            report = Progress(progress, size, progress_interval) if progress is not None else None
            for merged in runner.run(blocks(src, counts, BLOCK_BYTES)):
                out.write(merged.enriched_bytes)
                for letter in merged.dead_letters:
                    dead.write(letter + b"\n")
                counts.records += merged.records
                counts.enriched += merged.enriched
                counts.dead_letters += len(merged.dead_letters)
                if report is not None:
                    report.update(counts, src.tell() if size else 0)
            if persons_path is not None:
                _write_lines(persons_path, runner.persons())
            if report is not None:
                report.finish(counts)
    finally:
        runner.close()
    return counts
