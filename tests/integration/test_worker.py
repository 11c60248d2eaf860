"""`python -m streams worker` against the real broker: the same outputs as `replay`, dead letters, restarts,
two workers in one group, and unkeyed input.

Every test has its own topics and group (the `topics` fixture). The reference is always `python -m streams
replay` on the same input: per device, the enriched records must come out the same and in the same order
(records of different devices may interleave across partitions).
"""

from __future__ import annotations

import base64
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.config import Settings
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]



# -- inputs ----------------------------------------------------------------------------------------------





def restart_parts(n_devices: int = 60, *, prefix: str = "r") -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Three parts: (1) every device logs in; (2) tracks, binds, logs in again with the same ID (no new
    $SignUp while the state holds the login); (3) more tracks. Devices take turns within each part."""
    platforms = ["mp-wechat", "web", "mp-alipay"]
    devices = [(f"{prefix}-{i:03d}", platforms[i % 3], f"user-{prefix}-{i}") for i in range(n_devices)]
    clock = iter(range(1_712_200_000_000, 1_712_300_000_000, 1000))

    def part(steps: list[dict[str, Any]]) -> list[bytes]:
        return [orjson.dumps({"device_id": d, "platform": p, **{k: (v.format(user=u) if isinstance(v, str) else v)
                                                               for k, v in step.items()}, "time": next(clock)})
                for step in steps for d, p, u in devices]

    part1 = part([{"action": "track", "event": "open"}, {"action": "login", "id": "{user}"},
                  {"action": "track", "event": "after_login"}])
    part2 = part([{"action": "track", "event": "second_run"},
                  {"action": "bind", "key": "$identity_mobile", "value": "m-{user}"},
                  {"action": "login", "id": "{user}"},
                  {"action": "track", "event": "second_run_2"}])
    part3 = part([{"action": "track", "event": "third_run"}, {"action": "track", "event": "third_run_2"}])
    return part1, part2, part3










def assert_unique_per_device(expected: dict[str, list[dict[str, Any]]]) -> None:
    """The input's own property the repeat checks rely on: no two expected records of a device are alike."""
    for device_id, records in expected.items():
        assert len({kit.canonical(r) for r in records}) == len(records), device_id


# -- 1. same output as replay ----------------------------------------------------------------------------




@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_worker_output_equals_replay(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                     guarantee: str) -> None:
    generated = kit.generate()
    inputs = kit.write_jsonl(tmp_path / "input.jsonl", kit.sample_lines() + generated)
    expected, expected_dead = kit.replay_outputs(topics, inputs)
    assert len(expected) > 2000 and len(expected_dead) >= 7  # the input exercises what it should

    worker = start_worker(topics, processing_guarantee=guarantee)
    worker.wait_ready()
    assert kit.produce_file(topics, None) == 41  # the built-in sample
    assert kit.produce_file(topics, kit.write_jsonl(tmp_path / "generated.jsonl", generated)) == len(generated)

    out = kit.wait_for_outputs(topics, len(expected) + len(expected_dead), workers=[worker])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    assert len(out.enriched) == len(expected)
    assert kit.dead_letters_without_source(out.dead_values) == kit.dead_letters_without_source(expected_dead)
    kit.assert_sources_in(out.dead_values, topics)
    worker.check_alive()


# -- 2. dead letters -------------------------------------------------------------------------------------

BAD = [
    (b'{"device_id": "bad-utf8-\xff\xfe", "platform": "web", "event": "x"}', "not_utf8", ""),
    (b"this is not json", "not_json", ""),
    (b'["a", "json", "array"]', "not_object", ""),
    (b'{"device_id": "bad-platform", "platform": "mp-nowhere", "event": "x"}', "unknown_platform", "platform"),
    (b'{"device_id": "bad-key", "platform": "mp-wechat", "action": "bind", "key": "9lives", "value": "v"}',
     "invalid_key", "key"),
]


def test_bad_records_become_dead_letters_and_the_worker_goes_on(
    topics: Settings, start_worker: kit.StartWorker, tmp_path: Path
) -> None:
    lines = kit.sample_lines()
    sample_bad = lines[-7:]
    good = [orjson.dumps({"device_id": "ok-1", "platform": "mp-wechat", "event": "before", "time": 1})]
    after = [orjson.dumps({"device_id": f"ok-{i % 3}", "platform": "web", "event": "after", "time": 2 + i})
             for i in range(30)]
    bad = [raw for raw, _, _ in BAD] + sample_bad
    inputs = good + bad + after
    expected, expected_dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "input.jsonl", inputs))
    assert len(expected_dead) == len(bad) == 12
    assert [d["reason"] for d in expected_dead[:5]] == [reason for _, reason, _ in BAD]
    assert [d["field"] for d in expected_dead[:5]] == [field for _, _, field in BAD]

    worker = start_worker(topics)
    worker.wait_ready()
    sent = kit.produce(topics, kit.keyed(inputs))
    where = {raw: (m.partition, m.offset) for raw, m in zip(inputs, sent, strict=True)}

    out = kit.wait_for_outputs(topics, len(expected) + len(bad), workers=[worker])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    assert len(out.dead) == len(bad)
    got = {}
    for record, letter in zip(out.dead, out.dead_values, strict=True):
        raw = base64.b64decode(letter["raw"]) if letter.get("raw_encoding") == "base64" else letter["raw"].encode()
        assert raw in where, f"dead letter for input never sent: {letter}"
        partition, offset = where[raw]
        assert letter["source"] == {"topic": topics.raw_topic, "partition": partition, "offset": offset}, letter
        if "device_id" in letter:
            assert record.key == letter["device_id"].encode(), (record.key, letter)
        got[raw] = letter
    assert set(got) == set(bad)
    for raw, letter in zip(bad, expected_dead, strict=True):
        mine = {k: v for k, v in got[raw].items() if k != "source"}
        assert mine == {k: v for k, v in letter.items() if k != "source"}
    assert got[BAD[0][0]]["raw_encoding"] == "base64"
    # still running, and not about to exit
    time.sleep(2)
    worker.check_alive()


# -- 3. restarts -----------------------------------------------------------------------------------------




@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_keeps_device_state(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path, how: str,
                                    guarantee: str) -> None:
    part1, part2, part3 = restart_parts()
    expected1, _ = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "part1.jsonl", part1))
    expected12, _ = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "part12.jsonl", part1 + part2))
    expected, dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "all.jsonl", part1 + part2 + part3))
    assert not dead
    want = kit.by_device(expected)
    assert_unique_per_device(want)
    # the later parts' outputs depend on the state the earlier ones left: losing it shows
    alone, _ = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "part23.jsonl", part2 + part3))
    assert expected[len(expected1):] != alone
    state_a, state_b = str(tmp_path / "state-a"), str(tmp_path / "state-b")
    timings = []
    topics = replace(topics, processing_guarantee=guarantee)
    # at-least-once: after a SIGKILL a record may come out twice, but only exactly as it did the first time
    repeats_allowed = how == "sigkill" and guarantee == "at_least_once"

    # run 1: every device logs in
    t = time.monotonic()
    w1 = start_worker(topics, "run1", state_dir=state_a)
    w1.wait_ready()
    kit.produce(topics, kit.keyed(part1))
    kit.wait_for_outputs(topics, len(expected1), workers=[w1], settle=0)
    if how == "sigterm":
        assert w1.stop() == 0, f"SIGTERM: exit code {w1.proc.returncode}\n{w1.log_tail()}"
        assert not w1.forced, "the worker did not stop within 30 s of SIGTERM"
        kit.produce(topics, kit.keyed(part2))
    else:
        # part 2 arrives while the worker runs; it dies in the middle of it
        sender = kit.produce_slowly(topics, part2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(kit.kafka_read_enriched(topics)) < len(expected1) + len(part2) // 3:
            time.sleep(0.1)
        w1.kill()
        sender.join(60)
    timings.append(time.monotonic() - t)

    # run 2: the same state directory
    t = time.monotonic()
    w2 = start_worker(topics, "run2", state_dir=state_a)
    w2.wait_ready(timeout=120)
    kit.wait_for_outputs(topics, len(expected12), workers=[w2], distinct=repeats_allowed, settle=0)
    if how == "sigterm":
        assert w2.stop() == 0, f"SIGTERM: exit code {w2.proc.returncode}\n{w2.log_tail()}"
    else:
        w2.kill()
    kit.produce(topics, kit.keyed(part3))
    timings.append(time.monotonic() - t)

    # run 3: an empty state directory: the device table comes back from its changelog
    t = time.monotonic()
    w3 = start_worker(topics, "run3", state_dir=state_b)
    w3.wait_ready(timeout=120)
    out = kit.wait_for_outputs(topics, len(expected), workers=[w3], distinct=repeats_allowed)
    assert w3.stop() == 0, f"SIGTERM: exit code {w3.proc.returncode}\n{w3.log_tail()}"
    timings.append(time.monotonic() - t)

    got = kit.enriched_by_device(out.enriched)
    repeats = 0
    if repeats_allowed:
        for device_id, records in got.items():
            got[device_id], n = kit.without_repeats(records)
            repeats += n
    if not repeats_allowed:
        assert len(out.enriched) == len(expected), f"{len(out.enriched)} records out, {len(expected)} expected"
    print(f"{how}, {guarantee}: run timings {[round(x, 1) for x in timings]} s; {repeats} repeated records")
    for device_id, records in got.items():
        signups = [r for r in records if r.get("event") == "$SignUp"]
        assert len(signups) == 1, f"{device_id}: {len(signups)} $SignUp records: {signups}"
        after_login = records[records.index(signups[0]) + 1:]
        assert all("login_id" in r for r in after_login), f"{device_id} lost its login: {after_login}"
    kit.assert_same_per_device(got, want)
    assert not out.dead




# -- 4. two workers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_two_workers_split_the_partitions(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                          guarantee: str) -> None:
    topics = replace(topics, processing_guarantee=guarantee)
    generated = kit.generate(2000, 200, prefix="two", seed=7)
    half = len(generated) // 2
    expected1, dead1 = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "first.jsonl", generated[:half]))
    expected, expected_dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "input.jsonl", generated))
    a = start_worker(topics, "a", state_dir=str(tmp_path / "state-a"))
    b = start_worker(topics, "b", state_dir=str(tmp_path / "state-b"), web_port=kit.free_port())
    a.wait_ready(members=2, timeout=120)
    b.wait_ready(members=2, timeout=120)
    state, held = kit.group_assignment(topics)
    held = sorted(held, key=min)
    assert state == "Stable" and len(held) == 2, (state, held)
    assert all(held) and not held[0] & held[1] and held[0] | held[1] == {0, 1, 2, 3}, held

    kit.produce(topics, kit.keyed(generated[:half]))
    out = kit.wait_for_outputs(topics, len(expected1) + len(dead1), workers=[a, b])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected1))
    state, held_after = kit.group_assignment(topics)
    assert sorted(held_after, key=min) == held, f"the assignment changed meanwhile: {held} -> {held_after}"

    # one leaves: the other takes its partitions over, with their device states (from the changelog)
    assert a.stop() == 0, f"SIGTERM: exit code {a.proc.returncode}\n{a.log_tail()}"
    kit.produce(topics, kit.keyed(generated[half:]))
    out = kit.wait_for_outputs(topics, len(expected) + len(expected_dead), workers=[b])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    assert kit.dead_letters_without_source(out.dead_values) == kit.dead_letters_without_source(expected_dead)
    kit.assert_sources_in(out.dead_values, topics)
    assert b.stop() == 0, f"SIGTERM: exit code {b.proc.returncode}\n{b.log_tail()}"


def test_a_stalled_worker_cannot_commit_behind_its_successor(topics: Settings, start_worker: kit.StartWorker,
                                                             tmp_path: Path) -> None:
    """Exactly-once against a zombie: a worker frozen (SIGSTOP) mid-stream is dropped by the group after the
    session timeout and its partitions go to another worker, which fences its transactions. When it wakes up
    it must not commit what its successor has already done: every output is read exactly once."""
    topics = replace(topics, processing_guarantee="exactly_once")
    generated = kit.generate(4000, 200, prefix="zombie", seed=11)
    expected, expected_dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "input.jsonl", generated))
    a = start_worker(topics, "a", state_dir=str(tmp_path / "state-a"))
    a.wait_ready()
    sender = kit.produce_slowly(topics, generated, chunks=40, pause=0.3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(kit.kafka_read_enriched(topics)) < len(expected) // 8:
        time.sleep(0.1)
    a.proc.send_signal(signal.SIGSTOP)
    try:
        b = start_worker(topics, "b", state_dir=str(tmp_path / "state-b"), web_port=kit.free_port())
        # a is still a member until its session times out; then b holds everything
        kit.wait_for_group(topics, kit.held_by_one, 120, "b did not take over from the frozen worker", b.log_tail)
        sender.join(120)
        kit.wait_for_outputs(topics, len(expected) + len(expected_dead), workers=[b], settle=0)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    # the zombie wakes with a batch perhaps half sent and stale offsets; it must rejoin, not commit them
    kit.wait_for_group(topics, lambda state, held: state == "Stable" and len(held) == 2 and all(held), 90,
                   "the woken worker did not rejoin the group", a.log_tail)
    out = kit.wait_for_outputs(topics, len(expected) + len(expected_dead), workers=[a, b], settle=3)
    assert len(out.enriched) == len(expected), (f"{len(out.enriched) - len(expected)} records more than replay's"
                                                f"\n{a.log_tail()}")
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    assert kit.dead_letters_without_source(out.dead_values) == kit.dead_letters_without_source(expected_dead)
    assert a.stop() == 0, f"SIGTERM: exit code {a.proc.returncode}\n{a.log_tail()}"
    assert b.stop() == 0, f"SIGTERM: exit code {b.proc.returncode}\n{b.log_tail()}"


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_sigterm_during_a_rebalance_exits_cleanly(topics: Settings, start_worker: kit.StartWorker,
                                                   tmp_path: Path, guarantee: str) -> None:
    """A worker told to stop while it takes over partitions (rolling restarts do this) stops cleanly."""
    topics = replace(topics, processing_guarantee=guarantee)
    a = start_worker(topics, "a", state_dir=str(tmp_path / "state-a"))
    b = start_worker(topics, "b", state_dir=str(tmp_path / "state-b"), web_port=kit.free_port())
    a.wait_ready(members=2, timeout=120)
    b.wait_ready(members=2, timeout=120)
    assert a.stop() == 0, f"SIGTERM: exit code {a.proc.returncode}\n{a.log_tail()}"
    kit.wait_for_group(topics, kit.held_by_one, 60, "b did not take over all partitions")
    code = b.stop()
    assert not b.forced, "the worker did not stop within 30 s of SIGTERM"
    assert code == 0, (f"SIGTERM just after a rebalance: exit code {code}; errors logged:\n"
                       + "\n".join(b.errors()) + f"\nlog: {b.log_path}")


# -- 5. unkeyed input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_unkeyed_input_is_repartitioned(topics: Settings, start_worker: kit.StartWorker, tmp_path: Path,
                                        guarantee: str) -> None:
    topics = replace(topics, processing_guarantee=guarantee)
    # part A: keyed, but not by device_id (a bucket per device: a device's records stay in one partition)
    part_a = kit.generate(1500, 100, prefix="unkeyed", seed=7)
    messages = [(f"bucket-{orjson.loads(v)['device_id'][-1]}".encode(), v) for v in part_a]
    # part B: no key at all, in rounds of one record per device (no key, no order across partitions: the
    # rounds are what orders them), for devices of part A and new ones
    platform_of = {orjson.loads(v)["device_id"]: orjson.loads(v)["platform"] for v in part_a}
    devices = sorted(platform_of)[:40] + [f"fresh-{i:02d}" for i in range(40)]
    steps = [{"action": "login", "id": "u-{i}"}, {"action": "track", "event": "after"}, {"action": "logout"},
             {"action": "track", "event": "gone"}]
    rounds = [[orjson.dumps({"device_id": d, "platform": platform_of.get(d, "mp-wechat"),
                             **{k: v.format(i=i) for k, v in step.items()}, "time": 1_712_400_000_000 + n})
               for i, d in enumerate(devices)]
              for n, step in enumerate(steps)]

    worker = start_worker(topics)
    worker.wait_ready()
    kit.produce(topics, messages)
    sent = list(part_a)
    for n, records in enumerate(rounds):
        exp, dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / f"upto{n}.jsonl", sent))
        kit.wait_for_outputs(topics, len(exp) + len(dead), workers=[worker], settle=0)
        path = kit.write_jsonl(tmp_path / f"round{n}.jsonl", records)
        assert kit.produce_file(topics, path, keyed=False) == len(records)
        sent += records
    expected, expected_dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "all.jsonl", sent))
    out = kit.wait_for_outputs(topics, len(expected) + len(expected_dead), workers=[worker])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    assert kit.dead_letters_without_source(out.dead_values) == kit.dead_letters_without_source(expected_dead)
    # the dead letters of forwarded records name where they were produced: the raw topic
    kit.assert_sources_in(out.dead_values, topics)
