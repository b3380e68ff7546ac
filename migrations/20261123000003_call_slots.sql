-- Concurrency limits shared by every worker process (Zoho: calls in flight at once per
-- organisation). A call holds one slot row; a slot whose lease ran out (its process died) is
-- free again.
CREATE TABLE call_slots
(
    name        text        NOT NULL,
    slot        integer     NOT NULL CHECK (slot >= 0),
    -- The process holding it, while held.
    holder      uuid,
    lease_until timestamptz,
    PRIMARY KEY (name, slot)
);
