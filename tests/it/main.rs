//! Integration tests: one test binary, each test with its own database (store::testing).

// Test helpers may unwrap: a failure there is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod cli;
mod commands;
mod event_store;
mod global_log;
mod outbox;
mod processes;
mod read_models;
mod scaleout;

use std::time::Duration;

use sqlx::PgPool;
use store::global_log::{LogPosition, RecordedEvent, read_after};
use uuid::Uuid;

/// Stores booking `id`'s creation in its 1.0 shape, as written before `currency` existed (every
/// booking was in AED), straight into the event store: what the upcaster must bring forward.
/// Returns the stored payload.
pub async fn store_v1_booking_created(
    pool: &PgPool,
    id: Uuid,
    code: &str,
    client: Uuid,
    owner: Uuid,
) -> serde_json::Value {
    let v1 = serde_json::json!({"BookingCreated": {
        "external_code": code, "client_id": client,
        "owner_id": owner, "booking_type": "rental", "priority": "high", "channel": "Kommo",
        "start_at": "2025-11-01T10:00:00Z", "end_at": "2025-11-03T10:00:00Z",
        "rental_duration_days": 2, "vehicle_id": null, "driver_id": null,
        "price_daily": "6500.00", "deposit_amount": "5000.00", "advance_payment": "0.00",
        "full_insurance_fee": "0.00", "pickup_location": null, "dropoff_location": null,
        "services": [], "lead_id": null, "total_amount": "13000.00"
    }});
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Booking', $1, 1, 'BookingCreated', '1.0', $2, '{\"actor_type\": \"system\"}')",
    )
    .bind(id.to_string())
    .bind(&v1)
    .execute(pool)
    .await
    .unwrap();
    v1
}

/// A confirmed booking's way on the road: delivered as promised at `at` and handed over then
/// (100 km on the clock, a full tank).
pub fn on_the_road(at: chrono::DateTime<chrono::Utc>) -> [domain::booking::BookingCommand; 2] {
    use domain::booking::BookingCommand;
    [
        BookingCommand::StartDelivery {
            driver_id: None,
            promised_at: at,
        },
        BookingCommand::StartRental {
            started_at: at,
            pickup_mileage_km: 100,
            fuel_level_pct: 100,
        },
    ]
}

/// Reads the global log until at least `n` events are final, or 10 s passed. Other tests'
/// open transactions on the same server hold the horizon back for a moment.
pub async fn read_log(pool: &PgPool, n: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = read_after(pool, LogPosition::START, 100_000).await.unwrap();
        if events.len() >= n || tokio::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
