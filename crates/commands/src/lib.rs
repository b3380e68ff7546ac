//! The write side shared by every role that issues commands (the API, the Kommo webhook intake,
//! the outbox worker's write-backs, the process managers).

pub mod bus;
pub mod codes;
pub mod process;

use domain::booking::Booking;
use domain::client::Client;
use domain::deal::Deal;
use domain::lead::Lead;
use domain::vehicle_block::VehicleBlock;
use sqlx::PgPool;

pub use bus::{CommandError, Executor, Outcome};

/// Snapshot every N events for the long-lived streams.
pub const SNAPSHOT_EVERY: usize = 50;

/// One executor per aggregate type.
pub struct CommandBus {
    pub pool: PgPool,
    pub bookings: Executor<Booking>,
    pub leads: Executor<Lead>,
    pub deals: Executor<Deal>,
    pub clients: Executor<Client>,
    pub vehicle_blocks: Executor<VehicleBlock>,
}

impl CommandBus {
    pub fn new(pool: PgPool) -> Self {
        Self::with_snapshots(pool, Some(SNAPSHOT_EVERY))
    }

    /// `snapshot_every: None` replays whole streams (for comparison in benchmarks).
    pub fn with_snapshots(pool: PgPool, snapshot_every: Option<usize>) -> Self {
        Self {
            bookings: Executor::new(pool.clone(), snapshot_every),
            leads: Executor::new(pool.clone(), snapshot_every),
            deals: Executor::new(pool.clone(), snapshot_every),
            clients: Executor::new(pool.clone(), snapshot_every),
            vehicle_blocks: Executor::new(pool.clone(), None),
            pool,
        }
    }
}
