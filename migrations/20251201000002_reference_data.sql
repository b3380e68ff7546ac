-- Enumerations of the current schema (seeds/schema-current-2025-12.md) and the reference tables
-- that are plain data, not event-sourced: vehicles, staff_accounts, driver_profiles,
-- additional_services, sales_pipeline_stages, kommo_pipeline_stages, system_settings.

CREATE EXTENSION IF NOT EXISTS citext;

CREATE TYPE role_type AS ENUM ('operations', 'sales', 'ceo', 'driver', 'integration');
CREATE TYPE driver_status AS ENUM ('available', 'on_task', 'standby');
CREATE TYPE user_status AS ENUM ('pending', 'active', 'suspended', 'archived');
CREATE TYPE client_tier AS ENUM ('vip', 'gold', 'silver');
CREATE TYPE client_segment AS ENUM (
    'resident', 'tourist', 'premier_loyalist', 'dormant_vip', 'growth_gold', 'at_risk',
    'new_rising', 'high_value_dormant', 'general');
CREATE TYPE vehicle_status AS ENUM ('available', 'in_rent', 'maintenance', 'reserved', 'sold', 'service_car');
CREATE TYPE maintenance_job_type AS ENUM ('maintenance', 'repair', 'detailing');
CREATE TYPE maintenance_job_status AS ENUM ('scheduled', 'in_progress', 'done', 'cancelled');
CREATE TYPE document_status AS ENUM ('needs_review', 'verified', 'expired');
CREATE TYPE document_scope AS ENUM ('client', 'vehicle', 'booking', 'task', 'lead', 'maintenance_job');
CREATE TYPE booking_status AS ENUM ('lead', 'confirmed', 'delivery', 'in_progress', 'completed', 'cancelled');
CREATE TYPE booking_type AS ENUM ('rental', 'chauffeur', 'transfer');
CREATE TYPE priority_level AS ENUM ('high', 'medium', 'low');
CREATE TYPE calendar_event_type AS ENUM ('booking', 'maintenance', 'logistics');
CREATE TYPE event_status AS ENUM ('scheduled', 'in_progress', 'done', 'cancelled');
CREATE TYPE task_type AS ENUM ('pickup', 'delivery', 'inspection', 'document', 'custom');
CREATE TYPE task_status AS ENUM ('todo', 'inprogress', 'done', 'blocked');
CREATE TYPE application_status AS ENUM ('draft', 'submitted', 'in_review', 'approved', 'rejected', 'cancelled');
CREATE TYPE deal_status AS ENUM ('draft', 'active', 'completed', 'defaulted', 'cancelled');
CREATE TYPE lead_status AS ENUM ('active', 'won', 'lost');
CREATE TYPE system_log_level AS ENUM ('info', 'warning', 'error', 'critical');
CREATE TYPE system_log_category AS ENUM ('system', 'kommo', 'zoho', 'auth', 'booking', 'task');

CREATE TABLE staff_accounts
(
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    full_name       text        NOT NULL,
    email           citext      NOT NULL UNIQUE,
    phone           text,
    role            role_type   NOT NULL,
    locale          text        NOT NULL DEFAULT 'en-GB',
    timezone        text        NOT NULL DEFAULT 'Asia/Dubai',
    default_route   text,
    is_active       boolean     NOT NULL DEFAULT true,
    external_crm_id text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE driver_profiles
(
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    staff_account_id uuid          NOT NULL UNIQUE REFERENCES staff_accounts (id),
    status           driver_status NOT NULL DEFAULT 'available',
    experience_years int CHECK (experience_years >= 0),
    current_lat      numeric(9, 6),
    current_lng      numeric(9, 6),
    languages        text[]        NOT NULL DEFAULT '{}',
    notes            text,
    last_status_at   timestamptz
);

CREATE TABLE vehicles
(
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    external_ref          text UNIQUE,
    name                  text           NOT NULL,
    make                  text           NOT NULL,
    model                 text           NOT NULL,
    year                  int CHECK (year BETWEEN 1950 AND 2100),
    vin                   text UNIQUE,
    plate_number          text,
    status                vehicle_status NOT NULL DEFAULT 'available',
    class                 text,
    segment               text,
    body_style            text,
    seating_capacity      int,
    engine_displacement_l numeric(4, 1),
    power_hp              int,
    cylinders             int,
    transmission          text,
    zero_to_hundred_sec   numeric(4, 1),
    exterior_color        text,
    interior_color        text,
    mileage_km            int            NOT NULL DEFAULT 0 CHECK (mileage_km >= 0),
    -- Derived by the projections (SPEC §3); never written by a command.
    utilization_pct       numeric(5, 2)  NOT NULL DEFAULT 0,
    revenue_ytd           numeric(12, 2) NOT NULL DEFAULT 0,
    location              text,
    image_url             text,
    kommo_vehicle_id      text UNIQUE,
    zoho_item_id          text,
    rental_prices         jsonb          NOT NULL DEFAULT '{}',
    created_at            timestamptz    NOT NULL DEFAULT now(),
    updated_at            timestamptz    NOT NULL DEFAULT now()
);

CREATE TABLE additional_services
(
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text           NOT NULL UNIQUE,
    description   text,
    default_price numeric(12, 2) NOT NULL CHECK (default_price >= 0),
    is_active     boolean        NOT NULL DEFAULT true,
    created_at    timestamptz    NOT NULL DEFAULT now(),
    updated_at    timestamptz    NOT NULL DEFAULT now()
);

CREATE TABLE sales_pipeline_stages
(
    id                text PRIMARY KEY,
    name              text          NOT NULL,
    probability       numeric(3, 2) NOT NULL CHECK (probability BETWEEN 0 AND 1),
    sla_days          int           NOT NULL CHECK (sla_days >= 0),
    kommo_pipeline_id text,
    kommo_status_id   text,
    booking_status    booking_status,
    order_index       int           NOT NULL
);

CREATE TABLE kommo_pipeline_stages
(
    id             text PRIMARY KEY,
    label          text    NOT NULL,
    group_name     text,
    description    text,
    header_color   text,
    booking_status booking_status,
    is_active      boolean NOT NULL DEFAULT true,
    order_index    int     NOT NULL
);

CREATE TABLE system_settings
(
    key         text PRIMARY KEY,
    value       jsonb NOT NULL,
    description text
);
