-- The outbox (SPEC §1.3): rows derived from events by the outbox projector (idempotently, on
-- `dedupe_key`), claimed by workers with FOR UPDATE SKIP LOCKED and a lease, delivered in order
-- per entity and target, retried with backoff, dead-lettered as `failed` (visible, requeueable).

CREATE TABLE integrations_outbox
(
    id               uuid PRIMARY KEY,
    entity_type      text        NOT NULL CHECK (entity_type IN ('client', 'booking', 'lead')),
    entity_id        uuid        NOT NULL,
    target_system    text        NOT NULL CHECK (target_system IN ('kommo', 'zoho')),
    event_type       text        NOT NULL,
    payload          jsonb       NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'processed', 'failed')),
    attempts         int         NOT NULL DEFAULT 0,
    last_error       text,
    next_run_at      timestamptz NOT NULL DEFAULT now(),
    response         jsonb,
    -- Derivation is idempotent: one row per (event, target, action).
    dedupe_key       text        NOT NULL UNIQUE,
    -- The global position of the event that caused the row: the delivery order per entity.
    source_position  bigint      NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    processed_at     timestamptz
);
CREATE INDEX integrations_outbox_due_idx ON integrations_outbox (next_run_at)
    WHERE status IN ('pending', 'processing');
CREATE INDEX integrations_outbox_entity_idx
    ON integrations_outbox (entity_id, target_system, source_position);
CREATE INDEX integrations_outbox_status_idx ON integrations_outbox (status, updated_at);

-- CRM OAuth tokens, encrypted at rest (AES-256-GCM; nonce and key version stored alongside),
-- shared by every worker; one refreshes at a time (row lock).
CREATE TABLE crm_tokens
(
    system            text PRIMARY KEY CHECK (system IN ('kommo', 'zoho')),
    key_version       int         NOT NULL,
    access_token_enc  bytea,
    refresh_token_enc bytea,
    api_domain        text,
    expires_at        timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Request pacing shared by every worker process (Kommo: about 7 requests/s per account).
CREATE TABLE rate_limits
(
    name      text PRIMARY KEY,
    next_slot timestamptz NOT NULL DEFAULT now()
);
