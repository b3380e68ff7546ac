-- Each insert statement's notification now names its events and carries their global positions,
-- one line per event ("<global_position> <sequence> <aggregate_type> <aggregate_id>", lines
-- joined with a newline, a new notification whenever one would pass 7,900 bytes), so the command
-- that wrote an event learns its position from the notification instead of querying for it after
-- the commit. Delivered on commit only. An event whose type and id are longer than 1,000 bytes
-- gets no line (its writer queries). A statement that inserted nothing announces nothing.
CREATE OR REPLACE FUNCTION events_notify() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    line  text;
    batch text := '';
BEGIN
    FOR line IN
        SELECT n.global_position || ' ' || n.sequence || ' ' || n.aggregate_type || ' ' ||
               n.aggregate_id
        FROM new_events n
        WHERE octet_length(n.aggregate_type) + octet_length(n.aggregate_id) <= 1000
    LOOP
        IF octet_length(batch) + octet_length(line) > 7900 THEN
            PERFORM pg_notify('skyluxse_events', batch);
            batch := '';
        END IF;
        batch := CASE WHEN batch = '' THEN line ELSE batch || E'\n' || line END;
    END LOOP;
    IF batch <> '' THEN
        PERFORM pg_notify('skyluxse_events', batch);
    ELSIF EXISTS (SELECT 1 FROM new_events) THEN
        -- Only overlong ids: still wake the log's followers.
        PERFORM pg_notify('skyluxse_events', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER events_announce ON events;
CREATE TRIGGER events_announce
    AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- A change to a key or to a staff account (revocation, deactivation, a new role) ends every API
-- process's cached key lookups. Touching last_used_at does not.
CREATE FUNCTION auth_notify() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('skyluxse_auth', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_announce
    AFTER UPDATE OF key_digest, staff_id, revoked_at OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION auth_notify();

CREATE TRIGGER staff_accounts_announce
    AFTER UPDATE OR DELETE OR TRUNCATE ON staff_accounts
    FOR EACH STATEMENT EXECUTE FUNCTION auth_notify();
