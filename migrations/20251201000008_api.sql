-- The HTTP API's own tables (crates/api): staff API keys, idempotency keys of commands, and the
-- Kommo webhook intake. None of them is a read model: they are not rebuilt from the log.

-- API keys: random prefixed strings (`slx_...`) shown once by `skyluxse keys create`; only their
-- SHA-256 digest is kept. The caller's role is the staff account's role.
CREATE TABLE api_keys
(
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    staff_id     uuid        NOT NULL REFERENCES staff_accounts (id),
    -- The first characters of the key, to tell keys apart in lists and logs (never the rest).
    key_prefix   text        NOT NULL,
    key_digest   bytea       NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_staff_idx ON api_keys (staff_id);

-- Idempotency keys of commands, per staff account and route (method and path). The row is
-- inserted (ON CONFLICT DO NOTHING) as a claim before the command runs, so two concurrent
-- retries cannot both execute; the answer is stored when the command finishes and replayed to
-- every later retry with the same key and the same body.
CREATE TABLE idempotency_keys
(
    staff_id        uuid        NOT NULL,
    route           text        NOT NULL,
    idempotency_key text        NOT NULL,
    -- SHA-256 of the canonical request body: the same key with another body is refused.
    request_digest  bytea       NOT NULL,
    status          text        NOT NULL DEFAULT 'in_progress'
        CHECK (status IN ('in_progress', 'completed')),
    response_status smallint,
    response_body   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    PRIMARY KEY (staff_id, route, idempotency_key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- Raw Kommo webhook deliveries (seed columns, plus the raw body and processing state). A
-- delivery is stored once per distinct body (`source_payload_id` is the SHA-256 of the raw body),
-- so Kommo's repeated deliveries are harmless; a drain loop turns stored rows into commands.
CREATE TABLE kommo_webhook_events
(
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    source_payload_id  text        NOT NULL UNIQUE,
    hmac_validated     boolean     NOT NULL DEFAULT false,
    status             text        NOT NULL DEFAULT 'received'
        CHECK (status IN ('received', 'processed', 'failed')),
    -- The form fields as a JSON object (`leads[status][0][id]` -> "23802129").
    payload            jsonb       NOT NULL,
    raw_body           bytea       NOT NULL,
    error_message      text,
    attempts           int         NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    processed_at       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    kommo_status_id    text,
    kommo_status_label text,
    -- What processing did: the commands issued and their outcomes.
    fetched_data       jsonb
);
CREATE INDEX kommo_webhook_events_due_idx ON kommo_webhook_events (next_attempt_at)
    WHERE status = 'received';

-- Which lead a Kommo lead became. Claimed before the lead is created, so a repeated `leads[add]`
-- creates one lead only, and `leads[status]` finds its lead without waiting for a projection.
CREATE TABLE kommo_lead_links
(
    kommo_lead_id bigint PRIMARY KEY,
    lead_id       uuid        NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now()
);
