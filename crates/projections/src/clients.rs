//! `clients`: registration details, and the derived tier, segment, LTV, last booking and
//! outstanding amount (SPEC §3). Tier and segment are never set by a command: they follow from
//! the client's bookings (`client_booking_facts`) and, for the segment, from the clock.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::booking::BookingEvent;
use domain::client::{Client, ClientEvent};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::bookings::{Tracked, load_states, save_state};
use crate::rules;
use crate::util::{aggregate_uuid, decode};
use crate::{Projection, ProjectionError};

pub struct Clients;

#[async_trait::async_trait]
impl Projection for Clients {
    fn name(&self) -> &'static str {
        "clients"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["clients", "client_booking_facts", "client_states"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut ids = Vec::new();
        for e in events.iter().filter(|e| e.aggregate_type == Client::TYPE) {
            ids.push(aggregate_uuid(e)?);
        }
        let mut states: HashMap<Uuid, Tracked<Client>> =
            load_states(conn, "client_states", &ids).await?;
        // Clients whose derived figures must be recomputed, with the time of the latest event.
        let mut dirty: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        let mut registered = BTreeSet::new();

        for e in events {
            match e.aggregate_type.as_str() {
                "Client" => {
                    let ev: ClientEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    let t = states.entry(id).or_default();
                    t.state.apply(ev);
                    // PII stays in the event store only.
                    t.state.passport_number = None;
                    t.state.emirates_id = None;
                    t.touch(e);
                    registered.insert(id);
                    dirty.insert(id, e.recorded_at);
                }
                "Booking" => {
                    let ev: BookingEvent = decode(e)?;
                    let booking = aggregate_uuid(e)?;
                    if let Some(client) = booking_fact(conn, booking, &ev).await? {
                        dirty.insert(client, e.recorded_at);
                    }
                }
                _ => {}
            }
        }
        for id in &registered {
            if let Some(t) = states.get(id) {
                save_state(conn, "client_states", *id, t).await?;
                write_client(conn, *id, t).await?;
            }
        }
        for (client, at) in dirty {
            recompute(conn, Some(client), at).await?;
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

/// Updates the projection's record of a booking; returns the booking's client.
async fn booking_fact(
    conn: &mut PgConnection,
    booking: Uuid,
    ev: &BookingEvent,
) -> Result<Option<Uuid>, ProjectionError> {
    use BookingEvent as E;
    let sql: (&str, Vec<Decimal>, Option<DateTime<Utc>>) = match ev {
        E::BookingCreated {
            client_id,
            start_at,
            total_amount,
            ..
        } => {
            sqlx::query(
                "INSERT INTO client_booking_facts (booking_id, client_id, start_at, total_amount, outstanding_amount) \
                 VALUES ($1, $2, $3, $4, $4)",
            )
            .bind(booking)
            .bind(client_id)
            .bind(start_at)
            .bind(total_amount.amount())
            .execute(&mut *conn)
            .await?;
            return Ok(Some(*client_id));
        }
        E::BookingRescheduled {
            start_at,
            total_amount,
            ..
        } => (
            "UPDATE client_booking_facts SET start_at = $3, \
               outstanding_amount = greatest(outstanding_amount + $2 - total_amount, 0), total_amount = $2 \
             WHERE booking_id = $1 RETURNING client_id",
            vec![total_amount.amount()],
            Some(*start_at),
        ),
        E::BookingServiceAdded { total_amount, .. }
        | E::BookingServiceRemoved { total_amount, .. }
        | E::BookingExtended { total_amount, .. } => (
            "UPDATE client_booking_facts SET \
               outstanding_amount = greatest(outstanding_amount + $2 - total_amount, 0), total_amount = $2 \
             WHERE booking_id = $1 RETURNING client_id",
            vec![total_amount.amount()],
            None,
        ),
        E::BookingPaymentRecorded {
            outstanding_amount, ..
        } => (
            "UPDATE client_booking_facts SET outstanding_amount = $2 \
             WHERE booking_id = $1 RETURNING client_id",
            vec![outstanding_amount.amount()],
            None,
        ),
        E::BookingCancelled { .. } => (
            "UPDATE client_booking_facts SET cancelled = true WHERE booking_id = $1 RETURNING client_id",
            vec![],
            None,
        ),
        _ => return Ok(None),
    };
    let (query, amounts, start) = sql;
    let mut q = sqlx::query_scalar::<_, Uuid>(query).bind(booking);
    for a in amounts {
        q = q.bind(a);
    }
    if let Some(s) = start {
        q = q.bind(s);
    }
    Ok(q.fetch_optional(&mut *conn).await?)
}

async fn write_client(
    conn: &mut PgConnection,
    id: Uuid,
    t: &Tracked<Client>,
) -> Result<(), ProjectionError> {
    let c = &t.state;
    let channels: Vec<String> = c
        .preferred_channels
        .iter()
        .map(crate::bookings::enum_str)
        .collect();
    sqlx::query(
        "INSERT INTO clients (id, kommo_contact_id, zoho_contact_id, name, phone, email, \
           residency_country, preferred_language, preferred_channels, timezone, gender, date_of_birth, \
           created_at, updated_at, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (id) DO UPDATE SET kommo_contact_id = EXCLUDED.kommo_contact_id, \
           zoho_contact_id = EXCLUDED.zoho_contact_id, name = EXCLUDED.name, phone = EXCLUDED.phone, \
           email = EXCLUDED.email, residency_country = EXCLUDED.residency_country, \
           preferred_language = EXCLUDED.preferred_language, \
           preferred_channels = EXCLUDED.preferred_channels, timezone = EXCLUDED.timezone, \
           gender = EXCLUDED.gender, date_of_birth = EXCLUDED.date_of_birth, \
           updated_at = EXCLUDED.updated_at, last_position = EXCLUDED.last_position",
    )
    .bind(id)
    .bind(&c.kommo_contact_id)
    .bind(&c.zoho_contact_id)
    .bind(&c.name)
    .bind(c.phone.as_ref().map(|p| p.as_str().to_string()))
    .bind(c.email.as_ref().map(|p| p.as_str().to_string()))
    .bind(c.residency_country.as_ref().map(|p| p.as_str().to_string()))
    .bind(&c.preferred_language)
    .bind(channels)
    .bind(&c.timezone)
    .bind(&c.gender)
    .bind(c.date_of_birth)
    .bind(t.created_at)
    .bind(t.updated_at)
    .bind(t.last_position)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Recomputes LTV, last booking, outstanding, tier and segment of one client (or of all, for
/// the tick) as of `now`. Writes only rows whose figures change.
pub async fn recompute(
    conn: &mut PgConnection,
    client: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        Uuid,
        Option<Decimal>,
        Option<DateTime<Utc>>,
        Option<Decimal>,
        String,
        String,
        Decimal,
        Option<DateTime<Utc>>,
        Option<i32>,
        Decimal,
    )> = sqlx::query_as(
        "SELECT c.id, f.ltv, f.last_start, f.outstanding, c.tier::text, c.segment::text, \
           c.lifetime_value, c.last_booking_at, c.days_since_last_booking, c.outstanding_amount \
         FROM clients c \
         LEFT JOIN (SELECT client_id, sum(total_amount) AS ltv, max(start_at) AS last_start, \
                      sum(outstanding_amount) AS outstanding \
                    FROM client_booking_facts \
                    WHERE NOT cancelled AND ($1::uuid IS NULL OR client_id = $1) \
                    GROUP BY client_id) f \
           ON f.client_id = c.id \
         WHERE $1::uuid IS NULL OR c.id = $1",
    )
    .bind(client)
    .fetch_all(&mut *conn)
    .await?;
    for (id, ltv, last_start, outstanding, tier0, segment0, ltv0, last0, days0, out0) in rows {
        let ltv = ltv.unwrap_or(Decimal::ZERO);
        let outstanding = outstanding.unwrap_or(Decimal::ZERO);
        let days = last_start.map(|s| rules::days_since(s, now));
        let tier = rules::tier(ltv).as_str();
        let segment = rules::segment(ltv, days).as_str();
        let days_i32 = days.map(|d| d as i32);
        if tier == tier0
            && segment == segment0
            && ltv == ltv0
            && last_start == last0
            && days_i32 == days0
            && outstanding == out0
        {
            continue;
        }
        sqlx::query(
            "UPDATE clients SET lifetime_value = $2, last_booking_at = $3, \
               days_since_last_booking = $4, outstanding_amount = $5, \
               tier = $6::client_tier, segment = $7::client_segment \
             WHERE id = $1",
        )
        .bind(id)
        .bind(ltv)
        .bind(last_start)
        .bind(days_i32)
        .bind(outstanding)
        .bind(tier)
        .bind(segment)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
