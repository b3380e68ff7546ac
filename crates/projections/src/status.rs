//! Where each projection stands: checkpoint, lag behind the head of the log (events and
//! seconds), events applied, and the error it is stopped on, if any.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use store::global_log::{self, LogPosition};

use crate::runner::checkpoint_name;

#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub global_position: i64,
    pub events_applied: i64,
    pub events_behind: i64,
    /// How much older the oldest unapplied event is than now (0 when caught up).
    pub seconds_behind: f64,
    pub last_error: Option<String>,
    pub error_position: Option<i64>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// The status of every projection.
pub async fn all(pool: &PgPool) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    let mut out = Vec::new();
    for p in crate::all() {
        out.push(one(pool, &checkpoint_name(p.as_ref()), p.name()).await?);
    }
    Ok(out)
}

/// The status of the consumer whose checkpoint is `checkpoint`.
pub async fn one(
    pool: &PgPool,
    checkpoint: &str,
    name: &str,
) -> Result<ProjectionStatus, sqlx::Error> {
    #[allow(clippy::type_complexity)]
    let row: Option<(i64, i64, i64, Option<String>, Option<i64>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT transaction_id, global_position, events_applied, last_error, error_position, updated_at \
         FROM consumer_checkpoints WHERE name = $1",
    )
    .bind(checkpoint)
    .fetch_optional(pool)
    .await?;
    let (position, applied, last_error, error_position, updated_at) = match row {
        Some((t, g, a, e, ep, u)) => (
            LogPosition {
                transaction_id: t,
                global_position: g,
            },
            a,
            e,
            ep,
            Some(u),
        ),
        None => (LogPosition::START, 0, None, None, None),
    };
    let behind = global_log::count_after(pool, position).await?;
    let oldest: Option<DateTime<Utc>> = if behind > 0 {
        global_log::read_after(pool, position, 1)
            .await?
            .first()
            .map(|e| e.recorded_at)
    } else {
        None
    };
    Ok(ProjectionStatus {
        name: name.to_string(),
        global_position: position.global_position,
        events_applied: applied,
        events_behind: behind,
        seconds_behind: oldest
            .map(|t| ((Utc::now() - t).num_milliseconds().max(0) as f64) / 1000.0)
            .unwrap_or(0.0),
        last_error,
        error_position,
        updated_at,
    })
}
