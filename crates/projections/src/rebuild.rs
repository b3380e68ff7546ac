//! Rebuild: replay the whole log into fresh copies of a projection's tables (a schema of their
//! own, reached through `search_path`), while the live tables keep serving and keep being
//! updated; then, in one transaction holding the projection's checkpoint, bring both to the same
//! position, run the tick on both with one clock, compare them row for row, and swap the fresh
//! tables in (`ALTER TABLE ... SET SCHEMA`). Readers see the old tables or the new ones, never a mix.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgPool};
use store::RecordedEvent;
use store::checkpoints::{self, SessionLock};
use store::global_log::{self, LogPosition};

use crate::runner::{checkpoint_name, lock_checkpoint};
use crate::{Projection, ProjectionError, Session};

/// Differences between the live and the rebuilt copy of one table.
#[derive(Debug, Clone, Serialize)]
pub struct TableDiff {
    pub table: String,
    pub only_live: i64,
    pub only_rebuilt: i64,
    /// A few differing rows, as JSON text.
    pub samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub projection: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub position: i64,
    pub differences: Vec<TableDiff>,
    pub swapped: bool,
}

/// Progress while replaying.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub events: u64,
    pub position: i64,
    pub head: i64,
}

fn shadow_schema(p: &dyn Projection) -> String {
    format!("rebuild_{}", p.name())
}

fn retired_schema(p: &dyn Projection) -> String {
    format!("retired_{}", p.name())
}

async fn use_schema(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("SET LOCAL search_path TO {schema}, public"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Applies the events in `(from, to]` to the tables `schema` resolves to.
async fn apply_range(
    conn: &mut PgConnection,
    pool: &PgPool,
    projection: &dyn Projection,
    schema: &str,
    from: LogPosition,
    to: LogPosition,
) -> Result<u64, ProjectionError> {
    use_schema(conn, schema).await?;
    let mut position = from;
    let mut applied = 0;
    while position < to {
        let batch: Vec<_> = global_log::read_after(pool, position, 1000)
            .await?
            .into_iter()
            .filter(|e| e.position <= to)
            .collect();
        let Some(last) = batch.last() else { break };
        position = last.position;
        projection.apply(conn, &batch).await?;
        applied += batch.len() as u64;
    }
    Ok(applied)
}

/// Held while projections are rebuilt: a session advisory lock per projection
/// ([`SessionLock`]), so that two processes (two API replicas, the CLI and a replica) never
/// rebuild one projection at once. They would share its fresh tables (`rebuild_<name>`): the
/// second's `DROP SCHEMA` would remove the first's rows while it loads them.
pub struct RebuildGuard(SessionLock);

impl RebuildGuard {
    /// Takes the projections' rebuild locks, or none: [`ProjectionError::RebuildRunning`] names
    /// the first projection another session is rebuilding. Never waits.
    pub async fn acquire(
        pool: &PgPool,
        projections: &[&dyn Projection],
    ) -> Result<Self, ProjectionError> {
        let keys: Vec<String> = projections
            .iter()
            .map(|p| format!("skyluxse:rebuild:{}", p.name()))
            .collect();
        match SessionLock::try_acquire_all(pool, &keys).await? {
            Ok(lock) => Ok(Self(lock)),
            Err(busy) => Err(ProjectionError::RebuildRunning(projections[busy].name())),
        }
    }

    /// Gives the locks back (dropping the guard frees them too, once the server notices).
    pub async fn release(self) {
        self.0.release().await
    }
}

/// Rebuilds `projection`; swaps the result in when `swap` is true (otherwise only compares).
/// Refused with [`ProjectionError::RebuildRunning`] while another session rebuilds it.
pub async fn rebuild(
    pool: &PgPool,
    projection: &dyn Projection,
    swap: bool,
    progress: impl FnMut(Progress) + Send,
) -> Result<RebuildReport, ProjectionError> {
    let guard = RebuildGuard::acquire(pool, &[projection]).await?;
    rebuild_held(guard, pool, projection, swap, progress).await
}

/// [`rebuild`] under a guard the caller took (for [`RebuildGuard::acquire`] of `projection`);
/// gives it back when done.
pub async fn rebuild_held(
    guard: RebuildGuard,
    pool: &PgPool,
    projection: &dyn Projection,
    swap: bool,
    progress: impl FnMut(Progress) + Send,
) -> Result<RebuildReport, ProjectionError> {
    let reports = rebuild_unguarded(pool, &[projection], swap, progress).await;
    guard.release().await;
    let mut reports = reports?;
    reports.pop().ok_or_else(|| ProjectionError::Unhandleable {
        position: 0,
        event_type: projection.name().into(),
        event_version: String::new(),
        reason: "the rebuild produced no report".into(),
    })
}

/// Events read from the log per round of a rebuild.
const REPLAY_BATCH: i64 = 5_000;

/// Rebuilds several projections from one reading of the log: each replays into its fresh tables
/// on a connection of its own, concurrently, holding what it folds in memory ([`Session`]) and
/// writing its rows set-based at the end. Then each, as soon as its own replay is done: index,
/// catch up, tick, compare and (if `swap`) swap in. Refused with
/// [`ProjectionError::RebuildRunning`] if another session rebuilds any of them.
pub async fn rebuild_many(
    pool: &PgPool,
    projections: &[&dyn Projection],
    swap: bool,
    progress: impl FnMut(Progress) + Send,
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let guard = RebuildGuard::acquire(pool, projections).await?;
    let reports = rebuild_unguarded(pool, projections, swap, progress).await;
    guard.release().await;
    reports
}

async fn rebuild_unguarded(
    pool: &PgPool,
    projections: &[&dyn Projection],
    swap: bool,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let started = Instant::now();

    // Fresh, empty copies of the projections' tables, and one replaying task each.
    let mut feeds = Vec::new();
    let mut tasks = Vec::new();
    for projection in projections {
        let shadow = shadow_schema(*projection);
        let mut conn = pool.acquire().await?.detach();
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {shadow} CASCADE"))
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA {shadow}"))
            .execute(&mut conn)
            .await?;
        for t in projection.tables() {
            // Without indexes while loading (they are built once at the end, much faster
            // than maintained row by row); the session writes each key once.
            sqlx::query(&format!(
                "CREATE TABLE {shadow}.{t} (LIKE public.{t} INCLUDING ALL EXCLUDING INDEXES)"
            ))
            .execute(&mut conn)
            .await?;
        }
        // This connection only ever writes the fresh tables, statement by statement (no long
        // transaction holds back the log's horizon for the live consumers); they are not
        // visible to anyone until the swap, which commits durably and so after them.
        // A second one, alike, for sessions that write through two (see `Session::replay`).
        let mut other = pool.acquire().await?.detach();
        for setting in [
            format!("SET search_path TO {shadow}, public"),
            "SET synchronous_commit TO off".to_string(),
        ] {
            sqlx::query(&setting).execute(&mut conn).await?;
            sqlx::query(&setting).execute(&mut other).await?;
        }
        let session = projection.session(true);
        let (tx, rx) = tokio::sync::mpsc::channel::<Arc<Vec<RecordedEvent>>>(4);
        feeds.push(tx);
        tasks.push(tokio::spawn(replay(
            [conn, other],
            projection.name(),
            session,
            rx,
        )));
    }

    // Read the log once, from position zero, and hand every batch to every projection.
    let read = async {
        let head = global_log::head(pool)
            .await?
            .map_or(0, |(p, _)| p.global_position);
        let mut position = LogPosition::START;
        let mut events = 0u64;
        loop {
            let batch = global_log::read_after(pool, position, REPLAY_BATCH).await?;
            let Some(last) = batch.last() else { break };
            position = last.position;
            events += batch.len() as u64;
            let batch = Arc::new(batch);
            let mut closed = false;
            for feed in &feeds {
                closed |= feed.send(batch.clone()).await.is_err();
            }
            if closed {
                // A replay stopped on an error: its task reports it below.
                break;
            }
            progress(Progress {
                events,
                position: position.global_position,
                head,
            });
        }
        Ok::<_, ProjectionError>((position, events))
    };
    let (position, events) = match read.await {
        Ok(read) => read,
        Err(e) => {
            // The replays must not flush a part of the log (their fresh tables are dropped by
            // the next rebuild anyway).
            for task in &tasks {
                task.abort();
            }
            return Err(e);
        }
    };
    drop(feeds);
    let read = started.elapsed();
    tracing::info!(
        events,
        log_read_s = read.as_secs_f64(),
        "rebuild: read the log"
    );
    // Then each projection on its own as soon as its replay is done (while the others may still
    // be flushing): its indexes, then catch up, compare and swap under its checkpoint lock. A
    // failure stops only its own projection: the others still finish, each swap atomic.
    let indexing = tokio::sync::Semaphore::new(INDEX_AT_ONCE);
    let indexing = &indexing;
    let results =
        futures::future::join_all(projections.iter().zip(tasks).map(|(p, task)| async move {
            task.await.map_err(|e| ProjectionError::Unhandleable {
                position: 0,
                event_type: "rebuild".into(),
                event_version: String::new(),
                reason: format!("a replay task failed: {e}"),
            })??;
            index(pool, &[*p], indexing).await?;
            tracing::info!(
                projection = p.name(),
                indexed_s = started.elapsed().as_secs_f64(),
                "rebuild: indexed"
            );
            finish(pool, *p, position, events, swap, started).await
        }))
        .await;
    let mut reports = Vec::new();
    let mut failed = None;
    for (p, result) in projections.iter().zip(results) {
        match result {
            Ok(report) => reports.push(report),
            Err(e) => {
                tracing::error!(projection = p.name(), error = %e, "rebuild: failed");
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        None => Ok(reports),
        Some(e) => {
            let done: Vec<&str> = reports.iter().map(|r| r.projection.as_str()).collect();
            tracing::warn!(
                ?done,
                swap,
                "rebuild: these projections were rebuilt before another failed"
            );
            Err(e)
        }
    }
}

/// Index builds (and statistics) running at once over all projections: each sorts with 256 MB.
const INDEX_AT_ONCE: usize = 3;

/// Gives the projections' fresh tables the live tables' keys, constraints and indexes, under
/// the same names (names are per schema; the swap moves them along): largest tables first, a
/// few statements at a time (so the one big table is not indexed alone at the end); then
/// their statistics. A rebuild calls it per projection, as each finishes its replay;
/// `at_once` bounds the statements running at once over all of them.
async fn index(
    pool: &PgPool,
    projections: &[&dyn Projection],
    at_once: &tokio::sync::Semaphore,
) -> Result<(), ProjectionError> {
    use futures::{StreamExt, TryStreamExt};
    let mut statements: Vec<(i64, String)> = Vec::new();
    let mut conn = pool.acquire().await?;
    for projection in projections {
        let shadow = shadow_schema(*projection);
        for t in projection.tables() {
            let size: i64 = sqlx::query_scalar("SELECT pg_relation_size(to_regclass($1))")
                .bind(format!("{shadow}.{t}"))
                .fetch_one(&mut *conn)
                .await?;
            let constraints: Vec<(String, String)> = sqlx::query_as(
                "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
                 WHERE conrelid = to_regclass('public.' || $1) AND contype IN ('p', 'u', 'x') ORDER BY conname",
            )
            .bind(t)
            .fetch_all(&mut *conn)
            .await?;
            for (name, def) in &constraints {
                statements.push((
                    size,
                    format!("ALTER TABLE {shadow}.{t} ADD CONSTRAINT {name} {def}"),
                ));
            }
            let indexes: Vec<String> = sqlx::query_scalar(
                "SELECT i.indexdef FROM pg_indexes i WHERE i.schemaname = 'public' AND i.tablename = $1 \
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c \
                                   WHERE c.conrelid = to_regclass('public.' || $1) AND c.conname = i.indexname) \
                 ORDER BY i.indexname",
            )
            .bind(t)
            .fetch_all(&mut *conn)
            .await?;
            for def in indexes {
                statements.push((
                    size,
                    def.replacen(
                        &format!(" ON public.{t} "),
                        &format!(" ON {shadow}.{t} "),
                        1,
                    ),
                ));
            }
        }
    }
    drop(conn);
    // Stable: a table's constraints still come before its other indexes.
    statements.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    futures::stream::iter(statements)
        .map(|(_, sql)| async move {
            let _turn = at_once
                .acquire()
                .await
                .map_err(|e| index_wait_failed(e.to_string()))?;
            let mut tx = pool.begin().await?;
            // Sorting a million keys in memory rather than on disk.
            sqlx::query("SET LOCAL maintenance_work_mem = '256MB'")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&sql).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, ProjectionError>(())
        })
        .buffer_unordered(3)
        .try_collect::<()>()
        .await?;
    // Statistics, so that queries on the swapped-in tables are planned well at once (not only
    // after autovacuum's next round); after the indexes, which ANALYZE also samples. Only of
    // the columns queries select by: JSON documents (payloads, folded states) are read, never
    // filtered on, and sampling them took most of the time (autovacuum's own ANALYZE later
    // covers every column).
    let tables: Vec<(String, String)> = projections
        .iter()
        .flat_map(|p| {
            let shadow = shadow_schema(*p);
            p.tables()
                .iter()
                .map(move |t| (shadow.clone(), t.to_string()))
        })
        .collect();
    futures::stream::iter(tables)
        .map(|(schema, table)| async move {
            let _turn = at_once
                .acquire()
                .await
                .map_err(|e| index_wait_failed(e.to_string()))?;
            let columns: Vec<String> = sqlx::query_scalar(
                "SELECT quote_ident(column_name::text) FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2 \
                   AND data_type NOT IN ('json', 'jsonb') \
                   AND NOT (table_name LIKE '%\\_states' AND column_name = 'state') \
                 ORDER BY ordinal_position",
            )
            .bind(&schema)
            .bind(&table)
            .fetch_all(pool)
            .await?;
            let columns = if columns.is_empty() {
                String::new()
            } else {
                format!(" ({})", columns.join(", "))
            };
            sqlx::query(&format!("ANALYZE {schema}.{table}{columns}"))
                .execute(pool)
                .await?;
            Ok::<_, ProjectionError>(())
        })
        .buffer_unordered(3)
        .try_collect::<()>()
        .await
}

fn index_wait_failed(reason: String) -> ProjectionError {
    ProjectionError::Unhandleable {
        position: 0,
        event_type: "rebuild".into(),
        event_version: String::new(),
        reason: format!("waiting to build an index: {reason}"),
    }
}

/// Folds every batch it is fed into one fresh session, writing as it goes, then flushes.
async fn replay(
    [mut conn, other]: [PgConnection; 2],
    name: &'static str,
    session: Option<Box<dyn Session>>,
    mut batches: tokio::sync::mpsc::Receiver<Arc<Vec<RecordedEvent>>>,
) -> Result<(), ProjectionError> {
    // Only projections that fold into a session can replay this way.
    let Some(mut session) = session else {
        return Err(ProjectionError::Unhandleable {
            position: 0,
            event_type: "rebuild".into(),
            event_version: String::new(),
            reason: "this projection cannot be rebuilt (it has no session)".into(),
        });
    };
    let t = Instant::now();
    session.replay(&mut conn, other, &mut batches).await?;
    tracing::info!(
        projection = name,
        replayed_s = t.elapsed().as_secs_f64(),
        "rebuild: replayed and flushed"
    );
    let _ = conn.close().await;
    Ok(())
}

/// Brings the live and the rebuilt tables to one position under the checkpoint lock, ticks both
/// with one clock, compares them, and swaps the rebuilt ones in when `swap`.
async fn finish(
    pool: &PgPool,
    projection: &dyn Projection,
    replayed_to: LogPosition,
    replayed: u64,
    swap: bool,
    started: Instant,
) -> Result<RebuildReport, ProjectionError> {
    let shadow = shadow_schema(projection);
    let retired = retired_schema(projection);
    let mut position = replayed_to;
    let mut events = replayed;
    let name = checkpoint_name(projection);
    let mut tx = pool.begin().await?;
    let live = lock_checkpoint(&mut tx, &name).await?;
    if live > position {
        events += apply_range(&mut tx, pool, projection, &shadow, position, live).await?;
        position = live;
    } else if live < position {
        apply_range(&mut tx, pool, projection, "public", live, position).await?;
        checkpoints::save(&mut *tx, &name, position, 0).await?;
    }
    let now = Utc::now();
    use_schema(&mut tx, &shadow).await?;
    projection.tick(&mut tx, now).await?;
    use_schema(&mut tx, "public").await?;
    projection.tick(&mut tx, now).await?;

    let ticked = Instant::now();
    let mut differences = Vec::new();
    for t in projection.tables() {
        let diff = compare(&mut tx, t, &shadow).await?;
        if diff.only_live > 0 || diff.only_rebuilt > 0 {
            differences.push(diff);
        }
    }
    let compared = ticked.elapsed();

    if swap {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {retired} CASCADE"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA {retired}"))
            .execute(&mut *tx)
            .await?;
        for t in projection.tables() {
            sqlx::query(&format!("ALTER TABLE public.{t} SET SCHEMA {retired}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("ALTER TABLE {shadow}.{t} SET SCHEMA public"))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(&format!("DROP SCHEMA {retired} CASCADE"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {shadow} CASCADE"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(
        projection = projection.name(),
        compare_s = compared.as_secs_f64(),
        swap_s = (ticked.elapsed() - compared).as_secs_f64(),
        done_s = started.elapsed().as_secs_f64(),
        "rebuild: caught up, compared and swapped"
    );

    let seconds = started.elapsed().as_secs_f64();
    Ok(RebuildReport {
        projection: projection.name().to_string(),
        events,
        seconds,
        events_per_second: if seconds > 0.0 {
            events as f64 / seconds
        } else {
            0.0
        },
        position: position.global_position,
        differences,
        swapped: swap,
    })
}

/// The SQL of a 64-bit hash of a row `t` of `table`: each column hashed by its type's own hash
/// function, seeded with the column's place (the same value in two columns hashes apart; a
/// NULL is the place itself), combined with `#`. Without forming the whole row as a record,
/// which `hash_record_extended(t, 0)` does for every row (20 % of the fingerprint's time on the
/// timeline); that is still the hash of a table with a column of another type.
async fn row_hash(conn: &mut PgConnection, table: &str) -> Result<String, ProjectionError> {
    let columns: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT quote_ident(a.attname::text), t.typname::text, t.typtype::text, t.typcategory::text \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = to_regclass('public.' || $1) AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let mut hashes = Vec::with_capacity(columns.len());
    for (place, (column, typname, typtype, category)) in columns.iter().enumerate() {
        let c = format!("t.{column}");
        let seed = place + 1;
        let hash = match (typname.as_str(), typtype.as_str(), category.as_str()) {
            ("uuid", "b", _) => format!("uuid_hash_extended({c}, {seed})"),
            ("text" | "varchar" | "bpchar", "b", _) => format!("hashtextextended({c}, {seed})"),
            // Equal regardless of case, so hashed regardless of case.
            ("citext", "b", _) => format!("citext_hash_extended({c}, {seed})"),
            ("int2", "b", _) => format!("hashint2extended({c}, {seed})"),
            ("int4", "b", _) => format!("hashint4extended({c}, {seed})"),
            ("int8", "b", _) => format!("hashint8extended({c}, {seed})"),
            // 1.5 and 1.50 are equal and hash alike.
            ("numeric", "b", _) => format!("hash_numeric_extended({c}, {seed})"),
            ("timestamptz", "b", _) => {
                format!("timestamp_hash_extended({c} AT TIME ZONE 'UTC', {seed})")
            }
            ("date", "b", _) => format!("hashint4extended({c} - DATE '2000-01-01', {seed})"),
            ("bool", "b", _) => format!("hashint4extended({c}::int, {seed})"),
            ("jsonb", "b", _) => format!("jsonb_hash_extended({c}, {seed})"),
            (_, "e", _) => format!("hashenumextended({c}, {seed})"),
            (_, "b", "A") => format!("hash_array_extended({c}, {seed})"),
            _ => return Ok("hash_record_extended(t, 0)".into()),
        };
        hashes.push(format!("coalesce({hash}, {seed})"));
    }
    if hashes.is_empty() {
        return Ok("hash_record_extended(t, 0)".into());
    }
    Ok(format!("({})", hashes.join(" # ")))
}

async fn compare(
    conn: &mut PgConnection,
    table: &str,
    shadow: &str,
) -> Result<TableDiff, ProjectionError> {
    // First an order-independent fingerprint of each copy (row count and the sum of the rows'
    // 64-bit hashes): one scan each, no sort. The hash of a value is its type's own (as for
    // a hash join), so values that `EXCEPT` below takes as equal hash alike, and it needs no
    // text of the rows (3.5x faster than hashing `t::text` on the 1M-row timeline). The row's
    // columns' hashes are combined, then hashed once more before the sum: summed as they are,
    // they would only see each column's values, not which row holds them (two rows swapping a
    // status would go unnoticed). Only copies that differ are compared row by row to count and
    // show the differences.
    let row_hash = row_hash(conn, table).await?;
    let fingerprint = |schema: &str| {
        format!(
            "SELECT count(*)::text || '/' || coalesce(sum(hashint8extended({row_hash}, 0)), 0)::text \
             FROM {schema}.{table} t"
        )
    };
    let live: String = sqlx::query_scalar(&fingerprint("public"))
        .fetch_one(&mut *conn)
        .await?;
    let rebuilt: String = sqlx::query_scalar(&fingerprint(shadow))
        .fetch_one(&mut *conn)
        .await?;
    if live == rebuilt {
        return Ok(TableDiff {
            table: table.to_string(),
            only_live: 0,
            only_rebuilt: 0,
            samples: Vec::new(),
        });
    }
    // A folded state is JSON text, compared as JSON: one written before the states were text
    // (jsonb's key order) equals the same state written by serde (the type's field order).
    // (jsonb cannot hold `\u0000`, which JSON text can: such a state is compared as text.)
    let columns = if table.ends_with("_states") {
        "id, CASE WHEN strpos(state, '\\u0000') > 0 THEN to_jsonb(state) ELSE state::jsonb END AS state"
    } else {
        "*"
    };
    let only = |a: &str, b: &str| {
        format!("SELECT {columns} FROM {a}.{table} EXCEPT ALL SELECT {columns} FROM {b}.{table}")
    };
    let count = |q: String| format!("SELECT count(*) FROM ({q}) d");
    let only_live: i64 = sqlx::query_scalar(&count(only("public", shadow)))
        .fetch_one(&mut *conn)
        .await?;
    let only_rebuilt: i64 = sqlx::query_scalar(&count(only(shadow, "public")))
        .fetch_one(&mut *conn)
        .await?;
    let mut samples = Vec::new();
    if only_live + only_rebuilt > 0 {
        for (label, q) in [
            ("live", only("public", shadow)),
            ("rebuilt", only(shadow, "public")),
        ] {
            let rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT row_to_json(d)::text FROM ({q}) d LIMIT 3"))
                    .fetch_all(&mut *conn)
                    .await?;
            samples.extend(rows.into_iter().map(|r| format!("{label}: {r}")));
        }
    }
    Ok(TableDiff {
        table: table.to_string(),
        only_live,
        only_rebuilt,
        samples,
    })
}
