-- Rows for one Kommo lead come from the lead and from every booking won from it. Each entity's
-- rows went out in log order on their own, so a retried row of the lead could land after a later
-- booking's row and put an older status back. A booking's Kommo lead status row is now a row of
-- its lead (entity `lead`, the lead's id) naming the booking (`payload.booking_id`): the worker
-- sends one entity's rows in log order, one at a time.
--
-- Rows derived before this move under their lead the same way (history too, so that a requeued
-- dead letter also takes its turn).
WITH moved AS (
    SELECT o.id,
           (SELECT (e.payload -> 'BookingCreated' ->> 'lead_id')::uuid
            FROM events e
            WHERE e.aggregate_type = 'Booking' AND e.aggregate_id = o.entity_id::text
              AND e.event_type = 'BookingCreated'
            ORDER BY e.sequence
            LIMIT 1) AS lead_id
    FROM integrations_outbox o
    WHERE o.entity_type = 'booking' AND o.target_system = 'kommo' AND o.event_type = 'lead.status'
)
UPDATE integrations_outbox o
SET entity_type = 'lead',
    entity_id = m.lead_id,
    payload = o.payload || jsonb_build_object('booking_id', o.entity_id)
FROM moved m
WHERE m.id = o.id AND m.lead_id IS NOT NULL;
