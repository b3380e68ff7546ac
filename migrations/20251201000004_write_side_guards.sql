-- Rules that span aggregates, kept in the same transaction as the events that change them
-- (a BEFORE INSERT trigger on `events`), so they hold for every writer and every API replica:
--   * human codes (BK-, LD-, DL-) are unique and never reused;
--   * no vehicle holds two overlapping confirmed/active bookings or a booking overlapping a
--     maintenance/repair block.
-- A violation aborts the command's transaction: no event is written.

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- Code numbers come from sequences: unique, increasing, never handed out twice.
CREATE SEQUENCE booking_code_seq START 1001;
CREATE SEQUENCE lead_code_seq START 1201;
CREATE SEQUENCE deal_code_seq START 101;

CREATE TABLE entity_codes
(
    code           text PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (aggregate_type, aggregate_id)
);

-- What occupies each vehicle when: confirmed/active/completed bookings and blocks.
CREATE TABLE vehicle_schedule
(
    source_type text      NOT NULL CHECK (source_type IN ('booking', 'block')),
    source_id   text      NOT NULL,
    vehicle_id  uuid      NOT NULL,
    period      tstzrange NOT NULL,
    PRIMARY KEY (source_type, source_id),
    CONSTRAINT vehicle_schedule_no_overlap EXCLUDE USING gist (vehicle_id WITH =, period WITH &&)
);

CREATE FUNCTION claim_code(p_code text, p_type text, p_id text) RETURNS void
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO entity_codes (code, aggregate_type, aggregate_id)
    VALUES (p_code, p_type, p_id)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM entity_codes
                   WHERE code = p_code AND aggregate_type = p_type AND aggregate_id = p_id) THEN
            -- The same aggregate created concurrently: a lost race, reported like the events'
            -- own primary-key conflict so the writer re-reads and sees the aggregate exists.
            RAISE EXCEPTION 'the % % was created concurrently', p_type, p_id
                USING ERRCODE = 'unique_violation';
        END IF;
        RAISE EXCEPTION 'the code % is already taken', p_code
            USING ERRCODE = 'SX001', DETAIL = p_code;
    END IF;
END
$$;

-- Puts (or moves) `source` on the vehicle's schedule. The explicit check names the clash for
-- the error message; the exclusion constraint catches concurrent writers the check cannot see.
CREATE FUNCTION schedule_claim(p_type text, p_id text, p_vehicle uuid, p_period tstzrange) RETURNS void
    LANGUAGE plpgsql AS
$$
DECLARE
    clash record;
BEGIN
    SELECT source_type, source_id, period INTO clash
    FROM vehicle_schedule
    WHERE vehicle_id = p_vehicle
      AND period && p_period
      AND NOT (source_type = p_type AND source_id = p_id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'vehicle % is not available from % to %: it is held by % %',
            p_vehicle, lower(p_period), upper(p_period), clash.source_type, clash.source_id
            USING ERRCODE = 'SX002',
                DETAIL = json_build_object('vehicle_id', p_vehicle, 'source_type', clash.source_type,
                                           'source_id', clash.source_id,
                                           'start_at', lower(clash.period),
                                           'end_at', upper(clash.period))::text;
    END IF;
    INSERT INTO vehicle_schedule (source_type, source_id, vehicle_id, period)
    VALUES (p_type, p_id, p_vehicle, p_period)
    ON CONFLICT (source_type, source_id) DO UPDATE
        SET vehicle_id = EXCLUDED.vehicle_id,
            period     = EXCLUDED.period;
END
$$;

CREATE FUNCTION events_write_guards() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    body jsonb := NEW.payload::jsonb -> NEW.event_type;
    held record;
BEGIN
    IF body IS NULL THEN
        RETURN NEW;
    END IF;
    CASE NEW.aggregate_type || '.' || NEW.event_type
        WHEN 'Booking.BookingCreated' THEN
            PERFORM claim_code(body ->> 'external_code', NEW.aggregate_type, NEW.aggregate_id);
        WHEN 'Lead.LeadCreated' THEN
            PERFORM claim_code(body ->> 'lead_code', NEW.aggregate_type, NEW.aggregate_id);
        WHEN 'Deal.DealDrafted' THEN
            PERFORM claim_code(body ->> 'deal_number', NEW.aggregate_type, NEW.aggregate_id);
        WHEN 'Booking.BookingConfirmed' THEN
            PERFORM schedule_claim('booking', NEW.aggregate_id, (body ->> 'vehicle_id')::uuid,
                                   tstzrange((body ->> 'start_at')::timestamptz, (body ->> 'end_at')::timestamptz));
        WHEN 'Booking.BookingVehicleAssigned' THEN
            SELECT period INTO held FROM vehicle_schedule
            WHERE source_type = 'booking' AND source_id = NEW.aggregate_id;
            IF FOUND THEN
                PERFORM schedule_claim('booking', NEW.aggregate_id, (body ->> 'vehicle_id')::uuid, held.period);
            END IF;
        WHEN 'Booking.BookingRescheduled' THEN
            SELECT vehicle_id INTO held FROM vehicle_schedule
            WHERE source_type = 'booking' AND source_id = NEW.aggregate_id;
            IF FOUND THEN
                PERFORM schedule_claim('booking', NEW.aggregate_id, held.vehicle_id,
                                       tstzrange((body ->> 'start_at')::timestamptz, (body ->> 'end_at')::timestamptz));
            END IF;
        WHEN 'Booking.BookingExtended' THEN
            SELECT vehicle_id, period INTO held FROM vehicle_schedule
            WHERE source_type = 'booking' AND source_id = NEW.aggregate_id;
            IF FOUND THEN
                PERFORM schedule_claim('booking', NEW.aggregate_id, held.vehicle_id,
                                       tstzrange(lower(held.period), (body ->> 'new_end_at')::timestamptz));
            END IF;
        WHEN 'Booking.BookingCompleted' THEN
            -- The vehicle is free from its actual return (an early return frees the rest; a late
            -- one is a fact that cannot be refused).
            UPDATE vehicle_schedule
            SET period = tstzrange(lower(period),
                                   GREATEST(lower(period), LEAST(upper(period), (body ->> 'returned_at')::timestamptz)))
            WHERE source_type = 'booking' AND source_id = NEW.aggregate_id;
        WHEN 'Booking.BookingCancelled' THEN
            DELETE FROM vehicle_schedule WHERE source_type = 'booking' AND source_id = NEW.aggregate_id;
        WHEN 'VehicleBlock.VehicleBlocked' THEN
            PERFORM schedule_claim('block', NEW.aggregate_id, (body ->> 'vehicle_id')::uuid,
                                   tstzrange((body ->> 'start_at')::timestamptz, (body ->> 'end_at')::timestamptz));
        WHEN 'VehicleBlock.VehicleBlockRemoved' THEN
            DELETE FROM vehicle_schedule WHERE source_type = 'block' AND source_id = NEW.aggregate_id;
        ELSE
            NULL;
        END CASE;
    RETURN NEW;
END
$$;

CREATE TRIGGER events_write_guards
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_write_guards();
