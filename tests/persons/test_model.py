"""Replay's persons mapping against the model of persons.md (`model.py`), on random multi-device sequences.

Values come from small pools on purpose, so that devices collide: the same phone bound on several devices,
logins of the same user on two devices, placeholders ("null", " NULL ", "0", 0) that must merge no one, keys
that never claim ($identity_mp_id bound on the web), resets back to an earlier default ID. Some examples have
a device limit of 1 or 2, so that a pair claimed from a few devices has no owner; some salt the user IDs; some
hash the phone and the email (the block test is made on the clear value).

Besides the model: the file is the same with `--jobs 2` and `--jobs 3`, across two runs with `--state-dir`,
and whatever the interleaving of different devices' records.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from .model import Config, model_run
from .runner import Run, changes_end_at, run_replay

PLATFORMS = ("mp-wechat", "web", "mp-alipay", "mp-jd")
LOGIN_IDS = ("u1", "u2", "u3")
# (key, id) of a login with a key; the default keys of other platforms are allowed, and claim nothing
KEYED_LOGINS = (
    ("$identity_email", "a@b.c"), ("$identity_email", "a@b.c"), ("$identity_email", "x@y.z"),
    ("$identity_mobile", "13800000000"), ("$identity_email", "u1"), ("$identity_email", "null"),
    ("$identity_mobile", " NULL "), ("$identity_mobile", "0"), ("$identity_email", 0), ("$identity_mp_id", "a@b.c"),
    ("$identity_ali_mp_id", "13800000000"),
)
# (key, value) of bind and unbind, the real values more often than the placeholders; a number is refused on the web
PAIRS = (
    ("$identity_mobile", "13800000000"), ("$identity_mobile", "13800000000"), ("$identity_mobile", "13800000000"),
    ("$identity_mobile", "13900000000"), ("$identity_email", "a@b.c"), ("$identity_email", "a@b.c"),
    ("$identity_email", "a@b.c"),
    ("$identity_email", "x@y.z"), ("$identity_mobile", "null"), ("$identity_mobile", 0),
    ("$identity_email", " NULL "), ("$identity_email", "undefined"), ("$identity_mobile", "0"),
    ("$identity_mp_id", "a@b.c"), ("$identity_ali_mp_id", "13800000000"),
)
RESET_IDS = (None, "r1", "r2", "@device")  # None: a generated ID; "@device": back to the device ID
IDENTIFY_IDS = ("i1", "u1", "a@b.c")
HASHED = frozenset({"$identity_mobile", "$identity_email"})

# few distinct pairs, so that a logged-in device and an anonymous one bind the same placeholder; the other
# spellings of the block list are in test_rules.py
PLACEHOLDER_LOGINS = (
    ("$identity_email", "a@b.c"), ("$identity_email", "null"), ("$identity_email", 0), ("$identity_mobile", " Null "),
)
PLACEHOLDER_PAIRS = (
    ("$identity_mobile", "13800000000"), ("$identity_mobile", "null"), ("$identity_mobile", " NULL "),
    ("$identity_mobile", 0), ("$identity_mobile", 0), ("$identity_mobile", -1), ("$identity_email", "undefined"),
    ("$identity_email", "a@b.c"), ("$identity_email", 0),
)

Action = dict[str, Any]


def action_strategies(keyed_logins: Sequence[tuple[str, Any]], pairs: Sequence[tuple[str, Any]]
                      ) -> tuple[st.SearchStrategy[Action], st.SearchStrategy[Action]]:
    """Any action, and those of a device that never logs in (its device users are mapped via identity or not at
    all). Repeated to weigh them: binds and tracks make the claims, logins the owners."""
    login = st.builds(lambda i: {"action": "login", "id": i}, st.sampled_from(LOGIN_IDS))
    keyed_login = st.builds(lambda p: {"action": "login", "key": p[0], "id": p[1]}, st.sampled_from(keyed_logins))
    logout = st.just({"action": "logout"})
    bind = st.builds(lambda p: {"action": "bind", "key": p[0], "value": p[1]}, st.sampled_from(pairs))
    unbind = st.builds(lambda p: {"action": "unbind", "key": p[0], "value": p[1]}, st.sampled_from(pairs))
    reset = st.builds(
        lambda i: {"action": "reset_anonymous_id"} if i is None else {"action": "reset_anonymous_id", "id": i},
        st.sampled_from(RESET_IDS))
    identify = st.builds(lambda i: {"action": "identify", "id": i}, st.sampled_from(IDENTIFY_IDS))
    track = st.just({"action": "track", "event": "view"})
    customer_login = st.builds(
        lambda i: {"action": "set_customer_ids", "customer_ids": {"userid": {"id": i, "authState": 1}}},
        st.sampled_from(LOGIN_IDS))
    customer_logout = st.just(
        {"action": "set_customer_ids", "customer_ids": {"userid": {"id": "u1", "authState": 2}}})
    return (st.one_of(bind, bind, bind, track, track, login, keyed_login, keyed_login, keyed_login, logout, unbind,
                      reset, identify, customer_login, customer_logout),
            st.one_of(bind, bind, track, unbind, reset, identify))


ACTIONS = action_strategies(KEYED_LOGINS, PAIRS)
PLACEHOLDER_ACTIONS = action_strategies(PLACEHOLDER_LOGINS, PLACEHOLDER_PAIRS)

configs = st.builds(
    Config,
    salt=st.sampled_from(("", "pepper")),
    max_devices=st.sampled_from((1, 2, 50, 50)),
    hashed_keys=st.sampled_from((frozenset(), HASHED)),
)


@st.composite
def sequences(draw: st.DrawFn, pools: tuple[st.SearchStrategy[Action], st.SearchStrategy[Action]] = ACTIONS,
              max_steps: int = 80) -> list[dict[str, Any]]:
    """Raw records of 2-6 devices, interleaved, some of the devices never logging in. Each record carries its
    position in `properties`."""
    actions, anonymous_actions = pools
    platforms = draw(st.lists(st.sampled_from(PLATFORMS + PLATFORMS[:3]), min_size=2, max_size=6))
    anonymous = draw(st.lists(st.booleans(), min_size=len(platforms), max_size=len(platforms)))
    devices = draw(st.lists(st.integers(0, len(platforms) - 1), min_size=16, max_size=max_steps))
    records = []
    for n, device in enumerate(devices):
        action = draw(anonymous_actions if anonymous[device] else actions)
        device_id = f"d{device}"
        record = {"device_id": device_id, "platform": platforms[device], **action, "properties": {"n": n}}
        if record.get("id") == "@device":
            record["id"] = device_id
        records.append(record)
    return records


def per_record(records: Sequence[dict[str, Any]], run: Run) -> list[list[dict[str, Any]]]:
    """What replay emitted for each raw record (found by the position each carries)."""
    position = {r["properties"]["n"]: i for i, r in enumerate(records)}
    emitted: list[list[dict[str, Any]]] = [[] for _ in records]
    for r in run.enriched:
        emitted[position[r["properties"]["n"]]].append(r)
    return emitted


def interleavings(records: list[dict[str, Any]]) -> st.SearchStrategy[list[dict[str, Any]]]:
    """The same records, different devices' records in another order, each device's own order kept."""

    def rebuild(order: list[str]) -> list[dict[str, Any]]:
        queues: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            queues.setdefault(r["device_id"], []).append(r)
        return [queues[d].pop(0) for d in order]

    return st.permutations([r["device_id"] for r in records]).map(rebuild)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=sequences(), config=configs)
def test_replay_writes_the_models_mapping(records: list[dict[str, Any]], config: Config) -> None:
    run = run_replay(records, config)
    model = model_run(records, per_record(records, run), config)
    assert run.persons == model.persons_file()
    # the identity change log's last row per user says the same mapping
    assert changes_end_at(run.change_rows()) == run.persons
    for name in model.outcomes():
        event(name)
    target(float(len(model.conflicts())), label="device users in conflict")
    target(float(len(model.several_owned_pairs())), label="device users mapped through several pairs")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=sequences(PLACEHOLDER_ACTIONS), config=configs)
def test_placeholders_merge_no_one(records: list[dict[str, Any]], config: Config) -> None:
    """Mostly placeholders, as strings and numbers, in clear and hashed: the model blocks them from the value the
    client sent."""
    run = run_replay(records, config)
    model = model_run(records, per_record(records, run), config)
    assert run.persons == model.persons_file()
    for name in model.outcomes():
        event(name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=sequences(), config=configs, data=st.data())
def test_the_mapping_does_not_depend_on_the_interleaving_of_devices(
        records: list[dict[str, Any]], config: Config, data: st.DataObject) -> None:
    shuffled = data.draw(interleavings(records))
    first, second = run_replay(records, config), run_replay(shuffled, config)
    assert second.persons == first.persons
    model = model_run(shuffled, per_record(shuffled, second), config)
    assert second.persons == model.persons_file()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=sequences(), config=configs, data=st.data())
def test_two_runs_with_a_state_dir_write_the_mapping_of_one(
        records: list[dict[str, Any]], config: Config, data: st.DataObject) -> None:
    split = data.draw(st.integers(0, len(records)))
    persons_in_first = data.draw(st.booleans())
    whole = run_replay(records, config)
    with tempfile.TemporaryDirectory(prefix="persons-state-") as state:
        first = run_replay(records[:split], config, state_dir=state, persons=persons_in_first)
        second = run_replay(records[split:], config, state_dir=state)
    assert first.output + second.output == whole.output
    assert second.persons == whole.persons == model_run(records, per_record(records, whole), config).persons_file()
    # the second run's log goes on from the first's: its versions continue, and it ends where the whole's does
    # (a first run without the file leaves its users' last mapping and version in the state all the same)
    if persons_in_first:
        # (a row's line is of its own run's input)
        shifted = [r | {"line": r["line"] + split} if "line" in r else r for r in second.change_rows()]
        assert first.change_rows() + shifted == whole.change_rows()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=sequences(), config=configs)
def test_jobs_write_the_mapping_of_one_process(records: list[dict[str, Any]], config: Config) -> None:
    one = run_replay(records, config)
    assert one.persons == model_run(records, per_record(records, one), config).persons_file()
    for jobs in (2, 3):
        several = run_replay(records, config, jobs=jobs)
        assert several.output == one.output
        assert several.persons == one.persons
