"""The warehouse side: `python -m streams load --into FILE.duckdb` reads the enriched, dead-letter, persons and
identity change log topics into DuckDB tables and creates the views of `schemas/sql/` over them.

Lives here: the tables, one definition per topic (`tables.py`: a new topic is one definition more), the DuckDB
file with its loaded offsets, written in the same transaction as the rows they cover (`database.py`), the Kafka
loop without consumer group (`load.py`) and the command (`command.py`). Not here: the views' SQL, which is
portable and ships as files in `schemas/sql/`.
"""

CHUNK_RECORDS = 10_000  # records per DuckDB transaction, by default
