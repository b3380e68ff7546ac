//! `bookings`, `booking_additional_services`, `booking_invoices`, `booking_timeline_events` and
//! `calendar_events` (bookings and maintenance/repair blocks).
//!
//! A booking's row is derived from its state folded by the domain's own `apply`, kept in
//! `booking_states`, so totals and statuses are computed in exactly one place.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::booking::{Booking, BookingEvent, BookingStatus, ServiceLine};
use domain::vehicle_block::VehicleBlockEvent;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::util::{actor_json, aggregate_uuid, decode, event_row_id};
use crate::write::{CopyStream, JsonText, Row, States, Table, delete_where, json_row};
use crate::{Projection, ProjectionError, Session};

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

    fn session(&self, fresh: bool) -> Option<Box<dyn Session>> {
        Some(Box::new(BookingsSession {
            fresh,
            states: States::new("booking_states", fresh),
            timeline: None,
        }))
    }
}

struct BookingsSession {
    /// A rebuild's session (see [`Table::write`]).
    fresh: bool,
    states: States<Booking>,
    /// A rebuild's timeline, streamed on the second connection while the session folds.
    timeline: Option<CopyStream>,
}

const INVOICES: Table = Table {
    name: "booking_invoices",
    columns: &[
        "id",
        "booking_id",
        "label",
        "invoice_type",
        "amount",
        "status",
        "issued_at",
        "due_at",
        "last_position",
    ],
    key: &[],
    keep: &[],
};

const CALENDAR: Table = Table {
    name: "calendar_events",
    columns: &[
        "id",
        "vehicle_id",
        "booking_id",
        "maintenance_job_id",
        "event_type",
        "title",
        "start_at",
        "end_at",
        "status",
        "last_position",
    ],
    key: &["id"],
    keep: &["booking_id", "maintenance_job_id", "event_type"],
};

const SERVICES: Table = Table {
    name: "booking_additional_services",
    columns: &[
        "id",
        "booking_id",
        "service_id",
        "price",
        "quantity",
        "description",
        "last_position",
    ],
    key: &[],
    keep: &[],
};

const BOOKINGS: Table = Table {
    name: "bookings",
    columns: &[
        "id",
        "external_code",
        "client_id",
        "vehicle_id",
        "driver_id",
        "owner_id",
        "lead_id",
        "status",
        "booking_type",
        "priority",
        "channel",
        "start_at",
        "end_at",
        "rental_duration_days",
        "currency",
        "price_daily",
        "total_amount",
        "paid_amount",
        "outstanding_amount",
        "deposit_amount",
        "advance_payment",
        "full_insurance_fee",
        "pickup_location",
        "dropoff_location",
        "kommo_status_id",
        "zoho_sales_order_id",
        "zoho_sync_status",
        "zoho_sync_error",
        "sales_service_rating",
        "sales_service_feedback",
        "delivery_promised_at",
        "delivery_actual_at",
        "delivered_on_time",
        "pickup_mileage_km",
        "return_mileage_km",
        "returned_at",
        "cancel_reason",
        "status_changed_at",
        "created_at",
        "updated_at",
        "version",
        "last_position",
    ],
    key: &["id"],
    keep: &["created_at"],
};

#[async_trait::async_trait]
impl Session for BookingsSession {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut ids = Vec::new();
        for e in events.iter().filter(|e| e.aggregate_type == Booking::TYPE) {
            ids.push(aggregate_uuid(e)?);
        }
        self.states.load(conn, ids).await?;
        let mut timeline: Vec<TimelineRow> = Vec::new();
        let mut invoices = Vec::new();
        let mut blocks = Vec::new();
        let mut unblocked: (Vec<Uuid>, Vec<i64>) = Default::default();

        for e in events {
            match e.aggregate_type.as_str() {
                "Booking" => {
                    let ev: BookingEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    let t = self.states.change(id);
                    let status_before = (t.state.created, t.state.status);
                    t.state.apply(ev.clone());
                    t.touch(e);
                    if status_before != (t.state.created, t.state.status) {
                        t.status_changed_at = Some(e.recorded_at);
                    }
                    let message = message(&ev, &t.state);
                    if let BookingEvent::BookingInvoiceIssued {
                        invoice_id,
                        label,
                        invoice_type,
                        amount,
                        issued_at,
                        due_at,
                    } = &ev
                    {
                        invoices.push(json!({
                            "id": invoice_id,
                            "booking_id": id,
                            "label": label,
                            "invoice_type": invoice_type,
                            "amount": amount.amount(),
                            "status": "issued",
                            "issued_at": issued_at,
                            "due_at": due_at,
                            "last_position": e.position.global_position,
                        }));
                    }
                    timeline.push(TimelineRow {
                        id: event_row_id(e),
                        booking_id: id,
                        sequence: e.sequence,
                        event_type: e.event_type.clone(),
                        message,
                        payload: payload_text(e, &ev),
                        actor: actor_json(e),
                        occurred_at: e.recorded_at,
                        position: e.position.global_position,
                    });
                }
                "VehicleBlock" => {
                    let ev: VehicleBlockEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    match block_row(id, &ev, e) {
                        Some(row) => blocks.push(row),
                        None => {
                            unblocked.0.push(id);
                            unblocked.1.push(e.position.global_position);
                        }
                    }
                }
                _ => {}
            }
        }

        match &mut self.timeline {
            Some(stream) => {
                for row in &timeline {
                    stream.rows.row(|out| row.fields(out))?;
                    stream.send_some().await?;
                }
            }
            None => insert_timeline(conn, timeline).await?,
        }
        INVOICES.write(conn, self.fresh, invoices).await?;
        CALENDAR.write(conn, self.fresh, blocks).await?;
        if !unblocked.0.is_empty() {
            sqlx::query(
                "UPDATE calendar_events c SET status = 'cancelled', last_position = u.p \
                 FROM unnest($1::uuid[], $2::bigint[]) AS u(id, p) WHERE c.id = u.id",
            )
            .bind(unblocked.0)
            .bind(unblocked.1)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let rows = rows_of(&self.states);
        self.states.save(conn).await?;
        Self::write_rows_of(conn, self.fresh, rows).await
    }

    /// The timeline streams on the second connection while the batches are folded; then the
    /// states go in on it while the rows go in on the first.
    async fn replay(
        &mut self,
        conn: &mut PgConnection,
        other: PgConnection,
        batches: &mut tokio::sync::mpsc::Receiver<Arc<Vec<RecordedEvent>>>,
    ) -> Result<(), ProjectionError> {
        self.timeline =
            Some(CopyStream::start(other, "booking_timeline_events", TIMELINE_COLUMNS).await?);
        while let Some(batch) = batches.recv().await {
            self.apply(conn, &batch).await?;
        }
        let Some(timeline) = self.timeline.take() else {
            return Ok(());
        };
        // The states are final: a task of their own writes them on the second connection while
        // this one derives the rows from them and writes those on the first.
        let states = Arc::new(std::mem::replace(
            &mut self.states,
            States::new("booking_states", true),
        ));
        let folded = std::time::Instant::now();
        let saving = tokio::spawn({
            let states = states.clone();
            async move {
                let mut other = timeline.finish().await?;
                let timeline_s = folded.elapsed().as_secs_f64();
                states.copy_changed(&mut other).await?;
                let _ = sqlx::Connection::close(other).await;
                tracing::debug!(
                    timeline_s,
                    states_s = folded.elapsed().as_secs_f64(),
                    "rebuild: bookings timeline and states written"
                );
                Ok::<_, ProjectionError>(())
            }
        });
        let written = copy_rows_of(conn, &states).await;
        if written.is_ok() {
            tracing::debug!(
                rows_s = folded.elapsed().as_secs_f64(),
                "rebuild: bookings rows written"
            );
        }
        let saved = saving.await.map_err(|e| ProjectionError::Unhandleable {
            position: 0,
            event_type: "rebuild".into(),
            event_version: String::new(),
            reason: format!("writing the booking states failed: {e}"),
        })?;
        saved.and(written)
    }
}

/// What a flush writes besides the states.
struct BookingRows {
    ids: Vec<Uuid>,
    rows: Vec<serde_json::Value>,
    services: Vec<serde_json::Value>,
    calendar: Vec<serde_json::Value>,
    off_calendar: Vec<Uuid>,
}

impl BookingsSession {
    async fn write_rows_of(
        conn: &mut PgConnection,
        fresh: bool,
        r: BookingRows,
    ) -> Result<(), ProjectionError> {
        BOOKINGS.write(conn, fresh, r.rows).await?;
        if !fresh {
            // (A rebuild's one flush writes these bookings' rows for the first time.)
            delete_where(conn, "booking_additional_services", "booking_id", &r.ids).await?;
            delete_where(conn, "calendar_events", "id", &r.off_calendar).await?;
        }
        SERVICES.write(conn, fresh, r.services).await?;
        CALENDAR.write(conn, fresh, r.calendar).await?;
        Ok(())
    }
}

/// The rows of the bookings changed since the last flush (read from their states).
fn rows_of(states: &States<Booking>) -> BookingRows {
    let ids = states.changed();
    let (mut rows, mut services, mut calendar, mut off_calendar) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for id in &ids {
        let Some(t) = states.get(id) else {
            continue;
        };
        let Some(row) = json_row(|out| booking_fields(*id, t, out)) else {
            continue;
        };
        rows.push(row);
        services.extend(
            t.state
                .services
                .iter()
                .filter_map(|s| json_row(|out| service_fields(*id, t, s, out))),
        );
        match json_row(|out| calendar_fields(*id, t, out)) {
            Some(row) => calendar.push(row),
            None => off_calendar.push(*id),
        }
    }
    BookingRows {
        ids,
        rows,
        services,
        calendar,
        off_calendar,
    }
}

/// A rebuild's rows, straight from the folded states into the fresh tables.
async fn copy_rows_of(
    conn: &mut PgConnection,
    states: &States<Booking>,
) -> Result<(), ProjectionError> {
    let ids = states.changed();
    let folded: Vec<(Uuid, &Tracked<Booking>)> = ids
        .iter()
        .filter_map(|id| Some((*id, states.get(id)?)))
        .collect();
    let services: Vec<(Uuid, &Tracked<Booking>, &ServiceLine)> = folded
        .iter()
        .filter(|(_, t)| has_period(&t.state))
        .flat_map(|(id, t)| t.state.services.iter().map(move |s| (*id, *t, s)))
        .collect();
    BOOKINGS
        .write_each(conn, true, folded.clone(), |(id, t), out| {
            booking_fields(id, t, out)
        })
        .await?;
    SERVICES
        .write_each(conn, true, services, |(id, t, s), out| {
            service_fields(id, t, s, out)
        })
        .await?;
    CALENDAR
        .write_each(conn, true, folded, |(id, t), out| {
            calendar_fields(id, t, out)
        })
        .await
}

/// Only a booking with its dates has rows.
fn has_period(b: &Booking) -> bool {
    b.start_at.is_some() && b.end_at.is_some()
}

fn service_fields(id: Uuid, t: &Tracked<Booking>, s: &ServiceLine, out: &mut Row<'_>) {
    out.field("id", &s.line_id);
    out.field("booking_id", &id);
    out.field("service_id", &s.service_id);
    out.field("price", &s.price.amount());
    out.field("quantity", &s.quantity);
    out.field("description", &s.description);
    out.field("last_position", &t.last_position);
}

/// The calendar row of a booking with a vehicle and its dates; nothing otherwise.
fn calendar_fields(id: Uuid, t: &Tracked<Booking>, out: &mut Row<'_>) {
    let b = &t.state;
    let (Some(start_at), Some(end_at), Some(vehicle_id)) = (b.start_at, b.end_at, b.vehicle_id)
    else {
        return;
    };
    out.field("id", &id);
    out.field("vehicle_id", &vehicle_id);
    out.field("booking_id", &id);
    out.field("maintenance_job_id", &None::<Uuid>);
    out.field("event_type", "booking");
    out.field("title", &b.external_code);
    // A completed booking holds the car until it came back (as the vehicle guard and
    // utilization count it), early or late, not until the planned end.
    let end_at = match (b.status, b.returned_at) {
        (BookingStatus::Completed, Some(returned)) if returned > start_at => returned,
        _ => end_at,
    };
    out.field("start_at", &start_at);
    out.field("end_at", &end_at);
    out.field("status", calendar_status(b.status));
    out.field("last_position", &t.last_position);
}

/// A timeline row's payload: the stored text when the event is of the version this code
/// writes (serializing the decoded event would give the same document), else the decoded
/// (upcast) event serialized anew.
fn payload_text(e: &RecordedEvent, ev: &BookingEvent) -> String {
    use cqrs_es::DomainEvent;
    if ev.event_version() == e.event_version {
        e.payload.text().to_string()
    } else {
        serde_json::to_string(ev).unwrap_or_else(|_| "null".into())
    }
}

/// One `booking_timeline_events` row.
struct TimelineRow {
    id: Uuid,
    booking_id: Uuid,
    sequence: i64,
    event_type: String,
    message: String,
    /// JSON text (parsed once, by PostgreSQL).
    payload: String,
    actor: String,
    occurred_at: DateTime<Utc>,
    position: i64,
}

const TIMELINE_COLUMNS: &[&str] = &[
    "id",
    "booking_id",
    "sequence",
    "event_type",
    "message",
    "payload",
    "actor",
    "occurred_at",
    "last_position",
];

impl TimelineRow {
    /// The row into a rebuild's `COPY`.
    fn fields(&self, out: &mut Row<'_>) {
        out.field("id", &self.id);
        out.field("booking_id", &self.booking_id);
        out.field("sequence", &self.sequence);
        out.field("event_type", &self.event_type);
        out.field("message", &self.message);
        out.field("payload", &JsonText(&self.payload));
        out.field("actor", &JsonText(&self.actor));
        out.field("occurred_at", &self.occurred_at);
        out.field("last_position", &self.position);
    }
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
        Vec<String>,
        Vec<String>,
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
         SELECT i, b, s, t, m, p::jsonb, a::jsonb, o, l FROM unnest($1::uuid[], $2::uuid[], \
           $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[], \
           $9::bigint[]) AS u(i, b, s, t, m, p, a, o, l)",
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

/// The calendar row of a new block; `None` for a removal.
fn block_row(id: Uuid, ev: &VehicleBlockEvent, e: &RecordedEvent) -> Option<serde_json::Value> {
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
            Some(json!({
                "id": id,
                "vehicle_id": vehicle_id,
                "booking_id": null,
                "maintenance_job_id": id,
                "event_type": "maintenance",
                "title": title,
                "start_at": start_at,
                "end_at": end_at,
                "status": "scheduled",
                "last_position": e.position.global_position,
            }))
        }
        VehicleBlockEvent::VehicleBlockRemoved { .. } => None,
    }
}

/// The `bookings` row of a folded booking that has its dates; nothing otherwise.
fn booking_fields(id: Uuid, t: &Tracked<Booking>, out: &mut Row<'_>) {
    let b = &t.state;
    if !has_period(b) {
        return;
    }
    let on_time = match (b.delivered_at, b.promised_at) {
        (Some(d), Some(p)) => Some(d <= p),
        (Some(_), None) => Some(true),
        _ => None,
    };
    out.field("id", &id);
    out.field("external_code", &b.external_code);
    out.field("client_id", &b.client_id);
    out.field("vehicle_id", &b.vehicle_id);
    out.field("driver_id", &b.driver_id);
    out.field("owner_id", &b.owner_id);
    out.field("lead_id", &b.lead_id);
    out.field("status", b.status.as_str());
    out.field("booking_type", enum_str(&b.booking_type).as_str());
    out.field("priority", enum_str(&b.priority).as_str());
    out.field("channel", &b.channel);
    out.field("start_at", &b.start_at);
    out.field("end_at", &b.end_at);
    out.field("rental_duration_days", &b.rental_duration_days);
    out.field("currency", &b.currency);
    out.field("price_daily", &b.price_daily.amount());
    out.field("total_amount", &b.total_amount.amount());
    out.field("paid_amount", &b.paid_amount.amount());
    out.field("outstanding_amount", &b.outstanding_amount().amount());
    out.field("deposit_amount", &b.deposit_amount.amount());
    out.field("advance_payment", &b.advance_payment.amount());
    out.field("full_insurance_fee", &b.full_insurance_fee.amount());
    out.field("pickup_location", &b.pickup_location);
    out.field("dropoff_location", &b.dropoff_location);
    out.field("kommo_status_id", &b.kommo_status_id);
    out.field("zoho_sales_order_id", &b.zoho_sales_order_id);
    out.field("zoho_sync_status", &b.zoho_sync_status);
    out.field("zoho_sync_error", &b.zoho_sync_error);
    out.field("sales_service_rating", &b.sales_service_rating);
    out.field("sales_service_feedback", &b.sales_service_feedback);
    out.field("delivery_promised_at", &b.promised_at);
    out.field("delivery_actual_at", &b.delivered_at);
    out.field("delivered_on_time", &on_time);
    out.field("pickup_mileage_km", &b.pickup_mileage_km);
    out.field("return_mileage_km", &b.return_mileage_km);
    out.field("returned_at", &b.returned_at);
    out.field("cancel_reason", &b.cancel_reason);
    out.field("status_changed_at", &t.status_changed_at.or(t.created_at));
    out.field("created_at", &t.created_at);
    out.field("updated_at", &t.updated_at);
    out.field("version", &t.version);
    out.field("last_position", &t.last_position);
}

/// The snake_case name of a serde enum value.
pub fn enum_str<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
