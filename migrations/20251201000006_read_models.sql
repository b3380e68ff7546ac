-- Read models (SPEC §3), under the seeds' table names. They are written only by the projections
-- (crates/projections), each row stamped with the global position of the event that last changed
-- it, and can be rebuilt from the log at any time: nothing here is a source of truth. Columns
-- are deterministic functions of the events (and, for time-driven ones, of the tick's clock).

CREATE TABLE bookings
(
    id                     uuid PRIMARY KEY,
    external_code          text           NOT NULL UNIQUE,
    client_id              uuid           NOT NULL,
    vehicle_id             uuid,
    driver_id              uuid,
    owner_id               uuid           NOT NULL,
    lead_id                uuid,
    status                 booking_status NOT NULL,
    booking_type           booking_type   NOT NULL,
    priority               priority_level NOT NULL,
    channel                text           NOT NULL,
    start_at               timestamptz    NOT NULL,
    end_at                 timestamptz    NOT NULL,
    rental_duration_days   int            NOT NULL,
    currency               text           NOT NULL,
    price_daily            numeric(12, 2) NOT NULL,
    total_amount           numeric(12, 2) NOT NULL,
    paid_amount            numeric(12, 2) NOT NULL DEFAULT 0,
    outstanding_amount     numeric(12, 2) NOT NULL,
    deposit_amount         numeric(12, 2) NOT NULL,
    advance_payment        numeric(12, 2) NOT NULL,
    full_insurance_fee     numeric(12, 2) NOT NULL,
    pickup_location        text,
    dropoff_location       text,
    kommo_status_id        bigint,
    zoho_sales_order_id    text,
    zoho_sync_status       text,
    zoho_sync_error        text,
    sales_service_rating   smallint,
    sales_service_feedback text,
    delivery_promised_at   timestamptz,
    delivery_actual_at     timestamptz,
    delivered_on_time      boolean,
    pickup_mileage_km      int,
    return_mileage_km      int,
    returned_at            timestamptz,
    cancel_reason          text,
    status_changed_at      timestamptz    NOT NULL,
    created_at             timestamptz    NOT NULL,
    updated_at             timestamptz    NOT NULL,
    version                bigint         NOT NULL,
    last_position          bigint         NOT NULL
);
CREATE INDEX bookings_client_idx ON bookings (client_id);
CREATE INDEX bookings_vehicle_idx ON bookings (vehicle_id, start_at);
CREATE INDEX bookings_status_idx ON bookings (status);

CREATE TABLE booking_additional_services
(
    id            uuid PRIMARY KEY,
    booking_id    uuid           NOT NULL,
    service_id    uuid           NOT NULL,
    price         numeric(12, 2) NOT NULL,
    quantity      int            NOT NULL,
    description   text,
    last_position bigint         NOT NULL
);
CREATE INDEX booking_additional_services_booking_idx ON booking_additional_services (booking_id);

CREATE TABLE booking_invoices
(
    id            uuid PRIMARY KEY,
    booking_id    uuid           NOT NULL,
    label         text           NOT NULL UNIQUE,
    invoice_type  text           NOT NULL,
    amount        numeric(12, 2) NOT NULL,
    status        text           NOT NULL,
    issued_at     timestamptz    NOT NULL,
    due_at        timestamptz,
    last_position bigint         NOT NULL
);
CREATE INDEX booking_invoices_booking_idx ON booking_invoices (booking_id);

CREATE TABLE booking_timeline_events
(
    id            uuid PRIMARY KEY,
    booking_id    uuid        NOT NULL,
    sequence      bigint      NOT NULL,
    event_type    text        NOT NULL,
    message       text        NOT NULL,
    payload       jsonb       NOT NULL,
    actor         jsonb       NOT NULL,
    occurred_at   timestamptz NOT NULL,
    last_position bigint      NOT NULL,
    UNIQUE (booking_id, sequence)
);

CREATE TABLE calendar_events
(
    id                 uuid PRIMARY KEY,
    vehicle_id         uuid                NOT NULL,
    booking_id         uuid,
    maintenance_job_id uuid,
    event_type         calendar_event_type NOT NULL,
    title              text                NOT NULL,
    start_at           timestamptz         NOT NULL,
    end_at             timestamptz         NOT NULL,
    status             event_status        NOT NULL,
    last_position      bigint              NOT NULL
);
CREATE INDEX calendar_events_vehicle_range_idx ON calendar_events USING gist (vehicle_id, tstzrange(start_at, end_at));

CREATE TABLE clients
(
    id                      uuid PRIMARY KEY,
    kommo_contact_id        text,
    zoho_contact_id         text,
    name                    text           NOT NULL,
    phone                   text,
    email                   citext,
    residency_country       text,
    preferred_language      text,
    preferred_channels      text[]         NOT NULL DEFAULT '{}',
    timezone                text,
    gender                  text,
    date_of_birth           date,
    tier                    client_tier    NOT NULL DEFAULT 'silver',
    segment                 client_segment NOT NULL DEFAULT 'general',
    lifetime_value          numeric(14, 2) NOT NULL DEFAULT 0,
    outstanding_amount      numeric(14, 2) NOT NULL DEFAULT 0,
    last_booking_at         timestamptz,
    days_since_last_booking int,
    nps_score               smallint,
    created_at              timestamptz    NOT NULL,
    updated_at              timestamptz    NOT NULL,
    last_position           bigint         NOT NULL
);
CREATE INDEX clients_segment_idx ON clients (tier, segment);

-- The clients projection's own record of each booking (LTV and last booking come from it).
CREATE TABLE client_booking_facts
(
    booking_id         uuid PRIMARY KEY,
    client_id          uuid           NOT NULL,
    start_at           timestamptz    NOT NULL,
    total_amount       numeric(12, 2) NOT NULL,
    outstanding_amount numeric(12, 2) NOT NULL,
    cancelled          boolean        NOT NULL DEFAULT false
);
CREATE INDEX client_booking_facts_client_idx ON client_booking_facts (client_id);

-- Periods during which a vehicle is used (confirmed, active or completed bookings).
CREATE TABLE vehicle_usage_periods
(
    booking_id    uuid PRIMARY KEY,
    vehicle_id    uuid        NOT NULL,
    start_at      timestamptz NOT NULL,
    end_at        timestamptz NOT NULL,
    total_amount  numeric(12, 2) NOT NULL,
    completed     boolean     NOT NULL DEFAULT false,
    last_position bigint      NOT NULL
);
CREATE INDEX vehicle_usage_periods_vehicle_idx ON vehicle_usage_periods (vehicle_id);

CREATE TABLE vehicle_utilization
(
    vehicle_id      uuid PRIMARY KEY,
    utilization_pct numeric(5, 2) NOT NULL,
    computed_at     timestamptz   NOT NULL
);

CREATE TABLE sales_leads
(
    id                 uuid PRIMARY KEY,
    lead_code          text           NOT NULL UNIQUE,
    client_id          uuid,
    owner_id           uuid           NOT NULL,
    stage_id           text           NOT NULL,
    probability        numeric(3, 2)  NOT NULL,
    sla_days           int            NOT NULL,
    status             lead_status    NOT NULL,
    value_amount       numeric(12, 2) NOT NULL,
    weighted_value     numeric(14, 4) NOT NULL,
    source             text           NOT NULL,
    title              text,
    requested_start_at timestamptz,
    requested_end_at   timestamptz,
    fleet_size         int            NOT NULL,
    next_action        text,
    next_action_at     timestamptz,
    expected_close_at  timestamptz,
    loss_reason        text,
    booking_id         uuid,
    kommo_lead_id      bigint,
    kommo_status_id    bigint,
    stage_entered_at   timestamptz    NOT NULL,
    velocity_days      int            NOT NULL DEFAULT 0,
    is_overdue         boolean        NOT NULL DEFAULT false,
    created_at         timestamptz    NOT NULL,
    updated_at         timestamptz    NOT NULL,
    last_position      bigint         NOT NULL
);

CREATE TABLE deals
(
    id                  uuid PRIMARY KEY,
    deal_number         text           NOT NULL UNIQUE,
    client_id           uuid           NOT NULL,
    vehicle_id          uuid,
    application_id      uuid,
    status              deal_status    NOT NULL,
    principal_amount    numeric(12, 2) NOT NULL,
    monthly_payment     numeric(12, 2) NOT NULL,
    interest_rate       numeric(7, 4)  NOT NULL,
    security_deposit    numeric(12, 2) NOT NULL,
    term_months         int            NOT NULL,
    contract_start_date date           NOT NULL,
    contract_end_date   date           NOT NULL,
    first_payment_date  date           NOT NULL,
    contract_terms      jsonb,
    total_paid          numeric(14, 2) NOT NULL DEFAULT 0,
    missed_payments     int            NOT NULL DEFAULT 0,
    closing_reason      text,
    created_at          timestamptz    NOT NULL,
    updated_at          timestamptz    NOT NULL,
    last_position       bigint         NOT NULL
);

CREATE TABLE deal_events
(
    id            uuid PRIMARY KEY,
    deal_id       uuid        NOT NULL,
    event_type    text        NOT NULL,
    payload       jsonb       NOT NULL,
    created_by    uuid,
    created_at    timestamptz NOT NULL,
    last_position bigint      NOT NULL
);
CREATE INDEX deal_events_deal_idx ON deal_events (deal_id, created_at);

-- KPIs: one row per business day (Asia/Dubai). Counters come from the day's events; state
-- metrics are the state after the day's last event (or now, for today, by the tick).
CREATE TABLE kpi_snapshots
(
    id            uuid PRIMARY KEY,
    snapshot_date date        NOT NULL UNIQUE,
    metrics       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL,
    last_position bigint      NOT NULL
);

CREATE TABLE kpi_daily_counts
(
    day                date PRIMARY KEY,
    bookings_created   int            NOT NULL DEFAULT 0,
    bookings_cancelled int            NOT NULL DEFAULT 0,
    revenue            numeric(14, 2) NOT NULL DEFAULT 0,
    deliveries         int            NOT NULL DEFAULT 0,
    deliveries_on_time int            NOT NULL DEFAULT 0
);

CREATE TABLE kpi_booking_facts
(
    booking_id         uuid PRIMARY KEY,
    vehicle_id         uuid,
    status             booking_status NOT NULL,
    total_amount       numeric(12, 2) NOT NULL,
    outstanding_amount numeric(12, 2) NOT NULL,
    start_at           timestamptz    NOT NULL,
    end_at             timestamptz    NOT NULL
);

CREATE TABLE kpi_lead_facts
(
    lead_id      uuid PRIMARY KEY,
    status       lead_status    NOT NULL,
    value_amount numeric(12, 2) NOT NULL,
    probability  numeric(3, 2)  NOT NULL
);

CREATE TABLE kpi_deal_facts
(
    deal_id uuid PRIMARY KEY,
    status  deal_status NOT NULL
);

-- Projection-internal: the aggregate state folded by the domain's own `apply`, from which the
-- read-model rows are derived (one source of truth for totals and statuses).
CREATE TABLE booking_states
(
    id    uuid PRIMARY KEY,
    state jsonb NOT NULL
);
CREATE TABLE lead_states
(
    id    uuid PRIMARY KEY,
    state jsonb NOT NULL
);
CREATE TABLE deal_states
(
    id    uuid PRIMARY KEY,
    state jsonb NOT NULL
);
CREATE TABLE client_states
(
    id    uuid PRIMARY KEY,
    state jsonb NOT NULL
);
