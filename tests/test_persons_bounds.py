"""A client that never stops binding new values, or resetting and logging in, cannot grow its device's
persons part (stored inside its state, written to the changelog as one record) without bound."""

from __future__ import annotations

import orjson

from streams import codec
from streams.enrich import Enricher, EnrichSettings, MemoryStore
from streams.offline.persons import OfflinePersons
from streams.persons.device import MAX_CLAIMS, MAX_SIGNUPS


def run(records: list[dict[str, object]]) -> OfflinePersons:
    enricher, store, persons = Enricher(), MemoryStore(), OfflinePersons(EnrichSettings())
    for i, record in enumerate(records):
        outcome = enricher.step(orjson.dumps(record), {"line": i}, store)
        assert outcome.dead_letter is None
        persons.observe(outcome)
    return persons


def test_claims_stop_at_the_bound_and_an_unbind_makes_room() -> None:
    device = {"device_id": "adv", "platform": "mp-wechat"}
    binds = [{**device, "action": "bind", "key": "$identity_mobile", "value": f"v{i}"} for i in range(MAX_CLAIMS + 50)]
    persons = run(binds)
    part = persons.devices["adv"]
    assert part.claim_count() == MAX_CLAIMS
    assert len(codec.encode_state(persons_state(), None, part)) < codec.MAX_OUTPUT_BYTES // 4
    assert f"$identity_mobile+v{MAX_CLAIMS}" not in part.claims
    # releasing one makes room for the next claim: the next record's first pair (the phone bound last)
    last = f"$identity_mobile+v{MAX_CLAIMS + 49}"
    persons = run([*binds, {**device, "action": "unbind", "key": "$identity_mobile", "value": "v0"},
                   {**device, "action": "bind", "key": "$identity_email", "value": "new@x.io"}])
    claims = persons.devices["adv"].claims
    assert "$identity_mobile+v0" not in claims and last in claims and len(claims) == MAX_CLAIMS


def test_sign_ups_stop_at_the_bound() -> None:
    device = {"device_id": "adv", "platform": "mp-wechat"}
    records: list[dict[str, object]] = []
    for i in range(MAX_SIGNUPS + 20):
        records += [{**device, "action": "reset_anonymous_id", "id": f"a{i}"},
                    {**device, "action": "login", "id": f"u{i}"}, {**device, "action": "logout"}]
    assert len(run(records).devices["adv"].signups) == MAX_SIGNUPS


def persons_state():  # type: ignore[no-untyped-def]
    from streams.identity import DeviceState

    return DeviceState.new("adv")
