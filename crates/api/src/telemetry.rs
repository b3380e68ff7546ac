//! Prometheus metrics: request counts and latency per route, and at each scrape the lag of every
//! consumer of the log (events and seconds behind its head; `projection_*` for the projections,
//! `consumer_*` for the outbox projector and the process manager), whether it is stopped on an
//! error, the outbox by status and the Kommo webhook backlog.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("http_request_duration_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        ) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was installed already; /metrics shows only its own");
        }
        handle
    })
}

/// Counts and times every request, labelled by route template (never the raw path: it may carry
/// ids or the webhook secret).
pub async fn track(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let handle = handle();
    refresh_gauges(&state).await;
    handle.run_upkeep();
    let mut response = handle.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `{family}_events_behind`, `_seconds_behind`, `_position` and `_stopped`, labelled
/// `{family}="name"`, for each consumer of the log in `all`.
fn export_lag(family: &'static str, all: &[projections::status::ProjectionStatus]) {
    for c in all {
        let gauge =
            |what: &str| metrics::gauge!(format!("{family}_{what}"), family => c.name.clone());
        gauge("events_behind").set(c.events_behind as f64);
        gauge("seconds_behind").set(c.seconds_behind);
        gauge("position").set(c.global_position as f64);
        gauge("stopped").set(if c.last_error.is_some() { 1.0 } else { 0.0 });
    }
}

async fn refresh_gauges(state: &AppState) {
    match projections::status::all(&state.pool).await {
        Ok(all) => export_lag("projection", &all),
        Err(e) => tracing::warn!(error = %e, "cannot read projection status for metrics"),
    }
    match crate::ops::other_consumers(&state.pool).await {
        Ok(all) => export_lag("consumer", &all),
        Err(e) => tracing::warn!(error = %e, "cannot read consumer status for metrics"),
    }
    if let Ok(rows) = sqlx::query_as::<_, (String, i64)>(
        "SELECT status, count(*) FROM integrations_outbox GROUP BY status",
    )
    .fetch_all(&state.pool)
    .await
    {
        for status in ["pending", "processing", "processed", "failed"] {
            let n = rows
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("outbox_rows", "status" => status).set(n as f64);
        }
    }
    if let Ok(n) = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM kommo_webhook_events WHERE status = 'received'",
    )
    .fetch_one(&state.pool)
    .await
    {
        metrics::gauge!("kommo_webhooks_pending").set(n as f64);
    }
}
