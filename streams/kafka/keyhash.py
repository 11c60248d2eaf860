"""Kafka's partitioner hash of many device IDs at once, and the worker's bounded cache of it.

Lives here: `murmur2_many`, the same hash as `streams.kafka.murmur2.murmur2` computed for a whole list of keys in
a few big-integer operations per 4-byte word instead of a dozen Python operations per word and key: keys of
one length are laid side by side, one per 64-bit lane of a Python int, and every step of murmur2 (a 32-bit
multiply, a shift, a xor) is done for all lanes at once. A lane holds a 32-bit value and a product of two
32-bit values fits in 64 bits, so no lane spills into the next; what a right shift brings down from the lane
above lands above bit 32 and is masked off. And `KeyHashes`, which keeps the hashes of recently seen devices
in two generations: when the young one is full it becomes the old one, so a device seen in the last
generation keeps its hash (a cache cleared whole forgets the busiest devices with the rest).

At a million devices most devices of a batch have not been seen lately; hashing them one at a time in
Python was 14% of the worker's CPU. A test checks `murmur2_many` against `murmur2` on keys of every length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from streams.kafka.murmur2 import murmur2
from streams.kafka.partitioners import key_hash

_M = 0x5BD1E995
_SEED = 0x9747B28C
# below this many keys of one length, one call per key costs less than setting up the lanes
_MIN_LANES = 8


def murmur2_many(keys: list[bytes]) -> list[int]:
    """`murmur2(k)` for every key, in order."""
    out = [0] * len(keys)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    for length, positions in by_length.items():
        if len(positions) < _MIN_LANES:
            for i in positions:
                out[i] = murmur2(keys[i])
            continue
        for i, h in zip(positions, _same_length([keys[i] for i in positions], length), strict=True):
            out[i] = h
    return out


def _same_length(keys: list[bytes], length: int) -> list[int]:
    n = len(keys)
    joined = b"".join(keys)
    lanes = bytearray(8 * n)
    mask = int.from_bytes(b"\xff\xff\xff\xff\0\0\0\0" * n, "little")
    one = int.from_bytes(b"\1\0\0\0\0\0\0\0" * n, "little")

    def word(start: int, size: int) -> int:
        """The lanes holding bytes start..start+size-1 of every key, little-endian (as murmur2 reads them)."""
        for b in range(4):
            lanes[b::8] = joined[start + b::length] if b < size else bytes(n)
        return int.from_bytes(lanes, "little")

    h = (_SEED ^ length) * one
    for w in range(length >> 2):
        k = (word(4 * w, 4) * _M) & mask
        k = ((k ^ (k >> 24)) & mask) * _M & mask
        h = ((h * _M) & mask) ^ k
    tail = length & 3
    if tail:
        h = ((h ^ word(length & ~3, tail)) * _M) & mask
    h = (h ^ (h >> 13)) & mask
    h = (h * _M) & mask
    h = (h ^ (h >> 15)) & mask
    return list(struct.unpack(f"<{n}Q", h.to_bytes(8 * n, "little")))


def _murmur2_many_positive(keys: list[bytes]) -> list[int]:
    return [h & 0x7FFFFFFF for h in murmur2_many(keys)]


class KeyHashes:
    """Device ID -> the producers' partitioner's hash of its UTF-8 (`streams.kafka.partitioners`), for the devices
    seen in the last one or two generations of `size` devices."""

    def __init__(self, size: int = 200_000, partitioner: str = "murmur2") -> None:
        self.size = size
        self.young: dict[str, int] = {}
        self.old: dict[str, int] = {}
        self.hash = key_hash(partitioner)
        self.hash_many = _murmur2_many_positive if partitioner == "murmur2" else self._one_by_one

    def get(self, device_id: str) -> int:
        h = self.young.get(device_id)
        if h is None:
            h = self.old.get(device_id)
            if h is None:
                h = self.hash(device_id.encode())
            self._add(device_id, h)
        return h

    def _one_by_one(self, keys: list[bytes]) -> list[int]:
        hash_ = self.hash
        return [hash_(k) for k in keys]

    def prepare(self, device_ids: Iterable[str]) -> None:
        """Hash, together, those of `device_ids` not in the cache (the devices of a batch, before it runs)."""
        young, old = self.young, self.old
        missing: list[str] = []
        for d in device_ids:
            if d not in young:
                h = old.get(d)
                if h is None:
                    missing.append(d)
                else:
                    self._add(d, h)
        if not missing:
            return
        missing = list(dict.fromkeys(missing))
        try:
            encoded = [d.encode() for d in missing]
        except UnicodeEncodeError:
            return  # a lone surrogate: such a record is refused before any hashing; leave it to `get`
        for d, h in zip(missing, self.hash_many(encoded), strict=True):
            self._add(d, h)

    def _add(self, device_id: str, h: int) -> None:
        if len(self.young) >= self.size:
            self.old, self.young = self.young, {}
        self.young[device_id] = h
