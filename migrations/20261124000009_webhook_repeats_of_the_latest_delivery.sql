-- A Kommo delivery is a repeat only of the delivery received just before it. A lead moved from
-- one status to another, back, and then again the same way sends the same body twice with
-- another delivery between them: that second one is news, not a repeat, and was dropped while
-- each distinct body was kept only once. A body seen before is kept, and processing applies
-- its status only where it continues the lead's statuses (its `old_status_id` is the lead's
-- Kommo status): a late repeat of an older move changes nothing. A lead Kommo already created
-- here is not created twice either.
ALTER TABLE kommo_webhook_events DROP CONSTRAINT kommo_webhook_events_source_payload_id_key;
CREATE INDEX kommo_webhook_events_payload_idx ON kommo_webhook_events (source_payload_id);
CREATE INDEX kommo_webhook_events_received_idx ON kommo_webhook_events (created_at DESC, id DESC);
