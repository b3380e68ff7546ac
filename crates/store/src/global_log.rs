//! The global event log: every consumer (projections, the outbox projector, the audit feed)
//! reads the `events` table through this module.
//!
//! Order is `(transaction_id, global_position)` and only events of transactions older than
//! every transaction still running (`pg_snapshot_xmin(pg_current_snapshot())`) are returned.
//! An identity column alone is not enough: transaction A can take position 10, transaction B
//! position 11, and B commit first. A reader that returned 11 and moved its checkpoint past it
//! would never see 10. Below the snapshot's xmin nothing can commit any more, so the order is final.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use sqlx::{PgExecutor, Row};

use crate::StoredJson;
use crate::listener::Wakeups;

/// How soon a follower looks again when events exist but are not final yet.
const PENDING_RETRY: Duration = Duration::from_millis(20);

/// A place in the global log: the position of the last event a reader has consumed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogPosition {
    /// The writing transaction's id (`xid8`, which fits i64 for any real cluster).
    pub transaction_id: i64,
    pub global_position: i64,
}

impl LogPosition {
    /// Before the first event.
    pub const START: Self = Self {
        transaction_id: 0,
        global_position: 0,
    };
}

/// One event as stored, with its place in the global log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordedEvent {
    pub position: LogPosition,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: StoredJson,
    pub metadata: StoredJson,
    pub recorded_at: DateTime<Utc>,
    /// The payload as a reader decoded it, kept so that readers sharing one batch (a rebuild's
    /// projections) decode each event once.
    #[serde(skip)]
    pub decoded: Decoded,
}

/// A typed value decoded from an event's payload, set once (see [`RecordedEvent::decoded`]).
#[derive(Default, Clone)]
pub struct Decoded(std::sync::OnceLock<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl Decoded {
    /// The decoded value, if it was decoded as a `T`.
    pub fn get<T: 'static>(&self) -> Option<&T> {
        self.0.get().and_then(|v| v.downcast_ref::<T>())
    }

    /// Keeps `value` unless a value was kept already.
    pub fn set<T: Send + Sync + 'static>(&self, value: T) {
        let _ = self.0.set(std::sync::Arc::new(value));
    }
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoded")
    }
}

/// A cache: two events are equal whatever was decoded of them.
impl PartialEq for Decoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

const SELECT_COLUMNS: &str = "transaction_id::text::bigint AS transaction_id, global_position, \
     aggregate_type, aggregate_id, sequence, event_type, event_version, payload::text AS payload, \
     metadata::text AS metadata, recorded_at";

/// Reads up to `limit` events after `after`, in log order, only those whose order is final.
pub async fn read_after<'e, E: PgExecutor<'e>>(
    executor: E,
    after: LogPosition,
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let sql = format!(
        "SELECT {SELECT_COLUMNS} FROM events \
         WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY events.transaction_id, events.global_position \
         LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(after.transaction_id.to_string())
        .bind(after.global_position)
        .bind(limit)
        .fetch_all(executor)
        .await?;
    rows.iter().map(decode).collect()
}

/// The newest event whose order is final, if any: the head of the log for lag measurements.
pub async fn head<'e, E: PgExecutor<'e>>(
    executor: E,
) -> Result<Option<(LogPosition, DateTime<Utc>)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT transaction_id::text::bigint AS transaction_id, global_position, recorded_at \
         FROM events \
         WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1",
    )
    .fetch_optional(executor)
    .await?;
    row.map(|r| {
        Ok((
            LogPosition {
                transaction_id: r.try_get("transaction_id")?,
                global_position: r.try_get("global_position")?,
            },
            r.try_get("recorded_at")?,
        ))
    })
    .transpose()
}

/// Whether events exist after `after` that are not final yet (an older transaction is still
/// open somewhere in the cluster): the caller should look again soon rather than wait for a
/// notification that was already sent.
pub async fn has_pending_after<'e, E: PgExecutor<'e>>(
    executor: E,
    after: LogPosition,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events \
         WHERE (transaction_id, global_position) > ($1::text::xid8, $2))",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.global_position)
    .fetch_one(executor)
    .await
}

/// How many final events lie after `after`.
pub async fn count_after<'e, E: PgExecutor<'e>>(
    executor: E,
    after: LogPosition,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events \
         WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.global_position)
    .fetch_one(executor)
    .await
}

/// The events of the given types in the given streams of one aggregate type, each stream in
/// its order: what a reader needs of a stream's past that its batch does not hold.
pub async fn stream_events<'e, E: PgExecutor<'e>>(
    executor: E,
    aggregate_type: &str,
    aggregate_ids: &[&str],
    event_types: &[&str],
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let sql = format!(
        "SELECT {SELECT_COLUMNS} FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND event_type = ANY($3) \
         ORDER BY aggregate_id, sequence"
    );
    let rows = sqlx::query(&sql)
        .bind(aggregate_type)
        .bind(aggregate_ids)
        .bind(event_types)
        .fetch_all(executor)
        .await?;
    rows.iter().map(decode).collect()
}

fn decode(row: &sqlx::postgres::PgRow) -> Result<RecordedEvent, sqlx::Error> {
    Ok(RecordedEvent {
        position: LogPosition {
            transaction_id: row.try_get("transaction_id")?,
            global_position: row.try_get("global_position")?,
        },
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: StoredJson::from_text(row.try_get::<String, _>("payload")?),
        metadata: StoredJson::from_text(row.try_get::<String, _>("metadata")?),
        recorded_at: row.try_get("recorded_at")?,
        decoded: Decoded::default(),
    })
}

/// Follows the log from a position: returns batches as events become final, waking on
/// LISTEN/NOTIFY and polling as the fallback (a lost connection or notification only delays).
pub struct LogFollower {
    pool: PgPool,
    wakeups: Option<Wakeups>,
    position: LogPosition,
    batch_size: i64,
    poll_interval: Duration,
    linger: Duration,
    /// Read before waiting: at the start, and after a full batch (more is probably there).
    /// After a shorter batch the follower has caught up, and waits for news first.
    read_first: bool,
}

/// How long a woken follower waits for more events before reading (see [`LogFollower::with_linger`]).
const LINGER: Duration = Duration::from_millis(20);

impl LogFollower {
    pub fn new(pool: PgPool, from: LogPosition) -> Self {
        Self {
            pool,
            wakeups: None,
            position: from,
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            linger: LINGER,
            read_first: true,
        }
    }

    /// After a notification, wait this long (and swallow the notifications that arrive
    /// meanwhile) before reading: under load one batch then carries the events of many
    /// commands, so a consumer's fixed cost per batch (transaction, checkpoint) is paid once
    /// for all of them, at the price of this much extra lag.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    pub fn with_batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// The position after the last event returned.
    pub fn position(&self) -> LogPosition {
        self.position
    }

    /// Moves the follower, e.g. after a consumer re-read its checkpoint.
    pub fn seek(&mut self, position: LogPosition) {
        self.position = position;
        self.read_first = true;
    }

    /// The next batch, without waiting: empty when nothing final is new.
    pub async fn poll(&mut self) -> Result<Vec<RecordedEvent>, sqlx::Error> {
        let batch = read_after(&self.pool, self.position, self.batch_size).await?;
        if let Some(last) = batch.last() {
            self.position = last.position;
        }
        Ok(batch)
    }

    /// The next non-empty batch, waiting for it as long as it takes.
    ///
    /// Once caught up (the last batch was not full), the follower does not read again until
    /// there is news: a notification that arrived while the last batch was being applied (then
    /// it lingers and reads), or, with none, whatever [`Self::wait`] brings. Under load this
    /// spares every consumer an empty read and a pending check per batch.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, sqlx::Error> {
        loop {
            // Listen before reading, so a commit between the read and the wait is not missed.
            self.ensure_listening().await;
            if self.read_first {
                let batch = self.poll().await?;
                if !batch.is_empty() {
                    self.read_first = batch.len() as i64 >= self.batch_size;
                    return Ok(batch);
                }
            }
            if self.take_buffered() {
                self.linger().await;
            } else if has_pending_after(&self.pool, self.position).await? {
                // Committed (or about to be) behind an open transaction: its notification may
                // be gone already, so look again shortly.
                tokio::time::sleep(PENDING_RETRY.min(self.poll_interval)).await;
            } else {
                self.wait().await;
            }
            self.read_first = true;
        }
    }

    /// Swallows the notifications that have arrived since the last look; whether there were any.
    fn take_buffered(&mut self) -> bool {
        match self.wakeups.as_mut() {
            Some(w) => match w.seen.has_changed() {
                Ok(news) => {
                    w.seen.mark_unchanged();
                    news
                }
                // The hub has ended: join a new one on the next round, and read.
                Err(_) => {
                    self.wakeups = None;
                    true
                }
            },
            None => false,
        }
    }

    /// Waits [`Self::with_linger`] for more events to come in, and swallows their notifications
    /// (the next read returns their events anyway).
    async fn linger(&mut self) {
        if !self.linger.is_zero() {
            tokio::time::sleep(self.linger).await;
            self.take_buffered();
        }
    }

    /// Joins this process's listener for the pool (see [`Wakeups`]); waits a little for it
    /// to be listening, so a commit between the first read and the first wait is not missed.
    async fn ensure_listening(&mut self) {
        if self.wakeups.is_some() {
            return;
        }
        // Kept before waiting, so a caller that drops this future does not join again.
        let wakeups = self.wakeups.insert(Wakeups::join(&self.pool));
        let _ = tokio::time::timeout(
            self.poll_interval.min(Duration::from_secs(2)),
            wakeups.listening.wait_for(|l| *l),
        )
        .await;
    }

    /// Waits for a notification or the poll interval, whichever comes first.
    async fn wait(&mut self) {
        let Some(wakeups) = self.wakeups.as_mut() else {
            tokio::time::sleep(self.poll_interval).await;
            return;
        };
        let listening = *wakeups.listening.borrow();
        if !listening {
            // The connection is being re-opened: read again once it listens (whatever was
            // committed meanwhile is then found), or after the poll interval.
            let _ =
                tokio::time::timeout(self.poll_interval, wakeups.listening.wait_for(|l| *l)).await;
            return;
        }
        match tokio::time::timeout(self.poll_interval, wakeups.seen.changed()).await {
            Ok(Ok(())) => {}
            Err(_) => return,
            // The listener is gone (it stopped): join a new one on the next round.
            Ok(Err(_)) => {
                self.wakeups = None;
                return;
            }
        }
        self.linger().await;
    }
}
