"""The batched partitioner hash against the one-key hash, and the two-generation cache in front of it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.kafka.keyhash import KeyHashes, murmur2_many
from streams.kafka.murmur2 import murmur2


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=80), max_size=40), st.integers(min_value=0, max_value=70),
       st.integers(min_value=0, max_value=30))
def test_many_keys_hash_as_one_key_each(keys: list[bytes], length: int, same: int) -> None:
    # keys of one length side by side in lanes (more than a handful of them), the rest one at a time
    keys = keys + [bytes((i * 7 + j) % 256 for j in range(length)) for i in range(same)]
    assert murmur2_many(keys) == [murmur2(k) for k in keys]


def test_device_ids_of_one_length() -> None:
    keys = [f"1707475699896-{i:07d}-eeb6a444ec0271f-{i * 31:08d}".encode() for i in range(5000)]
    assert murmur2_many(keys) == [murmur2(k) for k in keys]


def test_the_cache_gives_the_partitioner_hash_and_keeps_the_last_generation() -> None:
    hashes = KeyHashes(size=10)
    ids = [f"device-{i}" for i in range(25)]
    hashes.prepare(ids)
    assert [hashes.get(d) for d in ids] == [murmur2(d.encode()) & 0x7FFFFFFF for d in ids]
    assert len(hashes.young) <= 10 and len(hashes.old) <= 10
    # the newest devices are still there: what the young generation held when it filled is the old one
    assert ids[-1] in hashes.young or ids[-1] in hashes.old
    assert hashes.get("é-device") == murmur2("é-device".encode()) & 0x7FFFFFFF
