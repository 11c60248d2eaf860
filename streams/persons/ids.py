"""User IDs (persons.md §1): a login user per login ID, a device user per device and default ID.

Python's `uuid.uuid5`, written out: building a `uuid.UUID` and formatting it costs more than the SHA-1, and
every enriched record carries one of these.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any


def _uuid5(namespace: Any, name: str) -> str:
    """`str(uuid.uuid5(NS, name))`; `namespace`: a SHA-1 that has read NS's bytes."""
    h = namespace.copy()
    h.update(name.encode("utf-8", "surrogatepass"))
    x = h.hexdigest()
    # the version nibble becomes 5, the variant bits 10 (RFC 4122)
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{'89ab'[int(x[16], 16) & 3]}{x[17:20]}-{x[20:32]}"


class UserIds:
    """The namespace of one deployment (`STREAMS_PERSON_SALT`) and the two kinds of user ID in it."""

    __slots__ = ("namespace", "salted")

    def __init__(self, salt: str = "") -> None:
        name = "urn:streams:person:" + salt if salt else "urn:streams:person"
        self.namespace = hashlib.sha1(uuid.uuid5(uuid.NAMESPACE_URL, name).bytes)
        self.salted = bool(salt)

    def login_user(self, login_id: str) -> str:
        return _uuid5(self.namespace, "login:" + login_id)

    def device_user(self, device_id: str, default_id: str) -> str:
        return _uuid5(self.namespace, "device:" + str(len(device_id)) + ":" + device_id + default_id)

    def pair_hash(self, pair: str) -> str:
        """An identity pair's value, as the identity change log names it: hashed in this namespace, so that
        without the salt it cannot be looked up from a guessed value."""
        return _uuid5(self.namespace, "pair:" + pair)
