-- Each event's notification now names the event and carries its global position
-- ("<global_position> <sequence> <aggregate_type> <aggregate_id>"), so the command that wrote it
-- learns its position from the notification instead of querying for it after the commit.
-- One notification per event (per row), delivered on commit only; an aggregate id too long for a
-- payload sends an empty one (the writer then queries).
CREATE OR REPLACE FUNCTION events_notify() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF octet_length(NEW.aggregate_id) + octet_length(NEW.aggregate_type) > 1000 THEN
        PERFORM pg_notify('skyluxse_events', '');
    ELSE
        PERFORM pg_notify('skyluxse_events',
                          NEW.global_position || ' ' || NEW.sequence || ' ' ||
                          NEW.aggregate_type || ' ' || NEW.aggregate_id);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER events_announce ON events;
CREATE TRIGGER events_announce
    AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_notify();

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
