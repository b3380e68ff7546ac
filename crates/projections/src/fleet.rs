//! Vehicle utilization (SPEC §3): the share of the last 30 days each vehicle spent on confirmed,
//! active or completed bookings. Kept in `vehicle_utilization`, and copied into the reference
//! table's `vehicles.utilization_pct` (the column SPEC §3 names) by the live path and the tick;
//! the tick recomputes it as time passes.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use domain::booking::BookingEvent;
use serde_json::json;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::rules;
use crate::util::{aggregate_uuid, decode};
use crate::write::{Table, delete_where};
use crate::{Projection, ProjectionError, Session};

pub struct Fleet;

#[async_trait::async_trait]
impl Projection for Fleet {
    fn name(&self) -> &'static str {
        "fleet"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["vehicle_usage_periods", "vehicle_utilization"]
    }

    fn session(&self, fresh: bool) -> Option<Box<dyn Session>> {
        Some(Box::new(FleetSession {
            periods: HashMap::new(),
            changed: BTreeSet::new(),
            complete: fresh,
            vehicles: HashMap::new(),
        }))
    }

    async fn tick(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        recompute(conn, now).await
    }
}

/// A booking's use of a vehicle (`vehicle_usage_periods`).
#[derive(Debug, Clone, sqlx::FromRow)]
struct Period {
    vehicle_id: Uuid,
    start_at: DateTime<Utc>,
    end_at: DateTime<Utc>,
    completed: bool,
    last_position: i64,
}

struct FleetSession {
    /// Periods by booking; `None`: there is none (looked up, or deleted).
    periods: HashMap<Uuid, Option<Period>>,
    changed: BTreeSet<Uuid>,
    /// Every stored period is in `periods` (a rebuild into empty tables).
    complete: bool,
    /// Vehicles whose utilization must be recomputed, as of their latest affecting event.
    vehicles: HashMap<Uuid, DateTime<Utc>>,
}

const PERIODS: Table = Table {
    name: "vehicle_usage_periods",
    columns: &[
        "booking_id",
        "vehicle_id",
        "start_at",
        "end_at",
        "total_amount",
        "completed",
        "last_position",
    ],
    key: &["booking_id"],
    keep: &["total_amount"],
};

impl FleetSession {
    async fn load(
        &mut self,
        conn: &mut PgConnection,
        bookings: Vec<Uuid>,
    ) -> Result<(), ProjectionError> {
        let missing: Vec<Uuid> = bookings
            .into_iter()
            .filter(|b| !self.periods.contains_key(b))
            .collect();
        if self.complete || missing.is_empty() {
            return Ok(());
        }
        #[derive(sqlx::FromRow)]
        struct Row {
            booking_id: Uuid,
            #[sqlx(flatten)]
            period: Period,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT booking_id, vehicle_id, start_at, end_at, completed, last_position \
             FROM vehicle_usage_periods WHERE booking_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?;
        for b in missing {
            self.periods.insert(b, None);
        }
        for row in rows {
            self.periods.insert(row.booking_id, Some(row.period));
        }
        Ok(())
    }

    /// Folds one event; returns the vehicles whose utilization it changes.
    fn fold(&mut self, booking: Uuid, ev: BookingEvent, pos: i64) -> Vec<Uuid> {
        use BookingEvent as E;
        let slot = self.periods.entry(booking).or_insert(None);
        let affected = match ev {
            E::BookingConfirmed {
                vehicle_id,
                start_at,
                end_at,
            } => {
                *slot = Some(Period {
                    vehicle_id,
                    start_at,
                    end_at,
                    completed: false,
                    last_position: pos,
                });
                vec![vehicle_id]
            }
            E::BookingVehicleAssigned {
                vehicle_id,
                holds_vehicle: true,
            } => {
                let old = slot.as_mut().map(|p| {
                    let old = p.vehicle_id;
                    p.vehicle_id = vehicle_id;
                    p.last_position = pos;
                    old
                });
                old.into_iter().chain([vehicle_id]).collect()
            }
            E::BookingRescheduled {
                start_at,
                end_at,
                holds_vehicle: true,
                ..
            } => slot.as_mut().map_or_else(Vec::new, |p| {
                p.start_at = start_at;
                p.end_at = end_at;
                p.last_position = pos;
                vec![p.vehicle_id]
            }),
            E::BookingExtended { new_end_at, .. } => slot.as_mut().map_or_else(Vec::new, |p| {
                p.end_at = new_end_at;
                p.last_position = pos;
                vec![p.vehicle_id]
            }),
            E::BookingCompleted { returned_at, .. } => slot.as_mut().map_or_else(Vec::new, |p| {
                p.end_at = p.start_at.max(returned_at);
                p.completed = true;
                p.last_position = pos;
                vec![p.vehicle_id]
            }),
            E::BookingCancelled { .. } => slot.take().map(|p| p.vehicle_id).into_iter().collect(),
            _ => return vec![],
        };
        self.changed.insert(booking);
        affected
    }
}

#[async_trait::async_trait]
impl Session for FleetSession {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut bookings = Vec::new();
        for e in events.iter().filter(|e| e.aggregate_type == "Booking") {
            bookings.push(aggregate_uuid(e)?);
        }
        self.load(conn, bookings).await?;
        for e in events.iter().filter(|e| e.aggregate_type == "Booking") {
            let ev: BookingEvent = decode(e)?;
            let booking = aggregate_uuid(e)?;
            for v in self.fold(booking, ev, e.position.global_position) {
                self.vehicles.insert(v, e.recorded_at);
            }
        }
        Ok(())
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let (mut rows, mut gone) = (Vec::new(), Vec::new());
        for b in std::mem::take(&mut self.changed) {
            match self.periods.get(&b).and_then(Option::as_ref) {
                Some(p) => rows.push(json!({
                    "booking_id": b,
                    "vehicle_id": p.vehicle_id,
                    "start_at": p.start_at,
                    "end_at": p.end_at,
                    "total_amount": 0,
                    "completed": p.completed,
                    "last_position": p.last_position,
                })),
                None => gone.push(b),
            }
        }
        if !self.complete {
            delete_where(conn, "vehicle_usage_periods", "booking_id", &gone).await?;
        }
        PERIODS.write(conn, self.complete, rows).await?;
        let vehicles = std::mem::take(&mut self.vehicles);
        let ids: Vec<Uuid> = vehicles.keys().copied().collect();
        write_utilization(conn, self.complete, &ids, |v| vehicles.get(v).copied()).await
    }
}

/// Recomputes the utilization of every vehicle of the fleet and every vehicle with usage as of
/// `now` (the tick).
pub async fn recompute(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<(), ProjectionError> {
    let vehicles: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM vehicles UNION SELECT vehicle_id FROM vehicle_usage_periods",
    )
    .fetch_all(&mut *conn)
    .await?;
    write_utilization(conn, false, &vehicles, |_| Some(now)).await
}

/// Computes the utilization of `vehicles`, each as of the instant `at` gives, from their stored
/// periods, and writes it in one statement.
async fn write_utilization(
    conn: &mut PgConnection,
    fresh: bool,
    vehicles: &[Uuid],
    at: impl Fn(&Uuid) -> Option<DateTime<Utc>>,
) -> Result<(), ProjectionError> {
    if vehicles.is_empty() {
        return Ok(());
    }
    // Only periods that can overlap some vehicle's window count (`rules::utilization` clips the
    // rest away): a vehicle's older history is not read.
    let periods: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> =
        match rules::utilization_windows_cover(vehicles.iter().filter_map(&at)) {
            Some((from, to)) => {
                sqlx::query_as(
                    "SELECT vehicle_id, start_at, end_at FROM vehicle_usage_periods \
                     WHERE vehicle_id = ANY($1) AND end_at > $2 AND start_at < $3",
                )
                .bind(vehicles)
                .bind(from)
                .bind(to)
                .fetch_all(&mut *conn)
                .await?
            }
            None => Vec::new(),
        };
    let mut by_vehicle: HashMap<Uuid, Vec<rules::Span>> = HashMap::new();
    for (v, s, e) in periods {
        by_vehicle.entry(v).or_default().push((s, e));
    }
    let mut rows = Vec::with_capacity(vehicles.len());
    for v in vehicles {
        let Some(now) = at(v) else { continue };
        let mine = by_vehicle.get(v).map_or(&[][..], Vec::as_slice);
        rows.push(json!({
            "vehicle_id": v,
            "utilization_pct": rules::utilization(mine, now),
            "computed_at": now,
        }));
    }
    UTILIZATION.write(conn, fresh, rows).await?;
    if !fresh {
        // SPEC §3 names the figure `vehicles.utilization_pct`: kept equal to the read model's
        // (which a rebuild can swap; `vehicles` is reference data it cannot).
        sqlx::query(
            "UPDATE vehicles v SET utilization_pct = u.utilization_pct \
             FROM vehicle_utilization u \
             WHERE u.vehicle_id = ANY($1) AND v.id = u.vehicle_id \
               AND v.utilization_pct IS DISTINCT FROM u.utilization_pct",
        )
        .bind(vehicles)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

const UTILIZATION: Table = Table {
    name: "vehicle_utilization",
    columns: &["vehicle_id", "utilization_pct", "computed_at"],
    key: &["vehicle_id"],
    keep: &[],
};
