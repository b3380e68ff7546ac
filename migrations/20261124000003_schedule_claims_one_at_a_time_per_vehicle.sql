-- Claims on one vehicle's schedule are taken one at a time (a transaction-scoped advisory lock
-- on the vehicle, taken before the check).
--
-- Before, two transactions claiming overlapping periods of one vehicle could both pass the
-- check (neither sees the other's uncommitted row), both insert, and then each wait on the
-- other in the exclusion constraint's check: PostgreSQL broke the cycle after deadlock_timeout
-- (1 s) with "deadlock detected", and the loser's command failed as a store error instead of
-- "vehicle unavailable". Now the second claim waits for the first to end, and its check sees the
-- first's row once committed, so the refusal names the clash. The exclusion constraint stays as
-- the last line for any writer that does not come through here.
CREATE OR REPLACE FUNCTION schedule_claim(p_type text, p_id text, p_vehicle uuid, p_period tstzrange) RETURNS void
    LANGUAGE plpgsql AS
$$
DECLARE
    clash record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('vehicle_schedule:' || p_vehicle::text, 0));
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
