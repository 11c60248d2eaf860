"""`python -m streams replay`, as a user runs it: files, stdin/stdout, state in RocksDB, exit codes."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from streams.enrich import EnrichSettings
from streams.offline.replay import replay as run_replay
from tests.integration import kit

from .conftest import ROOT, validate

SAMPLE = ROOT / "streams" / "samples" / "seed.jsonl"


def replay(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "streams", "replay", *map(str, args)],
                          input=stdin, capture_output=True, timeout=120, cwd=ROOT)


def lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line]


def test_sample_goes_in_raw_and_comes_out_enriched(tmp_path: Path) -> None:
    run = replay("--input", SAMPLE, "--output", tmp_path / "out.jsonl", "--dead-letter", tmp_path / "dead.jsonl")
    assert run.returncode == 0, run.stderr
    out, dead = lines(tmp_path / "out.jsonl"), lines(tmp_path / "dead.jsonl")
    for record in out:
        validate("enriched", record)
    for letter in dead:
        validate("dead-letter", letter)
    raw_lines = [line for line in SAMPLE.read_bytes().splitlines() if line.strip()]
    assert len(dead) == 7
    kept = [orjson.loads(d)["raw"].encode() for d in dead]
    assert kept == raw_lines[-7:]  # the bad records, byte for byte
    assert [orjson.loads(d)["source"]["line"] for d in dead] == list(range(len(raw_lines) - 6, len(raw_lines) + 1))
    events = [orjson.loads(r).get("event") for r in out]
    assert events.count("$SignUp") == 5  # four logins and one AUTHENTICATED userid
    assert b"41 records in, 23 enriched out, 7 dead letters" in run.stderr


def test_stdin_to_stdout_is_the_same_as_files(tmp_path: Path) -> None:
    files = replay("--input", SAMPLE, "--output", tmp_path / "a.jsonl", "--dead-letter", tmp_path / "d1", "--quiet")
    piped = replay("--input", "-", "--output", "-", "--dead-letter", tmp_path / "d2", "--quiet",
                   stdin=SAMPLE.read_bytes())
    assert files.returncode == piped.returncode == 0
    assert piped.stdout == (tmp_path / "a.jsonl").read_bytes()
    assert piped.stderr == b""


def test_same_input_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert replay("--input", SAMPLE, "--output", tmp_path / name, "--dead-letter", tmp_path / f"{name}.d",
                      "--quiet").returncode == 0
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert (tmp_path / "a.d").read_bytes() == (tmp_path / "b.d").read_bytes()


@pytest.mark.parametrize("cut", [5, 13, 20, 33])
def test_a_backfill_in_pieces_equals_one_run(tmp_path: Path, cut: int) -> None:
    raw = SAMPLE.read_bytes().splitlines(keepends=True)
    (tmp_path / "1.jsonl").write_bytes(b"".join(raw[:cut]))
    (tmp_path / "2.jsonl").write_bytes(b"".join(raw[cut:]))
    state = tmp_path / "state"
    for piece in ("1", "2"):
        run = replay("--input", tmp_path / f"{piece}.jsonl", "--output", tmp_path / f"{piece}.out",
                     "--dead-letter", tmp_path / f"{piece}.dead", "--state-dir", state, "--quiet")
        assert run.returncode == 0, run.stderr
    whole = replay("--input", SAMPLE, "--output", tmp_path / "whole.out", "--dead-letter", tmp_path / "w.dead",
                   "--quiet")
    assert whole.returncode == 0
    assert (tmp_path / "1.out").read_bytes() + (tmp_path / "2.out").read_bytes() == \
        (tmp_path / "whole.out").read_bytes()


def test_default_platform_and_login_type_flags(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"device_id": "d", "action": "set_customer_ids", "customer_ids": {"crm": {"id": "c1", '
                    b'"authState": 1}}}\n{"device_id": "d", "event": "e"}\n')
    run = replay("--input", src, "--output", "-", "--dead-letter", tmp_path / "dead", "--quiet",
                 "--default-platform", "mp-feishu", "--login-customer-id-type", "crm")
    assert run.returncode == 0, run.stderr
    signup, track = (orjson.loads(line) for line in run.stdout.splitlines())
    assert signup["event"] == "$SignUp"
    assert track["platform"] == "mp-feishu"
    assert track["login_id"] == "c1"
    assert track["identities"]["$identity_feishu_mp_id"] == "d"


def test_settings_come_from_the_environment_too(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"device_id": "d", "event": "e"}\n')
    run = subprocess.run([sys.executable, "-m", "streams", "replay", "--input", str(src), "--output", "-",
                          "--dead-letter", str(tmp_path / "dead"), "--quiet"], capture_output=True, cwd=ROOT,
                         env={"STREAMS_DEFAULT_PLATFORM": "mp-taobao", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert run.returncode == 0, run.stderr
    assert orjson.loads(run.stdout)["identities"] == {"$identity_taobao_uuid": "d", "$identity_anonymous_id": "d"}


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    run = replay("--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o", "--dead-letter", tmp_path / "d")
    assert run.returncode == 1
    assert b"No such file or directory" in run.stderr
    assert b"Traceback" not in run.stderr


def test_usage_errors_exit_2() -> None:
    run = replay("--input", SAMPLE)
    assert run.returncode == 2
    assert b"--output" in run.stderr
    bad = replay("--input", SAMPLE, "--output", "-", "--dead-letter", "/dev/null", "--default-platform", "ios")
    assert bad.returncode == 2
    assert b"invalid choice" in bad.stderr


def test_progress_lines_for_long_inputs(tmp_path: Path) -> None:
    src = tmp_path / "long.jsonl"
    record = b'{"device_id": "d%d", "platform": "web", "event": "e"}\n'
    src.write_bytes(b"".join(record % (i % 1000) for i in range(15_000)))
    report = io.StringIO()
    counts = run_replay(str(src), os.devnull, os.devnull, EnrichSettings(), progress=report, progress_interval=0)
    assert counts.records == counts.enriched == 15_000
    progress = report.getvalue().splitlines()
    assert len(progress) > 10
    assert "ETA" in progress[0]
    assert "records/s" in progress[-1]


# -- several jobs ------------------------------------------------------------------------------------------


def spellings(record: dict[str, object]) -> list[bytes]:
    """The same device's record written the ways JSON allows: spaced, escaped, with a nested device_id, and
    with the key twice (the last one counts)."""
    device_id = str(record["device_id"])
    plain = orjson.dumps(record)
    key = b'"device_id":"' + device_id.encode() + b'"'
    escaped = f"\\u{ord(device_id[0]):04x}" + device_id[1:]
    return [
        plain.replace(key, b'"device_id" :\t "' + device_id.encode() + b'"'),
        plain.replace(key, b'"device_id":"' + escaped.encode() + b'"'),
        orjson.dumps({**record, "properties": {"device_id": "someone-else"}}),
        b'{"device_id":"someone-else",' + plain[1:],
        # a plain key first, and the key again, escaped, last (the one that counts)
        b'{"device_id":"someone-else",' + plain[1:].replace(b'"device_id"', b'"device\\u005fid"'),
        # the real key escaped, a nested one plain
        orjson.dumps({**record, "properties": {"device_id": "someone-else"}}).replace(
            b'"device_id":"' + device_id.encode(), b'"device\\u005fid":"' + device_id.encode()),
    ]


def test_route_sends_every_spelling_of_a_device_to_one_job() -> None:
    from streams.offline.jobs import route

    record = {"device_id": "été-42", "platform": "web", "event": "x"}
    for jobs in (2, 3, 7):
        assert len({route(line, jobs) for line in [orjson.dumps(record), *spellings(record)]}) == 1


def mixed_input() -> list[bytes]:
    """Generated records, with every spelling of some of their devices and bad and blank lines among them."""
    generated = kit.generate(4000, 120, prefix="jobs", seed=5)
    mixed: list[bytes] = []
    for i, line in enumerate(generated):
        mixed.append(line)
        if i % 50 == 0:  # the device's next records see what these did: a wrong job would show
            mixed += spellings(orjson.loads(line))
        if i % 400 == 0:
            mixed += [b"", b" \r", b"not json", b"[1]", b'{"device_id": 7}', b'{"device_id": "\\ud800"}',
                      b"\xff\xfe", b'{"device_id":"unclosed', b'{"device_id":"x\\"y","platform":"web","event":"e"}']
    return mixed


@pytest.mark.parametrize("jobs", [2, 3, 7])
def test_owners_of_a_block_are_the_route_of_each_line(jobs: int) -> None:
    """`owners` reads most lines by their start and checks the rest on the whole block: for every line that
    holds a device's record it must agree with `route`, whatever else the block holds. A line that holds
    none (not JSON, no device ID) touches no state: any job will do."""
    from streams.offline.jobs import NOBODY, owners, route

    def has_device(line: bytes) -> bool:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        return type(record) is dict and type(record.get("device_id")) is str

    mixed = mixed_input()
    checked = 0
    for start in range(0, len(mixed), 97):  # blocks of many sizes and mixes
        for size in (1, 5, 60, 400):
            block_lines = mixed[start:start + size]
            got = owners(block_lines, b"\n".join(block_lines), jobs)
            assert len(got) == len(block_lines)
            for line, owner in zip(block_lines, got, strict=True):
                if not line.strip():
                    assert owner == NOBODY
                elif has_device(line):
                    assert owner == route(line, jobs), line
                    checked += 1
                else:
                    assert owner < jobs, line
    assert checked > 10_000


@pytest.mark.parametrize("text", [b"", b"a\n", b"a", b"a\n\nbb\nccc", b"a\nbb\n\n", b"x" * 50 + b"\ny\n" + b"z" * 70])
def test_blocks_cover_the_input_with_its_line_numbers(text: bytes) -> None:
    from streams.offline.replay import Counts, blocks

    for size in (1, 2, 7, 1 << 20):
        counts = Counts.none()
        got = list(blocks(io.BytesIO(text), counts, size))
        assert b"".join(block for _, _, block in got) == text
        numbered = [(first + i, line) for first, _, block in got
                    for i, line in enumerate(block.removesuffix(b"\n").split(b"\n"))]
        assert numbered == list(enumerate(text.splitlines(), 1))
        ends = list(itertools.accumulate(len(block) for _, _, block in got))
        assert [offset for _, offset, _ in got] == [0, *ends][:len(got)]
        assert counts.lines == len(text.splitlines())


def test_jobs_give_the_bytes_of_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.offline import replay as replay_module

    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(mixed_input()) + b"\n")
    outputs = {}
    for jobs in (1, 3):
        out, dead = tmp_path / f"out{jobs}.jsonl", tmp_path / f"dead{jobs}.jsonl"
        counts = run_replay(str(source), str(out), str(dead), EnrichSettings(), jobs=jobs)
        outputs[jobs] = (out.read_bytes(), dead.read_bytes(), counts)
    assert outputs[1][2].enriched > 3000 and outputs[1][2].dead_letters > 50
    assert outputs[3] == outputs[1]
    # many blocks, each a few lines: a device's records meet in one job across blocks too
    monkeypatch.setattr(replay_module, "BLOCK_BYTES", 2000)
    out, dead = tmp_path / "out-small.jsonl", tmp_path / "dead-small.jsonl"
    counts = run_replay(str(source), str(out), str(dead), EnrichSettings(), jobs=2)
    assert (out.read_bytes(), dead.read_bytes(), counts) == outputs[1]


def test_jobs_read_stdin_and_write_stdout(tmp_path: Path) -> None:
    """Input from a pipe cannot be read again by the jobs: its blocks go to them through their queues."""
    data = b"\n".join(mixed_input()) + b"\n"
    one = replay("--input", "-", "--output", "-", "--dead-letter", tmp_path / "d1", stdin=data)
    two = replay("--input", "-", "--output", "-", "--dead-letter", tmp_path / "d2", "--jobs", "2", stdin=data)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and len(one.stdout.splitlines()) > 3000
    assert (tmp_path / "d2").read_bytes() == (tmp_path / "d1").read_bytes()


def test_jobs_refuse_a_state_dir(tmp_path: Path) -> None:
    run = replay("--input", SAMPLE, "--output", tmp_path / "o", "--dead-letter", tmp_path / "d", "--jobs", "2",
                 "--state-dir", tmp_path / "state")
    assert run.returncode == 2 and b"--state-dir" in run.stderr


def test_state_is_written_as_the_replay_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --state-dir the changed states are written every FLUSH_EVERY lines, not kept to the end (memory
    would grow with the devices)."""
    from streams.offline import replay as replay_module
    from streams.state.store import CachedStore

    flushes: list[int] = []
    flush = CachedStore.flush

    def counted(self: CachedStore) -> None:
        flushes.append(1)
        flush(self)

    monkeypatch.setattr(replay_module, "FLUSH_EVERY", 1000)
    monkeypatch.setattr(CachedStore, "flush", counted)
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(kit.generate(4500, 300, prefix="flush", seed=2)) + b"\n")
    run_replay(str(source), str(tmp_path / "out"), str(tmp_path / "dead"), EnrichSettings(),
               state_dir=str(tmp_path / "state"))
    assert len(flushes) >= 5  # at 1,000, 2,000, 3,000, 4,000 and the end


@pytest.mark.parametrize("cache", [1, 7, 100_000])
def test_state_dir_with_devices_beyond_the_cache_gives_the_bytes_of_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: int) -> None:
    """States read ahead in one multi-get per block of lines (some IDs spelled so that the read-ahead misses
    or misreads them), written every few hundred lines, and evicted from a cache far smaller than the devices:
    the bytes of an in-memory replay, in one run and in two runs over one state directory."""
    from streams.offline import replay as replay_module

    monkeypatch.setattr(replay_module, "FLUSH_EVERY", 300)
    monkeypatch.setattr(replay_module, "PREFETCH_LINES", 64)
    mixed = mixed_input()
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(mixed) + b"\n")
    memory = tmp_path / "memory.jsonl", tmp_path / "memory.dead"
    run_replay(str(source), str(memory[0]), str(memory[1]), EnrichSettings())
    one = tmp_path / "one.jsonl", tmp_path / "one.dead"
    run_replay(str(source), str(one[0]), str(one[1]), EnrichSettings(), state_dir=str(tmp_path / "s1"),
               cache_devices=cache)
    assert one[0].read_bytes() == memory[0].read_bytes() and one[1].read_bytes() == memory[1].read_bytes()
    half = len(mixed) // 2
    pieces = []
    for i, part in enumerate((mixed[:half], mixed[half:])):
        src, out, dead = tmp_path / f"p{i}.jsonl", tmp_path / f"p{i}.out", tmp_path / f"p{i}.dead"
        src.write_bytes(b"\n".join(part) + b"\n")
        run_replay(str(src), str(out), str(dead), EnrichSettings(), state_dir=str(tmp_path / "s2"),
                   cache_devices=cache)
        pieces.append(out.read_bytes())
    assert b"".join(pieces) == memory[0].read_bytes()
