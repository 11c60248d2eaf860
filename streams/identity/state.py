"""A device's identity state: what the SDK keeps in its storage, as one immutable value.

Lives here: `DeviceState` and `CustomerId`, and what follows from them alone (the login ID, distinct_id,
the identities map a record carries, the customer IDs `getCustomerIDs()` returns). Immutable on purpose:
an action builds a new state, so a rejected record cannot leave a half-changed one behind, and a caller
can tell "unchanged" by identity (`new is old`) and skip the write.
Not here: how states are stored or serialised (`streams.codec`, the stores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .platforms import ANONYMOUS_KEY, LOGIN_KEY, Platform

CustomerIdValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class CustomerId:
    """One Adobe customer-ID entry. `id` None: an entry without id (kept, never emitted)."""

    id: CustomerIdValue | None
    auth_state: int = 0
    hash_type: str | None = None

    def visible(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "authState": self.auth_state}
        if self.hash_type is not None:
            out["hashType"] = self.hash_type
        return out


@dataclass(frozen=True, slots=True)
class DeviceState:
    anonymous_id: str
    # the value under the platform's default key: the device ID until reset_anonymous_id changes it
    default_id: str
    login_key: str | None = None
    login_value: str | None = None
    bound: tuple[tuple[str, str], ...] = ()
    customer_ids: tuple[tuple[str, CustomerId], ...] = ()
    # how many IDs this device has had generated (a deterministic UUID needs a fresh input each time)
    generated: int = 0
    _stamp: dict[str, Any] | None = field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def new(cls, device_id: str) -> DeviceState:
        return cls(anonymous_id=device_id, default_id=device_id)

    @property
    def logged_in(self) -> bool:
        return self.login_value is not None

    @property
    def login_id(self) -> str | None:
        if self.login_value is None:
            return None
        return self.login_value if self.login_key == LOGIN_KEY else f"{self.login_key}+{self.login_value}"

    @property
    def distinct_id(self) -> str:
        login_id = self.login_id
        return self.anonymous_id if login_id is None else login_id

    def stored_identities(self, platform: Platform) -> dict[str, str]:
        """The SDK's stored map: default ID, the login pair, the bound IDs (without the anonymous ID)."""
        assert platform.default_key is not None
        ids = {platform.default_key: self.default_id}
        if self.login_key is not None and self.login_value is not None:
            ids[self.login_key] = self.login_value
        ids.update(self.bound)
        return ids

    def identities(self, platform: Platform) -> dict[str, str]:
        ids = self.stored_identities(platform)
        ids[ANONYMOUS_KEY] = self.anonymous_id
        return ids

    def visible_customer_ids(self) -> dict[str, dict[str, Any]]:
        return {t: c.visible() for t, c in self.customer_ids if c.id is not None}

    def stamp(self, platform: Platform) -> dict[str, Any]:
        """The identity fields every record of this state carries (cached: tracks are most of the traffic).
        Callers copy the dict before adding their own fields and never mutate what it holds."""
        cached = self._stamp
        if cached is not None and cached["platform"] == platform.name:
            return cached
        login_id = self.login_id
        if login_id is None:
            out: dict[str, Any] = {"distinct_id": self.anonymous_id, "anonymous_id": self.anonymous_id}
        else:
            out = {"distinct_id": login_id, "anonymous_id": self.anonymous_id, "login_id": login_id}
        default_key = platform.default_key
        if default_key is not None:
            if login_id is None and not self.bound:  # the common case, built directly
                out["identities"] = {default_key: self.default_id, ANONYMOUS_KEY: self.anonymous_id}
            else:
                out["identities"] = self.identities(platform)
        if self.customer_ids:
            customer_ids = self.visible_customer_ids()
            if customer_ids:
                out["customer_ids"] = customer_ids
        out["platform"] = platform.name
        object.__setattr__(self, "_stamp", out)
        return out
