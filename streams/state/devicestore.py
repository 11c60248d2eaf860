"""The device table's RocksDB store: Faust's, with its internal keys where no device ID can reach them.

Lives here: `DeviceStore` (Faust's rocksdict store whose persisted changelog offset lives under
`statekeys.OFFSET_KEY`, and which hides every internal key from the table's views) and `DeviceTable` (a Faust
table that opens it). Faust keeps its changelog offset under `__faust\\0offset__`, which a raw record whose
`device_id` is that string would overwrite, or read as a device state (a JSON string may hold a NUL).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faust
from faust.stores.rocksdb import Store
from yarl import URL

from streams.state.keys import OFFSET_KEY, is_internal


class DeviceStore(Store):
    offset_key = OFFSET_KEY

    def _visible_keys(self, db: Any) -> Iterator[bytes]:
        for key in super()._visible_keys(db):
            if not is_internal(key):
                yield key

    def _visible_items(self, db: Any) -> Iterator[tuple[bytes, bytes]]:
        for key, value in super()._visible_items(db):
            if not is_internal(key):
                yield key, value


class DeviceTable(faust.Table[bytes, bytes]):
    def _new_store_by_url(self, url: str | URL) -> Any:
        # Faust picks a store class by the URL's scheme from a global registry; this table always uses ours
        return DeviceStore(
            url,
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
        )
