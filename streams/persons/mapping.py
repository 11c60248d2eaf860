"""A device user's mapping to a person (persons.md §4), and the record that says so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOGIN = "login"
IDENTITY = "identity"


@dataclass(frozen=True, slots=True)
class Mapping:
    user_id: str  # the device user
    person_id: str  # the login user it belongs to
    via: str  # LOGIN or IDENTITY
    device_id: str
    identity_key: str | None = None  # via identity: the key of the pair that decided it (never the value)

    def record(self) -> dict[str, Any]:
        """The mapping record, keys in the spec's order."""
        out: dict[str, Any] = {"user_id": self.user_id, "person_id": self.person_id, "via": self.via,
                               "device_id": self.device_id}
        if self.identity_key is not None:
            out["identity_key"] = self.identity_key
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Mapping:
        return cls(record["user_id"], record["person_id"], record["via"], record["device_id"],
                   record.get("identity_key"))
