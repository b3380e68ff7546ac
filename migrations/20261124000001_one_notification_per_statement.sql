-- One notification per insert statement instead of one per event (a bulk load of 5,000 events
-- queued 5,000): the statement's events, one line each ("<global_position> <sequence>
-- <aggregate_type> <aggregate_id>", lines joined with a newline, a new notification whenever one
-- would pass 7,900 bytes). Delivered on commit only. An event whose type and id are longer than 1,000 bytes
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
