"""An independent model of persons.md §1-§4, written from the spec's text.

What lives here: the spec's user IDs (§1) with Python's `uuid.uuid5` itself, and `PersonsModel`, which reads
raw records with the enriched records replay emitted for each, and computes the final persons mapping as sets:
- a claim is a tuple (device, claimant, key, value) in a set: claiming twice is one claim (§2);
- an `$UnbindID` of (key, value) on a device removes that device's claims of the pair, whatever their claimant;
- a pair is owned when exactly one login user claims it and at most `max_devices` devices do (§3);
- a device user maps via its device's first `$SignUp` under its default ID, else via the single owner of the
  owned pairs it claims (§4).

Nothing here imports `streams.persons`. Each device's logged-in state and default ID come from running
`streams.identity.apply` (the identity engine, tested on its own in `tests/identity`); the model checks that
the engine's records are the ones replay emitted, so a record it reads is never paired with the wrong raw one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.identity import DeviceState, Rejected, Settings, apply

# -- the spec's tables, copied by hand (identity.md §1, persons.md §2) -----------------------------------------

# identity.md §1: the key of each platform's default ID (None: no global user association)
DEFAULT_KEYS: dict[str, str | None] = {
    "mp-wechat": "$identity_mp_id",
    "mp-alipay": "$identity_ali_mp_id",
    "mp-baidu": "$identity_baidu_mp_id",
    "mp-bytedance": "$identity_byte_mp_id",
    "mp-feishu": "$identity_feishu_mp_id",
    "mp-taobao": "$identity_taobao_uuid",
    "mp-xiaohongshu": "$identity_xhs_mp_id",
    "web": "$identity_cookie_id",
    "mp-jd": None,
    "mp-kuaishou": None,
    "mp-qq": None,
}
LOGIN_KEY = "$identity_login_id"
ANONYMOUS_KEY = "$identity_anonymous_id"
# persons.md §2: pairs under these keys never claim
UNCLAIMED_KEYS = frozenset({k for k in DEFAULT_KEYS.values() if k is not None} | {ANONYMOUS_KEY, LOGIN_KEY})
# persons.md §2: the placeholders, compared after str.strip() then str.lower()
PLACEHOLDERS = frozenset(
    {"", "null", "undefined", "none", "nil", "0", "-1", "anonymous", "unknown", "[object object]"})


# -- §1: user IDs ------------------------------------------------------------------------------------------------


def namespace(salt: str = "") -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, "urn:streams:person:" + salt if salt else "urn:streams:person")


def login_user(ns: uuid.UUID, login_id: str) -> str:
    return str(uuid.uuid5(ns, "login:" + login_id))


def device_user(ns: uuid.UUID, device_id: str, default_id: str) -> str:
    return str(uuid.uuid5(ns, "device:" + str(len(device_id)) + ":" + device_id + default_id))


# -- §2-§4 -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    salt: str = ""
    max_devices: int = 50
    hashed_keys: frozenset[str] = frozenset()


def sent_text(value: Any) -> str | None:
    """A value as the client sent it, as text: a string as is, an integral number as its decimal."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def is_placeholder(text: str) -> bool:
    return text.strip().lower() in PLACEHOLDERS


@dataclass
class PersonsModel:
    config: Config = field(default_factory=Config)
    # (device, claimant, key, value): the active claims
    claims: set[tuple[str, str, str, str]] = field(default_factory=set)
    # claimants that are login users (every other claimant is a device user)
    login_users: set[str] = field(default_factory=set)
    # device user -> (device, default ID)
    device_users: dict[str, tuple[str, str]] = field(default_factory=dict)
    # device user -> the login user of its device's first $SignUp while its default ID was the device's
    first_signup: dict[str, str] = field(default_factory=dict)
    # hashed values (of hashed keys) whose clear value, as the client sent it, was a placeholder
    blocked_hashes: set[str] = field(default_factory=set)
    # how many claims unbinds released (for the statistics)
    released: int = 0

    @property
    def ns(self) -> uuid.UUID:
        return namespace(self.config.salt)

    def user_id(self, device_id: str, login_id: str | None, default_id: str) -> str:
        """§1: the login user while logged in, else the device user."""
        if login_id is not None:
            return login_user(self.ns, login_id)
        user = device_user(self.ns, device_id, default_id)
        self.device_users[user] = (device_id, default_id)
        return user

    def _sent(self, raw: Mapping[str, Any]) -> None:
        """Remember the hashes of placeholders the client sent under a hashed key (bind, login with a key)."""
        action = raw.get("action")
        key = raw.get("key")
        if action not in ("bind", "login") or key not in self.config.hashed_keys:
            return
        text = sent_text(raw.get("value") if action == "bind" else raw.get("id"))
        if text is not None and is_placeholder(text):
            self.blocked_hashes.add(hashlib.sha256(text.encode("utf-8")).hexdigest())

    def blocked(self, key: str, value: str) -> bool:
        if key in self.config.hashed_keys:
            return value in self.blocked_hashes
        return is_placeholder(value)

    def observe(self, device_id: str, raw: Mapping[str, Any], logged_in_before: bool, default_id: str,
                emitted: Sequence[Mapping[str, Any]]) -> None:
        """One raw record that was not refused, and what it emitted. `default_id`: the device's default ID
        while the record ran (no action that emits a record changes it)."""
        self._sent(raw)
        for record in emitted:
            kind = record["type"]
            identities: Mapping[str, str] = record.get("identities") or {}
            if kind == "track_id_unbind":
                for key, value in identities.items():
                    kept = {c for c in self.claims if not (c[0] == device_id and c[2:] == (key, value))}
                    self.released += len(self.claims) - len(kept)
                    self.claims = kept
                continue
            login_id = record.get("login_id")
            claimant = self.user_id(device_id, login_id, default_id)
            if kind == "track_signup":
                signed_up = device_user(self.ns, device_id, default_id)
                self.device_users[signed_up] = (device_id, default_id)
                self.first_signup.setdefault(signed_up, claimant)
                if logged_in_before:
                    continue  # it carries the previous login's pairs: they claim nothing
            if login_id is not None:
                self.login_users.add(claimant)
            for key, value in identities.items():
                if key in UNCLAIMED_KEYS or self.blocked(key, value):
                    continue
                self.claims.add((device_id, claimant, key, value))

    def claimants(self) -> tuple[dict[tuple[str, str], set[str]], dict[tuple[str, str], set[str]]]:
        """Per claimed pair: the devices that claim it, and the login users among its claimants."""
        devices: dict[tuple[str, str], set[str]] = {}
        logins: dict[tuple[str, str], set[str]] = {}
        for device, claimant, key, value in self.claims:
            devices.setdefault((key, value), set()).add(device)
            if claimant in self.login_users:
                logins.setdefault((key, value), set()).add(claimant)
        return devices, logins

    def owners(self) -> dict[tuple[str, str], str]:
        """§3: each owned pair's owner."""
        devices, logins = self.claimants()
        owned = {}
        for pair, users in logins.items():
            if len(users) == 1 and len(devices[pair]) <= self.config.max_devices:
                (owned[pair],) = users
        return owned

    def owned_by(self) -> dict[str, dict[str, set[tuple[str, str]]]]:
        """Device user -> owner -> the owned pairs of that owner the device user actively claims."""
        owned = self.owners()
        out: dict[str, dict[str, set[tuple[str, str]]]] = {}
        for _, claimant, key, value in self.claims:
            if claimant not in self.login_users:
                owners = out.setdefault(claimant, {})
                if (key, value) in owned:
                    owners.setdefault(owned[key, value], set()).add((key, value))
        return out

    def mappings(self) -> list[dict[str, str]]:
        """§4: every device user's mapping, sorted by user ID."""
        owned_by = self.owned_by()
        out = []
        for user in sorted(set(self.first_signup) | set(owned_by)):
            device_id = self.device_users[user][0]
            if user in self.first_signup:
                out.append({"user_id": user, "person_id": self.first_signup[user], "via": "login",
                            "device_id": device_id})
                continue
            if len(owned_by[user]) != 1:
                continue  # no owner, or a conflict
            ((person, pairs),) = owned_by[user].items()
            first = min(pairs, key=lambda p: (p[0] + "+" + p[1]).encode("utf-8"))
            out.append({"user_id": user, "person_id": person, "via": "identity", "device_id": device_id,
                        "identity_key": first[0]})
        return out

    def conflicts(self) -> set[str]:
        """Device users without a sign-up whose owned pairs have several owners (§4.3)."""
        return {u for u, owners in self.owned_by().items() if len(owners) > 1 and u not in self.first_signup}

    def several_owned_pairs(self) -> set[str]:
        """Device users mapped via identity through more than one pair (identity_key picks one)."""
        return {u for u, owners in self.owned_by().items()
                if len(owners) == 1 and u not in self.first_signup and len(next(iter(owners.values()))) > 1}

    def outcomes(self) -> set[str]:
        """What happened in this run, in words: how often each case comes up shows in hypothesis' statistics."""
        found = {f"via {m['via']}" for m in self.mappings()}
        devices, logins = self.claimants()
        if any(len(users) > 1 for users in logins.values()):
            found.add("a pair claimed by two login users")
        if any(len(users) == 1 and len(devices[p]) > self.config.max_devices for p, users in logins.items()):
            found.add("a pair of one login user on too many devices")
        if self.released:
            found.add("an unbind released claims")
        if self.conflicts():
            found.add("a device user in conflict")
        if self.several_owned_pairs():
            found.add("a device user mapped via identity through several pairs")
        if self.blocked_hashes:
            found.add("a hashed placeholder")
        return found

    def persons_file(self) -> bytes:
        return b"".join(json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
                        for m in self.mappings())


def model_run(raws: Sequence[Mapping[str, Any]], emitted: Sequence[Sequence[Mapping[str, Any]]],
              config: Config) -> PersonsModel:
    """Feed `raws` in order, with `emitted[i]` the records replay emitted for `raws[i]`. Each device's state
    is tracked with the identity engine; every emitted record is checked to be the engine's for that raw record,
    and its `user_id` to be the one of §1."""
    assert len(raws) == len(emitted)
    model = PersonsModel(config)
    settings = Settings(hashed_keys=config.hashed_keys)
    states: dict[str, DeviceState] = {}
    for raw, records in zip(raws, emitted, strict=True):
        device_id = raw["device_id"]
        before = states.get(device_id) or DeviceState.new(device_id)
        try:
            after, expected = apply(before, raw, settings)
        except Rejected:
            assert not records, f"replay emitted {records} for a record the engine refuses: {raw}"
            continue
        states[device_id] = after
        assert [{k: v for k, v in r.items() if k != "user_id"} for r in records] == expected, raw
        # every record carries the user ID of the device's state after the record (§1)
        for r in records:
            assert r["user_id"] == model.user_id(device_id, after.login_id, after.default_id), (raw, r)
        assert after.default_id == before.default_id or not records
        model.observe(device_id, raw, before.logged_in, after.default_id, records)
    return model
