"""Device states between the engine and durable storage: a per-batch transaction with a bounded cache.

Lives here: `CachedStore`, which the enrich step reads and writes. Reads see the batch's own writes; each
changed device is encoded and written once per flush, however many of its records the batch held (as
Quix Streams' and Kafka Streams' state transactions do). Clean states stay in a bounded LRU cache so memory
does not grow with the number of devices. And `RocksBackend`, RocksDB through rocksdict, for `replay
--state-dir`. The worker plugs in its own backend over its Faust table (`streams.worker.app`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol

from rocksdict import Options, Rdict, WriteBatch

from streams import codec
from streams.identity import DeviceState


class Backend(Protocol):
    def read(self, device_id: str) -> bytes | None: ...

    def read_many(self, device_ids: list[str]) -> list[bytes | None]: ...

    def write(self, items: Iterable[tuple[str, bytes]]) -> None: ...


# a cache lookup's answer when the device is not in the cache (None there means: nothing stored)
_MISSING: Any = object()


class CachedStore:
    def __init__(self, backend: Backend, cache_size: int = 100_000) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self.clean: OrderedDict[str, DeviceState | None] = OrderedDict()
        self.dirty: dict[str, DeviceState] = {}

    def get(self, device_id: str) -> DeviceState | None:
        state = self.dirty.get(device_id)
        if state is not None:
            return state
        clean = self.clean
        cached = clean.get(device_id, _MISSING)
        if cached is not _MISSING:
            clean.move_to_end(device_id)
            return cached  # type: ignore[no-any-return]
        data = self.backend.read(device_id)
        state = None if data is None else codec.decode_state(data)
        self._remember(device_id, state)
        return state

    def put(self, device_id: str, state: DeviceState) -> None:
        self.dirty[device_id] = state

    def prefetch(self, device_ids: Iterable[str]) -> None:
        """Read the states of those devices that are neither changed nor cached in one multi-get, and cache
        them (devices with nothing stored too): the devices of the next lines, before they run. A cache warm
        only: an ID spelled wrong reads a state that no record asks for."""
        clean, dirty = self.clean, self.dirty
        wanted = [d for d in dict.fromkeys(device_ids) if d not in dirty and d not in clean]
        if not wanted:
            return
        # more than the cache holds would evict what was just read
        wanted = wanted[:self.cache_size]
        decode = codec.decode_state
        for device_id, data in zip(wanted, self.backend.read_many(wanted), strict=True):
            clean[device_id] = None if data is None else decode(data)  # new keys: at the end already
        for _ in range(len(clean) - self.cache_size):
            clean.popitem(last=False)

    def flush(self) -> list[tuple[str, bytes]]:
        """Write every changed device once; returns what was written (the worker changelogs it)."""
        if not self.dirty:
            return []
        items = [(device_id, codec.encode_state(state)) for device_id, state in self.dirty.items()]
        self.backend.write(items)
        for device_id, state in self.dirty.items():
            self._remember(device_id, state)
        self.dirty.clear()
        return items

    def _remember(self, device_id: str, state: DeviceState | None) -> None:
        self.clean[device_id] = state
        self.clean.move_to_end(device_id)
        while len(self.clean) > self.cache_size:
            self.clean.popitem(last=False)


def write_batch(items: Iterable[tuple[bytes, bytes | None]]) -> WriteBatch:
    """One RocksDB write batch of raw keys and values; a value None deletes its key."""
    batch = WriteBatch(raw_mode=True)
    for key, value in items:
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    return batch


def rocksdb_options(block_cache_mb: int = 64) -> Options:
    from rocksdict import BlockBasedOptions, Cache

    options = Options(raw_mode=True)
    options.create_if_missing(True)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(block_cache_mb << 20))
    # 10 bits a key: ~1% false positives. With millions of devices most lookups are of devices with
    # nothing stored, and without a filter each would read a data block of every level
    table.set_bloom_filter(10, False)
    options.set_block_based_table_factory(table)
    # bounded memtables: 2 x 16 MiB instead of RocksDB's 3 x 64 MiB
    options.set_write_buffer_size(16 << 20)
    options.set_max_write_buffer_number(2)
    # a bloom filter over the memtable's keys too: most lookups are of keys that are not there
    options.set_memtable_whole_key_filtering(True)
    options.set_memtable_prefix_bloom_ratio(0.1)
    return options


class RocksBackend:
    """Device states in one RocksDB database, key = device ID (UTF-8), value = `codec.encode_state`."""

    def __init__(self, path: str, block_cache_mb: int = 64) -> None:
        self.db = Rdict(path, rocksdb_options(block_cache_mb))

    def read(self, device_id: str) -> bytes | None:
        value = self.db.get(device_id.encode())
        return value if isinstance(value, bytes) else None

    def read_many(self, device_ids: list[str]) -> list[bytes | None]:
        """One RocksDB multi-get."""
        # a lone surrogate gives bytes that are no UTF-8: no such key is stored (the engine refuses the ID)
        keys: list[str | int | float | bytes | bool] = [d.encode(errors="surrogatepass") for d in device_ids]
        values: list[Any] = self.db.get(keys)  # type: ignore[assignment]
        return [v if isinstance(v, bytes) else None for v in values]

    def write(self, items: Iterable[tuple[str, bytes]]) -> None:
        batch = WriteBatch(raw_mode=True)
        for device_id, data in items:
            batch.put(device_id.encode(), data)
        self.db.write(batch)

    def write_raw(self, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Keys as they are (None: delete), in one write batch: the persons stage's part of the database."""
        self.db.write(write_batch(items))

    def close(self) -> None:
        self.db.close()
