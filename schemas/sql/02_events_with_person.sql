-- events_with_person: every enriched record once per record_id, attributed to its person.
-- At-least-once delivery may write a record again after a crash, byte for byte under the same record_id: the
-- first copy is kept (a record without record_id, not written by the worker, is kept as it is). The person is
-- the device user's current mapping, else the user itself, so a change of persons_latest re-attributes the
-- records without rewriting them.
CREATE OR REPLACE VIEW events_with_person AS
WITH copies AS (
    SELECT e.*,
           ROW_NUMBER() OVER (PARTITION BY e.record_id ORDER BY e.kafka_partition, e.kafka_offset) AS copy_number
    FROM enriched e
)
SELECT c.kafka_topic, c.kafka_partition, c.kafka_offset, c.kafka_timestamp,
       c.record_id, c.device_id, c.user_id,
       COALESCE(p.person_id, c.user_id) AS person_id,
       c.distinct_id, c.anonymous_id, c.login_id, c.original_id, c.platform, c.type, c.event, c.time,
       c.value_json
FROM copies c
LEFT JOIN persons_latest p ON p.user_id = c.user_id
WHERE c.copy_number = 1 OR c.record_id IS NULL;
