-- Sums over every KPI fact, kept up to date by differences as facts change, so a day's snapshot
-- reads one row instead of rescanning the facts (whose number grows with history). Part of the
-- kpis projection: rebuilt and compared with the rest of its tables.
CREATE TABLE kpi_totals
(
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    active_bookings    bigint  NOT NULL DEFAULT 0,
    outstanding_amount numeric NOT NULL DEFAULT 0,
    pipeline_value     numeric NOT NULL DEFAULT 0,
    leads_won          bigint  NOT NULL DEFAULT 0,
    leads_lost         bigint  NOT NULL DEFAULT 0,
    active_deals       bigint  NOT NULL DEFAULT 0
);

INSERT INTO kpi_totals (id, active_bookings, outstanding_amount, pipeline_value, leads_won, leads_lost, active_deals)
SELECT true,
       (SELECT count(*) FROM kpi_booking_facts WHERE status IN ('confirmed', 'delivery', 'in_progress')),
       (SELECT coalesce(sum(outstanding_amount), 0) FROM kpi_booking_facts WHERE status <> 'cancelled'),
       (SELECT coalesce(sum(value_amount * probability), 0) FROM kpi_lead_facts WHERE status = 'active'),
       (SELECT count(*) FROM kpi_lead_facts WHERE status = 'won'),
       (SELECT count(*) FROM kpi_lead_facts WHERE status = 'lost'),
       (SELECT count(*) FROM kpi_deal_facts WHERE status = 'active')
WHERE EXISTS (SELECT 1 FROM kpi_booking_facts UNION ALL SELECT 1 FROM kpi_lead_facts UNION ALL SELECT 1 FROM kpi_deal_facts);

-- A snapshot looks only at bookings that overlap its 30-day window.
CREATE INDEX kpi_booking_facts_usage_idx ON kpi_booking_facts (end_at) WHERE vehicle_id IS NOT NULL;
