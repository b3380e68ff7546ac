//! Upcasters: stored events of an older shape are rewritten to the current shape on load, so
//! the log is never edited and the Rust types only know the newest version.
//!
//! Readers of the global log (projections, the outbox projector) use [`upcast`] on each stored
//! payload; the aggregate stores use [`upcasters`].

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster};
use serde_json::Value;

/// `BookingCreated` 1.0 had no `currency`: every booking of that time was in AED.
fn booking_created_v2(mut payload: Value) -> Value {
    if let Some(body) = payload
        .get_mut("BookingCreated")
        .and_then(Value::as_object_mut)
    {
        body.entry("currency")
            .or_insert_with(|| Value::String("AED".into()));
    }
    payload
}

/// The upcasters of every aggregate, for `PersistedEventStore::with_upcasters`.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(SemanticVersionEventUpcaster::new(
        "BookingCreated",
        "2.0",
        Box::new(booking_created_v2),
    ))]
}

/// Brings one stored payload to the current shape (for readers of the global log).
pub fn upcast(event_type: &str, event_version: &str, payload: Value) -> Value {
    if needs_upcast(event_type, event_version) {
        booking_created_v2(payload)
    } else {
        payload
    }
}

/// Whether a stored payload of this type and version has an older shape than the code reads.
pub fn needs_upcast(event_type: &str, event_version: &str) -> bool {
    matches!(
        (event_type, major(event_version)),
        ("BookingCreated", Some(1))
    )
}

fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::booking::BookingEvent;
    use cqrs_es::persist::SerializedEvent;
    use serde_json::json;

    fn v1_booking_created() -> Value {
        json!({"BookingCreated": {
            "external_code": "BK-1001", "client_id": "00000000-0000-0000-0000-000000000001",
            "owner_id": "00000000-0000-0000-0000-000000000002", "booking_type": "rental",
            "priority": "high", "channel": "Kommo",
            "start_at": "2025-11-01T10:00:00Z", "end_at": "2025-11-03T10:00:00Z",
            "rental_duration_days": 2, "vehicle_id": null, "driver_id": null,
            "price_daily": "6500.00", "deposit_amount": "5000.00", "advance_payment": "0.00",
            "full_insurance_fee": "0.00", "pickup_location": null, "dropoff_location": null,
            "services": [], "lead_id": null, "total_amount": "13000.00"
        }})
    }

    #[test]
    fn a_v1_booking_created_loads_as_v2_in_aed() {
        let stored = SerializedEvent {
            aggregate_id: "b".into(),
            sequence: 1,
            aggregate_type: "Booking".into(),
            event_type: "BookingCreated".into(),
            event_version: "1.0".into(),
            payload: v1_booking_created(),
            metadata: json!({}),
        };
        // Without the upcaster the old payload does not even deserialize.
        assert!(serde_json::from_value::<BookingEvent>(stored.payload.clone()).is_err());

        let upcaster = &upcasters()[0];
        assert!(upcaster.can_upcast("BookingCreated", "1.0"));
        assert!(!upcaster.can_upcast("BookingCreated", "2.0"));
        let upcast_event = upcaster.upcast(stored);
        assert_eq!(upcast_event.event_version, "2.0.0");
        let event: BookingEvent = serde_json::from_value(upcast_event.payload).unwrap();
        let BookingEvent::BookingCreated { currency, .. } = event else {
            panic!("not a BookingCreated");
        };
        assert_eq!(currency, "AED");
    }

    #[test]
    fn the_log_reader_path_upcasts_the_same_way() {
        let payload = upcast("BookingCreated", "1.0", v1_booking_created());
        assert_eq!(payload["BookingCreated"]["currency"], "AED");
        let current = upcast("BookingCreated", "2.0", payload.clone());
        assert_eq!(current, payload);
    }
}
