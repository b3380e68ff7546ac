//! The outbox projector: derives `integrations_outbox` rows from events, in the same transaction
//! as its checkpoint (it runs on the projection runner), idempotently (`dedupe_key`). The event
//! log is the durable record, so nothing is lost between a command and its outbox rows.
//!
//! Rows carry only what to do and for which entity; the worker reads the entity's current state
//! when it delivers, so a burst of changes sends the latest data.

use std::collections::HashMap;

use domain::booking::BookingEvent;
use projections::{Projection, ProjectionError, decode};
use serde_json::json;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

/// The checkpoint name is `projection:outbox`.
pub struct OutboxProjector;

/// One delivery to derive: entity, target and action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Derived {
    pub entity_type: &'static str,
    /// The entity the row is ordered under, when not the event's own aggregate: a booking's
    /// Kommo lead status goes under its lead, so that every status sent to one Kommo lead (from
    /// the lead and from each booking won from it) goes out in the order of the log.
    pub entity_id: Option<Uuid>,
    pub target: &'static str,
    pub action: &'static str,
}

const fn d(entity_type: &'static str, target: &'static str, action: &'static str) -> Derived {
    Derived {
        entity_type,
        entity_id: None,
        target,
        action,
    }
}

/// What deriving a booking event's rows needs to know of its stream beyond the event itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BookingFacts {
    /// An earlier event of the stream confirmed the booking (Zoho has its sales order).
    pub was_confirmed: bool,
    /// The sales lead the booking was won from: only then is there a Kommo lead to move.
    pub lead: Option<Uuid>,
}

impl BookingFacts {
    /// Facts under which a booking event derives every row it ever can.
    const ALL: Self = Self {
        was_confirmed: true,
        lead: Some(Uuid::nil()),
    };
}

/// The deliveries an event calls for. Events caused by the CRMs themselves (actor `kommo`) or by
/// the worker's write-backs (actor `outbox-worker`) derive nothing, so nothing echoes back. A
/// booking moves its Kommo lead only if it came from one (a booking's lead is fixed when it is
/// created), and updates its Zoho sales order only once one exists (after its confirmation).
/// A booking's Kommo lead status is a row of its lead (see [`Derived::entity_id`]).
pub fn derive(event: &RecordedEvent, booking: BookingFacts) -> Vec<Derived> {
    let actor = event
        .metadata
        .get("actor_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if matches!(actor, "kommo" | "outbox-worker") {
        return vec![];
    }
    let lead_status = booking.lead.map(|lead| Derived {
        entity_id: Some(lead),
        ..d("lead", "kommo", "lead.status")
    });
    let sales_order = d("booking", "zoho", "sales_order.upsert");
    match (event.aggregate_type.as_str(), event.event_type.as_str()) {
        ("Client", "ClientRegistered" | "ClientDetailsUpdated") => vec![
            d("client", "kommo", "contact.upsert"),
            d("client", "zoho", "contact.upsert"),
        ],
        ("Booking", "BookingConfirmed") => [Some(sales_order), lead_status]
            .into_iter()
            .flatten()
            .collect(),
        ("Booking", "BookingDeliveryStarted" | "BookingRentalStarted") => {
            lead_status.into_iter().collect()
        }
        ("Booking", "BookingCompleted" | "BookingCancelled") => {
            [lead_status, booking.was_confirmed.then_some(sales_order)]
                .into_iter()
                .flatten()
                .collect()
        }
        (
            "Booking",
            "BookingRescheduled"
            | "BookingExtended"
            | "BookingServiceAdded"
            | "BookingServiceRemoved"
            | "BookingVehicleAssigned",
        ) if booking.was_confirmed => vec![sales_order],
        ("Lead", "LeadStageMoved" | "LeadWon" | "LeadLost") => {
            vec![d("lead", "kommo", "lead.status")]
        }
        _ => vec![],
    }
}

/// A stable row id for a derived row, from its dedupe key (name-based UUID): the same row
/// whatever else its event derives.
fn row_id(dedupe_key: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("outbox:{dedupe_key}").as_bytes(),
    )
}

/// What a booking stream's creation and confirmation say, as far as they are known.
#[derive(Default)]
struct Stream {
    /// `Some` once its `BookingCreated` is seen: the lead it names, if any.
    lead: Option<Option<Uuid>>,
    /// The sequence of its `BookingConfirmed`, if any.
    confirmed_at: Option<i64>,
}

impl Stream {
    fn learn(&mut self, event: &RecordedEvent) -> Result<(), ProjectionError> {
        match event.event_type.as_str() {
            "BookingCreated" => {
                if let BookingEvent::BookingCreated { lead_id, .. } = decode(event)? {
                    self.lead = Some(lead_id);
                }
            }
            "BookingConfirmed" => {
                self.confirmed_at = Some(
                    self.confirmed_at
                        .map_or(event.sequence, |at| at.min(event.sequence)),
                );
            }
            _ => {}
        }
        Ok(())
    }

    fn facts_at(&self, sequence: i64) -> BookingFacts {
        BookingFacts {
            was_confirmed: self.confirmed_at.is_some_and(|at| at < sequence),
            lead: self.lead.flatten(),
        }
    }
}

/// The facts of every booking stream with an event in `events` that may derive rows (only
/// those are decoded or looked up). A stream's events come in the log in stream order, so a
/// stream created in this batch has its whole past here; the others' creations and
/// confirmations are read in one query.
async fn booking_streams<'a>(
    conn: &mut PgConnection,
    events: &'a [RecordedEvent],
) -> Result<HashMap<&'a str, Stream>, ProjectionError> {
    let is_booking = |e: &&RecordedEvent| e.aggregate_type == "Booking";
    let mut streams: HashMap<&str, Stream> = events
        .iter()
        .filter(is_booking)
        .filter(|e| !derive(e, BookingFacts::ALL).is_empty())
        .map(|e| (e.aggregate_id.as_str(), Stream::default()))
        .collect();
    for e in events.iter().filter(is_booking) {
        if let Some(stream) = streams.get_mut(e.aggregate_id.as_str()) {
            stream.learn(e)?;
        }
    }
    let unknown: Vec<&str> = streams
        .iter()
        .filter(|(_, s)| s.lead.is_none())
        .map(|(id, _)| *id)
        .collect();
    if unknown.is_empty() {
        return Ok(streams);
    }
    let past = store::global_log::stream_events(
        &mut *conn,
        "Booking",
        &unknown,
        &["BookingCreated", "BookingConfirmed"],
    )
    .await?;
    for e in &past {
        if let Some(stream) = streams.get_mut(e.aggregate_id.as_str()) {
            stream.learn(e)?;
        }
    }
    for id in unknown {
        if streams.get(id).is_some_and(|s| s.lead.is_none()) {
            tracing::warn!(
                booking = id,
                "a booking stream has no BookingCreated: no Kommo lead to move"
            );
        }
    }
    Ok(streams)
}

#[async_trait::async_trait]
impl Projection for OutboxProjector {
    fn name(&self) -> &'static str {
        "outbox"
    }

    /// The outbox holds delivery state, not a pure function of the log: never rebuilt.
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        // The batch's rows, inserted in one statement.
        let mut ids = Vec::new();
        let mut entity_types = Vec::new();
        let mut entity_ids = Vec::new();
        let mut targets = Vec::new();
        let mut actions = Vec::new();
        let mut payloads = Vec::new();
        let mut dedupe_keys = Vec::new();
        let mut positions = Vec::new();
        let streams = booking_streams(conn, events).await?;
        for e in events {
            let facts = streams
                .get(e.aggregate_id.as_str())
                .filter(|_| e.aggregate_type == "Booking")
                .map_or_else(BookingFacts::default, |s| s.facts_at(e.sequence));
            let Ok(aggregate_id) = Uuid::parse_str(&e.aggregate_id) else {
                continue;
            };
            let pos = e.position.global_position;
            for row in derive(e, facts) {
                let dedupe_key = format!("{pos}:{}:{}", row.target, row.action);
                ids.push(row_id(&dedupe_key));
                entity_types.push(row.entity_type);
                entity_ids.push(row.entity_id.unwrap_or(aggregate_id));
                targets.push(row.target);
                actions.push(row.action);
                let mut payload = json!({
                    "cause": e.event_type,
                    "sequence": e.sequence,
                    "correlation_id": e.metadata.get("correlation_id"),
                });
                if row.entity_id.is_some() {
                    // A booking's row under its lead: the status to send is the booking's.
                    payload["booking_id"] = json!(aggregate_id);
                }
                payloads.push(payload);
                dedupe_keys.push(dedupe_key);
                positions.push(pos);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO integrations_outbox (id, entity_type, entity_id, target_system, event_type, \
               payload, dedupe_key, source_position, next_run_at) \
             SELECT id, entity_type, entity_id, target_system, event_type, payload, dedupe_key, \
               source_position, now() \
             FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[], \
               $7::text[], $8::bigint[]) \
               AS r(id, entity_type, entity_id, target_system, event_type, payload, dedupe_key, \
                 source_position) \
             ON CONFLICT (dedupe_key) DO NOTHING",
        )
        .bind(&ids)
        .bind(&entity_types)
        .bind(&entity_ids)
        .bind(&targets)
        .bind(&actions)
        .bind(&payloads)
        .bind(&dedupe_keys)
        .bind(&positions)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use store::LogPosition;

    fn event(aggregate: &str, event_type: &str, actor: &str) -> RecordedEvent {
        RecordedEvent {
            position: LogPosition {
                transaction_id: 1,
                global_position: 1,
            },
            aggregate_type: aggregate.into(),
            aggregate_id: Uuid::nil().to_string(),
            sequence: 1,
            event_type: event_type.into(),
            event_version: "1.0".into(),
            payload: json!({}).into(),
            metadata: json!({ "actor_type": actor }).into(),
            recorded_at: chrono::Utc::now(),
            decoded: Default::default(),
        }
    }

    /// (aggregate, event, actor, was confirmed, has a lead, expected rows)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        bool,
        bool,
        &'a [(&'a str, &'a str)],
    );

    #[test]
    fn derivation_table() {
        let cases: &[Case] = &[
            (
                "Client",
                "ClientRegistered",
                "staff",
                false,
                false,
                &[("kommo", "contact.upsert"), ("zoho", "contact.upsert")],
            ),
            (
                "Client",
                "ClientZohoContactLinked",
                "outbox-worker",
                false,
                false,
                &[],
            ),
            ("Client", "ClientDetailsUpdated", "kommo", false, false, &[]),
            ("Booking", "BookingCreated", "staff", false, true, &[]),
            (
                "Booking",
                "BookingConfirmed",
                "staff",
                false,
                true,
                &[("zoho", "sales_order.upsert"), ("kommo", "lead.status")],
            ),
            (
                "Booking",
                "BookingConfirmed",
                "staff",
                false,
                false,
                &[("zoho", "sales_order.upsert")],
            ),
            (
                "Booking",
                "BookingDeliveryStarted",
                "staff",
                true,
                true,
                &[("kommo", "lead.status")],
            ),
            (
                "Booking",
                "BookingDeliveryStarted",
                "staff",
                true,
                false,
                &[],
            ),
            ("Booking", "BookingRentalStarted", "staff", true, false, &[]),
            (
                "Booking",
                "BookingExtended",
                "staff",
                true,
                false,
                &[("zoho", "sales_order.upsert")],
            ),
            ("Booking", "BookingExtended", "staff", false, true, &[]),
            (
                "Booking",
                "BookingCancelled",
                "staff",
                false,
                true,
                &[("kommo", "lead.status")],
            ),
            ("Booking", "BookingCancelled", "staff", false, false, &[]),
            (
                "Booking",
                "BookingCancelled",
                "staff",
                true,
                true,
                &[("kommo", "lead.status"), ("zoho", "sales_order.upsert")],
            ),
            (
                "Booking",
                "BookingCompleted",
                "staff",
                true,
                false,
                &[("zoho", "sales_order.upsert")],
            ),
            (
                "Booking",
                "BookingZohoSalesOrderLinked",
                "outbox-worker",
                true,
                true,
                &[],
            ),
            (
                "Lead",
                "LeadWon",
                "staff",
                false,
                false,
                &[("kommo", "lead.status")],
            ),
            ("Lead", "LeadKommoStatusApplied", "kommo", false, false, &[]),
        ];
        for (aggregate, event_type, actor, was_confirmed, has_lead, expected) in cases {
            let lead = Uuid::from_u128(7);
            let facts = BookingFacts {
                was_confirmed: *was_confirmed,
                lead: has_lead.then_some(lead),
            };
            let derived = derive(&event(aggregate, event_type, actor), facts);
            for row in &derived {
                // A booking's lead status is ordered under its lead; every other row under
                // the event's own aggregate.
                let expected = (*aggregate == "Booking" && row.action == "lead.status")
                    .then_some(("lead", Some(lead)));
                assert_eq!(
                    expected.unwrap_or((&aggregate.to_lowercase(), None)),
                    (row.entity_type, row.entity_id),
                    "{aggregate}.{event_type}: {row:?}"
                );
            }
            let got: Vec<(&str, &str)> =
                derived.into_iter().map(|d| (d.target, d.action)).collect();
            assert_eq!(
                got,
                expected.to_vec(),
                "{aggregate}.{event_type} by {actor}, {facts:?}"
            );
        }
    }
}
