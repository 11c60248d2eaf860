"""Seed 000 (Sensors' mini-program guide to global user association), example by example, field for field.

Each case is one session from the guide: the raw records the app's calls become, and the records the guide
shows the SDK sending. `anonymous_id` on $UnbindID is the guide's (identity.md §3: the seed wins there).
"""

from __future__ import annotations

from typing import Any

import pytest

from .helpers import Session, identity_view

UUID1 = "1712042794795-4430041-097b46dd83f7da8-29832842"
UUID2 = "1712486830686-127572-0ddb5b17ab28868-11762623"
COOKIE = "18e84a8be997ff-00eab826c4cb1d48-1c525637-1296000-18e84a8be9aa30"
ANON = "your_customized_anonymous_id"
USER = "your_customer_id"
MOBILE = "187****8991"
REF = {"$referrer": "直接打开"}
VIEW_PROPS = {"$referrer": "直接打开", "$referrer_title": "", "$title": "", "$url_path": "pages/index/index"}


# the guide's sessions that begin with identify(ANON) and login(USER)
LOGGED_IN = [{"action": "identify", "id": ANON}, {"action": "login", "id": USER}]


def wx(anon: str, default: str, **extra: str) -> dict[str, str]:
    return {"$identity_mp_id": default, **extra, "$identity_anonymous_id": anon}


# (raw records, the records the guide shows for them, in order)
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "3.1 identify": (
        [
            {"action": "track", "event": "$MPViewScreen", "properties": VIEW_PROPS},
            {"action": "identify", "id": ANON},
            {"action": "track", "event": "$MPViewScreen", "properties": VIEW_PROPS},
        ],
        [
            {"anonymous_id": UUID1, "distinct_id": UUID1, "identities": wx(UUID1, UUID1),
             "event": "$MPViewScreen", "properties": VIEW_PROPS, "type": "track"},
            {"anonymous_id": ANON, "distinct_id": ANON, "identities": wx(ANON, UUID1),
             "event": "$MPViewScreen", "properties": VIEW_PROPS, "type": "track"},
        ],
    ),
    "3.2 login": (
        [
            {"action": "identify", "id": ANON},
            {"action": "track", "event": "$MPViewScreen", "properties": REF},
            {"action": "login", "id": USER, "properties": REF},
            {"action": "track", "event": "buttonClick", "properties": REF},
        ],
        [
            {"anonymous_id": ANON, "distinct_id": ANON, "identities": wx(ANON, UUID1),
             "event": "$MPViewScreen", "properties": REF, "type": "track"},
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER, "original_id": ANON,
             "identities": wx(ANON, UUID1, **{"$identity_login_id": USER}),
             "event": "$SignUp", "properties": REF, "type": "track_signup"},
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER,
             "identities": wx(ANON, UUID1, **{"$identity_login_id": USER}),
             "event": "buttonClick", "properties": REF, "type": "track"},
        ],
    ),
    "3.3 bind": (
        [
            *LOGGED_IN,
            {"action": "track", "event": "buttonClick", "properties": REF},
            {"action": "bind", "key": "$identity_mobile", "value": MOBILE, "properties": REF},
            {"action": "track", "event": "$MPViewScreen", "properties": REF},
        ],
        [
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER, "original_id": ANON,
             "identities": wx(ANON, UUID1, **{"$identity_login_id": USER}),
             "event": "$SignUp", "type": "track_signup"},
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER,
             "identities": wx(ANON, UUID1, **{"$identity_login_id": USER}),
             "event": "buttonClick", "properties": REF, "type": "track"},
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER,
             "identities": wx(ANON, UUID1, **{"$identity_login_id": USER, "$identity_mobile": MOBILE}),
             "event": "$BindID", "properties": REF, "type": "track_id_bind"},
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER,
             "identities": wx(ANON, UUID1, **{"$identity_login_id": USER, "$identity_mobile": MOBILE}),
             "event": "$MPViewScreen", "properties": REF, "type": "track"},
        ],
    ),
    "3.4 unbind": (
        [
            {"action": "identify", "id": ANON},
            {"action": "bind", "key": "$identity_mobile", "value": MOBILE},
            {"action": "track", "event": "$MPViewScreen", "properties": REF},
            {"action": "unbind", "key": "$identity_mobile", "value": MOBILE, "properties": REF},
            {"action": "track", "event": "$MPViewScreen", "properties": REF},
        ],
        [
            {"anonymous_id": ANON, "distinct_id": ANON,
             "identities": wx(ANON, UUID2, **{"$identity_mobile": MOBILE}),
             "event": "$BindID", "type": "track_id_bind"},
            {"anonymous_id": ANON, "distinct_id": ANON,
             "identities": wx(ANON, UUID2, **{"$identity_mobile": MOBILE}),
             "event": "$MPViewScreen", "properties": REF, "type": "track"},
            {"anonymous_id": ANON, "distinct_id": ANON, "identities": {"$identity_mobile": MOBILE},
             "event": "$UnbindID", "properties": REF, "type": "track_id_unbind"},
            {"anonymous_id": ANON, "distinct_id": ANON, "identities": wx(ANON, UUID2),
             "event": "$MPViewScreen", "properties": REF, "type": "track"},
        ],
    ),
    "3.5 logout": (
        [
            *LOGGED_IN,
            {"action": "track", "event": "$MPViewScreen", "properties": REF},
            {"action": "logout"},
            {"action": "track", "event": "$MPViewScreen", "properties": REF},
        ],
        [
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER, "original_id": ANON,
             "identities": wx(ANON, UUID2, **{"$identity_login_id": USER}),
             "event": "$SignUp", "type": "track_signup"},
            {"anonymous_id": ANON, "distinct_id": USER, "login_id": USER,
             "identities": wx(ANON, UUID2, **{"$identity_login_id": USER}),
             "event": "$MPViewScreen", "properties": REF, "type": "track"},
            {"anonymous_id": ANON, "distinct_id": ANON, "identities": wx(ANON, UUID2),
             "event": "$MPViewScreen", "properties": REF, "type": "track"},
        ],
    ),
}

DEVICE = {"3.1 identify": UUID1, "3.2 login": UUID1, "3.3 bind": UUID1, "3.4 unbind": UUID2, "3.5 logout": UUID2}


@pytest.mark.parametrize("name", list(CASES))
def test_seed_example(name: str) -> None:
    raws, expected = CASES[name]
    session = Session()
    got: list[dict[str, Any]] = []
    for raw in raws:
        got += session.send(device_id=DEVICE[name], platform="mp-wechat", **raw)
    assert [identity_view(r) for r in got] == expected


def test_seed_reset_anonymous_identity_on_the_web_key() -> None:
    """3.6: the guide's example carries `$identity_cookie_id`, the Web SDK's default key."""
    session = Session()
    props = {"$timezone_offset": -480}
    first = [
        *session.send(device_id=COOKIE, platform="web", action="identify", id=ANON),
        *session.send(device_id=COOKIE, platform="web", event="$MPViewScreen", properties=props),
    ]
    assert [identity_view(r) for r in first] == [
        {"anonymous_id": ANON, "distinct_id": ANON,
         "identities": {"$identity_cookie_id": COOKIE, "$identity_anonymous_id": ANON},
         "event": "$MPViewScreen", "properties": props, "type": "track"}
    ]
    assert session.send(device_id=COOKIE, platform="web", action="reset_anonymous_id", id="your_new_anonymous_id") == []
    after = session.send(device_id=COOKIE, platform="web", event="$MPViewScreen", properties=props)
    assert [identity_view(r) for r in after] == [
        {"anonymous_id": "your_new_anonymous_id", "distinct_id": "your_new_anonymous_id",
         "identities": {"$identity_cookie_id": "your_new_anonymous_id",
                        "$identity_anonymous_id": "your_new_anonymous_id"},
         "event": "$MPViewScreen", "properties": props, "type": "track"}
    ]


def test_reset_while_logged_in_changes_nothing() -> None:
    """3.6.2: only while anonymous; logged in, the call has no effect."""
    session = Session()
    session.send(device_id="d", platform="mp-alipay", action="login", id="u1")
    assert session.send(device_id="d", platform="mp-alipay", action="reset_anonymous_id", id="new") == []
    [rec] = session.send(device_id="d", platform="mp-alipay", event="e")
    assert rec["anonymous_id"] == "d"
    assert rec["identities"] == {"$identity_ali_mp_id": "d", "$identity_login_id": "u1", "$identity_anonymous_id": "d"}


def test_account_switch_recipe() -> None:
    """3.5.1: logout, then resetAnonymousIdentity, then login B: B's $SignUp has a fresh anonymous ID."""
    session = Session()
    dev = "1712042794795-4430041-097b46dd83f7da8-00000003"
    session.send(device_id=dev, platform="mp-alipay", action="login", id="userA")
    session.send(device_id=dev, platform="mp-alipay", action="logout")
    session.send(device_id=dev, platform="mp-alipay", action="reset_anonymous_id")
    [signup] = session.send(device_id=dev, platform="mp-alipay", action="login", id="userB")
    fresh = signup["anonymous_id"]
    assert fresh != dev
    assert signup["original_id"] == fresh
    assert signup["identities"] == {"$identity_ali_mp_id": fresh, "$identity_login_id": "userB",
                                    "$identity_anonymous_id": fresh}


def test_generated_ids_are_deterministic() -> None:
    def run() -> list[dict[str, Any]]:
        s = Session()
        s.send(device_id="d", platform="mp-baidu", action="reset_anonymous_id")
        s.send(device_id="d", platform="mp-baidu", action="reset_anonymous_id")
        return s.send(device_id="d", platform="mp-baidu", event="e")

    first, second = run(), run()
    assert first == second
    assert first[0]["anonymous_id"] not in ("d", "")
