"""User IDs (persons.md §1): a login user per login ID, a device user per device and default ID.

Python's `uuid.uuid5`, written out: building a `uuid.UUID` and formatting it costs more than the SHA-1, and
every enriched record carries one of these.
"""

from __future__ import annotations

import hashlib
import uuid


def _uuid5(namespace: bytes, name: str) -> str:
    h = bytearray(hashlib.sha1(namespace + name.encode("utf-8", "surrogatepass")).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


class UserIds:
    """The namespace of one deployment (`STREAMS_PERSON_SALT`) and the two kinds of user ID in it."""

    __slots__ = ("namespace", "salted")

    def __init__(self, salt: str = "") -> None:
        name = "urn:streams:person:" + salt if salt else "urn:streams:person"
        self.namespace = uuid.uuid5(uuid.NAMESPACE_URL, name).bytes
        self.salted = bool(salt)

    def login_user(self, login_id: str) -> str:
        return _uuid5(self.namespace, "login:" + login_id)

    def device_user(self, device_id: str, default_id: str) -> str:
        return _uuid5(self.namespace, "device:" + str(len(device_id)) + ":" + device_id + default_id)
