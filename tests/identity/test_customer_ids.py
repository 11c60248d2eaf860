"""Seed 002 (Adobe's customer IDs and authentication states): the getCustomerIDs examples, and §4's rules."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from streams.enrich import EnrichSettings
from streams.identity import Settings

from ..helpers import Session

BRIDGE_OFF = EnrichSettings(identity=Settings(login_customer_id_type=""))


def customer_ids_after(*calls: dict[str, Any], settings: EnrichSettings = BRIDGE_OFF, **kw: Any) -> Any:
    session = Session(settings)
    for call in calls:
        session.send(device_id="v", platform="web", action="set_customer_ids", customer_ids=call, **kw)
    [probe] = session.send(device_id="v", platform="web", event="probe")
    return probe.get("customer_ids")


# the seed's examples: setCustomerIDs input -> getCustomerIDs() output
SEED_EXAMPLES = [
    ([], None),  # "No setCustomerIDs call on this instance": {} (the field is absent)
    ([{"userid": {"id": "67312378756723456"}}], {"userid": {"id": "67312378756723456", "authState": 0}}),
    ([{"userid": {"id": "67312378756723456", "authState": 1}}],
     {"userid": {"id": "67312378756723456", "authState": 1}}),
    ([{"userid": {"id": "67312378756723456", "authState": "AUTHENTICATED"}}],
     {"userid": {"id": "67312378756723456", "authState": 1}}),
    # the seed shows {"userid": {"authState": 2}} (ECID before 4.5); identity.md §4 overrides it by name:
    # an entry without id is kept but never emitted
    ([{"userid": {"authState": "LOGGED_OUT"}}], None),
    ([{"userid": {"authState": 2}, "dpuuid": {"id": "550e8400-e29b-41d4-a716-446655440000"}}],
     {"dpuuid": {"id": "550e8400-e29b-41d4-a716-446655440000", "authState": 0}}),
    # setCustomerIDs examples: a scalar is an id with UNKNOWN; several ids, several states
    ([{"userid": {"id": "67312378756723456", "authState": 1}, "dpuuid": "550e8400-e29b-41d4-a716-446655440000"}],
     {"userid": {"id": "67312378756723456", "authState": 1},
      "dpuuid": {"id": "550e8400-e29b-41d4-a716-446655440000", "authState": 0}}),
    ([{"userid": {"id": "67312378756723456", "authState": 1},
       "dpuuid": {"id": "550e8400-e29b-41d4-a716-446655440000", "authState": 2}}],
     {"userid": {"id": "67312378756723456", "authState": 1},
      "dpuuid": {"id": "550e8400-e29b-41d4-a716-446655440000", "authState": 2}}),
]


@pytest.mark.parametrize(("calls", "expected"), SEED_EXAMPLES)
def test_seed_get_customer_ids(calls: list[dict[str, Any]], expected: Any) -> None:
    assert customer_ids_after(*calls) == expected


def test_merge_keeps_unmentioned_and_replaces_mentioned_whole() -> None:
    got = customer_ids_after({"a": {"id": "1", "authState": 1}, "b": "x"}, {"a": {"id": "2"}})
    assert got == {"a": {"id": "2", "authState": 0}, "b": {"id": "x", "authState": 0}}


@pytest.mark.parametrize("falsy", ["", 0, False])
def test_falsy_scalars_leave_the_entry_alone(falsy: Any) -> None:
    assert customer_ids_after({"a": "keep"}, {"a": falsy}) == {"a": {"id": "keep", "authState": 0}}


def test_ids_keep_their_json_type() -> None:
    assert customer_ids_after({"n": 12345, "t": True, "f": 1.5}) == {
        "n": {"id": 12345, "authState": 0}, "t": {"id": True, "authState": 0}, "f": {"id": 1.5, "authState": 0}}


def test_sha256_of_the_trimmed_lowercased_id() -> None:
    got = customer_ids_after({"email": {"id": " ECID@Adobe.com ", "authState": 1}}, hash="SHA-256")
    digest = hashlib.sha256(b"ecid@adobe.com").hexdigest()
    assert digest == "a6ea4cde5da5ae7cc68baae894d1d6544fca26254433b0fff7c2cb4843b4a097"  # Adobe's own example
    assert got == {"email": {"id": digest, "authState": 1, "hashType": "SHA-256"}}


def test_the_login_type_bridge() -> None:
    session = Session()  # default login type: userid
    [signup] = session.send(device_id="v", platform="web", action="set_customer_ids",
                            customer_ids={"userid": {"id": "u1", "authState": "AUTHENTICATED"}})
    assert (signup["type"], signup["login_id"], signup["distinct_id"]) == ("track_signup", "u1", "u1")
    assert signup["customer_ids"] == {"userid": {"id": "u1", "authState": 1}}
    # the same login again is no new $SignUp; UNKNOWN neither logs in nor out
    assert session.send(device_id="v", platform="web", action="set_customer_ids",
                        customer_ids={"userid": {"id": "u1", "authState": 1}}) == []
    assert session.send(device_id="v", platform="web", action="set_customer_ids", customer_ids={"userid": "u2"}) == []
    [probe] = session.send(device_id="v", platform="web", event="e")
    assert probe["login_id"] == "u1"
    # LOGGED_OUT, with or without an id, is logout()
    assert session.send(device_id="v", platform="web", action="set_customer_ids",
                        customer_ids={"userid": {"authState": 2}}) == []
    [probe] = session.send(device_id="v", platform="web", event="e")
    assert "login_id" not in probe
    assert probe["distinct_id"] == "v"


def test_bridge_login_with_a_hashed_id_logs_in_as_the_hash() -> None:
    session = Session()
    [signup] = session.send(device_id="v", platform="mp-wechat", action="set_customer_ids",
                            customer_ids={"userid": {"id": "Bob", "authState": 1}}, hash="sha256")
    assert signup["login_id"] == hashlib.sha256(b"bob").hexdigest()


def test_bridge_refuses_an_id_that_is_no_login_id() -> None:
    session = Session()
    dead = session.refuse(device_id="v", platform="mp-wechat", action="set_customer_ids",
                          customer_ids={"userid": {"id": -3, "authState": 1}})
    assert (dead["reason"], dead["field"]) == ("invalid_login_id", "customer_ids.userid.id")
    [probe] = session.send(device_id="v", platform="mp-wechat", event="e")
    assert "customer_ids" not in probe  # validation first: nothing was applied

