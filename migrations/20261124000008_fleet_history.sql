-- The KPI snapshots' fleet (fleet utilization, average revenue per car) was the vehicles that are
-- not sold *now*: selling or adding a car changed every past day's figures in a rebuild, and the
-- live table kept the old ones, so the two differed. `vehicles` is reference data kept outside
-- the event log; this table keeps when each vehicle was in the fleet (not sold), written by a
-- trigger on `vehicles`, so a day's fleet is the vehicles in it when the day began, whenever
-- it is computed.
--
-- Vehicles in the fleet today count for every earlier day (unbounded start), sold ones for none:
-- exactly what every snapshot so far was computed with.
CREATE TABLE vehicle_fleet_periods
(
    vehicle_id uuid      NOT NULL,
    in_fleet   tstzrange NOT NULL CHECK (NOT isempty(in_fleet)),
    PRIMARY KEY (vehicle_id, in_fleet)
);

INSERT INTO vehicle_fleet_periods (vehicle_id, in_fleet)
SELECT id, tstzrange(NULL, NULL) FROM vehicles WHERE status <> 'sold';

CREATE FUNCTION vehicles_fleet_history() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    was_in  boolean := TG_OP <> 'INSERT' AND OLD.status <> 'sold';
    is_in   boolean := TG_OP <> 'DELETE' AND NEW.status <> 'sold';
    vehicle uuid   := CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
BEGIN
    IF was_in AND NOT is_in THEN
        -- Sold or deleted: the open period ends now (gone if it began in this transaction).
        UPDATE vehicle_fleet_periods
        SET in_fleet = tstzrange(lower(in_fleet), now())
        WHERE vehicle_id = vehicle AND upper_inf(in_fleet)
          AND (lower_inf(in_fleet) OR lower(in_fleet) < now());
        DELETE FROM vehicle_fleet_periods
        WHERE vehicle_id = vehicle AND upper_inf(in_fleet) AND lower(in_fleet) >= now();
    ELSIF is_in AND NOT was_in THEN
        INSERT INTO vehicle_fleet_periods (vehicle_id, in_fleet)
        VALUES (vehicle, tstzrange(now(), NULL))
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER vehicles_fleet_history
    AFTER INSERT OR DELETE OR UPDATE OF status ON vehicles
    FOR EACH ROW EXECUTE FUNCTION vehicles_fleet_history();
