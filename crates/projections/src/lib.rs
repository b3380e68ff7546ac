//! Read models built from the global log (SPEC §1.2, §3).
//!
//! Each [`Projection`] consumes the log through `store::global_log` and commits its read-model
//! writes and its checkpoint in one transaction ([`runner`]), so a crash never double-applies.
//! One instance is active per projection (an advisory lock); others stand by. Time-driven facts
//! are recomputed by [`Projection::tick`]. Any projection can be rebuilt from position zero into
//! fresh tables, compared with the live ones and swapped in atomically ([`rebuild`]).
//!
//! **Invariant:** read-model rows are deterministic functions of the events (and of the tick's
//! clock), so a rebuild equals the incrementally maintained tables row for row.

#![recursion_limit = "256"]

pub mod bookings;
pub mod clients;
pub mod fleet;
pub mod kpis;
pub mod rebuild;
pub mod rules;
pub mod runner;
pub mod sales;
pub mod status;
mod util;
pub mod write;

/// Decoding a stored event into its domain event (upcast, version-checked), for other consumers
/// of the log that run on the projection runner (the outbox projector).
pub use util::decode;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use store::RecordedEvent;

/// Why a projection could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The event cannot be understood (unknown type or version, broken payload): the projection
    /// stops here until the code or the data is fixed; it never skips.
    #[error("cannot apply event {event_type} v{event_version} at position {position}: {reason}")]
    Unhandleable {
        position: i64,
        event_type: String,
        event_version: String,
        reason: String,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Another session (this process or another) is rebuilding this projection.
    #[error("a rebuild of {0} is already running")]
    RebuildRunning(&'static str),
}

/// A read model fed by the global log.
#[async_trait::async_trait]
pub trait Projection: Send + Sync {
    /// Stable name: the checkpoint key and the `rebuild` argument.
    fn name(&self) -> &'static str;
    /// The tables it owns (rebuilt and swapped together). Unqualified: they resolve through
    /// `search_path`, which is how a rebuild writes into its fresh copies.
    fn tables(&self) -> &'static [&'static str];
    /// Applies a batch of events, in log order, inside the caller's transaction.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        match self.session(false) {
            Some(mut session) => {
                session.apply(conn, events).await?;
                session.flush(conn).await
            }
            None => Err(ProjectionError::Unhandleable {
                position: events.first().map_or(0, |e| e.position.global_position),
                event_type: self.name().into(),
                event_version: String::new(),
                reason: "this projection implements neither apply nor session".into(),
            }),
        }
    }
    /// A fold over consecutive batches that keeps what it folded in memory and writes the rows
    /// it derives set-based on [`Session::flush`]. The live runner uses one per batch; a rebuild
    /// uses one for the whole log (`fresh`: its tables start empty, so nothing is ever loaded).
    fn session(&self, _fresh: bool) -> Option<Box<dyn Session>> {
        None
    }
    /// Recomputes what changes with time alone.
    async fn tick(
        &self,
        _conn: &mut PgConnection,
        _now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// See [`Projection::session`].
#[async_trait::async_trait]
pub trait Session: Send {
    /// Folds a batch (after the ones before it). May write rows that never change again (a
    /// timeline entry); everything derived from folded state waits for [`Session::flush`].
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError>;
    /// Writes everything changed since the last flush.
    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError>;
    /// A rebuild's whole replay into its fresh tables: every batch from `batches` folded in
    /// order, then flushed. `other` is a second connection to the same tables, outside any
    /// transaction: a session with much to write may stream rows through it while it folds and
    /// split its flush over both, so that PostgreSQL writes while the session computes.
    async fn replay(
        &mut self,
        conn: &mut PgConnection,
        other: PgConnection,
        batches: &mut tokio::sync::mpsc::Receiver<Arc<Vec<RecordedEvent>>>,
    ) -> Result<(), ProjectionError> {
        while let Some(batch) = batches.recv().await {
            self.apply(conn, &batch).await?;
        }
        self.flush(conn).await?;
        let _ = sqlx::Connection::close(other).await;
        Ok(())
    }
}

/// Every projection of the service.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(bookings::Bookings),
        Arc::new(clients::Clients),
        Arc::new(fleet::Fleet),
        Arc::new(sales::Sales),
        Arc::new(kpis::Kpis),
    ]
}

/// The projection called `name`.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name)
}
