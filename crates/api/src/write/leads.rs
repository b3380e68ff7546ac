//! Lead commands: `POST /v1/leads` and `POST /v1/leads/{id}/{action}`. Stage ids are resolved
//! against `sales_pipeline_stages` before the command is built. Winning allocates the booking's
//! id and code; the process manager creates that booking from `LeadWon`.

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use commands::codes::{self, CodeKind};
use domain::booking::BookingType;
use domain::lead::{LeadCommand, StageRef};
use rust_decimal::Decimal;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Answer, action, execute, execute_creation, refuse_before_numbering};
use crate::AppState;
use crate::error::{ApiResult, Problem};
use crate::extract::{ApiJson, CommandContext};
use crate::refs::{self, Kind, Ref};

/// The stage called `stage_id`, or a 422.
async fn stage(state: &AppState, stage_id: &str) -> ApiResult<StageRef> {
    refs::stage(&state.pool, stage_id).await?.ok_or_else(|| {
        Problem::validation(format!(
            "stage_id: {stage_id:?} is not a sales pipeline stage"
        ))
        .with_code("lead.unknown_stage")
    })
}

/// `POST /v1/leads`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLead {
    pub client_id: Option<Uuid>,
    /// The responsible salesperson; the caller when absent.
    pub owner_id: Option<Uuid>,
    /// A `sales_pipeline_stages` id; default `new`.
    pub stage_id: Option<String>,
    #[schema(value_type = Option<String>, example = "25000.00")]
    pub value_amount: Option<Decimal>,
    /// Where the lead came from; default `API`.
    pub source: Option<String>,
    pub title: Option<String>,
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub requested_start_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub requested_end_at: Option<DateTime<Utc>>,
    /// Default 1.
    pub fleet_size: Option<i32>,
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub expected_close_at: Option<DateTime<Utc>>,
    pub kommo_lead_id: Option<i64>,
}

/// Creates a lead; allocates its `LD-` code.
#[utoipa::path(
    post,
    path = "/v1/leads",
    tag = "leads",
    request_body = CreateLead,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer")),
    responses(
        (status = 201, description = "Created", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: CommandContext,
    ApiJson(req): ApiJson<CreateLead>,
) -> ApiResult<Answer> {
    let owner_id = req.owner_id.unwrap_or(ctx.caller.staff_id);
    let mut references: Vec<_> = req
        .client_id
        .map(|c| ("client_id", Ref::Client, c))
        .into_iter()
        .collect();
    references.push(("owner_id", Ref::Staff, owner_id));
    let stage = stage(&state, req.stage_id.as_deref().unwrap_or("new")).await?;
    let id = Uuid::now_v7();
    let mut command = LeadCommand::Create {
        lead_code: CodeKind::Lead.code(0),
        client_id: req.client_id,
        owner_id,
        stage,
        value_amount: req.value_amount.unwrap_or_default(),
        source: req.source.unwrap_or_else(|| "API".into()),
        title: req.title,
        requested_start_at: req.requested_start_at,
        requested_end_at: req.requested_end_at,
        fleet_size: req.fleet_size.unwrap_or(1),
        expected_close_at: req.expected_close_at,
        kommo_lead_id: req.kommo_lead_id,
    };
    refuse_before_numbering(&state.bus.leads, None, command.clone()).await?;
    let code = refs::require_all_and_take_code(&state.pool, &references, CodeKind::Lead).await?;
    if let LeadCommand::Create { lead_code, .. } = &mut command {
        *lead_code = code.clone();
    }
    let outcome = execute_creation(&state.bus.leads, &ctx, id, command).await?;
    Ok(Answer::created(
        &outcome,
        format!("/v1/leads/{id}"),
        Some(code),
    ))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveStage {
    /// A `sales_pipeline_stages` id.
    pub stage_id: String,
}

action!(
    /// Moves the lead to another pipeline stage.
    move_stage, "/v1/leads/{id}/move-stage", "leads", Kind::Lead, leads,
    MoveStage, |state, ctx, id, req| {
        (LeadCommand::MoveToStage { stage: stage(&state, &req.stage_id).await? }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeValue {
    #[schema(value_type = String, example = "30000.00")]
    pub value_amount: Decimal,
}

action!(
    /// Changes the lead's expected value.
    change_value, "/v1/leads/{id}/change-value", "leads", Kind::Lead, leads,
    ChangeValue, |state, ctx, id, req| {
        (LeadCommand::ChangeValue { value_amount: req.value_amount }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignOwner {
    pub owner_id: Uuid,
}

action!(
    /// Hands the lead to another salesperson.
    assign_owner, "/v1/leads/{id}/assign-owner", "leads", Kind::Lead, leads,
    AssignOwner, |state, ctx, id, req| {
        refs::require(&state.pool, "owner_id", Ref::Staff, req.owner_id).await?;
        (LeadCommand::AssignOwner { owner_id: req.owner_id }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetNextAction {
    pub next_action: String,
    #[serde(deserialize_with = "crate::time::instant")]
    pub next_action_at: DateTime<Utc>,
}

action!(
    /// Sets the next action and when it is due.
    set_next_action, "/v1/leads/{id}/set-next-action", "leads", Kind::Lead, leads,
    SetNextAction, |state, ctx, id, req| {
        (
            LeadCommand::SetNextAction {
                next_action: req.next_action,
                next_action_at: req.next_action_at,
            },
            None,
        )
    }
);

/// `POST /v1/leads/{id}/win`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Win {
    /// The client, when the lead has none yet (it is attached first).
    pub client_id: Option<Uuid>,
    /// `rental` (default), `chauffeur`, `transfer`.
    #[schema(value_type = Option<String>, example = "rental")]
    pub booking_type: Option<BookingType>,
    /// The booked period; the lead's requested one when absent.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub start_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub end_at: Option<DateTime<Utc>>,
    #[schema(value_type = String, example = "6500.00")]
    pub price_daily: Decimal,
    pub vehicle_id: Option<Uuid>,
}

/// Wins the lead. The booking's id and `BK-` code are allocated here and returned as
/// `booking_id`/`booking_code`; the booking itself is created by the process manager.
#[utoipa::path(
    post,
    path = "/v1/leads/{id}/win",
    tag = "leads",
    request_body = Win,
    params(
        ("id" = String, Path, description = "The lead id (UUID) or code"),
        ("If-Match" = Option<i64>, Header, description = "The version the lead is expected at"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer"),
    ),
    responses(
        (status = 200, description = "Won", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn win(
    State(state): State<AppState>,
    ctx: CommandContext,
    Path(raw_id): Path<String>,
    ApiJson(req): ApiJson<Win>,
) -> ApiResult<Answer> {
    let id = refs::resolve(&state.pool, &raw_id, Kind::Lead).await?;
    if let Some(v) = req.vehicle_id {
        refs::require(&state.pool, "vehicle_id", Ref::Vehicle, v).await?;
    }
    if let Some(client_id) = req.client_id {
        refs::require(&state.pool, "client_id", Ref::Client, client_id).await?;
    }
    let booking_id = Uuid::now_v7();
    let mut command = LeadCommand::Win {
        booking_id,
        booking_code: CodeKind::Booking.code(0),
        booking_type: req.booking_type.unwrap_or_default(),
        start_at: req.start_at,
        end_at: req.end_at,
        price_daily: req.price_daily,
        vehicle_id: req.vehicle_id,
        client_id: req.client_id,
    };
    refuse_before_numbering(&state.bus.leads, Some(id), command.clone()).await?;
    let booking_code = codes::allocate(&state.pool, CodeKind::Booking).await?;
    if let LeadCommand::Win {
        booking_code: code, ..
    } = &mut command
    {
        *code = booking_code.clone();
    }
    let outcome = execute(&state.bus.leads, &ctx, id, command).await?;
    Ok(Answer::ok(&outcome).map(|a| {
        a.booking_id = Some(booking_id);
        a.booking_code = Some(booking_code);
    }))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lose {
    /// The loss reason.
    pub reason: String,
}

action!(
    /// Loses the lead, with a reason.
    lose, "/v1/leads/{id}/lose", "leads", Kind::Lead, leads,
    Lose, |state, ctx, id, req| {
        (LeadCommand::Lose { reason: req.reason }, None)
    }
);
