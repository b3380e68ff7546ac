-- Where each consumer of the global log (projections, the outbox projector, process managers)
-- stands. Projections move their row in the same transaction as their read-model writes.
CREATE TABLE consumer_checkpoints
(
    name            text PRIMARY KEY,
    transaction_id  bigint      NOT NULL DEFAULT 0,
    global_position bigint      NOT NULL DEFAULT 0,
    events_applied  bigint      NOT NULL DEFAULT 0,
    -- Set when the consumer stopped on an event it cannot handle; cleared when it moves on.
    last_error      text,
    error_position  bigint,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
