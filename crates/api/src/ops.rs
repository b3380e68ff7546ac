//! Operations: the outbox's delivery state and requeueing dead letters (`integrations_outbox`,
//! owned by the outbox worker), projection status and lag, and starting a rebuild.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::AppState;
use crate::consistency::MinPosition;
use crate::error::{ApiResult, Problem, ProblemKind};
use crate::extract::ApiQuery;

/// The consumers of the global log besides the projections, by checkpoint and name: the outbox
/// projector (in the worker role) and the won-lead process manager (in the projector role).
/// They lag and stop on an event they cannot read like a projection, so they are reported
/// beside them; they are not rebuilt.
pub const OTHER_CONSUMERS: &[(&str, &str)] = &[
    ("projection:outbox", "outbox"),
    (commands::process::NAME, "lead_to_booking"),
];

/// Where each of [`OTHER_CONSUMERS`] stands.
pub async fn other_consumers(
    pool: &sqlx::PgPool,
) -> Result<Vec<projections::status::ProjectionStatus>, sqlx::Error> {
    let mut out = Vec::with_capacity(OTHER_CONSUMERS.len());
    for (checkpoint, name) in OTHER_CONSUMERS {
        out.push(projections::status::one(pool, checkpoint, name).await?);
    }
    Ok(out)
}

async fn require_outbox(state: &AppState) -> ApiResult<()> {
    let installed: bool =
        sqlx::query_scalar("SELECT to_regclass('integrations_outbox') IS NOT NULL")
            .fetch_one(&state.pool)
            .await?;
    if installed {
        Ok(())
    } else {
        Err(Problem::new(
            ProblemKind::Unavailable,
            "the outbox is not installed in this database yet",
        ))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OutboxQuery {
    /// `pending`, `processing`, `processed`, `failed` (dead letters).
    pub status: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// The rows derived from events up to this position are there (the outbox projector has
    /// passed it), as with the read models.
    pub min_position: Option<i64>,
}

const OUTBOX_STATUSES: &[&str] = &["pending", "processing", "processed", "failed"];

/// Outbox rows by status, most recently changed first.
#[utoipa::path(
    get,
    path = "/v1/outbox",
    tag = "operations",
    params(OutboxQuery),
    responses(
        (status = 200, description = "`{items, limit, offset, next_offset}` of `integrations_outbox` rows", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn outbox(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<OutboxQuery>,
) -> ApiResult<Json<Value>> {
    if let Some(s) = &q.status
        && !OUTBOX_STATUSES.contains(&s.as_str())
    {
        return Err(Problem::validation(format!(
            "status must be one of {}",
            OUTBOX_STATUSES.join(", ")
        )));
    }
    let limit = q.limit.unwrap_or(50);
    let offset = q.offset.unwrap_or(0);
    if !(1..=500).contains(&limit) || offset < 0 {
        return Err(Problem::validation(
            "limit must be between 1 and 500 and offset must not be negative",
        ));
    }
    require_outbox(&state).await?;
    crate::consistency::wait_for(
        &state.pool,
        &["outbox"],
        q.min_position,
        state.config.read_wait,
    )
    .await?;
    let mut rows: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(o) FROM integrations_outbox o \
         WHERE ($1::text IS NULL OR o.status = $1) \
         ORDER BY o.updated_at DESC, o.id LIMIT $2 OFFSET $3",
    )
    .bind(q.status)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(json!({
        "items": rows,
        "limit": limit,
        "offset": offset,
        "next_offset": if more { Some(offset + limit) } else { None },
    })))
}

/// Requeues a dead letter: `failed` -> `pending`, attempts 0, due now.
#[utoipa::path(
    post,
    path = "/v1/outbox/{id}/requeue",
    tag = "operations",
    params(("id" = Uuid, Path, description = "The outbox row id")),
    responses(
        (status = 200, description = "The requeued row", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn requeue(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> ApiResult<Json<Value>> {
    let not_found =
        || Problem::not_found(format!("no outbox row {raw}")).with_code("outbox.not_found");
    let id = Uuid::parse_str(&raw).map_err(|_| not_found())?;
    require_outbox(&state).await?;
    // Due in two seconds, as `outbox_worker::worker::requeue` says why: a claim running now
    // may be taking a later row of the same record.
    let row: Option<Value> = sqlx::query_scalar(
        "UPDATE integrations_outbox SET status = 'pending', attempts = 0, \
           next_run_at = now() + interval '2 seconds', updated_at = now() \
         WHERE id = $1 AND status = 'failed' RETURNING to_jsonb(integrations_outbox)",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    if let Some(row) = row {
        tracing::info!(outbox_id = %id, "dead letter requeued");
        return Ok(Json(row));
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM integrations_outbox WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await?;
    match status {
        None => Err(not_found()),
        Some(s) => Err(Problem::new(
            ProblemKind::InvalidTransition,
            format!("only failed rows can be requeued; this one is {s}"),
        )
        .with_code("outbox.invalid_transition")),
    }
}

/// Every projection's checkpoint, lag (events and seconds behind the head) and error, and the
/// rebuilds this process is running.
#[utoipa::path(
    get,
    path = "/v1/projections",
    tag = "operations",
    params(MinPosition),
    responses(
        (status = 200, description = "`{projections: [...], consumers: [...], rebuilding: [...]}`: each projection's and each other consumer's (the outbox projector, the won-lead process manager) position, lag and error", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn projection_status(
    State(state): State<AppState>,
    ApiQuery(_min): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    let all = projections::status::all(&state.pool).await?;
    let consumers = other_consumers(&state.pool).await?;
    let rebuilding: Vec<String> = state.rebuilding().into_iter().collect();
    Ok(Json(
        json!({ "projections": all, "consumers": consumers, "rebuilding": rebuilding }),
    ))
}

/// Starts rebuilding a projection from the whole log in the background (the live tables keep
/// serving; the rebuilt ones are compared and swapped in). Answers 202 at once.
#[utoipa::path(
    post,
    path = "/v1/projections/{name}/rebuild",
    tag = "operations",
    params(("name" = String, Path, description = "`bookings`, `clients`, `fleet`, `sales` or `kpis`")),
    responses(
        (status = 202, description = "Started", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn rebuild(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Some(projection) = projections::by_name(&name) else {
        let names: Vec<&str> = projections::all().iter().map(|p| p.name()).collect();
        return Err(Problem::not_found(format!(
            "no projection called {name:?}; choose one of {}",
            names.join(", ")
        ))
        .with_code("projection.not_found"));
    };
    let running = || {
        Problem::conflict(format!("a rebuild of {name} is already running"))
            .with_code("projection.rebuilding")
    };
    // Across processes (another replica or the CLI may be rebuilding it), then in this one for
    // the status; nothing is awaited in between, so a dropped request leaves no mark behind.
    let guard = match projections::rebuild::RebuildGuard::acquire(
        &state.pool,
        &[projection.as_ref()],
    )
    .await
    {
        Ok(guard) => guard,
        Err(projections::ProjectionError::RebuildRunning(_)) => return Err(running()),
        Err(other) => return Err(Problem::internal(other)),
    };
    if !state.start_rebuild(projection.name()) {
        // Not while this process's rebuilds hold their guards.
        guard.release().await;
        return Err(running());
    }
    let task_state = state.clone();
    tokio::spawn(async move {
        let name = projection.name();
        tracing::info!(projection = name, "rebuild started");
        match projections::rebuild::rebuild_held(
            guard,
            &task_state.pool,
            projection.as_ref(),
            true,
            |_| {},
        )
        .await
        {
            Ok(report) if report.differences.is_empty() => tracing::info!(
                projection = name,
                events = report.events,
                seconds = report.seconds,
                "rebuild swapped in; it equalled the live tables"
            ),
            Ok(report) => tracing::warn!(
                projection = name,
                events = report.events,
                tables = report.differences.len(),
                "rebuild swapped in; it differed from the live tables"
            ),
            Err(e) => tracing::error!(projection = name, error = %e, "rebuild failed"),
        }
        task_state.finish_rebuild(name);
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "projection": name, "status": "started" })),
    ))
}
