-- A completed booking's calendar event ends when the car came back (early or late), as the
-- vehicle guard and utilization already count it, not at the planned end. The projection
-- writes it so from now on; this brings the rows written before in line, so that the live
-- table keeps equalling a rebuild.
UPDATE calendar_events c
SET end_at = b.returned_at
FROM bookings b
WHERE c.booking_id = b.id
  AND b.status = 'completed'
  AND b.returned_at IS NOT NULL
  AND b.returned_at > c.start_at
  AND c.end_at <> b.returned_at;
