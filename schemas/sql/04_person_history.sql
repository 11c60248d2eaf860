-- person_history: each device user's mapping over time, from the identity change log's `mapping` rows: one row
-- per (user_id, version), the mapping that version set, valid from when it was decided until the next version
-- (valid_to NULL: the current one). An `unmapped` version has person_id NULL: the user was its own person then.
-- The mapping as of T (ms):
--   WHERE valid_from <= T AND (valid_to IS NULL OR valid_to > T) AND person_id IS NOT NULL
-- At-least-once delivery may write a row again after a crash, the same bytes under the same user_id and
-- version: one is kept. valid_from is the worker's processing time, else (replay's rows) the client time of the
-- record that caused the change; never earlier than a previous version's (a client clock, or a partition that
-- moved to a machine whose clock is behind, can go back), so that a user's intervals never overlap.
CREATE OR REPLACE VIEW person_history AS
WITH copies AS (
    SELECT c.*,
           ROW_NUMBER() OVER (PARTITION BY c.user_id, c.version ORDER BY c.kafka_partition, c.kafka_offset)
               AS copy_number
    FROM identity_changes c
    WHERE c.kind = 'mapping' AND c.user_id IS NOT NULL AND c.version IS NOT NULL
),
versions AS (
    SELECT user_id, version, op, person_id, previous_person_id, via, identity_key, device_id, conflict,
           MAX(COALESCE(processed_time, event_time))
               OVER (PARTITION BY user_id ORDER BY version ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
               AS valid_from,
           record_id, model
    FROM copies
    WHERE copy_number = 1
)
SELECT user_id, version, op, person_id, previous_person_id, via, identity_key, device_id, conflict, valid_from,
       LEAD(valid_from) OVER (PARTITION BY user_id ORDER BY version) AS valid_to,
       record_id, model
FROM versions;
