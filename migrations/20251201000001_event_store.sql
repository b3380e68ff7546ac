-- The event store: postgres-es's `events` and `snapshots` tables, extended with the global log
-- (SPEC §1.1). Readers of the global log order by (transaction_id, global_position) and read only
-- below pg_snapshot_xmin(pg_current_snapshot()), so a slow transaction's events are never skipped.

CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         json                         NOT NULL,
    metadata        json                         NOT NULL,
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id  xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz                  NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_position_key ON events (global_position);
-- The order every global-log reader uses.
CREATE INDEX events_log_order_idx ON events (transaction_id, global_position);

-- Events are facts: never updated, never deleted.
CREATE FUNCTION events_are_immutable() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'events are append-only (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_immutable();

-- Announce new events; the notification is delivered on commit only. Readers also poll, so a
-- lost notification only delays them.
CREATE FUNCTION events_notify() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('skyluxse_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_announce
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    timestamp        timestamptz DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
