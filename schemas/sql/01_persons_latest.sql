-- persons_latest: the persons mapping as it stands, one row per device user that has one (persons.md §4).
-- A user_id without a row is its own person: a login user, or a device user mapped to no one.
-- The loader keeps `persons` at the persons topic's latest value per key, a tombstone deleting the row, as the
-- compacted topic itself does; a warehouse that appends every record instead takes the latest per key here.
CREATE OR REPLACE VIEW persons_latest AS
SELECT user_id, person_id, via, device_id, identity_key
FROM persons
WHERE person_id IS NOT NULL;
