//! The domain: aggregates and their rules (SPEC §2), on cqrs-es.
//!
//! **Invariant:** this crate knows nothing of sqlx, reqwest or axum. Anything that needs outside
//! data (human codes, pipeline stages, the vehicle schedule) is looked up by the caller before
//! the command is built, or enforced by the store in the events' own transaction.

pub mod booking;
pub mod client;
pub mod deal;
pub mod lead;
pub mod metadata;
pub mod types;
pub mod upcasting;
pub mod vehicle_block;

pub use metadata::{Actor, ActorKind, CommandMetadata, Role};
pub use types::{Money, Period, ValidationError};

/// What kind of failure a command error is, so callers (the API) can choose a status code
/// without knowing every aggregate's error enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input is wrong (422).
    Validation,
    /// The aggregate does not exist (404).
    NotFound,
    /// The command does not fit the aggregate's current status (409).
    InvalidTransition,
    /// The aggregate already exists, or another rule about other data conflicts (409).
    Conflict,
}

/// Implemented by every aggregate's error type.
pub trait DomainError: std::error::Error {
    fn kind(&self) -> ErrorKind;
    /// A stable machine-readable code, e.g. `booking.invalid_transition`.
    fn code(&self) -> &'static str;
}
