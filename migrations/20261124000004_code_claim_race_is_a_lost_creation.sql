-- A creation that loses the race to a concurrent creation of the same aggregate is reported as
-- that lost race (unique_violation, which the command bus decides again and then refuses as
-- "already exists"), whatever code each of them carried. Before, it was checked only under the
-- same code, so two creations of one aggregate with different codes (two replicas taking in the
-- same Kommo lead) made the loser fail with "the code ... is already taken".
CREATE OR REPLACE FUNCTION claim_code(p_code text, p_type text, p_id text) RETURNS void
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO entity_codes (code, aggregate_type, aggregate_id)
    VALUES (p_code, p_type, p_id)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM entity_codes
                   WHERE aggregate_type = p_type AND aggregate_id = p_id) THEN
            RAISE EXCEPTION 'the % % was created concurrently', p_type, p_id
                USING ERRCODE = 'unique_violation';
        END IF;
        RAISE EXCEPTION 'the code % is already taken', p_code
            USING ERRCODE = 'SX001', DETAIL = p_code;
    END IF;
END
$$;
