//! Vehicle utilization (SPEC §3): the share of the last 30 days each vehicle spent on confirmed,
//! active or completed bookings. Kept in `vehicle_utilization` (the API shows it as the
//! vehicle's `utilization_pct`); the tick recomputes it as time passes.

use chrono::{DateTime, Utc};
use domain::booking::BookingEvent;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::rules;
use crate::util::{aggregate_uuid, decode};
use crate::{Projection, ProjectionError};

pub struct Fleet;

#[async_trait::async_trait]
impl Projection for Fleet {
    fn name(&self) -> &'static str {
        "fleet"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["vehicle_usage_periods", "vehicle_utilization"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        for e in events.iter().filter(|e| e.aggregate_type == "Booking") {
            let ev: BookingEvent = decode(e)?;
            let booking = aggregate_uuid(e)?;
            let pos = e.position.global_position;
            use BookingEvent as E;
            let affected: Vec<Uuid> = match ev {
                E::BookingConfirmed {
                    vehicle_id,
                    start_at,
                    end_at,
                } => {
                    sqlx::query(
                        "INSERT INTO vehicle_usage_periods (booking_id, vehicle_id, start_at, end_at, total_amount, last_position) \
                         VALUES ($1, $2, $3, $4, 0, $5)",
                    )
                    .bind(booking)
                    .bind(vehicle_id)
                    .bind(start_at)
                    .bind(end_at)
                    .bind(pos)
                    .execute(&mut *conn)
                    .await?;
                    vec![vehicle_id]
                }
                E::BookingVehicleAssigned {
                    vehicle_id,
                    holds_vehicle: true,
                } => {
                    let old: Option<Uuid> = sqlx::query_scalar(
                        "SELECT vehicle_id FROM vehicle_usage_periods WHERE booking_id = $1",
                    )
                    .bind(booking)
                    .fetch_optional(&mut *conn)
                    .await?;
                    update(conn, booking, "vehicle_id = $2", vehicle_id, pos).await?;
                    old.into_iter().chain([vehicle_id]).collect()
                }
                E::BookingRescheduled {
                    start_at,
                    end_at,
                    holds_vehicle: true,
                    ..
                } => sqlx::query_scalar(
                    "UPDATE vehicle_usage_periods SET start_at = $2, end_at = $3, last_position = $4 \
                     WHERE booking_id = $1 RETURNING vehicle_id",
                )
                .bind(booking)
                .bind(start_at)
                .bind(end_at)
                .bind(pos)
                .fetch_all(&mut *conn)
                .await?,
                E::BookingExtended { new_end_at, .. } => {
                    update(conn, booking, "end_at = $2", new_end_at, pos).await?
                }
                E::BookingCompleted { returned_at, .. } => {
                    update(conn, booking, "end_at = greatest(start_at, $2), completed = true", returned_at, pos)
                        .await?
                }
                E::BookingCancelled { .. } => sqlx::query_scalar(
                    "DELETE FROM vehicle_usage_periods WHERE booking_id = $1 RETURNING vehicle_id",
                )
                .bind(booking)
                .fetch_all(&mut *conn)
                .await?,
                _ => vec![],
            };
            for v in affected {
                recompute(conn, Some(v), e.recorded_at).await?;
            }
        }
        Ok(())
    }

    async fn tick(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        recompute(conn, None, now).await
    }
}

async fn update<T>(
    conn: &mut PgConnection,
    booking: Uuid,
    set: &str,
    value: T,
    pos: i64,
) -> Result<Vec<Uuid>, ProjectionError>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    Ok(sqlx::query_scalar(&format!(
        "UPDATE vehicle_usage_periods SET {set}, last_position = $3 WHERE booking_id = $1 RETURNING vehicle_id"
    ))
    .bind(booking)
    .bind(value)
    .bind(pos)
    .fetch_all(&mut *conn)
    .await?)
}

/// Recomputes the utilization of one vehicle (or of every vehicle of the fleet and every
/// vehicle with usage, for the tick) as of `now`.
pub async fn recompute(
    conn: &mut PgConnection,
    vehicle: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    let vehicles: Vec<Uuid> = match vehicle {
        Some(v) => vec![v],
        None => {
            sqlx::query_scalar(
                "SELECT id FROM vehicles UNION SELECT vehicle_id FROM vehicle_usage_periods",
            )
            .fetch_all(&mut *conn)
            .await?
        }
    };
    let periods: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT vehicle_id, start_at, end_at FROM vehicle_usage_periods WHERE vehicle_id = ANY($1)",
    )
    .bind(&vehicles)
    .fetch_all(&mut *conn)
    .await?;
    for v in vehicles {
        let mine: Vec<_> = periods
            .iter()
            .filter(|(id, _, _)| *id == v)
            .map(|&(_, s, e)| (s, e))
            .collect();
        let pct = rules::utilization(&mine, now);
        sqlx::query(
            "INSERT INTO vehicle_utilization (vehicle_id, utilization_pct, computed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (vehicle_id) DO UPDATE SET utilization_pct = EXCLUDED.utilization_pct, \
               computed_at = EXCLUDED.computed_at",
        )
        .bind(v)
        .bind(pct)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
