//! Client commands: `POST /v1/clients`, `PATCH /v1/clients/{id}`. Tier and segment are derived
//! by the projections, never set here.

use axum::extract::{Path, State};
use chrono::NaiveDate;
use domain::client::{ClientCommand, Pii};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Answer, execute, execute_creation};
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{ApiJson, CommandContext};
use crate::refs::{self, Kind};

/// `POST /v1/clients`. Passport and Emirates ID numbers are kept in the event store only (never
/// in read models or logs).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterClient {
    pub name: String,
    /// E.164, e.g. `+971501234567`.
    pub phone: Option<String>,
    pub email: Option<String>,
    /// ISO 3166-1 alpha-2, e.g. `AE`.
    pub residency_country: Option<String>,
    pub preferred_language: Option<String>,
    /// `whatsapp`, `phone`, `email`, `sms`, `telegram`.
    #[serde(default)]
    pub preferred_channels: Vec<String>,
    pub timezone: Option<String>,
    pub gender: Option<String>,
    #[serde(default, deserialize_with = "crate::time::opt_date")]
    pub date_of_birth: Option<NaiveDate>,
    /// Personal data: stored in the event store only, never shown or logged.
    #[schema(value_type = Option<String>)]
    pub passport_number: Option<Pii>,
    #[schema(value_type = Option<String>)]
    pub emirates_id: Option<Pii>,
    pub kommo_contact_id: Option<String>,
}

/// Registers a client.
#[utoipa::path(
    post,
    path = "/v1/clients",
    tag = "clients",
    request_body = RegisterClient,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer")),
    responses(
        (status = 201, description = "Registered", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn register(
    State(state): State<AppState>,
    ctx: CommandContext,
    ApiJson(req): ApiJson<RegisterClient>,
) -> ApiResult<Answer> {
    let id = Uuid::now_v7();
    let command = ClientCommand::Register {
        name: req.name,
        phone: req.phone,
        email: req.email,
        residency_country: req.residency_country,
        preferred_language: req.preferred_language,
        preferred_channels: req.preferred_channels,
        timezone: req.timezone,
        gender: req.gender,
        date_of_birth: req.date_of_birth,
        passport_number: req.passport_number,
        emirates_id: req.emirates_id,
        kommo_contact_id: req.kommo_contact_id,
    };
    let outcome = execute_creation(&state.bus.clients, &ctx, id, command).await?;
    Ok(Answer::created(&outcome, format!("/v1/clients/{id}"), None))
}

/// `PATCH /v1/clients/{id}`: each field given replaces the current one; absent fields stay.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateClient {
    pub name: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub residency_country: Option<String>,
    pub preferred_language: Option<String>,
    pub preferred_channels: Option<Vec<String>>,
    pub timezone: Option<String>,
    pub gender: Option<String>,
    #[serde(default, deserialize_with = "crate::time::opt_date")]
    pub date_of_birth: Option<NaiveDate>,
    /// Personal data: stored in the event store only, never shown or logged.
    #[schema(value_type = Option<String>)]
    pub passport_number: Option<Pii>,
    #[schema(value_type = Option<String>)]
    pub emirates_id: Option<Pii>,
}

/// Updates a client's details.
#[utoipa::path(
    patch,
    path = "/v1/clients/{id}",
    tag = "clients",
    request_body = UpdateClient,
    params(
        ("id" = Uuid, Path, description = "The client id"),
        ("If-Match" = Option<i64>, Header, description = "The version the client is expected at"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer"),
    ),
    responses(
        (status = 200, description = "Updated", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    ctx: CommandContext,
    Path(raw_id): Path<String>,
    ApiJson(req): ApiJson<UpdateClient>,
) -> ApiResult<Answer> {
    let id = refs::resolve(&state.pool, &raw_id, Kind::Client).await?;
    let command = ClientCommand::UpdateDetails {
        name: req.name,
        phone: req.phone,
        email: req.email,
        residency_country: req.residency_country,
        preferred_language: req.preferred_language,
        preferred_channels: req.preferred_channels,
        timezone: req.timezone,
        gender: req.gender,
        date_of_birth: req.date_of_birth,
        passport_number: req.passport_number,
        emirates_id: req.emirates_id,
    };
    let outcome = execute(&state.bus.clients, &ctx, id, command).await?;
    Ok(Answer::ok(&outcome))
}
