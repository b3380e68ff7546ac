//! `bookings`, `booking_additional_services`, `booking_invoices`, `booking_timeline_events` and
//! `calendar_events` (bookings and maintenance/repair blocks).
//!
//! A booking's row is derived from its state folded by the domain's own `apply`, kept in
//! `booking_states`, so totals and statuses are computed in exactly one place.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::booking::{Booking, BookingEvent, BookingStatus};
use domain::vehicle_block::VehicleBlockEvent;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::util::{actor, aggregate_uuid, decode, event_row_id};
use crate::{Projection, ProjectionError};

pub struct Bookings;

/// A folded state and when it last changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tracked<A> {
    pub state: A,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub status_changed_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub last_position: i64,
}

impl<A> Tracked<A> {
    pub fn touch(&mut self, event: &RecordedEvent) {
        self.created_at.get_or_insert(event.recorded_at);
        self.updated_at = Some(event.recorded_at);
        self.version = event.sequence;
        self.last_position = event.position.global_position;
    }
}

/// Loads folded states of `ids` from `table`.
pub async fn load_states<A: serde::de::DeserializeOwned + Default>(
    conn: &mut PgConnection,
    table: &str,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Tracked<A>>, ProjectionError> {
    let rows: Vec<(Uuid, serde_json::Value)> =
        sqlx::query_as(&format!("SELECT id, state FROM {table} WHERE id = ANY($1)"))
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?;
    let mut out = HashMap::new();
    for (id, state) in rows {
        let tracked: Tracked<A> =
            serde_json::from_value(state).map_err(|e| ProjectionError::Unhandleable {
                position: 0,
                event_type: table.into(),
                event_version: String::new(),
                reason: format!("stored state of {id} is unreadable: {e}"),
            })?;
        out.insert(id, tracked);
    }
    Ok(out)
}

/// Saves folded states.
pub async fn save_state<A: Serialize>(
    conn: &mut PgConnection,
    table: &str,
    id: Uuid,
    tracked: &Tracked<A>,
) -> Result<(), ProjectionError> {
    let json = serde_json::to_value(tracked).map_err(|e| ProjectionError::Unhandleable {
        position: tracked.last_position,
        event_type: table.into(),
        event_version: String::new(),
        reason: e.to_string(),
    })?;
    sqlx::query(&format!(
        "INSERT INTO {table} (id, state) VALUES ($1, $2) \
         ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state"
    ))
    .bind(id)
    .bind(json)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Calendar status of a booking status (SPEC §3).
pub fn calendar_status(status: BookingStatus) -> &'static str {
    match status {
        BookingStatus::Lead | BookingStatus::Confirmed => "scheduled",
        BookingStatus::Delivery | BookingStatus::InProgress => "in_progress",
        BookingStatus::Completed => "done",
        BookingStatus::Cancelled => "cancelled",
    }
}

/// The human message of a timeline row.
fn message(event: &BookingEvent, state: &Booking) -> String {
    use BookingEvent as E;
    let code = &state.external_code;
    match event {
        E::BookingCreated {
            rental_duration_days,
            total_amount,
            currency,
            ..
        } => format!(
            "Booking {code} created: {rental_duration_days} day(s), total {total_amount} {currency}"
        ),
        E::BookingVehicleAssigned { vehicle_id, .. } => format!("Vehicle {vehicle_id} assigned"),
        E::BookingDriverAssigned { driver_id } => format!("Driver {driver_id} assigned"),
        E::BookingOwnerChanged { owner_id } => format!("Owner changed to {owner_id}"),
        E::BookingRescheduled {
            start_at, end_at, ..
        } => format!("Rescheduled to {start_at} - {end_at}"),
        E::BookingServiceAdded { line, .. } => format!(
            "Service {} added ({} x {})",
            line.service_id, line.quantity, line.price
        ),
        E::BookingServiceRemoved { line_id, .. } => format!("Service line {line_id} removed"),
        E::BookingConfirmed { .. } => "Booking confirmed".into(),
        E::BookingDeliveryStarted { promised_at, .. } => {
            format!("Delivery started, promised for {promised_at}")
        }
        E::BookingRentalStarted {
            delivered_on_time, ..
        } => {
            if *delivered_on_time {
                "Car handed over on time; rental started".into()
            } else {
                "Car handed over late; rental started".into()
            }
        }
        E::BookingExtended {
            new_end_at, amount, ..
        } => format!("Extended to {new_end_at} for {amount}"),
        E::BookingCompleted { returned_at, .. } => format!("Returned at {returned_at}; completed"),
        E::BookingCancelled { reason, .. } => format!("Cancelled: {reason}"),
        E::BookingInvoiceIssued { label, amount, .. } => {
            format!("Invoice {label} issued: {amount}")
        }
        E::BookingPaymentRecorded {
            amount,
            outstanding_amount,
            ..
        } => format!("Payment of {amount} recorded; outstanding {outstanding_amount}"),
        E::BookingSalesServiceRated { rating, .. } => format!("Sales service rated {rating}/10"),
        E::BookingKommoStatusApplied { kommo_status_id } => {
            format!("Kommo status {kommo_status_id} applied")
        }
        E::BookingZohoSalesOrderLinked {
            zoho_sales_order_id,
        } => format!("Zoho sales order {zoho_sales_order_id} linked"),
        E::BookingZohoSyncFailed { .. } => "Zoho sync failed".into(),
    }
}

#[async_trait::async_trait]
impl Projection for Bookings {
    fn name(&self) -> &'static str {
        "bookings"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "bookings",
            "booking_additional_services",
            "booking_invoices",
            "booking_timeline_events",
            "calendar_events",
            "booking_states",
        ]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut ids = Vec::new();
        for e in events.iter().filter(|e| e.aggregate_type == Booking::TYPE) {
            ids.push(aggregate_uuid(e)?);
        }
        ids.sort_unstable();
        ids.dedup();
        let mut states: HashMap<Uuid, Tracked<Booking>> =
            load_states(conn, "booking_states", &ids).await?;
        let mut touched = BTreeMap::new();
        let mut timeline: Vec<TimelineRow> = Vec::new();

        for e in events {
            match e.aggregate_type.as_str() {
                "Booking" => {
                    let ev: BookingEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    let t = states.entry(id).or_default();
                    let status_before = (t.state.created, t.state.status);
                    t.state.apply(ev.clone());
                    t.touch(e);
                    if status_before != (t.state.created, t.state.status) {
                        t.status_changed_at = Some(e.recorded_at);
                    }
                    timeline.push(TimelineRow {
                        id: event_row_id(e),
                        booking_id: id,
                        sequence: e.sequence,
                        event_type: e.event_type.clone(),
                        message: message(&ev, &t.state),
                        payload: serde_json::to_value(&ev).unwrap_or_default(),
                        actor: actor(e),
                        occurred_at: e.recorded_at,
                        position: e.position.global_position,
                    });
                    if let BookingEvent::BookingInvoiceIssued {
                        invoice_id,
                        label,
                        invoice_type,
                        amount,
                        issued_at,
                        due_at,
                    } = &ev
                    {
                        sqlx::query(
                            "INSERT INTO booking_invoices \
                             (id, booking_id, label, invoice_type, amount, status, issued_at, due_at, last_position) \
                             VALUES ($1, $2, $3, $4, $5, 'issued', $6, $7, $8)",
                        )
                        .bind(invoice_id)
                        .bind(id)
                        .bind(label)
                        .bind(invoice_type)
                        .bind(amount.amount())
                        .bind(issued_at)
                        .bind(due_at)
                        .bind(e.position.global_position)
                        .execute(&mut *conn)
                        .await?;
                    }
                    touched.insert(id, ());
                }
                "VehicleBlock" => {
                    let ev: VehicleBlockEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    apply_block(conn, id, &ev, e).await?;
                }
                _ => {}
            }
        }

        insert_timeline(conn, timeline).await?;
        for id in touched.keys() {
            if let Some(t) = states.get(id) {
                save_state(conn, "booking_states", *id, t).await?;
                write_booking(conn, *id, t).await?;
            }
        }
        Ok(())
    }
}

/// One `booking_timeline_events` row.
struct TimelineRow {
    id: Uuid,
    booking_id: Uuid,
    sequence: i64,
    event_type: String,
    message: String,
    payload: serde_json::Value,
    actor: serde_json::Value,
    occurred_at: DateTime<Utc>,
    position: i64,
}

/// Inserts a batch's timeline rows in one statement.
async fn insert_timeline(
    conn: &mut PgConnection,
    rows: Vec<TimelineRow>,
) -> Result<(), ProjectionError> {
    if rows.is_empty() {
        return Ok(());
    }
    #[allow(clippy::type_complexity)] // one vector per column, bound as arrays
    let mut cols: (
        Vec<Uuid>,
        Vec<Uuid>,
        Vec<i64>,
        Vec<String>,
        Vec<String>,
        Vec<serde_json::Value>,
        Vec<serde_json::Value>,
        Vec<DateTime<Utc>>,
        Vec<i64>,
    ) = Default::default();
    for r in rows {
        cols.0.push(r.id);
        cols.1.push(r.booking_id);
        cols.2.push(r.sequence);
        cols.3.push(r.event_type);
        cols.4.push(r.message);
        cols.5.push(r.payload);
        cols.6.push(r.actor);
        cols.7.push(r.occurred_at);
        cols.8.push(r.position);
    }
    sqlx::query(
        "INSERT INTO booking_timeline_events \
         (id, booking_id, sequence, event_type, message, payload, actor, occurred_at, last_position) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], \
           $6::jsonb[], $7::jsonb[], $8::timestamptz[], $9::bigint[])",
    )
    .bind(cols.0)
    .bind(cols.1)
    .bind(cols.2)
    .bind(cols.3)
    .bind(cols.4)
    .bind(cols.5)
    .bind(cols.6)
    .bind(cols.7)
    .bind(cols.8)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn apply_block(
    conn: &mut PgConnection,
    id: Uuid,
    ev: &VehicleBlockEvent,
    e: &RecordedEvent,
) -> Result<(), ProjectionError> {
    match ev {
        VehicleBlockEvent::VehicleBlocked {
            vehicle_id,
            kind,
            start_at,
            end_at,
            description,
        } => {
            let kind = serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "maintenance".into());
            let title = match description {
                Some(d) => format!("{kind}: {d}"),
                None => kind,
            };
            sqlx::query(
                "INSERT INTO calendar_events \
                 (id, vehicle_id, booking_id, maintenance_job_id, event_type, title, start_at, end_at, status, last_position) \
                 VALUES ($1, $2, NULL, $1, 'maintenance', $3, $4, $5, 'scheduled', $6)",
            )
            .bind(id)
            .bind(vehicle_id)
            .bind(title)
            .bind(start_at)
            .bind(end_at)
            .bind(e.position.global_position)
            .execute(&mut *conn)
            .await?;
        }
        VehicleBlockEvent::VehicleBlockRemoved { .. } => {
            sqlx::query(
                "UPDATE calendar_events SET status = 'cancelled', last_position = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(e.position.global_position)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

async fn write_booking(
    conn: &mut PgConnection,
    id: Uuid,
    t: &Tracked<Booking>,
) -> Result<(), ProjectionError> {
    let b = &t.state;
    let (Some(start_at), Some(end_at)) = (b.start_at, b.end_at) else {
        return Ok(());
    };
    let on_time = match (b.delivered_at, b.promised_at) {
        (Some(d), Some(p)) => Some(d <= p),
        (Some(_), None) => Some(true),
        _ => None,
    };
    sqlx::query(
        "INSERT INTO bookings (id, external_code, client_id, vehicle_id, driver_id, owner_id, lead_id, \
           status, booking_type, priority, channel, start_at, end_at, rental_duration_days, currency, \
           price_daily, total_amount, paid_amount, outstanding_amount, deposit_amount, advance_payment, \
           full_insurance_fee, pickup_location, dropoff_location, kommo_status_id, zoho_sales_order_id, \
           zoho_sync_status, zoho_sync_error, sales_service_rating, sales_service_feedback, \
           delivery_promised_at, delivery_actual_at, delivered_on_time, pickup_mileage_km, \
           return_mileage_km, returned_at, cancel_reason, status_changed_at, created_at, updated_at, \
           version, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::booking_status, $9::booking_type, $10::priority_level, \
           $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, \
           $29, $30, $31, $32, $33, $34, $35, $36, $37, $38, $39, $40, $41, $42) \
         ON CONFLICT (id) DO UPDATE SET external_code = EXCLUDED.external_code, \
           client_id = EXCLUDED.client_id, vehicle_id = EXCLUDED.vehicle_id, \
           driver_id = EXCLUDED.driver_id, owner_id = EXCLUDED.owner_id, lead_id = EXCLUDED.lead_id, \
           status = EXCLUDED.status, booking_type = EXCLUDED.booking_type, \
           priority = EXCLUDED.priority, channel = EXCLUDED.channel, start_at = EXCLUDED.start_at, \
           end_at = EXCLUDED.end_at, rental_duration_days = EXCLUDED.rental_duration_days, \
           currency = EXCLUDED.currency, price_daily = EXCLUDED.price_daily, \
           total_amount = EXCLUDED.total_amount, paid_amount = EXCLUDED.paid_amount, \
           outstanding_amount = EXCLUDED.outstanding_amount, deposit_amount = EXCLUDED.deposit_amount, \
           advance_payment = EXCLUDED.advance_payment, full_insurance_fee = EXCLUDED.full_insurance_fee, \
           pickup_location = EXCLUDED.pickup_location, dropoff_location = EXCLUDED.dropoff_location, \
           kommo_status_id = EXCLUDED.kommo_status_id, zoho_sales_order_id = EXCLUDED.zoho_sales_order_id, \
           zoho_sync_status = EXCLUDED.zoho_sync_status, zoho_sync_error = EXCLUDED.zoho_sync_error, \
           sales_service_rating = EXCLUDED.sales_service_rating, \
           sales_service_feedback = EXCLUDED.sales_service_feedback, \
           delivery_promised_at = EXCLUDED.delivery_promised_at, \
           delivery_actual_at = EXCLUDED.delivery_actual_at, \
           delivered_on_time = EXCLUDED.delivered_on_time, pickup_mileage_km = EXCLUDED.pickup_mileage_km, \
           return_mileage_km = EXCLUDED.return_mileage_km, returned_at = EXCLUDED.returned_at, \
           cancel_reason = EXCLUDED.cancel_reason, status_changed_at = EXCLUDED.status_changed_at, \
           updated_at = EXCLUDED.updated_at, version = EXCLUDED.version, \
           last_position = EXCLUDED.last_position",
    )
    .bind(id)
    .bind(&b.external_code)
    .bind(b.client_id)
    .bind(b.vehicle_id)
    .bind(b.driver_id)
    .bind(b.owner_id)
    .bind(b.lead_id)
    .bind(b.status.as_str())
    .bind(enum_str(&b.booking_type))
    .bind(enum_str(&b.priority))
    .bind(&b.channel)
    .bind(start_at)
    .bind(end_at)
    .bind(b.rental_duration_days as i32)
    .bind(&b.currency)
    .bind(b.price_daily.amount())
    .bind(b.total_amount.amount())
    .bind(b.paid_amount.amount())
    .bind(b.outstanding_amount().amount())
    .bind(b.deposit_amount.amount())
    .bind(b.advance_payment.amount())
    .bind(b.full_insurance_fee.amount())
    .bind(&b.pickup_location)
    .bind(&b.dropoff_location)
    .bind(b.kommo_status_id)
    .bind(&b.zoho_sales_order_id)
    .bind(&b.zoho_sync_status)
    .bind(&b.zoho_sync_error)
    .bind(b.sales_service_rating)
    .bind(&b.sales_service_feedback)
    .bind(b.promised_at)
    .bind(b.delivered_at)
    .bind(on_time)
    .bind(b.pickup_mileage_km)
    .bind(b.return_mileage_km)
    .bind(b.returned_at)
    .bind(&b.cancel_reason)
    .bind(t.status_changed_at.or(t.created_at))
    .bind(t.created_at)
    .bind(t.updated_at)
    .bind(t.version)
    .bind(t.last_position)
    .execute(&mut *conn)
    .await?;

    sqlx::query("DELETE FROM booking_additional_services WHERE booking_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    for s in &b.services {
        sqlx::query(
            "INSERT INTO booking_additional_services \
             (id, booking_id, service_id, price, quantity, description, last_position) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(s.line_id)
        .bind(id)
        .bind(s.service_id)
        .bind(s.price.amount())
        .bind(s.quantity)
        .bind(&s.description)
        .bind(t.last_position)
        .execute(&mut *conn)
        .await?;
    }

    match b.vehicle_id {
        Some(vehicle_id) => {
            sqlx::query(
                "INSERT INTO calendar_events \
                 (id, vehicle_id, booking_id, maintenance_job_id, event_type, title, start_at, end_at, status, last_position) \
                 VALUES ($1, $2, $1, NULL, 'booking', $3, $4, $5, $6::event_status, $7) \
                 ON CONFLICT (id) DO UPDATE SET vehicle_id = EXCLUDED.vehicle_id, title = EXCLUDED.title, \
                   start_at = EXCLUDED.start_at, end_at = EXCLUDED.end_at, status = EXCLUDED.status, \
                   last_position = EXCLUDED.last_position",
            )
            .bind(id)
            .bind(vehicle_id)
            .bind(&b.external_code)
            .bind(start_at)
            .bind(end_at)
            .bind(calendar_status(b.status))
            .bind(t.last_position)
            .execute(&mut *conn)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM calendar_events WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// The snake_case name of a serde enum value.
pub fn enum_str<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
