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

/// Session advisory locks held on a connection of their own: while it lives, no other session
/// gets them; when the holder's process dies, its connection closes and they are free.
pub struct SessionLock {
    conn: PgConnection,
}

impl SessionLock {
    /// Tries once, never waiting, to take every lock named in `keys`: all of them, or none and
    /// the index of the first one another session holds.
    pub async fn try_acquire_all(
        pool: &PgPool,
        keys: &[String],
    ) -> Result<Result<Self, usize>, sqlx::Error> {
        let options = pool.connect_options();
        let mut lock = Self {
            conn: PgConnection::connect_with(&options).await?,
        };
        for (i, key) in keys.iter().enumerate() {
            let got: Result<bool, _> =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(key)
                    .fetch_one(&mut lock.conn)
                    .await;
            match got {
                Ok(true) => {}
                Ok(false) => {
                    lock.release().await;
                    return Ok(Err(i));
                }
                Err(e) => {
                    let _ = lock.conn.close().await;
                    return Err(e);
                }
            }
        }
        Ok(Ok(lock))
    }

    /// Whether the lock's connection is still alive (if it is not, another session may hold
    /// the locks).
    pub async fn still_held(&mut self) -> bool {
        sqlx::query("SELECT 1")
            .execute(&mut self.conn)
            .await
            .is_ok()
    }

    /// Gives the locks back, and returns once the server has: closing the connection frees
    /// them too, but only when the server has seen it close, so a taker right after could
    /// still find them held.
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut self.conn)
            .await;
        let _ = self.conn.close().await;
    }
}

/// Leadership of one consumer: its [`SessionLock`]. When the holder's process dies, the lock is
/// free for a standby.
pub struct Leadership(SessionLock);

impl Leadership {
    /// Tries once to become the active instance of `name`.
    pub async fn try_acquire(pool: &PgPool, name: &str) -> Result<Option<Self>, sqlx::Error> {
        let keys = [format!("consumer:{name}")];
        Ok(SessionLock::try_acquire_all(pool, &keys)
            .await?
            .ok()
            .map(Self))
    }

    /// Whether the lock's connection is still alive (if it is not, another instance may lead).
    pub async fn still_held(&mut self) -> bool {
        self.0.still_held().await
    }

    pub async fn release(self) {
        self.0.release().await
    }
}
