//! Command routes: each builds one domain command from the request (looking up outside data
//! first), runs it through `commands::Executor` with the caller's metadata and `If-Match`, and
//! answers `{"id", "version", "position"}` (201 with the code for creations).

pub mod bookings;
pub mod clients;
pub mod deals;
pub mod fleet;
pub mod leads;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use commands::{Executor, Outcome};
use cqrs_es::Aggregate;
use domain::DomainError;
use domain::booking::BookingEvent;
use domain::deal::DealEvent;
use domain::lead::LeadEvent;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiResult, Problem};
use crate::extract::CommandContext;

/// The answer to a command.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CommandAnswer {
    /// The aggregate the command ran on.
    pub id: Uuid,
    /// Its version after the command (send it as `If-Match` to the next command).
    pub version: i64,
    /// The global position of the command's last event (use it as `min_position` on queries).
    pub position: i64,
    /// The human code of a created booking, lead or deal (`BK-1052`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The service line added (`add-service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line_id: Option<Uuid>,
    /// The invoice issued (`issue-invoice`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invoice_id: Option<Uuid>,
    /// The payment recorded (`record-payment`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<Uuid>,
    /// The booking a won lead becomes (`win`; created by the process manager).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub booking_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub booking_code: Option<String>,
}

/// A command answer with its status and headers (`ETag`, and `Location` for creations).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: CommandAnswer,
    pub location: Option<String>,
}

impl Answer {
    pub fn ok(outcome: &Outcome) -> Self {
        Self {
            status: StatusCode::OK,
            body: CommandAnswer {
                id: outcome.id,
                version: outcome.version,
                position: outcome.position,
                code: None,
                line_id: None,
                invoice_id: None,
                payment_id: None,
                booking_id: None,
                booking_code: None,
            },
            location: None,
        }
    }

    pub fn created(outcome: &Outcome, location: String, code: Option<String>) -> Self {
        let mut a = Self::ok(outcome);
        a.status = StatusCode::CREATED;
        a.location = Some(location);
        a.body.code = code;
        a
    }

    pub fn map(mut self, f: impl FnOnce(&mut CommandAnswer)) -> Self {
        f(&mut self.body);
        self
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let etag = format!("\"{}\"", self.body.version);
        let mut response = (self.status, axum::Json(self.body)).into_response();
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&etag) {
            headers.insert(header::ETAG, v);
        }
        if let Some(Ok(v)) = self.location.map(|l| HeaderValue::from_str(&l)) {
            headers.insert(header::LOCATION, v);
        }
        response
    }
}

/// An event a command wrote, as far as the command's answer needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WrittenEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub global_position: i64,
    /// The payload as stored (JSON text).
    pub payload: String,
}

/// The answer a command route gives, rebuilt from the events its command wrote under one
/// `Idempotency-Key` claim (in log order): for a retry that finds the first attempt committed but
/// unanswered (its process died, or failed after the commit). `route_path` is the request's path
/// (a creation's `Location` is below it). `Ok(None)` when the command did not happen: no events,
/// or, for `win` (which attaches the client in a command of its own first), no `LeadWon`; running
/// the route again is then safe. `Err` when the events cannot be read.
pub fn answer_from_events(
    route_path: &str,
    events: &[WrittenEvent],
) -> Result<Option<Answer>, String> {
    let Some(last) = events.iter().max_by_key(|e| e.global_position) else {
        return Ok(None);
    };
    let id = Uuid::parse_str(&last.aggregate_id).map_err(|e| e.to_string())?;
    let outcome = Outcome {
        id,
        version: last.sequence,
        position: last.global_position,
        events: events.len(),
    };
    // Only a creation writes an aggregate's first event.
    let mut answer = if events.iter().any(|e| e.sequence == 1) {
        Answer::created(&outcome, format!("{route_path}/{id}"), None)
    } else {
        Answer::ok(&outcome)
    };
    let a = &mut answer.body;
    let mut won = false;
    for e in events {
        let bad = |err: serde_json::Error| format!("{} event: {err}", e.aggregate_type);
        match e.aggregate_type.as_str() {
            "Booking" => match serde_json::from_str(&e.payload).map_err(bad)? {
                BookingEvent::BookingCreated { external_code, .. } => a.code = Some(external_code),
                BookingEvent::BookingServiceAdded { line, .. } => a.line_id = Some(line.line_id),
                BookingEvent::BookingInvoiceIssued { invoice_id, .. } => {
                    a.invoice_id = Some(invoice_id);
                }
                BookingEvent::BookingPaymentRecorded { payment_id, .. } => {
                    a.payment_id = Some(payment_id);
                }
                _ => {}
            },
            "Lead" => match serde_json::from_str(&e.payload).map_err(bad)? {
                LeadEvent::LeadCreated { lead_code, .. } => a.code = Some(lead_code),
                LeadEvent::LeadWon {
                    booking_id,
                    booking_code,
                    ..
                } => {
                    won = true;
                    a.booking_id = Some(booking_id);
                    a.booking_code = Some(booking_code);
                }
                _ => {}
            },
            "Deal" => match serde_json::from_str(&e.payload).map_err(bad)? {
                DealEvent::DealDrafted { deal_number, .. } => a.code = Some(deal_number),
                DealEvent::DealPaymentRecorded { payment_id, .. } => {
                    a.payment_id = Some(payment_id);
                }
                _ => {}
            },
            _ => {}
        }
    }
    if route_path.starts_with("/v1/leads/") && route_path.ends_with("/win") && !won {
        return Ok(None);
    }
    Ok(Some(answer))
}

/// Runs `command` on aggregate `id` for the caller.
pub async fn execute<A>(
    executor: &Executor<A>,
    ctx: &CommandContext,
    id: Uuid,
    command: A::Command,
) -> ApiResult<Outcome>
where
    A: Aggregate<Services = ()> + 'static,
    A::Command: Clone,
    A::Error: DomainError,
{
    executor
        .execute(id, command, &ctx.metadata, ctx.expected_version)
        .await
        .map_err(Problem::from)
}

/// Runs the creation `command` on `id`, an id the handler has just made up, for the caller
/// ([`Executor::create`]: one query to load the stream it cannot have yet).
pub async fn execute_creation<A>(
    executor: &Executor<A>,
    ctx: &CommandContext,
    id: Uuid,
    command: A::Command,
) -> ApiResult<Outcome>
where
    A: Aggregate<Services = ()> + 'static,
    A::Command: Clone,
    A::Error: DomainError,
{
    executor
        .create(id, command, &ctx.metadata, ctx.expected_version)
        .await
        .map_err(Problem::from)
}

/// Refuses a command the domain would refuse before a code number is taken for it: numbers are
/// never given back, so a refused request would leave a gap in them. `id`: the aggregate the
/// command is for, `None` for a creation.
pub async fn refuse_before_numbering<A>(
    executor: &Executor<A>,
    id: Option<Uuid>,
    command: A::Command,
) -> ApiResult<()>
where
    A: Aggregate<Services = ()> + 'static,
    A::Command: Clone,
    A::Error: DomainError,
{
    executor
        .would_accept(id, command)
        .await
        .map_err(Problem::from)
}

/// Generates a `POST /v1/<resource>/{id}/<action>` handler: resolve the id, parse the body, build
/// the command (the block may look things up with `.await?`), run it, answer 200.
macro_rules! action {
    (
        $(#[$doc:meta])*
        $name:ident, $path:literal, $tag:literal, $kind:expr, $executor:ident,
        $body:ty, |$state:ident, $ctx:ident, $id:ident, $req:ident| $build:block
    ) => {
        $(#[$doc])*
        #[utoipa::path(
            post,
            path = $path,
            tag = $tag,
            request_body = $body,
            params(
                ("id" = String, Path, description = "The id (UUID) or the human code"),
                ("If-Match" = Option<i64>, Header, description = "The version the resource is expected at"),
                ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer"),
            ),
            responses(
                (status = 200, description = "Done", body = $crate::write::CommandAnswer),
                (status = "4XX", description = "Refused", body = $crate::error::ProblemDocument, content_type = "application/problem+json"),
            ),
            security(("bearer" = []))
        )]
        pub async fn $name(
            axum::extract::State($state): axum::extract::State<$crate::AppState>,
            $ctx: $crate::extract::CommandContext,
            axum::extract::Path(raw_id): axum::extract::Path<String>,
            $crate::extract::ApiJson($req): $crate::extract::ApiJson<$body>,
        ) -> $crate::error::ApiResult<$crate::write::Answer> {
            let $id = $crate::refs::resolve(&$state.pool, &raw_id, $kind).await?;
            let (command, extra): (_, Option<$crate::write::Extra>) = $build;
            let outcome =
                $crate::write::execute(&$state.bus.$executor, &$ctx, $id, command).await?;
            Ok($crate::write::Answer::ok(&outcome).map(|a| {
                if let Some(e) = extra {
                    e.apply(a)
                }
            }))
        }
    };
}
pub(crate) use action;

/// A server-generated id reported with the answer.
#[derive(Debug, Clone, Copy)]
pub enum Extra {
    Line(Uuid),
    Invoice(Uuid),
    Payment(Uuid),
}

impl Extra {
    pub fn apply(self, a: &mut CommandAnswer) {
        match self {
            Self::Line(id) => a.line_id = Some(id),
            Self::Invoice(id) => a.invoice_id = Some(id),
            Self::Payment(id) => a.payment_id = Some(id),
        }
    }
}

/// An action without fields: `{}` or an empty body.
#[derive(Debug, Clone, Default, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}
