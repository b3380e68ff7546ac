//! Maintenance and repair blocks: `POST /v1/vehicles/{id}/blocks`,
//! `DELETE /v1/vehicles/{id}/blocks/{block_id}`. A block takes the vehicle off the schedule like
//! a confirmed booking; an overlap with a booking is refused (409 `vehicle-unavailable`).

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use domain::vehicle_block::{BlockKind, VehicleBlockCommand};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Answer, execute, execute_creation};
use crate::AppState;
use crate::error::{ApiResult, Problem};
use crate::extract::{ApiJson, CommandContext};

/// `POST /v1/vehicles/{id}/blocks` (named like `maintenance_jobs`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBlock {
    /// `maintenance` (default), `repair`, `detailing`.
    #[schema(value_type = Option<String>, example = "maintenance")]
    pub job_type: Option<BlockKind>,
    #[serde(deserialize_with = "crate::time::instant")]
    pub scheduled_start: DateTime<Utc>,
    #[serde(deserialize_with = "crate::time::instant")]
    pub scheduled_end: DateTime<Utc>,
    pub description: Option<String>,
}

/// Blocks a vehicle for maintenance or repair.
#[utoipa::path(
    post,
    path = "/v1/vehicles/{id}/blocks",
    tag = "fleet",
    request_body = CreateBlock,
    params(
        ("id" = Uuid, Path, description = "The vehicle id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer"),
    ),
    responses(
        (status = 201, description = "Blocked; `id` is the block's id", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create_block(
    State(state): State<AppState>,
    ctx: CommandContext,
    Path(vehicle_id): Path<String>,
    ApiJson(req): ApiJson<CreateBlock>,
) -> ApiResult<Answer> {
    let vehicle_id = vehicle(&state, &vehicle_id).await?;
    let id = Uuid::now_v7();
    let command = VehicleBlockCommand::Create {
        vehicle_id,
        kind: req.job_type.unwrap_or_default(),
        start_at: req.scheduled_start,
        end_at: req.scheduled_end,
        description: req.description,
    };
    let outcome = execute_creation(&state.bus.vehicle_blocks, &ctx, id, command).await?;
    Ok(Answer::created(
        &outcome,
        format!("/v1/vehicles/{vehicle_id}/blocks/{id}"),
        None,
    ))
}

/// Removes a block: the vehicle is free again for that period.
#[utoipa::path(
    delete,
    path = "/v1/vehicles/{id}/blocks/{block_id}",
    tag = "fleet",
    params(
        ("id" = Uuid, Path, description = "The vehicle id"),
        ("block_id" = Uuid, Path, description = "The block id"),
        ("If-Match" = Option<i64>, Header, description = "The version the block is expected at"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer"),
    ),
    responses(
        (status = 200, description = "Removed", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn remove_block(
    State(state): State<AppState>,
    ctx: CommandContext,
    Path((vehicle_id, block_id)): Path<(String, String)>,
) -> ApiResult<Answer> {
    let vehicle_id = vehicle(&state, &vehicle_id).await?;
    let not_found = || {
        Problem::not_found(format!("vehicle {vehicle_id} has no block {block_id}"))
            .with_code("vehicle_block.not_found")
    };
    let block_id = Uuid::parse_str(&block_id).map_err(|_| not_found())?;
    let (block, _) = state
        .bus
        .vehicle_blocks
        .replay(block_id, None)
        .await
        .map_err(Problem::from)?;
    if !block.created || block.vehicle_id != vehicle_id {
        return Err(not_found());
    }
    let outcome = execute(
        &state.bus.vehicle_blocks,
        &ctx,
        block_id,
        VehicleBlockCommand::Remove,
    )
    .await?;
    Ok(Answer::ok(&outcome))
}

async fn vehicle(state: &AppState, raw: &str) -> ApiResult<Uuid> {
    let not_found = || {
        Problem::not_found(format!("no vehicle has the id {raw}")).with_code("vehicle.not_found")
    };
    let id = Uuid::parse_str(raw).map_err(|_| not_found())?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM vehicles WHERE id = $1)")
        .bind(id)
        .fetch_one(&state.pool)
        .await?;
    if exists { Ok(id) } else { Err(not_found()) }
}
