-- identity_graph: the identifiers each person holds now, one row per (person, identity key, value), with the
-- number of devices that hold it.
-- A device holds the identities of its latest record (its records are in one partition of the enriched topic,
-- in their order), less the pairs an $UnbindID after that record dropped (an $UnbindID carries only the pair it
-- drops). The device's identifiers belong to the person of that record's user, through persons_latest.
CREATE OR REPLACE VIEW identity_graph AS
WITH records AS (
    SELECT kafka_topic, kafka_partition, kafka_offset, device_id, person_id, type
    FROM events_with_person
),
latest AS (
    SELECT kafka_topic, kafka_partition, kafka_offset, device_id, person_id
    FROM (
        SELECT r.*,
               ROW_NUMBER() OVER (PARTITION BY r.device_id
                                  ORDER BY r.kafka_partition DESC, r.kafka_offset DESC) AS newest
        FROM records r
        WHERE r.type <> 'track_id_unbind'
    ) ranked
    WHERE newest = 1
),
held AS (
    SELECT l.person_id, l.device_id, i.identity_key, i.identity_value
    FROM latest l
    JOIN enriched_identities i
      ON i.kafka_topic = l.kafka_topic AND i.kafka_partition = l.kafka_partition
     AND i.kafka_offset = l.kafka_offset
),
dropped AS (
    SELECT r.device_id, i.identity_key, i.identity_value
    FROM records r
    JOIN enriched_identities i
      ON i.kafka_topic = r.kafka_topic AND i.kafka_partition = r.kafka_partition
     AND i.kafka_offset = r.kafka_offset
    JOIN latest l ON l.device_id = r.device_id
    WHERE r.type = 'track_id_unbind' AND r.kafka_partition = l.kafka_partition AND r.kafka_offset > l.kafka_offset
)
SELECT h.person_id, h.identity_key, h.identity_value, COUNT(DISTINCT h.device_id) AS devices
FROM held h
LEFT JOIN dropped d
  ON d.device_id = h.device_id AND d.identity_key = h.identity_key AND d.identity_value = h.identity_value
WHERE d.device_id IS NULL
GROUP BY h.person_id, h.identity_key, h.identity_value;
