//! The HTTP API (SPEC §4): commands, read-model queries, audit, operations, Kommo webhooks,
//! health, metrics and the OpenAPI document, on axum.
//!
//! # A request
//! `x-request-id` is set (or kept) and echoed; a tracing span carries the method, the route
//! template (never the raw path: it may hold the webhook secret), the request id and the staff id.
//! Bodies are limited to 64 KiB (413). Every `/v1` route authenticates a bearer API key
//! ([`auth`]) and applies the role matrix below; command routes then honour `Idempotency-Key`
//! ([`idempotency`]) and `If-Match` (expected version; 412 when stale), build the domain command
//! (looking up codes, stages, the services catalogue first, [`refs`]) and run it through
//! `commands::Executor` with the caller as actor and the request id in the event metadata
//! ([`write`]). Queries read the read models ([`read`]), waiting for `min_position`
//! ([`consistency`]); audit reads the event store itself ([`audit`]). Every error is an RFC 9457
//! problem ([`error`]).
//!
//! # Role matrix
//! One row per `/v1` route in [`auth::ROLE_MATRIX`] (a route without a row is refused to all):
//!
//! | | operations | sales | ceo | driver | integration |
//! |---|---|---|---|---|---|
//! | register/update clients; create bookings | ✓ | ✓ | | | |
//! | booking: assign-vehicle, change-owner, reschedule, add/remove-service, confirm, extend, cancel | ✓ | ✓ | | | |
//! | booking: assign-driver, issue-invoice, record-payment | ✓ | | | | |
//! | booking: start-delivery, start-rental, complete | ✓ | | | ✓ | |
//! | booking: rate | | | ✓ | | |
//! | vehicle blocks | ✓ | | | | |
//! | leads and deals: all commands | | ✓ | | | |
//! | read clients, KPIs | ✓ | ✓ | ✓ | | |
//! | read bookings, calendar | ✓ | ✓ | ✓ | ✓ | |
//! | booking timeline and state (audit) | ✓ | ✓ | ✓ | | |
//! | read leads, pipeline, deals, deal events | | ✓ | ✓ | | |
//! | global event feed | ✓ | | ✓ | | ✓ |
//! | read outbox, projection status | ✓ | | ✓ | | ✓ |
//! | requeue outbox rows | ✓ | | | | ✓ |
//! | rebuild a projection | ✓ | | | | |
//!
//! `/webhooks/kommo/{secret}` authenticates by its secret instead ([`kommo`]); `/healthz`,
//! `/readyz`, `/metrics` and `/openapi.json` are open.

pub mod audit;
pub mod auth;
pub mod consistency;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod kommo;
pub mod ops;
pub mod read;
pub mod refs;
pub mod telemetry;
pub mod time;
pub mod write;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{from_fn, from_fn_with_state, map_response};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use commands::CommandBus;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceBuilder;
use tower_http::limit::{RequestBodyLimitLayer, ResponseBody};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{Problem, ProblemKind};

/// The largest request body accepted (413 above).
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// How long a request may take before it is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the API (environment names as in SPEC §6).
#[derive(Clone)]
pub struct ApiConfig {
    /// `KOMMO_WEBHOOK_SECRET`: the secret in the webhook URL and the HMAC key. Unset: the webhook
    /// route answers 404.
    pub kommo_webhook_secret: Option<SecretString>,
    /// How long a query with `min_position` waits for the read models.
    pub read_wait: Duration,
    /// How often a running command renews its `Idempotency-Key` claim
    /// ([`idempotency::HEARTBEAT`]).
    pub claim_heartbeat: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            kommo_webhook_secret: None,
            read_wait: Duration::from_secs(2),
            claim_heartbeat: idempotency::HEARTBEAT,
        }
    }
}

impl ApiConfig {
    /// With this Kommo webhook secret.
    pub fn with_kommo_webhook_secret(mut self, secret: &str) -> Self {
        self.kommo_webhook_secret = Some(SecretString::from(secret.to_string()));
        self
    }

    pub fn from_env() -> Self {
        Self {
            kommo_webhook_secret: std::env::var("KOMMO_WEBHOOK_SECRET")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(SecretString::from),
            ..Self::default()
        }
    }
}

/// What every handler needs.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub bus: Arc<CommandBus>,
    pub config: Arc<ApiConfig>,
    /// Wakes the Kommo intake when a delivery was stored.
    pub intake: Arc<tokio::sync::Notify>,
    /// Key lookups reused while no key or staff account changes.
    pub keys: Arc<auth::KeyCache>,
    rebuilding: Arc<Mutex<BTreeSet<String>>>,
}

impl AppState {
    pub fn new(pool: PgPool, config: ApiConfig) -> Self {
        Self {
            bus: Arc::new(CommandBus::new(pool.clone())),
            keys: Arc::new(auth::KeyCache::new(pool.clone())),
            pool,
            config: Arc::new(config),
            intake: Arc::new(tokio::sync::Notify::new()),
            rebuilding: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    /// Projections being rebuilt by this process.
    pub fn rebuilding(&self) -> BTreeSet<String> {
        self.rebuilding
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Marks a rebuild as running; `false` if it already is.
    fn start_rebuild(&self, name: &str) -> bool {
        self.rebuilding
            .lock()
            .map(|mut s| s.insert(name.to_string()))
            .unwrap_or(false)
    }

    fn finish_rebuild(&self, name: &str) {
        if let Ok(mut s) = self.rebuilding.lock() {
            s.remove(name);
        }
    }
}

/// The API's background work until `shutdown` turns true: the Kommo webhook intake and the
/// expiry of old idempotency keys.
pub async fn run_background(state: AppState, shutdown: tokio::sync::watch::Receiver<bool>) {
    let intake = kommo::run_intake(state.clone(), shutdown.clone());
    let expiry = async {
        let mut shutdown = shutdown;
        loop {
            if let Err(e) = idempotency::expire(&state.pool).await {
                tracing::warn!(error = %e, "cannot expire idempotency keys");
            }
            tokio::select! {
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
                () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
        }
    };
    tokio::join!(intake, expiry);
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "SkyLuxse operations API",
        description = "Commands, read models, audit and operations of the SkyLuxse backend. \
            Errors are RFC 9457 problem details. Authenticate with `Authorization: Bearer <key>`."
    ),
    modifiers(&BearerAuth),
    components(schemas(error::ProblemDocument)),
    tags(
        (name = "clients"), (name = "bookings"), (name = "fleet"), (name = "leads"),
        (name = "deals"), (name = "kpis"), (name = "audit"), (name = "operations"),
        (name = "webhooks"), (name = "health"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("API key (slx_...)")
                    .build(),
            ),
        );
    }
}

/// The `/v1` routes: authenticated, role-checked, idempotent commands.
fn v1(state: &AppState) -> OpenApiRouter<AppState> {
    use write::{bookings, clients, deals, fleet, leads};
    OpenApiRouter::new()
        // Clients
        .routes(routes!(clients::register, read::list_clients))
        .routes(routes!(clients::update, read::get_client))
        // Bookings
        .routes(routes!(bookings::create, read::list_bookings))
        .routes(routes!(read::get_booking))
        .routes(routes!(bookings::assign_vehicle))
        .routes(routes!(bookings::assign_driver))
        .routes(routes!(bookings::change_owner))
        .routes(routes!(bookings::reschedule))
        .routes(routes!(bookings::add_service))
        .routes(routes!(bookings::remove_service))
        .routes(routes!(bookings::confirm))
        .routes(routes!(bookings::start_delivery))
        .routes(routes!(bookings::start_rental))
        .routes(routes!(bookings::extend))
        .routes(routes!(bookings::complete))
        .routes(routes!(bookings::cancel))
        .routes(routes!(bookings::issue_invoice))
        .routes(routes!(bookings::record_payment))
        .routes(routes!(bookings::rate))
        .routes(routes!(audit::timeline))
        .routes(routes!(audit::state))
        .routes(routes!(read::calendar))
        // Fleet
        .routes(routes!(fleet::create_block))
        .routes(routes!(fleet::remove_block))
        // Leads
        .routes(routes!(leads::create))
        .routes(routes!(read::get_lead))
        .routes(routes!(leads::move_stage))
        .routes(routes!(leads::change_value))
        .routes(routes!(leads::assign_owner))
        .routes(routes!(leads::set_next_action))
        .routes(routes!(leads::win))
        .routes(routes!(leads::lose))
        .routes(routes!(read::pipeline))
        // Deals
        .routes(routes!(deals::create))
        .routes(routes!(read::get_deal))
        .routes(routes!(read::deal_events))
        .routes(routes!(deals::activate))
        .routes(routes!(deals::record_payment))
        .routes(routes!(deals::record_missed_payment))
        .routes(routes!(deals::mark_defaulted))
        .routes(routes!(deals::complete))
        .routes(routes!(deals::cancel))
        // KPIs, audit feed, operations
        .routes(routes!(read::kpis))
        .routes(routes!(audit::feed))
        .routes(routes!(ops::outbox))
        .routes(routes!(ops::requeue))
        .routes(routes!(ops::projection_status))
        .routes(routes!(ops::rebuild))
        // Innermost first: the guard runs before idempotency.
        .route_layer(from_fn_with_state(state.clone(), idempotency::idempotency))
        .route_layer(from_fn_with_state(state.clone(), auth::guard))
}

/// The routes open without an API key.
fn open() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(telemetry::metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(kommo::webhook))
}

/// The whole router and its OpenAPI document.
pub fn router_and_openapi(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(v1(&state))
        .merge(open())
        .split_for_parts();
    let doc_json = Arc::new(doc.to_json().unwrap_or_else(|_| "{}".into()));
    telemetry::handle();
    let router = router
        .fallback(no_route)
        .with_state(state)
        .layer(Extension(OpenApiJson(doc_json)))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(span)
                        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
                )
                .layer(from_fn(telemetry::track))
                .layer(map_response(as_problem))
                .layer(from_fn(extract::refuse_nul))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    REQUEST_TIMEOUT,
                ))
                // The limit layer wraps response bodies; unwrap them for the layers above.
                .map_response(|r: Response<ResponseBody<Body>>| r.map(Body::new))
                .layer(RequestBodyLimitLayer::new(BODY_LIMIT_BYTES))
                .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES)),
        );
    (router, doc)
}

/// The service's router.
pub fn router(state: AppState) -> Router {
    router_and_openapi(state).0
}

fn span(request: &Request) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let request_id = request
        .headers()
        .get(extract::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        request_id,
        staff_id = tracing::field::Empty,
    )
}

/// Gives answers made outside the handlers (a bare 405 of the router, a 413 or 408 of a tower
/// layer) the problem+json shape of every other error.
async fn as_problem(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/problem+json"));
    if is_problem {
        return response;
    }
    let kind = ProblemKind::from_status(status);
    let detail = match kind {
        ProblemKind::MethodNotAllowed => "this route does not take this method".to_string(),
        ProblemKind::PayloadTooLarge => {
            format!("the body is larger than {} KiB", BODY_LIMIT_BYTES / 1024)
        }
        ProblemKind::Unavailable => "the request took too long; retry later".to_string(),
        _ => kind.title().to_string(),
    };
    let mut problem = Problem::new(kind, detail).into_response();
    *problem.status_mut() = status;
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = response.headers().get(&name) {
            problem.headers_mut().insert(name, v.clone());
        }
    }
    problem
}

async fn no_route() -> Problem {
    Problem::not_found("no such route; see /openapi.json").with_code("route.not_found")
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Object)))]
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 503, description = "The database does not answer", body = Object),
    ))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "database unavailable" })),
            )
        }
    }
}

#[derive(Clone)]
struct OpenApiJson(Arc<String>);

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> Response {
    let mut response = doc.0.as_str().to_string().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
