"""persons.md's rules, one example each, through `replay --persons`: the file is compared with what the spec's
text says, written out by hand (user IDs from `uuid.uuid5`, via `model.login_user` and `model.device_user`)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest

from .model import Config, device_user, login_user, namespace
from .runner import Run, run_replay

NS = namespace()
PHONE = "13800000000"
EMAIL = "a@b.c"
MOBILE_KEY = "$identity_mobile"
EMAIL_KEY = "$identity_email"
HASHED = frozenset({MOBILE_KEY, EMAIL_KEY})


def rec(device_id: str, action: str, platform: str = "mp-wechat", **fields: Any) -> dict[str, Any]:
    return {"device_id": device_id, "platform": platform, "action": action, **fields}


def login(device_id: str, id_: Any, key: str | None = None, platform: str = "mp-wechat") -> dict[str, Any]:
    return rec(device_id, "login", platform, id=id_) if key is None else rec(device_id, "login", platform, key=key,
                                                                               id=id_)


def bind(device_id: str, key: str, value: Any, platform: str = "mp-wechat") -> dict[str, Any]:
    return rec(device_id, "bind", platform, key=key, value=value)


def unbind(device_id: str, key: str, value: Any, platform: str = "mp-wechat") -> dict[str, Any]:
    return rec(device_id, "unbind", platform, key=key, value=value)


def track(device_id: str, platform: str = "mp-wechat") -> dict[str, Any]:
    return rec(device_id, "track", platform, event="view")


def L(login_id: str) -> str:  # the spec's login_user
    return login_user(NS, login_id)


def D(device_id: str, default_id: str | None = None) -> str:  # the spec's device_user
    return device_user(NS, device_id, device_id if default_id is None else default_id)


def via_login(device_id: str, person: str, default_id: str | None = None) -> dict[str, Any]:
    return {"user_id": D(device_id, default_id), "person_id": person, "via": "login", "device_id": device_id}


def via_identity(device_id: str, person: str, key: str, default_id: str | None = None) -> dict[str, Any]:
    return {"user_id": D(device_id, default_id), "person_id": person, "via": "identity", "device_id": device_id,
            "identity_key": key}


def expect(run: Run, *mappings: dict[str, Any]) -> None:
    """The --persons file is exactly these mappings, sorted by user ID, in the spec's key order."""
    assert run.mappings() == sorted(mappings, key=lambda m: m["user_id"])
    for m in run.mappings():
        assert list(m) == ["user_id", "person_id", "via", "device_id", "identity_key"][:len(m)]


# -- §2: claims --------------------------------------------------------------------------------------------------


def test_a_phone_bound_while_anonymous_is_claimed_by_the_sign_up_as_the_login_user() -> None:
    # d1 binds the phone anonymously, then signs up: the $SignUp carries the phone, with the login's user ID.
    # d1 sends nothing after it (the login drops the bound phone), so only the $SignUp can have claimed it
    records = [bind("d1", MOBILE_KEY, PHONE), login("d1", "u1"), bind("d2", MOBILE_KEY, PHONE)]
    run = run_replay(records)
    signup = run.enriched[1]
    assert signup["type"] == "track_signup" and signup["identities"][MOBILE_KEY] == PHONE
    assert signup["user_id"] == L("u1")
    expect(run, via_login("d1", L("u1")), via_identity("d2", L("u1"), MOBILE_KEY))
    # without the sign-up, only device users claim the phone: no owner
    expect(run_replay([records[0], records[2]]))


def test_a_login_with_a_key_claims_its_own_pair() -> None:
    person = L(f"{EMAIL_KEY}+{EMAIL}")
    run = run_replay([login("d1", EMAIL, EMAIL_KEY), track("d1"), bind("d2", EMAIL_KEY, EMAIL)])
    assert {r["user_id"] for r in run.enriched[:2]} == {person}
    expect(run, via_login("d1", person), via_identity("d2", person, EMAIL_KEY))


def test_a_sign_up_made_while_logged_in_claims_nothing() -> None:
    # the second $SignUp carries u1's login pair and the phone bound under u1: they stay u1's
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), login("d1", "u2"), track("d1"),
               bind("d2", MOBILE_KEY, PHONE)]
    run = run_replay(records)
    assert run.enriched[2]["type"] == "track_signup" and run.enriched[2]["identities"][MOBILE_KEY] == PHONE
    expect(run, via_login("d1", L("u1")), via_identity("d2", L("u1"), MOBILE_KEY))
    # the same login from anonymous claims the pairs it carries: then u1 and u2 share the phone
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), login("d3", "u2"), bind("d3", MOBILE_KEY, PHONE),
               bind("d2", MOBILE_KEY, PHONE)]
    expect(run_replay(records), via_login("d1", L("u1")), via_login("d3", L("u2")))


@pytest.mark.parametrize("hashed", [False, True], ids=["clear", "hashed"])
@pytest.mark.parametrize("value", ["null", " NULL ", "0", 0, -1, "-1", "Undefined", "none", "nil", " ",
                                   "anonymous", "Unknown", "[object Object]", "\tNull\n"])
def test_placeholders_are_blocked_before_any_hashing(value: Any, hashed: bool) -> None:
    config = Config(hashed_keys=HASHED if hashed else frozenset())
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, value), track("d1"), bind("d2", MOBILE_KEY, value),
               track("d2")]
    run = run_replay(records, config)
    assert not run.dead
    expect(run, via_login("d1", L("u1")))
    # a real value under the same key maps d2
    run = run_replay([login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), bind("d2", MOBILE_KEY, PHONE)], config)
    expect(run, via_login("d1", L("u1")), via_identity("d2", L("u1"), MOBILE_KEY))


@pytest.mark.parametrize("hashed", [False, True], ids=["clear", "hashed"])
def test_a_login_with_a_placeholder_under_a_key_claims_nothing(hashed: bool) -> None:
    config = Config(hashed_keys=HASHED if hashed else frozenset())
    for id_ in ("null", 0, " Null "):
        records = [login("d1", id_, EMAIL_KEY), track("d1"), bind("d2", EMAIL_KEY, id_), track("d2")]
        run = run_replay(records, config)
        assert not run.dead
        person = run.enriched[0]["user_id"]
        expect(run, via_login("d1", person))


def test_default_keys_the_anonymous_id_and_the_login_id_never_claim() -> None:
    # $identity_mp_id is WeChat's default key, bound here on the web and on Alipay; $identity_ali_mp_id is
    # Alipay's, bound and logged in with on WeChat. Two devices share the login ID and the anonymous ID too
    records = [
        login("w1", "u1", platform="web"), bind("w1", "$identity_mp_id", "x", platform="web"),
        bind("a1", "$identity_mp_id", "x", platform="mp-alipay"),
        login("m1", "y", "$identity_ali_mp_id"), track("m1"),
        bind("m2", "$identity_ali_mp_id", "y"),
        rec("i1", "identify", id="u1"), track("i1"), rec("i2", "identify", id="i"), track("i2"),
        login("i3", "u9"), rec("i3", "identify", id="i"), track("i3"),
    ]
    run = run_replay(records)
    assert not run.dead
    expect(run, via_login("w1", L("u1")), via_login("m1", L("$identity_ali_mp_id+y")), via_login("i3", L("u9")))


# -- §2: releases --------------------------------------------------------------------------------------------------


def test_an_unbind_releases_the_claims_of_every_claimant_on_its_device_only() -> None:
    before_unbind = [
        # d1: u1 claims the phone, then (logged out, a new default ID r1) the device user D(d1, r1) claims it
        login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), rec("d1", "logout"), rec("d1", "reset_anonymous_id", id="r1"),
        bind("d1", MOBILE_KEY, PHONE),
        bind("d2", MOBILE_KEY, PHONE),
    ]
    run = run_replay(before_unbind)
    expect(run, via_login("d1", L("u1")), via_identity("d1", L("u1"), MOBILE_KEY, "r1"),
           via_identity("d2", L("u1"), MOBILE_KEY))
    # d1 unbinds: both its claims go (u1's and D(d1, r1)'s); d2's device user claim alone owns nothing
    run = run_replay([*before_unbind, unbind("d1", MOBILE_KEY, PHONE)])
    expect(run, via_login("d1", L("u1")))
    # u1's claim from d3 is not d1's to release: it still owns the phone
    run = run_replay([login("d3", "u1"), bind("d3", MOBILE_KEY, PHONE), *before_unbind,
                      unbind("d1", MOBILE_KEY, PHONE)])
    expect(run, via_login("d1", L("u1")), via_login("d3", L("u1")), via_identity("d2", L("u1"), MOBILE_KEY))
    # a later record of d1 carrying the phone claims it again, for its own user ID only
    run = run_replay([*before_unbind, unbind("d1", MOBILE_KEY, PHONE), bind("d1", MOBILE_KEY, PHONE)])
    expect(run, via_login("d1", L("u1")))
    run = run_replay([*before_unbind, unbind("d1", MOBILE_KEY, PHONE), login("d1", "u1", platform="mp-wechat"),
                      bind("d1", MOBILE_KEY, PHONE)])
    expect(run, via_login("d1", L("u1")), via_login("d1", L("u1"), "r1"), via_identity("d2", L("u1"), MOBILE_KEY))


def test_logout_login_reset_and_rebinding_release_nothing() -> None:
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), bind("d1", MOBILE_KEY, "13900000000"),
               rec("d1", "logout"), rec("d1", "reset_anonymous_id"), login("d1", "u2"),
               bind("d2", MOBILE_KEY, PHONE)]
    run = run_replay(records)
    generated = run.enriched[-2]["identities"]["$identity_mp_id"]
    expect(run, via_login("d1", L("u1")), via_login("d1", L("u2"), generated), via_identity("d2", L("u1"), MOBILE_KEY))


# -- §3: ownership ---------------------------------------------------------------------------------------------


def test_a_pair_claimed_by_two_login_users_merges_no_one() -> None:
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), login("d2", "u2"), bind("d2", MOBILE_KEY, PHONE),
               bind("d3", MOBILE_KEY, PHONE)]
    expect(run_replay(records), via_login("d1", L("u1")), via_login("d2", L("u2")))
    # two login users on one device share it too
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), rec("d1", "logout"), login("d1", "u2"),
               bind("d1", MOBILE_KEY, PHONE), bind("d3", MOBILE_KEY, PHONE)]
    expect(run_replay(records), via_login("d1", L("u1")))


@pytest.mark.parametrize(("max_devices", "owned"), [(2, False), (3, True), (50, True)])
def test_a_pair_on_more_devices_than_the_limit_has_no_owner(max_devices: int, owned: bool) -> None:
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), bind("d2", MOBILE_KEY, PHONE),
               bind("d3", MOBILE_KEY, PHONE)]
    run = run_replay(records, Config(max_devices=max_devices))
    mapped = [via_identity("d2", L("u1"), MOBILE_KEY), via_identity("d3", L("u1"), MOBILE_KEY)] if owned else []
    expect(run, via_login("d1", L("u1")), *mapped)
    # an unbind brings the pair back under the limit
    run = run_replay([*records, unbind("d3", MOBILE_KEY, PHONE)], Config(max_devices=2))
    expect(run, via_login("d1", L("u1")), via_identity("d2", L("u1"), MOBILE_KEY))


def test_claims_by_device_users_never_make_an_owner() -> None:
    records = [bind("d1", MOBILE_KEY, PHONE), bind("d2", MOBILE_KEY, PHONE), track("d2")]
    expect(run_replay(records))


# -- §4: the mapping -----------------------------------------------------------------------------------------------


def test_a_device_whose_first_record_is_a_login_is_mapped_via_login() -> None:
    run = run_replay([login("d1", "u1"), track("d1")])
    assert {r["user_id"] for r in run.enriched} == {L("u1")}  # no record carries D(d1, d1)
    expect(run, via_login("d1", L("u1")))


def test_later_logins_on_a_shared_device_change_nothing_for_the_first_device_user() -> None:
    records = [track("d1"), login("d1", "u1"), rec("d1", "logout"), login("d1", "u2"), rec("d1", "logout"),
               rec("d1", "set_customer_ids", customer_ids={"userid": {"id": "u3", "authState": 1}}),
               rec("d1", "set_customer_ids", customer_ids={"userid": {"id": "u3", "authState": 2}}),
               login("d1", EMAIL, EMAIL_KEY), rec("d1", "logout"), track("d1")]
    run = run_replay(records)
    assert [r["type"] for r in run.enriched].count("track_signup") == 4
    assert run.enriched[-1]["user_id"] == D("d1")  # later anonymous visits: still the first person's
    expect(run, via_login("d1", L("u1")))


def test_a_sign_up_from_set_customer_ids_maps_via_login() -> None:
    records = [track("d1"), rec("d1", "set_customer_ids", customer_ids={"userid": {"id": "u3", "authState": 1}})]
    expect(run_replay(records), via_login("d1", L("u3")))


def test_the_first_sign_up_counts_over_every_period_of_a_default_id() -> None:
    records = [
        track("d1"), rec("d1", "reset_anonymous_id", id="r1"), rec("d1", "reset_anonymous_id", id="d1"),
        login("d1", "u1"),  # D(d1, d1)'s first sign-up, in its second period
        rec("d1", "logout"), rec("d1", "reset_anonymous_id", id="r1"), login("d1", "u2"),  # D(d1, r1)
        rec("d1", "logout"), rec("d1", "reset_anonymous_id", id="d1"), login("d1", "u3"),  # nothing new
    ]
    expect(run_replay(records), via_login("d1", L("u1")), via_login("d1", L("u2"), "r1"))


def test_a_conflict_maps_nothing() -> None:
    owners = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), login("d2", "u2"), bind("d2", EMAIL_KEY, EMAIL)]
    records = [*owners, bind("d3", MOBILE_KEY, PHONE), bind("d3", EMAIL_KEY, EMAIL), track("d3")]
    expect(run_replay(records), via_login("d1", L("u1")), via_login("d2", L("u2")))
    # the conflict ends when d3 unbinds one of the pairs
    expect(run_replay([*records, unbind("d3", EMAIL_KEY, EMAIL)]), via_login("d1", L("u1")), via_login("d2", L("u2")),
           via_identity("d3", L("u1"), MOBILE_KEY))
    # pairs without an owner are ignored: a shared email beside an owned phone
    records = [*owners, login("d4", "u4"), bind("d4", EMAIL_KEY, EMAIL), bind("d3", MOBILE_KEY, PHONE),
               bind("d3", EMAIL_KEY, EMAIL)]
    expect(run_replay(records), via_login("d1", L("u1")), via_login("d2", L("u2")), via_login("d4", L("u4")),
           via_identity("d3", L("u1"), MOBILE_KEY))


def test_the_identity_key_is_the_first_owned_pair_by_the_utf8_bytes_of_key_plus_value() -> None:
    # "$identity_mobile$2+…" sorts before "$identity_mobile+…" ("$" < "+"), although the key is longer
    records = [login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE), bind("d1", "$identity_mobile$2", "13900000000"),
               bind("d2", MOBILE_KEY, PHONE), bind("d2", "$identity_mobile$2", "13900000000"),
               bind("d3", MOBILE_KEY, PHONE)]
    expect(run_replay(records), via_login("d1", L("u1")), via_identity("d2", L("u1"), "$identity_mobile$2"),
           via_identity("d3", L("u1"), MOBILE_KEY))


def test_mp_jd_maps_via_login_only() -> None:
    records = [
        login("d1", "u1"), bind("d1", MOBILE_KEY, PHONE),
        track("j1", "mp-jd"), login("j1", "u1", platform="mp-jd"),
        track("j2", "mp-jd"), bind("j2", MOBILE_KEY, PHONE, "mp-jd"), track("j2", "mp-jd"),
    ]
    run = run_replay(records)
    assert len(run.dead) == 1 and run.dead[0]["reason"] == "unsupported_on_platform"
    assert all("identities" not in r for r in run.enriched if r["platform"] == "mp-jd")
    expect(run, via_login("d1", L("u1")), via_login("j1", L("u1")))


# -- §1: user IDs, and what the mapping record holds --------------------------------------------------------------


@pytest.mark.parametrize("salt", ["", "pepper"])
def test_user_ids_are_the_specs_uuid5(salt: str) -> None:
    ns = uuid.uuid5(uuid.NAMESPACE_URL, "urn:streams:person:pepper" if salt else "urn:streams:person")
    device = "dé"  # len() counts code points: 2
    records = [
        track(device, "web"),
        login(device, "u1", platform="web"),
        login(device, EMAIL, EMAIL_KEY, platform="web"),
        unbind(device, EMAIL_KEY, EMAIL, platform="web"),  # logs out: the $UnbindID carries the device user
        rec(device, "reset_anonymous_id", "web", id="r1"),
        track(device, "web"),
        login("d2", "u1"), bind("d2", MOBILE_KEY, PHONE), bind(device, MOBILE_KEY, PHONE, "web"),
    ]
    run = run_replay(records, Config(salt=salt))
    user_ids = [r["user_id"] for r in run.enriched]
    first = str(uuid.uuid5(ns, "device:2:dédé"))
    second = str(uuid.uuid5(ns, "device:2:dér1"))
    u1 = str(uuid.uuid5(ns, "login:u1"))
    assert user_ids == [first, u1, str(uuid.uuid5(ns, "login:$identity_email+a@b.c")), first, second, u1, u1, second]
    assert run.mappings() == sorted([
        {"user_id": first, "person_id": u1, "via": "login", "device_id": device},
        {"user_id": second, "person_id": u1, "via": "identity", "device_id": device, "identity_key": MOBILE_KEY},
        {"user_id": str(uuid.uuid5(ns, "device:2:d2d2")), "person_id": u1, "via": "login", "device_id": "d2"},
    ], key=lambda m: m["user_id"])
    assert (uuid.UUID(first).version, uuid.UUID(u1).version) == (5, 5)
    if salt:  # the salt changes every user ID
        assert first != str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "urn:streams:person"), "device:2:dédé"))
    # the file is compact JSON, the keys in the spec's order, non-ASCII as UTF-8
    line = f'{{"user_id":"{second}","person_id":"{u1}","via":"identity","device_id":"dé",' \
        '"identity_key":"$identity_mobile"}'
    assert line.encode("utf-8") in run.persons.splitlines()


@pytest.mark.parametrize("hashed", [False, True], ids=["clear", "hashed"])
def test_the_mapping_record_never_holds_an_identity_value(hashed: bool) -> None:
    records = [login("d1", EMAIL, EMAIL_KEY), bind("d1", MOBILE_KEY, PHONE), track("d1"),
               bind("d2", MOBILE_KEY, PHONE), bind("d3", EMAIL_KEY, EMAIL), bind("d3", MOBILE_KEY, PHONE)]
    run = run_replay(records, Config(hashed_keys=HASHED if hashed else frozenset()))
    person = L(f"{EMAIL_KEY}+{hashlib.sha256(EMAIL.encode()).hexdigest() if hashed else EMAIL}")
    expect(run, via_login("d1", person), via_identity("d2", person, MOBILE_KEY), via_identity("d3", person, EMAIL_KEY))
    for value in (EMAIL, PHONE):
        for shown in (value, hashlib.sha256(value.encode()).hexdigest()):
            assert shown.encode() not in run.persons
