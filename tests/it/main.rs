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
