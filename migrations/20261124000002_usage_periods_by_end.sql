-- Utilization reads only the periods that can overlap a vehicle's last 30 days, not its whole
-- history: index the periods by vehicle and end (this also serves lookups by vehicle alone).
CREATE INDEX vehicle_usage_periods_vehicle_end_idx ON vehicle_usage_periods (vehicle_id, end_at);
DROP INDEX vehicle_usage_periods_vehicle_idx;
