-- A Kommo delivery is a repeat only of the delivery received just before it. A lead moved from
-- one status to another, back, and then again the same way sends the same body twice with
-- another delivery between them: that second one is news, not a repeat, and was dropped while
-- each distinct body was kept only once. (A repeat that does get through is harmless: a status
-- the lead already has, or a lead Kommo already created here, changes nothing.)
ALTER TABLE kommo_webhook_events DROP CONSTRAINT kommo_webhook_events_source_payload_id_key;
CREATE INDEX kommo_webhook_events_received_idx ON kommo_webhook_events (created_at DESC, id DESC);
