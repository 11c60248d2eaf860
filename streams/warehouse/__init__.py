"""The warehouse side: `python -m streams load --into FILE.duckdb` reads the enriched, dead-letter, persons and
identity change log topics into DuckDB tables and creates the views of `schemas/sql/` over them.

Lives here: the tables, one definition per topic (`tables.py`: a new topic is one definition more), the DuckDB
file with its loaded offsets, written in the same transaction as the rows they cover (`database.py`), how a
chunk's records reach its tables (`staging.py`, through a file: `files.py`), the Kafka loop without consumer
group (`load.py`) and the command (`command.py`). Not here: the views' SQL, which is portable and ships as files
in `schemas/sql/`.
"""

# records per DuckDB transaction, by default: two row groups of the enriched table (database.ROW_GROUP_ROWS),
# which DuckDB then writes compressed once (a chunk of fewer rows is logged, and compressed at checkpoints)
CHUNK_RECORDS = 65_536
