//! `kpi_snapshots`: one row per business day (Asia/Dubai).
//!
//! Counters (bookings created/cancelled, revenue of completions, deliveries and their SLA) count
//! the day's events. State metrics (active bookings, pipeline value, win rate, active deals,
//! outstanding amount) are the state right after the day's last event; fleet utilization is
//! measured over the 30 days ending at the end of that day. Days without events get a row from
//! the tick (or when the next day's first event arrives), with the state carried over. So a row
//! depends only on the events, never on when it was computed: a rebuild reproduces it exactly.

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use domain::booking::BookingEvent;
use domain::deal::DealEvent;
use domain::lead::LeadEvent;
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::rules;
use crate::util::{aggregate_uuid, business_day, decode};
use crate::{Projection, ProjectionError};

pub struct Kpis;

#[async_trait::async_trait]
impl Projection for Kpis {
    fn name(&self) -> &'static str {
        "kpis"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "kpi_snapshots",
            "kpi_daily_counts",
            "kpi_booking_facts",
            "kpi_lead_facts",
            "kpi_deal_facts",
        ]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut current: Option<(NaiveDate, i64)> = None;
        for e in events {
            let day = business_day(e.recorded_at);
            if let Some((d, pos)) = current
                && d != day
            {
                snapshot(conn, d, pos).await?;
            }
            if current.is_none_or(|(d, _)| d != day) {
                // Days without events between the last snapshot and this one carry the state.
                fill_gaps(conn, day, current.map(|(_, p)| p)).await?;
            }
            apply_event(conn, e, day).await?;
            current = Some((day, e.position.global_position));
        }
        if let Some((d, pos)) = current {
            snapshot(conn, d, pos).await?;
        }
        Ok(())
    }

    async fn tick(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        let today = business_day(now);
        let last: Option<NaiveDate> =
            sqlx::query_scalar("SELECT max(snapshot_date) FROM kpi_snapshots")
                .fetch_one(&mut *conn)
                .await?;
        let position: i64 = sqlx::query_scalar(
            "SELECT coalesce(max(global_position), 0) FROM consumer_checkpoints WHERE name = 'projection:kpis'",
        )
        .fetch_one(&mut *conn)
        .await?;
        let mut day = last.map_or(today, |d| d + Duration::days(1));
        while day <= today {
            snapshot(conn, day, position).await?;
            day += Duration::days(1);
        }
        Ok(())
    }
}

/// Writes rows for the days after the newest snapshot and before `day`.
async fn fill_gaps(
    conn: &mut PgConnection,
    day: NaiveDate,
    position: Option<i64>,
) -> Result<(), ProjectionError> {
    let row: Option<(NaiveDate, i64)> = sqlx::query_as(
        "SELECT snapshot_date, last_position FROM kpi_snapshots ORDER BY snapshot_date DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some((last, last_pos)) = row else {
        return Ok(());
    };
    let position = position.unwrap_or(last_pos);
    let mut d = last + Duration::days(1);
    while d < day {
        snapshot(conn, d, position).await?;
        d += Duration::days(1);
    }
    Ok(())
}

/// Adds to the day's counters: `set` may use `$2` for `amount`.
async fn count(
    conn: &mut PgConnection,
    day: NaiveDate,
    set: &str,
    amount: Option<Decimal>,
) -> Result<(), ProjectionError> {
    sqlx::query("INSERT INTO kpi_daily_counts (day) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(day)
        .execute(&mut *conn)
        .await?;
    let q = format!("UPDATE kpi_daily_counts SET {set} WHERE day = $1");
    let mut q = sqlx::query(&q).bind(day);
    if let Some(a) = amount {
        q = q.bind(a);
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

async fn apply_event(
    conn: &mut PgConnection,
    e: &RecordedEvent,
    day: NaiveDate,
) -> Result<(), ProjectionError> {
    let id = match e.aggregate_type.as_str() {
        "Booking" | "Lead" | "Deal" => aggregate_uuid(e)?,
        _ => return Ok(()),
    };
    match e.aggregate_type.as_str() {
        "Booking" => {
            use BookingEvent as E;
            let ev: BookingEvent = decode(e)?;
            match ev {
                E::BookingCreated {
                    vehicle_id,
                    start_at,
                    end_at,
                    total_amount,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO kpi_booking_facts (booking_id, vehicle_id, status, total_amount, outstanding_amount, start_at, end_at) \
                         VALUES ($1, $2, 'lead', $3, $3, $4, $5)",
                    )
                    .bind(id)
                    .bind(vehicle_id)
                    .bind(total_amount.amount())
                    .bind(start_at)
                    .bind(end_at)
                    .execute(&mut *conn)
                    .await?;
                    count(conn, day, "bookings_created = bookings_created + 1", None).await?;
                }
                E::BookingVehicleAssigned { vehicle_id, .. } => {
                    fact(conn, id, "vehicle_id = $2", vehicle_id).await?;
                }
                E::BookingRescheduled {
                    start_at,
                    end_at,
                    total_amount,
                    ..
                } => {
                    fact(conn, id, "start_at = $2", start_at).await?;
                    fact(conn, id, "end_at = $2", end_at).await?;
                    set_total(conn, id, total_amount.amount()).await?;
                }
                E::BookingServiceAdded { total_amount, .. }
                | E::BookingServiceRemoved { total_amount, .. } => {
                    set_total(conn, id, total_amount.amount()).await?;
                }
                E::BookingExtended {
                    new_end_at,
                    total_amount,
                    ..
                } => {
                    fact(conn, id, "end_at = $2", new_end_at).await?;
                    set_total(conn, id, total_amount.amount()).await?;
                }
                E::BookingConfirmed { .. } => status(conn, id, "confirmed").await?,
                E::BookingDeliveryStarted { .. } => status(conn, id, "delivery").await?,
                E::BookingRentalStarted {
                    delivered_on_time, ..
                } => {
                    status(conn, id, "in_progress").await?;
                    let on_time = if delivered_on_time {
                        Decimal::ONE
                    } else {
                        Decimal::ZERO
                    };
                    count(
                        conn,
                        day,
                        "deliveries = deliveries + 1, deliveries_on_time = deliveries_on_time + $2::int",
                        Some(on_time),
                    )
                    .await?;
                }
                E::BookingCompleted { returned_at, .. } => {
                    status(conn, id, "completed").await?;
                    fact(conn, id, "end_at = greatest(start_at, $2)", returned_at).await?;
                    let total: Option<Decimal> = sqlx::query_scalar(
                        "SELECT total_amount FROM kpi_booking_facts WHERE booking_id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                    count(
                        conn,
                        day,
                        "revenue = revenue + $2",
                        Some(total.unwrap_or_default()),
                    )
                    .await?;
                }
                E::BookingCancelled { .. } => {
                    status(conn, id, "cancelled").await?;
                    count(
                        conn,
                        day,
                        "bookings_cancelled = bookings_cancelled + 1",
                        None,
                    )
                    .await?;
                }
                E::BookingPaymentRecorded {
                    outstanding_amount, ..
                } => {
                    fact(
                        conn,
                        id,
                        "outstanding_amount = $2",
                        outstanding_amount.amount(),
                    )
                    .await?;
                }
                _ => {}
            }
        }
        "Lead" => {
            use LeadEvent as E;
            let ev: LeadEvent = decode(e)?;
            let upsert =
                |status: &'static str, value: Option<Decimal>, probability: Option<Decimal>| {
                    (status, value, probability)
                };
            let change = match ev {
                E::LeadCreated {
                    value_amount,
                    probability,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO kpi_lead_facts (lead_id, status, value_amount, probability) VALUES ($1, 'active', $2, $3)",
                    )
                    .bind(id)
                    .bind(value_amount.amount())
                    .bind(probability)
                    .execute(&mut *conn)
                    .await?;
                    None
                }
                E::LeadStageMoved { probability, .. } => Some(upsert("", None, Some(probability))),
                E::LeadKommoStatusApplied { probability, .. } => {
                    Some(upsert("", None, probability))
                }
                E::LeadValueChanged { value_amount } => {
                    Some(upsert("", Some(value_amount.amount()), None))
                }
                E::LeadWon { .. } => Some(upsert("won", None, None)),
                E::LeadLost { .. } => Some(upsert("lost", None, None)),
                _ => None,
            };
            if let Some((status, value, probability)) = change {
                sqlx::query(
                    "UPDATE kpi_lead_facts SET \
                       status = CASE WHEN $2 = '' THEN status ELSE $2::lead_status END, \
                       value_amount = coalesce($3, value_amount), probability = coalesce($4, probability) \
                     WHERE lead_id = $1",
                )
                .bind(id)
                .bind(status)
                .bind(value)
                .bind(probability)
                .execute(&mut *conn)
                .await?;
            }
        }
        "Deal" => {
            let ev: DealEvent = decode(e)?;
            let status = match ev {
                DealEvent::DealDrafted { .. } => "draft",
                DealEvent::DealActivated {} => "active",
                DealEvent::DealCompleted { .. } => "completed",
                DealEvent::DealDefaulted { .. } => "defaulted",
                DealEvent::DealCancelled { .. } => "cancelled",
                _ => return Ok(()),
            };
            sqlx::query(
                "INSERT INTO kpi_deal_facts (deal_id, status) VALUES ($1, $2::deal_status) \
                 ON CONFLICT (deal_id) DO UPDATE SET status = EXCLUDED.status",
            )
            .bind(id)
            .bind(status)
            .execute(&mut *conn)
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn fact<T>(
    conn: &mut PgConnection,
    booking: Uuid,
    set: &str,
    value: T,
) -> Result<(), ProjectionError>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    sqlx::query(&format!(
        "UPDATE kpi_booking_facts SET {set} WHERE booking_id = $1"
    ))
    .bind(booking)
    .bind(value)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn status(
    conn: &mut PgConnection,
    booking: Uuid,
    status: &str,
) -> Result<(), ProjectionError> {
    fact(
        conn,
        booking,
        "status = $2::booking_status",
        status.to_string(),
    )
    .await
}

async fn set_total(
    conn: &mut PgConnection,
    booking: Uuid,
    total: Decimal,
) -> Result<(), ProjectionError> {
    fact(
        conn,
        booking,
        "outstanding_amount = greatest(outstanding_amount + $2 - total_amount, 0), total_amount = $2",
        total,
    )
    .await
}

fn ratio(num: i64, den: i64) -> serde_json::Value {
    if den == 0 {
        serde_json::Value::Null
    } else {
        json!((Decimal::from(num) / Decimal::from(den)).round_dp(4))
    }
}

/// Computes and stores the snapshot of `day` from the current facts.
async fn snapshot(
    conn: &mut PgConnection,
    day: NaiveDate,
    position: i64,
) -> Result<(), ProjectionError> {
    let counts: Option<(i32, i32, Decimal, i32, i32)> = sqlx::query_as(
        "SELECT bookings_created, bookings_cancelled, revenue, deliveries, deliveries_on_time \
         FROM kpi_daily_counts WHERE day = $1",
    )
    .bind(day)
    .fetch_optional(&mut *conn)
    .await?;
    let (created, cancelled, revenue, deliveries, on_time) =
        counts.unwrap_or((0, 0, Decimal::ZERO, 0, 0));
    let (active, outstanding): (i64, Option<Decimal>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status IN ('confirmed', 'delivery', 'in_progress')), \
                sum(outstanding_amount) FILTER (WHERE status <> 'cancelled') \
         FROM kpi_booking_facts",
    )
    .fetch_one(&mut *conn)
    .await?;
    let (pipeline, won, lost): (Option<Decimal>, i64, i64) = sqlx::query_as(
        "SELECT sum(value_amount * probability) FILTER (WHERE status = 'active'), \
                count(*) FILTER (WHERE status = 'won'), count(*) FILTER (WHERE status = 'lost') \
         FROM kpi_lead_facts",
    )
    .fetch_one(&mut *conn)
    .await?;
    let active_deals: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kpi_deal_facts WHERE status = 'active'")
            .fetch_one(&mut *conn)
            .await?;

    // Utilization over the 30 days ending at the end of the business day.
    let end_of_day = Utc.from_utc_datetime(
        &(day + Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default(),
    ) - Duration::hours(4);
    let fleet: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM vehicles WHERE status <> 'sold' ORDER BY id")
            .fetch_all(&mut *conn)
            .await?;
    let periods: Vec<(Option<Uuid>, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT vehicle_id, start_at, end_at FROM kpi_booking_facts \
         WHERE status IN ('confirmed', 'delivery', 'in_progress', 'completed') AND vehicle_id IS NOT NULL",
    )
    .fetch_all(&mut *conn)
    .await?;
    let fleet_size = fleet.len() as i64;
    let mut total_util = Decimal::ZERO;
    for v in &fleet {
        let mine: Vec<_> = periods
            .iter()
            .filter(|(id, _, _)| id.as_ref() == Some(v))
            .map(|&(_, s, e)| (s, e))
            .collect();
        total_util += rules::utilization(&mine, end_of_day);
    }
    let (fleet_utilization, revenue_per_car) = if fleet_size == 0 {
        (serde_json::Value::Null, serde_json::Value::Null)
    } else {
        (
            json!((total_util / Decimal::from(fleet_size)).round_dp(2)),
            json!((revenue / Decimal::from(fleet_size)).round_dp(2)),
        )
    };
    let metrics = json!({
        "active_bookings": active,
        "bookings_created": created,
        "bookings_cancelled": cancelled,
        "revenue": revenue,
        "fleet_utilization": fleet_utilization,
        "avg_revenue_per_car": revenue_per_car,
        "sla_compliance": ratio(i64::from(on_time), i64::from(deliveries)),
        "deliveries": deliveries,
        "pipeline_value": pipeline.unwrap_or_default().round_dp(2),
        "lead_win_rate": ratio(won, won + lost),
        "active_deals": active_deals,
        "outstanding_amount": outstanding.unwrap_or_default(),
    });
    let start_of_day = end_of_day - Duration::days(1);
    let id = crate::util::stable_id(&format!("kpi:{day}"));
    sqlx::query(
        "INSERT INTO kpi_snapshots (id, snapshot_date, metrics, created_at, last_position) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (snapshot_date) DO UPDATE SET metrics = EXCLUDED.metrics, \
           last_position = EXCLUDED.last_position",
    )
    .bind(id)
    .bind(day)
    .bind(metrics)
    .bind(start_of_day)
    .bind(position)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
