-- An idempotency claim whose process died mid-command must not block its key for 24 hours, and
-- taking it over must never run the command twice. Each claim gets an id, recorded in the
-- metadata of the events its command writes (`idempotency_claim`). A retry takes over a claim
-- left `in_progress` for a while in one transaction: it locks the claim row (waiting for a first
-- attempt that is committing, which holds it FOR SHARE), then either finds the command's events
-- under the id and stores the answer built from them, or gives the claim a new id, after which
-- the first attempt can no longer commit (the trigger below refuses its events).

-- A claim without an id (made before this migration, or on a route whose writes are not events)
-- is not fenced: it is never taken over and waits for its answer or its expiry, as before.
ALTER TABLE idempotency_keys
    ADD COLUMN claim_id   uuid,
    ADD COLUMN claimed_at timestamptz NOT NULL DEFAULT now();

CREATE UNIQUE INDEX idempotency_keys_claim_key ON idempotency_keys (claim_id);

-- The events of one claim (only commands sent with an Idempotency-Key carry one).
CREATE INDEX events_idempotency_claim_idx ON events ((metadata ->> 'idempotency_claim'))
    WHERE (metadata ->> 'idempotency_claim') IS NOT NULL;

-- The fence: an event of a claim is written only while that claim is the key's current one and
-- not finished. `FOR SHARE` holds the claim until the command's transaction ends, so a takeover
-- (an UPDATE of the row) waits for a command that is committing, and then sees its events.
CREATE FUNCTION events_idempotency_fence() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    claim text := NEW.metadata ->> 'idempotency_claim';
BEGIN
    IF claim IS NOT NULL THEN
        PERFORM 1 FROM idempotency_keys
        WHERE claim_id = claim::uuid AND status = 'in_progress'
            FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the idempotency claim % was taken over by a retry of the request', claim
                USING ERRCODE = 'SX003';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER events_idempotency_fence
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_idempotency_fence();
