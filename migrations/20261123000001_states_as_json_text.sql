-- The projections' folded states are read and written only by the projection that owns them, as
-- serde_json text of one Rust type (fields always in the type's order). Stored as text they need
-- no jsonb parsing on every save and no jsonb printing on every load; a rebuild of 1M events
-- writes 275 MB of them. (Still JSON: `state::jsonb` reads one in SQL.)
ALTER TABLE booking_states ALTER COLUMN state TYPE text USING state::text;
ALTER TABLE lead_states ALTER COLUMN state TYPE text USING state::text;
ALTER TABLE deal_states ALTER COLUMN state TYPE text USING state::text;
ALTER TABLE client_states ALTER COLUMN state TYPE text USING state::text;
