//! Running projections: each batch of events and the checkpoint move commit in one transaction
//! (exactly-once effect); one active runner per projection (advisory lock), the others stand by
//! and take over when it dies; a tick recomputes time-driven facts.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::{PgConnection, PgPool};
use store::RecordedEvent;
use store::checkpoints::{self, Leadership};
use store::global_log::{self, LogFollower, LogPosition};

use crate::{Projection, ProjectionError};

/// The checkpoint key of a projection.
pub fn checkpoint_name(projection: &dyn Projection) -> String {
    format!("projection:{}", projection.name())
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub batch_size: i64,
    pub tick_every: Duration,
    /// How long a projection stopped on an error waits before trying again.
    pub retry_after: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            tick_every: Duration::from_secs(60),
            retry_after: Duration::from_secs(5),
        }
    }
}

/// What applying a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    Applied(LogPosition),
    /// The checkpoint is not where the caller thought (a rebuild swapped tables in, or another
    /// runner moved it): nothing was applied; continue from here.
    Moved(LogPosition),
}

/// Locks the projection's checkpoint row for this transaction and returns its position.
pub async fn lock_checkpoint(
    conn: &mut PgConnection,
    name: &str,
) -> Result<LogPosition, sqlx::Error> {
    sqlx::query("INSERT INTO consumer_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    let (transaction_id, global_position): (i64, i64) = sqlx::query_as(
        "SELECT transaction_id, global_position FROM consumer_checkpoints WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    Ok(LogPosition {
        transaction_id,
        global_position,
    })
}

/// [`lock_checkpoint`] in one round trip for a batch, whose commit then does not wait for the
/// disk (`synchronous_commit = off` for this transaction only): the read-model rows and the
/// checkpoint are kept or lost together, and a batch lost in a crash of the server is applied
/// again from the log, which is durable. Any later durable commit makes it durable too.
/// The batch's statements are planned for their actual arguments each time: a plan cached while
/// a table was nearly empty (a catch-up from zero) would otherwise scan it for every lookup by
/// key as it grows.
async fn lock_checkpoint_for_batch(
    conn: &mut PgConnection,
    name: &str,
) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT c.transaction_id, c.global_position \
         FROM consumer_checkpoints c, set_config('synchronous_commit', 'off', true) AS s, \
           set_config('plan_cache_mode', 'force_custom_plan', true) AS p \
         WHERE c.name = $1 FOR UPDATE OF c",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some((transaction_id, global_position)) => Ok(LogPosition {
            transaction_id,
            global_position,
        }),
        None => lock_checkpoint(conn, name).await,
    }
}

/// Applies `events` (which follow `expected`) and moves the checkpoint, in one transaction.
/// On an event the projection cannot handle, the events before it are applied, the checkpoint
/// stops just before it, and the error is recorded.
pub async fn apply_batch(
    pool: &PgPool,
    projection: &dyn Projection,
    expected: LogPosition,
    events: &[RecordedEvent],
) -> Result<BatchOutcome, ProjectionError> {
    let Some(last) = events.last() else {
        return Ok(BatchOutcome::Applied(expected));
    };
    let name = checkpoint_name(projection);
    let mut tx = pool.begin().await?;
    let current = lock_checkpoint_for_batch(&mut tx, &name).await?;
    if current != expected {
        return Ok(BatchOutcome::Moved(current));
    }
    match projection.apply(&mut tx, events).await {
        Ok(()) => {
            checkpoints::save(&mut *tx, &name, last.position, events.len() as i64).await?;
            tx.commit().await?;
            Ok(BatchOutcome::Applied(last.position))
        }
        Err(ProjectionError::Unhandleable {
            position,
            event_type,
            event_version,
            reason,
        }) => {
            tx.rollback().await?;
            let before: Vec<RecordedEvent> = events
                .iter()
                .take_while(|e| e.position.global_position != position)
                .cloned()
                .collect();
            if !before.is_empty() && before.len() < events.len() {
                Box::pin(apply_batch(pool, projection, expected, &before)).await?;
            }
            let error = ProjectionError::Unhandleable {
                position,
                event_type,
                event_version,
                reason,
            };
            checkpoints::record_error(pool, &name, position, &error.to_string()).await?;
            Err(error)
        }
        Err(e) => Err(e),
    }
}

/// Applies every final event after the checkpoint; returns how many. For tests, the CLI and
/// rebuilds; the long-running runner uses [`run`].
pub async fn catch_up(
    pool: &PgPool,
    projection: &dyn Projection,
    batch_size: i64,
) -> Result<u64, ProjectionError> {
    let name = checkpoint_name(projection);
    let mut position = checkpoints::load(pool, &name).await?;
    let mut applied = 0;
    loop {
        let batch = global_log::read_after(pool, position, batch_size).await?;
        if batch.is_empty() {
            return Ok(applied);
        }
        match apply_batch(pool, projection, position, &batch).await? {
            BatchOutcome::Applied(p) => {
                applied += batch.len() as u64;
                position = p;
            }
            BatchOutcome::Moved(p) => position = p,
        }
    }
}

/// Runs the time-driven recompute once, under the projection's checkpoint lock.
pub async fn tick(pool: &PgPool, projection: &dyn Projection) -> Result<(), ProjectionError> {
    let mut tx = pool.begin().await?;
    lock_checkpoint(&mut tx, &checkpoint_name(projection)).await?;
    projection.tick(&mut tx, Utc::now()).await?;
    tx.commit().await?;
    Ok(())
}

/// Runs every projection until `shutdown` turns true.
pub async fn run(
    pool: PgPool,
    projections: Vec<Arc<dyn Projection>>,
    config: RunnerConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let tasks: Vec<_> = projections
        .into_iter()
        .map(|p| {
            let pool = pool.clone();
            let config = config.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { run_one(pool, p, config, shutdown).await })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

async fn run_one(
    pool: PgPool,
    projection: Arc<dyn Projection>,
    config: RunnerConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let name = checkpoint_name(projection.as_ref());
    loop {
        if *shutdown.borrow() {
            return;
        }
        let wait = match Leadership::try_acquire(&pool, &name).await {
            Ok(Some(mut leadership)) => {
                tracing::info!(projection = projection.name(), "active");
                let result = follow(
                    &pool,
                    projection.as_ref(),
                    &config,
                    &mut leadership,
                    &mut shutdown,
                )
                .await;
                leadership.release().await;
                match result {
                    Ok(()) => Duration::from_millis(200),
                    Err(e) => {
                        tracing::error!(projection = projection.name(), error = %e, "projection stopped");
                        config.retry_after
                    }
                }
            }
            // Another instance is active: stand by.
            Ok(None) => Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(projection = projection.name(), error = %e, "cannot reach the database");
                config.retry_after
            }
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn follow(
    pool: &PgPool,
    projection: &dyn Projection,
    config: &RunnerConfig,
    leadership: &mut Leadership,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), ProjectionError> {
    let name = checkpoint_name(projection);
    let start = checkpoints::load(pool, &name).await?;
    let mut follower = LogFollower::new(pool.clone(), start).with_batch_size(config.batch_size);
    let mut position = start;
    let mut ticker = tokio::time::interval(config.tick_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = ticker.tick() => {
                if !leadership.still_held().await {
                    return Ok(());
                }
                tick(pool, projection).await?;
            }
            batch = follower.next_batch() => {
                let batch = batch?;
                match apply_batch(pool, projection, position, &batch).await? {
                    BatchOutcome::Applied(p) => position = p,
                    BatchOutcome::Moved(p) => {
                        position = p;
                        follower.seek(p);
                    }
                }
            }
        }
    }
}
