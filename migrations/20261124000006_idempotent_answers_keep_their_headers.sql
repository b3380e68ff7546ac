-- A replayed answer carries the headers the first one had that a client acts on: `ETag` (the
-- version for the next If-Match) and `Location` (where a created resource is).
ALTER TABLE idempotency_keys ADD COLUMN response_headers jsonb;
