-- The client and KPI projections derived a booking's outstanding amount by adding each change of
-- its total to the previous outstanding amount, clamped at zero: once a booking had been paid
-- beyond a lower total, a later increase showed as owed in full. They now keep what has been
-- paid, and derive the outstanding amount as the booking does: greatest(total - paid, 0).
--
-- Existing rows take the paid amount from the bookings read model (payments set it absolutely,
-- so events the client or KPI projection applies after this only move it on), else
-- total - outstanding; then the outstanding amounts and the sums over them are derived again.
ALTER TABLE client_booking_facts ADD COLUMN paid_amount numeric(12, 2);
UPDATE client_booking_facts f
SET paid_amount = coalesce((SELECT b.paid_amount FROM bookings b WHERE b.id = f.booking_id),
                           f.total_amount - f.outstanding_amount);
UPDATE client_booking_facts SET outstanding_amount = greatest(total_amount - paid_amount, 0);
ALTER TABLE client_booking_facts ALTER COLUMN paid_amount SET NOT NULL;

UPDATE clients c
SET outstanding_amount = coalesce((SELECT sum(f.outstanding_amount) FROM client_booking_facts f
                                   WHERE f.client_id = c.id AND NOT f.cancelled), 0);

ALTER TABLE kpi_booking_facts ADD COLUMN paid_amount numeric(12, 2);
UPDATE kpi_booking_facts f
SET paid_amount = coalesce((SELECT b.paid_amount FROM bookings b WHERE b.id = f.booking_id),
                           f.total_amount - f.outstanding_amount);
UPDATE kpi_booking_facts SET outstanding_amount = greatest(total_amount - paid_amount, 0);
ALTER TABLE kpi_booking_facts ALTER COLUMN paid_amount SET NOT NULL;

UPDATE kpi_totals
SET outstanding_amount = (SELECT coalesce(sum(outstanding_amount), 0) FROM kpi_booking_facts
                          WHERE status <> 'cancelled');
