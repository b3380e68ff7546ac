//! `clients`: registration details, and the derived tier, segment, LTV, last booking and
//! outstanding amount (SPEC §3). Tier and segment are never set by a command: they follow from
//! the client's bookings (`client_booking_facts`) and, for the segment, from the clock.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::booking::BookingEvent;
use domain::client::{Client, ClientEvent};
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::bookings::Tracked;
use crate::rules;
use crate::util::{aggregate_uuid, decode};
use crate::write::{Row, States, Table};
use crate::{Projection, ProjectionError, Session};

pub struct Clients;

#[async_trait::async_trait]
impl Projection for Clients {
    fn name(&self) -> &'static str {
        "clients"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["clients", "client_booking_facts", "client_states"]
    }

    fn session(&self, fresh: bool) -> Option<Box<dyn Session>> {
        Some(Box::new(ClientsSession {
            states: States::new("client_states", fresh),
            facts: HashMap::new(),
            changed_facts: BTreeSet::new(),
            complete: fresh,
            dirty: HashMap::new(),
        }))
    }

    async fn tick(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        recompute(conn, Recompute::All(now)).await
    }
}

/// What the projection records of a booking (`client_booking_facts`).
#[derive(Debug, Clone)]
struct Fact {
    client_id: Uuid,
    start_at: DateTime<Utc>,
    total_amount: Decimal,
    /// All paid so far (the latest `BookingPaymentRecorded`'s `paid_amount`).
    paid_amount: Decimal,
    cancelled: bool,
}

impl Fact {
    /// `total_amount - paid_amount`, never below zero: the booking's own rule (SPEC §2).
    fn outstanding(&self) -> Decimal {
        rules::outstanding(self.total_amount, self.paid_amount)
    }
}

struct ClientsSession {
    states: States<Client>,
    /// Facts by booking; `None`: looked up, there is none.
    facts: HashMap<Uuid, Option<Fact>>,
    changed_facts: BTreeSet<Uuid>,
    /// Every stored fact is in `facts` (a rebuild into empty tables).
    complete: bool,
    /// Clients whose derived figures must be recomputed, with the time of their latest event.
    dirty: HashMap<Uuid, DateTime<Utc>>,
}

impl ClientsSession {
    async fn load_facts(
        &mut self,
        conn: &mut PgConnection,
        bookings: Vec<Uuid>,
    ) -> Result<(), ProjectionError> {
        let missing: Vec<Uuid> = bookings
            .into_iter()
            .filter(|b| !self.facts.contains_key(b))
            .collect();
        if self.complete || missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<(Uuid, Uuid, DateTime<Utc>, Decimal, Decimal, bool)> = sqlx::query_as(
            "SELECT booking_id, client_id, start_at, total_amount, paid_amount, cancelled \
             FROM client_booking_facts WHERE booking_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?;
        for b in missing {
            self.facts.insert(b, None);
        }
        for (booking, client_id, start_at, total_amount, paid_amount, cancelled) in rows {
            self.facts.insert(
                booking,
                Some(Fact {
                    client_id,
                    start_at,
                    total_amount,
                    paid_amount,
                    cancelled,
                }),
            );
        }
        Ok(())
    }

    /// Updates the record of a booking; returns the booking's client when it has one.
    fn booking_fact(&mut self, booking: Uuid, ev: &BookingEvent) -> Option<Uuid> {
        use BookingEvent as E;
        if let E::BookingCreated {
            client_id,
            start_at,
            total_amount,
            ..
        } = ev
        {
            self.facts.insert(
                booking,
                Some(Fact {
                    client_id: *client_id,
                    start_at: *start_at,
                    total_amount: total_amount.amount(),
                    paid_amount: Decimal::ZERO,
                    cancelled: false,
                }),
            );
            self.changed_facts.insert(booking);
            return Some(*client_id);
        }
        let fact = self.facts.get_mut(&booking)?.as_mut()?;
        match ev {
            E::BookingRescheduled {
                start_at,
                total_amount,
                ..
            } => {
                fact.start_at = *start_at;
                fact.total_amount = total_amount.amount();
            }
            E::BookingServiceAdded { total_amount, .. }
            | E::BookingServiceRemoved { total_amount, .. }
            | E::BookingExtended { total_amount, .. } => fact.total_amount = total_amount.amount(),
            E::BookingPaymentRecorded { paid_amount, .. } => {
                fact.paid_amount = paid_amount.amount();
            }
            E::BookingCancelled { .. } => fact.cancelled = true,
            _ => return None,
        }
        let client = fact.client_id;
        self.changed_facts.insert(booking);
        Some(client)
    }
}

const CLIENTS: Table = Table {
    name: "clients",
    columns: &[
        "id",
        "kommo_contact_id",
        "zoho_contact_id",
        "name",
        "phone",
        "email",
        "residency_country",
        "preferred_language",
        "preferred_channels",
        "timezone",
        "gender",
        "date_of_birth",
        "created_at",
        "updated_at",
        "last_position",
    ],
    key: &["id"],
    // The derived figures (tier, segment, LTV, ...) are not written here: `recompute` owns them.
    keep: &["created_at"],
};

const FACTS: Table = Table {
    name: "client_booking_facts",
    columns: &[
        "booking_id",
        "client_id",
        "start_at",
        "total_amount",
        "paid_amount",
        "outstanding_amount",
        "cancelled",
    ],
    key: &["booking_id"],
    keep: &["client_id"],
};

#[async_trait::async_trait]
impl Session for ClientsSession {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let (mut clients, mut bookings) = (Vec::new(), Vec::new());
        for e in events {
            match e.aggregate_type.as_str() {
                "Client" => clients.push(aggregate_uuid(e)?),
                "Booking" => bookings.push(aggregate_uuid(e)?),
                _ => {}
            }
        }
        self.states.load(conn, clients).await?;
        self.load_facts(conn, bookings).await?;
        for e in events {
            match e.aggregate_type.as_str() {
                "Client" => {
                    let ev: ClientEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    let t = self.states.change(id);
                    t.state.apply(ev);
                    // PII stays in the event store only.
                    t.state.passport_number = None;
                    t.state.emirates_id = None;
                    t.touch(e);
                    self.dirty.insert(id, e.recorded_at);
                }
                "Booking" => {
                    let ev: BookingEvent = decode(e)?;
                    let booking = aggregate_uuid(e)?;
                    if let Some(client) = self.booking_fact(booking, &ev) {
                        self.dirty.insert(client, e.recorded_at);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let registered = self.states.changed();
        self.states.save(conn).await?;
        CLIENTS
            .write_each(conn, self.complete, &registered, |id, out| {
                if let Some(t) = self.states.get(id) {
                    client_fields(*id, t, out);
                }
            })
            .await?;
        let changed = std::mem::take(&mut self.changed_facts);
        let facts = &self.facts;
        FACTS
            .write_each(conn, self.complete, changed, |b, out| {
                let Some(Some(f)) = facts.get(&b) else {
                    return;
                };
                out.field("booking_id", &b);
                out.field("client_id", &f.client_id);
                out.field("start_at", &f.start_at);
                out.field("total_amount", &f.total_amount);
                out.field("paid_amount", &f.paid_amount);
                out.field("outstanding_amount", &f.outstanding());
                out.field("cancelled", &f.cancelled);
            })
            .await?;
        let dirty = std::mem::take(&mut self.dirty);
        recompute(conn, Recompute::Clients(&dirty)).await
    }
}

fn client_fields(id: Uuid, t: &Tracked<Client>, out: &mut Row<'_>) {
    let c = &t.state;
    let channels: Vec<String> = c
        .preferred_channels
        .iter()
        .map(crate::bookings::enum_str)
        .collect();
    out.field("id", &id);
    out.field("kommo_contact_id", &c.kommo_contact_id);
    out.field("zoho_contact_id", &c.zoho_contact_id);
    out.field("name", &c.name);
    out.field("phone", &c.phone.as_ref().map(|p| p.as_str()));
    out.field("email", &c.email.as_ref().map(|p| p.as_str()));
    out.field(
        "residency_country",
        &c.residency_country.as_ref().map(|p| p.as_str()),
    );
    out.field("preferred_language", &c.preferred_language);
    out.field("preferred_channels", &channels);
    out.field("timezone", &c.timezone);
    out.field("gender", &c.gender);
    out.field("date_of_birth", &c.date_of_birth);
    out.field("created_at", &t.created_at);
    out.field("updated_at", &t.updated_at);
    out.field("last_position", &t.last_position);
}

/// Whose figures to recompute, and as of when.
pub enum Recompute<'a> {
    /// Every client, as of one instant (the tick).
    All(DateTime<Utc>),
    /// These clients, each as of its latest event.
    Clients(&'a HashMap<Uuid, DateTime<Utc>>),
}

/// Recomputes LTV, last booking, outstanding, tier and segment from the facts, in one query,
/// and writes the rows whose figures change in one statement.
pub async fn recompute(
    conn: &mut PgConnection,
    target: Recompute<'_>,
) -> Result<(), ProjectionError> {
    // Many clients at once (a rebuild, a large batch): one pass over everything beats probing
    // for each (`= ANY` compares every row with every element when there is no index).
    let ids: Option<Vec<Uuid>> = match &target {
        Recompute::All(_) => None,
        Recompute::Clients(map) if map.is_empty() => return Ok(()),
        Recompute::Clients(map) if map.len() > 1_000 => None,
        Recompute::Clients(map) => Some(map.keys().copied().collect()),
    };
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
                    WHERE NOT cancelled AND ($1::uuid[] IS NULL OR client_id = ANY($1)) \
                    GROUP BY client_id) f \
           ON f.client_id = c.id \
         WHERE $1::uuid[] IS NULL OR c.id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut changed = Vec::new();
    for (id, ltv, last_start, outstanding, tier0, segment0, ltv0, last0, days0, out0) in rows {
        let now = match &target {
            Recompute::All(now) => *now,
            Recompute::Clients(map) => match map.get(&id) {
                Some(at) => *at,
                None => continue,
            },
        };
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
        changed.push(json!({
            "id": id,
            "lifetime_value": ltv,
            "last_booking_at": last_start,
            "days_since_last_booking": days_i32,
            "outstanding_amount": outstanding,
            "tier": tier,
            "segment": segment,
        }));
    }
    if changed.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE clients c SET lifetime_value = r.lifetime_value, last_booking_at = r.last_booking_at, \
           days_since_last_booking = r.days_since_last_booking, \
           outstanding_amount = r.outstanding_amount, tier = r.tier, segment = r.segment \
         FROM jsonb_populate_recordset(NULL::clients, $1) r WHERE c.id = r.id",
    )
    .bind(serde_json::Value::Array(changed))
    .execute(&mut *conn)
    .await?;
    Ok(())
}
