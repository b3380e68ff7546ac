//! PostgreSQL plumbing shared by every role: finding or starting the server, connecting,
//! migrating, and reading the global event log. Knows nothing of the domain.

pub mod checkpoints;
pub mod db;
pub mod global_log;
pub mod listener;
pub mod local_pg;
pub mod redact;
pub mod stored_json;
#[cfg(feature = "testing")]
pub mod testing;

pub use db::{DbConfig, DbError, MIGRATOR};
pub use global_log::{LogFollower, LogPosition, RecordedEvent};
pub use stored_json::StoredJson;
