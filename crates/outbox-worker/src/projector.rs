//! The outbox projector: derives `integrations_outbox` rows from events, in the same transaction
//! as its checkpoint (it runs on the projection runner), idempotently (`dedupe_key`). The event
//! log is the durable record, so nothing is lost between a command and its outbox rows.
//!
//! Rows carry only what to do and for which entity; the worker reads the entity's current state
//! when it delivers, so a burst of changes sends the latest data.

use std::collections::HashSet;

use projections::{Projection, ProjectionError};
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
    pub target: &'static str,
    pub action: &'static str,
}

const fn d(entity_type: &'static str, target: &'static str, action: &'static str) -> Derived {
    Derived {
        entity_type,
        target,
        action,
    }
}

/// The deliveries an event calls for. Events caused by the CRMs themselves (actor `kommo`) or by
/// the worker's write-backs (actor `outbox-worker`) derive nothing, so nothing echoes back.
pub fn derive(event: &RecordedEvent, booking_was_confirmed: bool) -> Vec<Derived> {
    let actor = event
        .metadata
        .get("actor_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if matches!(actor, "kommo" | "outbox-worker") {
        return vec![];
    }
    match (event.aggregate_type.as_str(), event.event_type.as_str()) {
        ("Client", "ClientRegistered" | "ClientDetailsUpdated") => vec![
            d("client", "kommo", "contact.upsert"),
            d("client", "zoho", "contact.upsert"),
        ],
        ("Booking", "BookingConfirmed") => vec![
            d("booking", "zoho", "sales_order.upsert"),
            d("booking", "kommo", "lead.status"),
        ],
        ("Booking", "BookingDeliveryStarted" | "BookingRentalStarted") => {
            vec![d("booking", "kommo", "lead.status")]
        }
        ("Booking", "BookingCompleted" | "BookingCancelled") => {
            let mut out = vec![d("booking", "kommo", "lead.status")];
            if booking_was_confirmed {
                out.push(d("booking", "zoho", "sales_order.upsert"));
            }
            out
        }
        (
            "Booking",
            "BookingRescheduled"
            | "BookingExtended"
            | "BookingServiceAdded"
            | "BookingServiceRemoved"
            | "BookingVehicleAssigned",
        ) if booking_was_confirmed => vec![d("booking", "zoho", "sales_order.upsert")],
        ("Lead", "LeadStageMoved" | "LeadWon" | "LeadLost") => {
            vec![d("lead", "kommo", "lead.status")]
        }
        _ => vec![],
    }
}

/// A stable row id for the `index`th row of the event at `position` (name-based UUID).
fn row_id(position: i64, index: usize) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("outbox:{position}:{index}").as_bytes(),
    )
}

async fn was_confirmed(conn: &mut PgConnection, e: &RecordedEvent) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'Booking' \
           AND aggregate_id = $1 AND sequence < $2 AND event_type = 'BookingConfirmed')",
    )
    .bind(&e.aggregate_id)
    .bind(e.sequence)
    .fetch_one(&mut *conn)
    .await
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
        // Bookings confirmed earlier in this batch (their later events need no lookup).
        let mut confirmed_here: HashSet<&str> = HashSet::new();
        for e in events {
            let is_booking = e.aggregate_type == "Booking";
            if is_booking && e.event_type == "BookingConfirmed" {
                confirmed_here.insert(&e.aggregate_id);
            }
            let confirmed = is_booking
                && matches!(
                    e.event_type.as_str(),
                    "BookingRescheduled"
                        | "BookingExtended"
                        | "BookingServiceAdded"
                        | "BookingServiceRemoved"
                        | "BookingVehicleAssigned"
                        | "BookingCompleted"
                        | "BookingCancelled"
                )
                && (confirmed_here.contains(e.aggregate_id.as_str())
                    || was_confirmed(conn, e).await?);
            let Ok(entity_id) = Uuid::parse_str(&e.aggregate_id) else {
                continue;
            };
            let pos = e.position.global_position;
            for (i, row) in derive(e, confirmed).into_iter().enumerate() {
                ids.push(row_id(pos, i));
                entity_types.push(row.entity_type);
                entity_ids.push(entity_id);
                targets.push(row.target);
                actions.push(row.action);
                payloads.push(json!({
                    "cause": e.event_type,
                    "sequence": e.sequence,
                    "correlation_id": e.metadata.get("correlation_id"),
                }));
                dedupe_keys.push(format!("{pos}:{}:{}", row.target, row.action));
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

    #[test]
    fn derivation_table() {
        type Case<'a> = (&'a str, &'a str, &'a str, bool, &'a [(&'a str, &'a str)]);
        let cases: &[Case] = &[
            (
                "Client",
                "ClientRegistered",
                "staff",
                false,
                &[("kommo", "contact.upsert"), ("zoho", "contact.upsert")],
            ),
            (
                "Client",
                "ClientZohoContactLinked",
                "outbox-worker",
                false,
                &[],
            ),
            ("Client", "ClientDetailsUpdated", "kommo", false, &[]),
            ("Booking", "BookingCreated", "staff", false, &[]),
            (
                "Booking",
                "BookingConfirmed",
                "staff",
                false,
                &[("zoho", "sales_order.upsert"), ("kommo", "lead.status")],
            ),
            (
                "Booking",
                "BookingExtended",
                "staff",
                true,
                &[("zoho", "sales_order.upsert")],
            ),
            ("Booking", "BookingExtended", "staff", false, &[]),
            (
                "Booking",
                "BookingCancelled",
                "staff",
                false,
                &[("kommo", "lead.status")],
            ),
            (
                "Booking",
                "BookingCancelled",
                "staff",
                true,
                &[("kommo", "lead.status"), ("zoho", "sales_order.upsert")],
            ),
            (
                "Booking",
                "BookingZohoSalesOrderLinked",
                "outbox-worker",
                true,
                &[],
            ),
            (
                "Lead",
                "LeadWon",
                "staff",
                false,
                &[("kommo", "lead.status")],
            ),
            ("Lead", "LeadKommoStatusApplied", "kommo", false, &[]),
        ];
        for (aggregate, event_type, actor, confirmed, expected) in cases {
            let got: Vec<(&str, &str)> = derive(&event(aggregate, event_type, actor), *confirmed)
                .into_iter()
                .map(|d| (d.target, d.action))
                .collect();
            assert_eq!(
                got,
                expected.to_vec(),
                "{aggregate}.{event_type} by {actor}"
            );
        }
    }
}
