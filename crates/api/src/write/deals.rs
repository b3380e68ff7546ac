//! Deal commands (financing and leasing contracts): `POST /v1/deals` and
//! `POST /v1/deals/{id}/{action}`.

use axum::extract::State;
use chrono::{DateTime, NaiveDate, Utc};
use commands::codes::CodeKind;
use domain::deal::DealCommand;
use rust_decimal::Decimal;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Answer, Empty, Extra, action, execute_creation, refuse_before_numbering};
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{ApiJson, CommandContext};
use crate::refs::{self, Kind, Ref, now};

/// `POST /v1/deals`: a draft contract.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DraftDeal {
    pub client_id: Uuid,
    pub vehicle_id: Option<Uuid>,
    pub application_id: Option<Uuid>,
    #[schema(value_type = String, example = "450000.00")]
    pub principal_amount: Decimal,
    #[schema(value_type = String, example = "14500.00")]
    pub monthly_payment: Decimal,
    /// Yearly, in percent.
    #[schema(value_type = String, example = "4.5")]
    pub interest_rate: Decimal,
    #[schema(value_type = Option<String>)]
    pub security_deposit: Option<Decimal>,
    pub term_months: i32,
    #[serde(deserialize_with = "crate::time::date")]
    pub contract_start_date: NaiveDate,
    #[serde(deserialize_with = "crate::time::date")]
    pub contract_end_date: NaiveDate,
    #[serde(deserialize_with = "crate::time::date")]
    pub first_payment_date: NaiveDate,
    /// A JSON object of free-form terms.
    #[schema(value_type = Option<Object>)]
    pub contract_terms: Option<serde_json::Value>,
}

/// Drafts a deal; allocates its `DL-` number.
#[utoipa::path(
    post,
    path = "/v1/deals",
    tag = "deals",
    request_body = DraftDeal,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer")),
    responses(
        (status = 201, description = "Drafted", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: CommandContext,
    ApiJson(req): ApiJson<DraftDeal>,
) -> ApiResult<Answer> {
    let mut references = vec![("client_id", Ref::Client, req.client_id)];
    references.extend(req.vehicle_id.map(|v| ("vehicle_id", Ref::Vehicle, v)));
    let id = Uuid::now_v7();
    let mut command = DealCommand::Draft {
        deal_number: CodeKind::Deal.code(0),
        client_id: req.client_id,
        vehicle_id: req.vehicle_id,
        application_id: req.application_id,
        principal_amount: req.principal_amount,
        monthly_payment: req.monthly_payment,
        interest_rate: req.interest_rate,
        security_deposit: req.security_deposit.unwrap_or_default(),
        term_months: req.term_months,
        contract_start_date: req.contract_start_date,
        contract_end_date: req.contract_end_date,
        first_payment_date: req.first_payment_date,
        contract_terms: req.contract_terms,
    };
    refuse_before_numbering(&state.bus.deals, None, command.clone()).await?;
    let code = refs::require_all_and_take_code(&state.pool, &references, CodeKind::Deal).await?;
    if let DealCommand::Draft { deal_number, .. } = &mut command {
        *deal_number = code.clone();
    }
    let outcome = execute_creation(&state.bus.deals, &ctx, id, command).await?;
    Ok(Answer::created(
        &outcome,
        format!("/v1/deals/{id}"),
        Some(code),
    ))
}

action!(
    /// Activates a draft deal.
    activate, "/v1/deals/{id}/activate", "deals", Kind::Deal, deals,
    Empty, |state, ctx, id, req| {
        let Empty {} = req;
        (DealCommand::Activate, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DealPayment {
    #[schema(value_type = String, example = "14500.00")]
    pub amount: Decimal,
    /// Now when absent.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub paid_at: Option<DateTime<Utc>>,
}

action!(
    /// Records a payment on an active deal (its id is returned as `payment_id`).
    record_payment, "/v1/deals/{id}/record-payment", "deals", Kind::Deal, deals,
    DealPayment, |state, ctx, id, req| {
        let payment_id = Uuid::now_v7();
        (
            DealCommand::RecordPayment {
                payment_id,
                amount: req.amount,
                paid_at: req.paid_at.unwrap_or_else(now),
            },
            Some(Extra::Payment(payment_id)),
        )
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MissedPayment {
    #[serde(deserialize_with = "crate::time::date")]
    pub due_date: NaiveDate,
    #[schema(value_type = String, example = "14500.00")]
    pub amount: Decimal,
}

action!(
    /// Records a missed payment (once per due date).
    record_missed_payment, "/v1/deals/{id}/record-missed-payment", "deals", Kind::Deal, deals,
    MissedPayment, |state, ctx, id, req| {
        (DealCommand::RecordMissedPayment { due_date: req.due_date, amount: req.amount }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DealReason {
    pub reason: String,
}

action!(
    /// Marks an active deal as defaulted.
    mark_defaulted, "/v1/deals/{id}/mark-defaulted", "deals", Kind::Deal, deals,
    DealReason, |state, ctx, id, req| {
        (DealCommand::MarkDefaulted { reason: req.reason }, None)
    }
);

action!(
    /// Completes an active deal.
    complete, "/v1/deals/{id}/complete", "deals", Kind::Deal, deals,
    Empty, |state, ctx, id, req| {
        let Empty {} = req;
        (DealCommand::Complete, None)
    }
);

action!(
    /// Cancels a draft deal.
    cancel, "/v1/deals/{id}/cancel", "deals", Kind::Deal, deals,
    DealReason, |state, ctx, id, req| {
        (DealCommand::Cancel { reason: req.reason }, None)
    }
);
