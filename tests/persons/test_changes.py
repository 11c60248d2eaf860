"""The identity change log's rules (`streams.persons.changes`): which change writes which row, the rows'
shape, the identifiers that link a user, and the model version that must move with the rules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from streams.persons import DevicePersons, Mapping, UserIds
from streams.persons.changes import MODEL_VERSION, NO_TRIGGER, Change, Trigger, links_of, op_of
from tests.conftest import validate

A = Mapping("0544bab4-394a-5eec-b968-c1cfd6c52caf", "088213c0-ea83-52d8-8713-eba810e6d0b0", "login", "dev-1")
B = Mapping(A.user_id, "cfd38e06-2b7f-5315-8544-a9f8d279c7fe", "identity", "dev-1", "$identity_mobile")
IDS = UserIds("salt")


@pytest.mark.parametrize(("old", "new", "op"), [
    (None, A, "created"), (A, B, "remapped"), (A, None, "unmapped"), (A, A, None), (None, None, None),
    # the same person by another way is a change of the mapping the persons topic holds
    (A, Mapping(A.user_id, A.person_id, "identity", "dev-1", "$identity_email"), "remapped"),
])
def test_each_change_writes_its_op(old: Mapping | None, new: Mapping | None, op: str | None) -> None:
    assert op_of(old, new) == op


def test_rows_follow_the_schema_and_share_their_version() -> None:
    links = ((("$identity_mobile", IDS.pair_hash("$identity_mobile+p1")),))
    rows = Change(A.user_id, A, B, False, links, Trigger("raw:0:7:0", 1712042798795)).rows(3, 1767225600000)
    for row in rows:
        validate("identity-change", row)
    assert [r["kind"] for r in rows] == ["mapping", "link"] and {r["version"] for r in rows} == {3}
    assert rows[0] | {} == rows[0] and rows[0]["op"] == "remapped" and rows[0]["previous_person_id"] == A.person_id
    assert rows[0]["identity_key"] == "$identity_mobile" and rows[1]["value_hash"] != "p1"
    unmapped = Change(A.user_id, B, None, True, (), Trigger(None, None, 12)).rows(4, None)
    for row in unmapped:
        validate("identity-change", row)
    assert unmapped == [{"kind": "mapping", "op": "unmapped", "user_id": A.user_id, "person_id": None,
                         "previous_person_id": B.person_id, "via": None, "device_id": "dev-1", "conflict": True,
                         "version": 4, "record_id": None, "line": 12, "event_time": None, "processed_time": None,
                         "model": MODEL_VERSION}]
    with pytest.raises(AssertionError):
        Change(A.user_id, A, A, False, (), NO_TRIGGER).rows(1, None)


def test_links_name_the_login_or_the_owned_pairs_never_a_value() -> None:
    assert links_of(DevicePersons(), A.user_id, A, IDS, lambda pair: None) == [("$identity_login_id", A.person_id)]
    claims = {"$identity_mobile+p1": {A.user_id: False}, "$identity_email+e1": {A.user_id: False},
              "$identity_mobile+p2": {A.user_id: False}, "$identity_mobile+p3": {"someone": False}}
    owners = {"$identity_mobile+p1": B.person_id, "$identity_email+e1": B.person_id, "$identity_mobile+p2": "other"}
    links = links_of(DevicePersons(claims=claims), A.user_id, B, IDS, owners.get)
    assert links == sorted([("$identity_mobile", IDS.pair_hash("$identity_mobile+p1")),
                            ("$identity_email", IDS.pair_hash("$identity_email+e1"))])
    assert all("p1" not in h and "e1" not in h for _, h in links)
    # salted: another deployment's hash of the same value differs
    assert UserIds("other").pair_hash("$identity_mobile+p1") != IDS.pair_hash("$identity_mobile+p1")
    assert links_of(DevicePersons(claims=claims), A.user_id, None, IDS, owners.get) == []


def test_trigger_reads_what_a_record_has() -> None:
    assert Trigger.of_record({"record_id": "raw:1:2:0", "time": 5}) == Trigger("raw:1:2:0", 5)
    assert Trigger.of_record({"time": "soon"}, 9) == Trigger(None, None, 9)


# The rules whose change must raise MODEL_VERSION, and their digest as of it (their bytes: a comment counts).
# When this fails after a change of the rules: raise MODEL_VERSION in streams/persons/changes.py, and put the
# digest printed here.
RULES = Path(__file__).resolve().parents[2] / "streams"
RULE_FILES = sorted([*(RULES / "identity").glob("*.py"), *(RULES / "persons").glob("*.py")])
DIGEST = {"2026.12.1": "616a6af19ec8a2044dd3b1ed66b84f7417e1ea0b4bd414cb57c1b52e6fb399a4"}


def test_the_model_version_moves_with_the_rules() -> None:
    h = hashlib.sha256()
    for path in RULE_FILES:
        if path.name != "changes.py":
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    digest = h.hexdigest()
    assert DIGEST.get(MODEL_VERSION) == digest, (
        f"the identity or persons rules changed: raise MODEL_VERSION and record {MODEL_VERSION!r}'s digest "
        f"{digest} here")
