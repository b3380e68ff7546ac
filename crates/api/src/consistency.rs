//! Reading one's own writes: a query with `min_position=<n>` waits (up to a couple of seconds)
//! until the read models it reads have applied the event at global position `n`, else answers
//! 503 `not-yet-projected`.
//!
//! The log's order is `(transaction_id, global_position)`, not `global_position` alone (see
//! `store::global_log`), so the wait compares the projection's checkpoint with the *log position*
//! of event `n`, not with the number `n`: a checkpoint can carry a higher global position while
//! event `n`, written by an older transaction, is still ahead of it.

use std::time::Duration;

use serde::Deserialize;
use sqlx::PgPool;
use store::global_log::LogPosition;
use utoipa::IntoParams;

use crate::error::{ApiResult, Problem, ProblemKind};

/// The `min_position` query parameter, shared by every query.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
pub struct MinPosition {
    /// Wait until the read model reflects the event at this global position (a command
    /// answer's `position`), up to about 2 s; 503 `not-yet-projected` if it does not.
    pub min_position: Option<i64>,
}

/// Waits until every projection in `projections` has applied the event at `min_position`.
pub async fn wait_for(
    pool: &PgPool,
    projections: &[&str],
    min_position: Option<i64>,
    max_wait: Duration,
) -> ApiResult<()> {
    let Some(wanted) = min_position.filter(|p| *p > 0) else {
        return Ok(());
    };
    let txid: Option<i64> = sqlx::query_scalar(
        "SELECT transaction_id::text::bigint FROM events WHERE global_position = $1",
    )
    .bind(wanted)
    .fetch_optional(pool)
    .await?;
    let Some(transaction_id) = txid else {
        return Err(Problem::validation(format!(
            "min_position {wanted} is not the position of any event"
        ))
        .with_code("request.unknown_position"));
    };
    let target = LogPosition {
        transaction_id,
        global_position: wanted,
    };
    let names: Vec<String> = projections
        .iter()
        .map(|p| format!("projection:{p}"))
        .collect();
    let deadline = tokio::time::Instant::now() + max_wait;
    loop {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT name, transaction_id, global_position FROM consumer_checkpoints \
             WHERE name = ANY($1)",
        )
        .bind(&names)
        .fetch_all(pool)
        .await?;
        let behind: Vec<&str> = projections
            .iter()
            .zip(&names)
            .filter(|(_, name)| {
                !rows.iter().any(|(n, t, g)| {
                    n == *name
                        && LogPosition {
                            transaction_id: *t,
                            global_position: *g,
                        } >= target
                })
            })
            .map(|(p, _)| *p)
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Problem::new(
                ProblemKind::NotYetProjected,
                format!(
                    "the read model ({}) has not reached position {wanted} yet; \
                     the data you wrote is not there yet: retry shortly",
                    behind.join(", ")
                ),
            )
            .with_code("read_model.behind")
            .with("min_position", wanted)
            .with("projections", behind)
            .retry_after(1));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
