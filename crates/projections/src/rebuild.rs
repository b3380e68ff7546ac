//! Rebuild: replay the whole log into fresh copies of a projection's tables (a schema of their
//! own, reached through `search_path`), while the live tables keep serving and keep being
//! updated; then, in one transaction holding the projection's checkpoint, bring both to the same
//! position, run the tick on both with one clock, compare them row for row, and swap the fresh
//! tables in (`ALTER TABLE ... SET SCHEMA`). Readers see the old tables or the new ones, never a mix.

use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use store::checkpoints;
use store::global_log::{self, LogPosition};

use crate::runner::{checkpoint_name, lock_checkpoint};
use crate::{Projection, ProjectionError};

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

/// Rebuilds `projection`; swaps the result in when `swap` is true (otherwise only compares).
pub async fn rebuild(
    pool: &PgPool,
    projection: &dyn Projection,
    swap: bool,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let shadow = shadow_schema(projection);
    let retired = retired_schema(projection);

    // Fresh, empty copies of the projection's tables.
    let mut conn = pool.acquire().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {shadow} CASCADE"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {shadow}"))
        .execute(&mut *conn)
        .await?;
    for t in projection.tables() {
        sqlx::query(&format!(
            "CREATE TABLE {shadow}.{t} (LIKE public.{t} INCLUDING ALL)"
        ))
        .execute(&mut *conn)
        .await?;
    }
    drop(conn);

    // Replay from position zero in batches, without holding anything the live runner needs.
    let head = global_log::head(pool)
        .await?
        .map_or(0, |(p, _)| p.global_position);
    let mut position = LogPosition::START;
    let mut events = 0u64;
    loop {
        let batch = global_log::read_after(pool, position, 2000).await?;
        let Some(last) = batch.last() else { break };
        let mut tx = pool.begin().await?;
        use_schema(&mut tx, &shadow).await?;
        projection.apply(&mut tx, &batch).await?;
        tx.commit().await?;
        position = last.position;
        events += batch.len() as u64;
        progress(Progress {
            events,
            position: position.global_position,
            head,
        });
    }

    // Catch both copies up to one position under the checkpoint lock, tick both with one clock,
    // compare, swap.
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

    let mut differences = Vec::new();
    for t in projection.tables() {
        let diff = compare(&mut tx, t, &shadow).await?;
        if diff.only_live > 0 || diff.only_rebuilt > 0 {
            differences.push(diff);
        }
    }

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

async fn compare(
    conn: &mut PgConnection,
    table: &str,
    shadow: &str,
) -> Result<TableDiff, ProjectionError> {
    let only = |a: &str, b: &str| {
        format!("SELECT * FROM {a}.{table} EXCEPT ALL SELECT * FROM {b}.{table}")
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
