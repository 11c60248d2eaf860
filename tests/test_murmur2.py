"""The partitioner hash against aiokafka's reference implementation (itself a port of the Java client's)."""

from __future__ import annotations

from aiokafka.partitioner import murmur2 as reference
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.kafka.murmur2 import murmur2, partition_of


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_same_hash_as_aiokafka(data: bytes) -> None:
    assert murmur2(data) == reference(data)


@given(st.text(min_size=1, max_size=80), st.integers(min_value=1, max_value=64))
def test_partition_of_a_device_id(device_id: str, partitions: int) -> None:
    key = device_id.encode("utf-8", "surrogatepass")
    assert partition_of(key, partitions) == (reference(key) & 0x7FFFFFFF) % partitions
