//! Decoding stored events into domain events, and small SQL helpers shared by projections.

use cqrs_es::DomainEvent;
use serde::de::DeserializeOwned;
use store::RecordedEvent;
use uuid::Uuid;

use crate::ProjectionError;

/// Upcasts and deserializes a stored event; refuses versions newer than this code knows.
pub fn decode<E: DomainEvent + DeserializeOwned>(
    event: &RecordedEvent,
) -> Result<E, ProjectionError> {
    let fail = |reason: String| ProjectionError::Unhandleable {
        position: event.position.global_position,
        event_type: event.event_type.clone(),
        event_version: event.event_version.clone(),
        reason,
    };
    let payload = domain::upcasting::upcast(
        &event.event_type,
        &event.event_version,
        event.payload.clone(),
    );
    let decoded: E = serde_json::from_value(payload).map_err(|e| fail(e.to_string()))?;
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

/// A deterministic id for the `n`th event of an aggregate (timeline rows, deal events).
pub fn event_row_id(event: &RecordedEvent) -> Uuid {
    // UUIDv8 from the global position: unique per event and stable across rebuilds.
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&event.position.global_position.to_be_bytes());
    bytes[8..].copy_from_slice(&event.sequence.to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The actor of an event, from its metadata (no PII is ever put there).
pub fn actor(event: &RecordedEvent) -> serde_json::Value {
    let m = &event.metadata;
    serde_json::json!({
        "type": m.get("actor_type").cloned().unwrap_or(serde_json::Value::Null),
        "id": m.get("actor_id").cloned().unwrap_or(serde_json::Value::Null),
        "role": m.get("actor_role").cloned().unwrap_or(serde_json::Value::Null),
        "request_id": m.get("request_id").cloned().unwrap_or(serde_json::Value::Null),
    })
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
