//! Decoding stored events into domain events, and small SQL helpers shared by projections.

use cqrs_es::DomainEvent;
use serde::de::DeserializeOwned;
use store::RecordedEvent;
use uuid::Uuid;

use crate::ProjectionError;

/// Upcasts and deserializes a stored event; refuses versions newer than this code knows. The
/// result is kept with the event: another projection reading the same batch gets a copy.
pub fn decode<E: DomainEvent + DeserializeOwned + Clone + Sync + 'static>(
    event: &RecordedEvent,
) -> Result<E, ProjectionError> {
    if let Some(decoded) = event.decoded.get::<E>() {
        return Ok(decoded.clone());
    }
    let decoded: E = decode_payload(event)?;
    event.decoded.set(decoded.clone());
    Ok(decoded)
}

fn decode_payload<E: DomainEvent + DeserializeOwned>(
    event: &RecordedEvent,
) -> Result<E, ProjectionError> {
    let fail = |reason: String| ProjectionError::Unhandleable {
        position: event.position.global_position,
        event_type: event.event_type.clone(),
        event_version: event.event_version.clone(),
        reason,
    };
    // Only an old version needs its payload reshaped (and so copied); the rest is read in place.
    let decoded: E = if !domain::upcasting::needs_upcast(&event.event_type, &event.event_version) {
        event.payload.parse()
    } else {
        event.payload.parse().and_then(|payload| {
            serde_json::from_value(domain::upcasting::upcast(
                &event.event_type,
                &event.event_version,
                payload,
            ))
        })
    }
    // serde's message can quote the payload (personal data); the error is stored and shown.
    .map_err(|e| fail(store::redact::serde_message(&e.to_string())))?;
    if decoded.event_type() != event.event_type {
        return Err(fail(format!(
            "the payload is a {}, the row says {}",
            decoded.event_type(),
            event.event_type
        )));
    }
    let major = |v: &str| v.split('.').next().and_then(|m| m.parse::<u32>().ok());
    match (major(&event.event_version), major(&decoded.event_version())) {
        (Some(stored), Some(known)) if stored <= known => Ok(decoded),
        _ => Err(fail(format!(
            "version {} is newer than the {} this code knows",
            event.event_version,
            decoded.event_version()
        ))),
    }
}

/// The aggregate id of an event as a UUID.
pub fn aggregate_uuid(event: &RecordedEvent) -> Result<Uuid, ProjectionError> {
    Uuid::parse_str(&event.aggregate_id).map_err(|_| ProjectionError::Unhandleable {
        position: event.position.global_position,
        event_type: event.event_type.clone(),
        event_version: event.event_version.clone(),
        reason: "the aggregate id is not a UUID".into(),
    })
}

/// A deterministic id for the row an event produces (timeline rows, deal events): a name-based
/// UUID of the event's place in the log, unique per event and stable across rebuilds.
pub fn event_row_id(event: &RecordedEvent) -> Uuid {
    stable_id(&format!(
        "event:{}:{}",
        event.position.global_position, event.sequence
    ))
}

/// A name-based (v5) UUID: the same name always gives the same id, different names never collide
/// in practice. (Custom UUIDv8 bytes would lose bits to the version and variant fields.)
pub fn stable_id(name: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
}

/// The actor of an event, from its metadata (no PII is ever put there), as JSON text:
/// `{"type", "id", "role", "request_id"}`, each `null` when the metadata lacks it.
pub fn actor_json(event: &RecordedEvent) -> String {
    #[derive(serde::Deserialize, serde::Serialize)]
    struct Actor {
        #[serde(rename(serialize = "type"), default)]
        actor_type: serde_json::Value,
        #[serde(rename(serialize = "id"), default)]
        actor_id: serde_json::Value,
        #[serde(rename(serialize = "role"), default)]
        actor_role: serde_json::Value,
        #[serde(default)]
        request_id: serde_json::Value,
    }
    // Metadata that is not an object has no actor: every member is null.
    let actor = event.metadata.parse::<Actor>().unwrap_or(Actor {
        actor_type: serde_json::Value::Null,
        actor_id: serde_json::Value::Null,
        actor_role: serde_json::Value::Null,
        request_id: serde_json::Value::Null,
    });
    serde_json::to_string(&actor).unwrap_or_else(|_| "null".into())
}

/// The staff id of the actor, when a staff member issued the command.
pub fn actor_staff_id(event: &RecordedEvent) -> Option<Uuid> {
    event
        .metadata
        .get("actor_id")
        .and_then(|v| v.as_str())
        .and_then(|s| Uuid::parse_str(s).ok())
}

/// The business day (Asia/Dubai, UTC+4 all year) of an instant.
pub fn business_day(t: chrono::DateTime<chrono::Utc>) -> chrono::NaiveDate {
    (t + chrono::Duration::hours(4)).date_naive()
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::LogPosition;

    fn at(global_position: i64, sequence: i64) -> RecordedEvent {
        RecordedEvent {
            position: LogPosition {
                transaction_id: 1,
                global_position,
            },
            aggregate_type: "Booking".into(),
            aggregate_id: Uuid::nil().to_string(),
            sequence,
            event_type: "BookingCreated".into(),
            event_version: "2.0".into(),
            payload: serde_json::Value::Null.into(),
            metadata: serde_json::Value::Null.into(),
            recorded_at: chrono::Utc::now(),
            decoded: Default::default(),
        }
    }

    #[test]
    fn row_ids_differ_for_every_event_and_repeat_for_the_same_one() {
        // Positions that differ only in the bits a UUIDv8 reserves for its version.
        let ids: std::collections::HashSet<Uuid> = (0..64)
            .flat_map(|k| [at(k << 12, 1), at((k << 12) + 1, 2)])
            .map(|e| event_row_id(&e))
            .collect();
        assert_eq!(ids.len(), 128);
        assert_eq!(event_row_id(&at(4096, 1)), event_row_id(&at(4096, 1)));
    }
}
