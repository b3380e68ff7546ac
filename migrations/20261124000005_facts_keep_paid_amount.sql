-- The client and KPI projections derived a booking's outstanding amount by adding each change of
-- its total to the previous outstanding amount, clamped at zero: once a booking had been paid
-- beyond a lower total, a later increase showed as owed in full. They now keep what has been
-- paid, and derive the outstanding amount as the booking does: greatest(total - paid, 0).
--
-- Existing rows: paid = total - outstanding, exact for every booking never paid beyond its
-- total; `POST /v1/projections/{name}/rebuild` (clients, kpis) recomputes the others from the
-- events.
ALTER TABLE client_booking_facts ADD COLUMN paid_amount numeric(12, 2);
UPDATE client_booking_facts SET paid_amount = total_amount - outstanding_amount;
ALTER TABLE client_booking_facts ALTER COLUMN paid_amount SET NOT NULL;

ALTER TABLE kpi_booking_facts ADD COLUMN paid_amount numeric(12, 2);
UPDATE kpi_booking_facts SET paid_amount = total_amount - outstanding_amount;
ALTER TABLE kpi_booking_facts ALTER COLUMN paid_amount SET NOT NULL;
