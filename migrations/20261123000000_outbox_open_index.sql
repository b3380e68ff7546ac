-- Claiming walks the open rows in log order and stops after a batch, instead of sorting every
-- open row on each claim; whether an earlier row of the same entity and target is still open is
-- looked up among open rows only (not through every processed row of that entity). The claim
-- query is in outbox-worker's worker.rs.
CREATE INDEX integrations_outbox_open_idx ON integrations_outbox (source_position)
    WHERE status IN ('pending', 'processing');
CREATE INDEX integrations_outbox_open_entity_idx
    ON integrations_outbox (entity_id, target_system, source_position)
    WHERE status IN ('pending', 'processing');
