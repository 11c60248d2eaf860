"""A chunk's records of one table handed to DuckDB as a file, one record a line (partition, offset, timestamp,
key, then the value as it came), which its CSV reader reads.

Binding a chunk as long string parameters and splitting them in SQL (`staging.staging_sql`) cost the load most
of its time: DuckDB turns the split into a list value element by element. Its CSV reader instead fills its
vectors directly, and in parallel. A file can carry only what a line can hold, so a chunk goes this way only
when none of its values and keys holds a newline, a carriage return (which may end a line too) or a NUL, and
none is empty (`ChunkFiles.write`): C-level passes over the bytes. Any other chunk takes the parameters, and so
does one that DuckDB refuses: a field delimiter in a key or value gives its line a field too many, and the
reader refuses invalid UTF-8 (`staging.Unfit`).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import cast

from streams.warehouse.tables import Columns

DELIMITER = b"\x1f"
UNSAFE = (b"\r", b"\x00")  # and a newline, counted
BUFFER_BYTES = 4 * 1024 * 1024  # what each of DuckDB's threads reads at a time: a chunk's file is split between them
LONGEST_LINE = 2 * 1024 * 1024  # DuckDB's default: a longer record fails its chunk's query (and takes the parameters)


def scratch_dir() -> Path:
    """A directory of this user's own for the files: in memory (/dev/shm) where there is one. A file is
    written once a chunk and read back at once: a disk would only add writes."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    path = base / f"streams-load-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return Path(tempfile.mkdtemp(prefix="streams-load-"))
    # a world-writable base: someone else's directory (or link) of that name is not used
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return Path(tempfile.mkdtemp(prefix="streams-load-"))
    return path


def quoted(text: str | Path) -> str:
    """An SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


class ChunkFiles:
    """The file of the DuckDB file at `database`, named after it: a load killed mid-chunk leaves it behind, and
    the next load of the same file (DuckDB lets one process open it) writes over it."""

    def __init__(self, database: str, directory: Path | None = None) -> None:
        directory = directory or scratch_dir()
        self.path = directory / (hashlib.sha256(os.path.abspath(database).encode()).hexdigest()[:24] + ".records")

    def write(self, records: Columns) -> bool:
        """The records into the file, when each one is safe in a line: True; else False. A tombstone (None) has
        no line: an empty field is read as NULL. Its key may be None (written empty), not empty."""
        keys = records.keys
        if not all(records.values) or None in records.timestamps or b"" in keys:
            return False
        timestamps = cast(list[int], records.timestamps)
        prefixes = [b"%d\x1f%d\x1f%d\x1f%s\x1f" % (p, o, t, k or b"") for p, o, t, k in
                    zip(records.partitions, records.offsets, timestamps, keys, strict=True)]
        lines = [b"\n"] * (3 * len(prefixes))
        lines[0::3] = prefixes
        lines[1::3] = cast(list[bytes], records.values)
        text = b"".join(lines)
        if text.count(b"\n") != len(prefixes) or any(c in text for c in UNSAFE):
            return False
        with open(self.path, "wb") as f:
            f.write(text)
        return True

    def sql(self) -> str:
        """The file's rows: kafka_partition, kafka_offset, kafka_timestamp, kafka_key, value_json."""
        return (f"read_csv({quoted(self.path)}, header = false, delim = '{DELIMITER.decode()}', quote = '', "
                f"escape = '', auto_detect = false, new_line = '\\n', max_line_size = {LONGEST_LINE}, "
                f"buffer_size = {BUFFER_BYTES}, columns = {{'kafka_partition': 'INTEGER', 'kafka_offset': 'BIGINT', "
                "'kafka_timestamp': 'BIGINT', 'kafka_key': 'VARCHAR', 'value_json': 'VARCHAR'})")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
