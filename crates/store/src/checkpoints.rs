//! Checkpoints of the global log's consumers, and leadership (one active instance per
//! consumer, the others standing by).

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection, PgExecutor};

use crate::global_log::LogPosition;

/// The consumer's position; `START` when it never ran.
pub async fn load<'e, E: PgExecutor<'e>>(
    executor: E,
    name: &str,
) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, global_position FROM consumer_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(executor)
    .await?;
    Ok(
        row.map_or(LogPosition::START, |(transaction_id, global_position)| {
            LogPosition {
                transaction_id,
                global_position,
            }
        }),
    )
}

/// Moves the consumer to `position` (call it in the transaction of the work it covers).
pub async fn save<'e, E: PgExecutor<'e>>(
    executor: E,
    name: &str,
    position: LogPosition,
    applied: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO consumer_checkpoints (name, transaction_id, global_position, events_applied) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
           global_position = EXCLUDED.global_position, \
           events_applied = consumer_checkpoints.events_applied + EXCLUDED.events_applied, \
           last_error = NULL, error_position = NULL, updated_at = now()",
    )
    .bind(name)
    .bind(position.transaction_id)
    .bind(position.global_position)
    .bind(applied)
    .execute(executor)
    .await?;
    Ok(())
}

/// Records that the consumer stopped at `global_position` because of `error`.
pub async fn record_error<'e, E: PgExecutor<'e>>(
    executor: E,
    name: &str,
    global_position: i64,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO consumer_checkpoints (name, last_error, error_position) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET last_error = EXCLUDED.last_error, \
           error_position = EXCLUDED.error_position, updated_at = now()",
    )
    .bind(name)
    .bind(error)
    .bind(global_position)
    .execute(executor)
    .await?;
    Ok(())
}

/// Leadership of one consumer: a session advisory lock held on a dedicated connection. When the
/// holder's process dies, its connection closes and the lock is free for a standby.
pub struct Leadership {
    conn: PgConnection,
}

impl Leadership {
    /// Tries once to become the active instance of `name`.
    pub async fn try_acquire(pool: &PgPool, name: &str) -> Result<Option<Self>, sqlx::Error> {
        let options = pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("consumer:{name}"))
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Self { conn }))
        } else {
            conn.close().await?;
            Ok(None)
        }
    }

    /// Whether the lock's connection is still alive (if it is not, another instance may lead).
    pub async fn still_held(&mut self) -> bool {
        sqlx::query("SELECT 1")
            .execute(&mut self.conn)
            .await
            .is_ok()
    }

    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}
