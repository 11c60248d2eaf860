"""STREAMS_HASH_IDENTITY_KEYS: chosen identity keys' values never reach the state or an output in clear."""

from __future__ import annotations

import hashlib

from streams.enrich import EnrichSettings
from streams.identity import Settings

from ..helpers import Session


def test_hashed_identity_keys_never_hold_the_value() -> None:
    """STREAMS_HASH_IDENTITY_KEYS: the chosen keys' values are SHA-256 from the moment they are read."""
    settings = EnrichSettings(identity=Settings(hashed_keys=frozenset({"$identity_mobile", "$identity_email"})))
    session = Session(settings)
    digest = hashlib.sha256(b"13800001111").hexdigest()
    [bound] = session.send(device_id="d", platform="mp-wechat", action="bind", key="$identity_mobile",
                           value="13800001111")
    assert bound["identities"]["$identity_mobile"] == digest
    [signup] = session.send(device_id="d", platform="mp-wechat", action="login", key="$identity_email", id="a@b.c")
    email = hashlib.sha256(b"a@b.c").hexdigest()
    assert signup["login_id"] == f"$identity_email+{email}"
    assert signup["identities"]["$identity_email"] == email
    assert signup["identities"]["$identity_mobile"] == digest  # the bound pair rides on $SignUp, hashed
    # unbinding by the clear value finds the hashed pair, and logs out (the pair is the login ID)
    [unbound] = session.send(device_id="d", platform="mp-wechat", action="unbind", key="$identity_email",
                             value="a@b.c")
    assert unbound["identities"] == {"$identity_email": email}
    assert "login_id" not in unbound
    everything = b"".join(s.encode() for s in map(str, session.store.states.values()))
    assert b"a@b.c" not in everything and b"13800001111" not in everything
