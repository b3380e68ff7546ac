//! `Idempotency-Key`: a retried command returns the first answer and writes nothing new.
//!
//! Keys are scoped to the staff account and the route (method and path). The first request
//! inserts its key row with `ON CONFLICT DO NOTHING`: that insert is the claim, so of two
//! concurrent retries only one runs the command; the other is told the first is still in
//! progress (409, `Retry-After`). When the command finishes, its status and body are stored
//! and every later retry with the same body gets exactly that answer. The same key with a
//! different body is refused (422). Server failures (5xx) release the claim, so the retry runs
//! again. The command runs in a task of its own, so a client that hangs up does not leave the
//! claim half done. Keys are kept for 24 hours.
//!
//! A process can die between running the command and storing its answer, and a server failure
//! can come after the command committed. Each claim on a command route has an id, recorded on
//! the events its command writes (`idempotency_claim` in their metadata), and the database
//! writes those events only while the claim is current (a trigger that holds the claim row
//! `FOR SHARE` until the command's transaction ends). A claim is resolved in one transaction
//! that locks its row (so it waits for a command that is committing): if the command's events
//! are there, the answer is built from them ([`crate::write::answer_from_events`]) and stored;
//! if not, the claim gets a new id (fencing the first attempt out) or is released. That happens
//! when a retry finds a claim `in_progress` and not renewed for [`ABANDONED_AFTER_SECONDS`] (a
//! running command renews its claim every [`HEARTBEAT`], for up to [`HEARTBEAT_FOR`]: so its
//! process died, or the command is stuck), and when the command answered with a server error. So a retry never runs a
//! command twice, and a dead process blocks its key for seconds, not a day. Routes whose writes
//! are not events (operations) keep unfenced claims: released on a server error, never taken
//! over.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{Problem, ProblemKind};
use crate::extract::body_rejection;
use crate::write::{WrittenEvent, answer_from_events};

pub const HEADER: &str = "idempotency-key";

/// How long keys are kept.
pub const RETENTION_HOURS: i32 = 24;

/// A claim `in_progress` and not renewed for this long is presumed abandoned (its process died):
/// the next retry takes it over. A first attempt that is still running after all is fenced out,
/// so this choice never lets a command run twice.
pub const ABANDONED_AFTER_SECONDS: f64 = 10.0;

/// While a command runs, its claim's `claimed_at` is renewed this often, so a retry takes over
/// only a claim whose process stopped renewing it (died), not a command that is slow (waiting
/// for a lock, say).
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(3);

/// A command still running after this long is presumed stuck: its claim is no longer renewed,
/// so a retry can take it over (fencing the stuck attempt out). Twice the request timeout.
pub const HEARTBEAT_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// The claim a command request runs under (a request extension), for its events' metadata.
#[derive(Debug, Clone, Copy)]
pub struct ClaimId(pub Uuid);

/// The middleware on command routes (after [`crate::auth::guard`]).
pub async fn idempotency(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(k) if !k.trim().is_empty() && k.len() <= 255 => k.trim().to_string(),
        _ => {
            return Problem::validation("Idempotency-Key must be 1 to 255 visible characters")
                .with_code("idempotency.invalid_key")
                .into_response();
        }
    };
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return next.run(request).await;
    };
    let route = format!("{} {}", request.method(), request.uri().path());
    let (parts, body) = request.into_parts();
    let bytes = match to_bytes(body, crate::BODY_LIMIT_BYTES).await {
        Ok(b) => b,
        Err(_) => return body_rejection(StatusCode::PAYLOAD_TOO_LARGE).into_response(),
    };
    let digest = request_digest(&bytes);
    let path = parts.uri.path().to_string();
    let mut claim = Claim {
        staff_id: caller.staff_id,
        id: fenced(&path).then(Uuid::new_v4),
        path,
        route,
        key,
    };

    match claim.try_take(&state, &digest).await {
        Ok(Taken::Ours) => {}
        Ok(Taken::Replay(response)) => return response,
        Err(p) => return p.into_response(),
    }

    let mut request = Request::from_parts(parts, Body::from(bytes));
    if let Some(id) = claim.id {
        request.extensions_mut().insert(ClaimId(id));
    }
    let pool = state.pool.clone();
    let heartbeat = state.config.claim_heartbeat;
    let task = tokio::spawn(async move {
        let response = match claim.id {
            Some(id) => while_alive(&pool, id, heartbeat, next.run(request)).await,
            None => next.run(request).await,
        };
        claim.finish(&pool, response).await
    });
    match task.await {
        Ok(response) => response,
        Err(e) => Problem::internal(format!("command task failed: {e}")).into_response(),
    }
}

/// Runs `command` while renewing claim `id` every `heartbeat` ([`HEARTBEAT`]; for at most
/// [`HEARTBEAT_FOR`]). The renewals run in a task of their own: one may wait for the claim row
/// while the command's own transaction holds it (the fence, until its commit), so it must not
/// stop the command from being polled; and it is never dropped mid-statement, only told to
/// stop between renewals.
async fn while_alive(
    pool: &sqlx::PgPool,
    id: Uuid,
    heartbeat: std::time::Duration,
    command: impl std::future::Future<Output = Response>,
) -> Response {
    let done = std::sync::Arc::new(tokio::sync::Notify::new());
    let renewals = tokio::spawn({
        let (pool, done) = (pool.clone(), done.clone());
        async move {
            let until = tokio::time::Instant::now() + HEARTBEAT_FOR;
            loop {
                tokio::select! {
                    () = done.notified() => return,
                    () = tokio::time::sleep(heartbeat) => {}
                }
                if tokio::time::Instant::now() >= until {
                    tracing::warn!(
                        "a command has run for a minute; its idempotency claim is no longer renewed"
                    );
                    return;
                }
                // (A claim taken over or finished has another id or status: nothing changes.
                // While the command's transaction holds the row, past the fence, the renewal is
                // skipped rather than waited for: a takeover waits for that transaction anyway.)
                if let Err(e) = sqlx::query(
                    "UPDATE idempotency_keys SET claimed_at = now() WHERE claim_id = ( \
                       SELECT claim_id FROM idempotency_keys \
                       WHERE claim_id = $1 AND status = 'in_progress' \
                       FOR NO KEY UPDATE SKIP LOCKED)",
                )
                .bind(id)
                .execute(&pool)
                .await
                {
                    tracing::warn!(error = %e, "cannot renew an idempotency claim");
                }
            }
        }
    });
    // Told to stop when the command ends, however it ends (a panic too). `notify_one` keeps the
    // permit if the task is mid-renewal: it stops at its next look.
    struct Stop(std::sync::Arc<tokio::sync::Notify>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.notify_one();
        }
    }
    let _stop = Stop(done);
    drop(renewals);
    command.await
}

/// SHA-256 of the body in canonical form: JSON is re-serialized (object keys sorted), so the
/// same command sent with other whitespace or key order counts as the same body.
fn request_digest(bytes: &[u8]) -> Vec<u8> {
    let canonical = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}".to_vec()
    } else {
        match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(v) => serde_json::to_vec(&v).unwrap_or_else(|_| bytes.to_vec()),
            Err(_) => bytes.to_vec(),
        }
    };
    Sha256::digest(&canonical).to_vec()
}

/// Whether a route's claims are fenced: every write of a command route is an event of its
/// command, so its claims can be resolved from the log. The operations routes (requeue, rebuild)
/// write no events.
fn fenced(path: &str) -> bool {
    !(path.starts_with("/v1/outbox/") || path.starts_with("/v1/projections/"))
}

/// A stored key: request digest, status, response status, body and kept headers, claim id,
/// and for how many seconds it has been claimed.
type StoredKey = (
    Vec<u8>,
    String,
    Option<i16>,
    Option<Vec<u8>>,
    Option<Value>,
    Option<Uuid>,
    f64,
);

struct Claim {
    staff_id: Uuid,
    route: String,
    /// The request's path (a creation's `Location` is below it).
    path: String,
    key: String,
    /// This attempt's claim id (recorded on the command's events); none on unfenced routes.
    id: Option<Uuid>,
}

enum Taken {
    Ours,
    Replay(Response),
}

/// What a claim's resolution found.
enum Resolved {
    /// The command's events are there: its answer, now stored.
    Answered(Response),
    /// The command did not happen, and cannot any more: the claim has the new id, or is gone.
    NotDone,
    /// Another attempt resolved the claim first.
    Gone,
}

impl Claim {
    async fn try_take(&mut self, state: &AppState, digest: &[u8]) -> Result<Taken, Problem> {
        for _ in 0..3 {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys \
                 (staff_id, route, idempotency_key, request_digest, claim_id) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(self.staff_id)
            .bind(&self.route)
            .bind(&self.key)
            .bind(digest)
            .bind(self.id)
            .execute(&state.pool)
            .await?
            .rows_affected();
            if inserted == 1 {
                return Ok(Taken::Ours);
            }
            let row: Option<StoredKey> = sqlx::query_as(
                "SELECT request_digest, status, response_status, response_body, response_headers, \
                        claim_id, extract(epoch FROM clock_timestamp() - claimed_at)::float8 \
                 FROM idempotency_keys \
                 WHERE staff_id = $1 AND route = $2 AND idempotency_key = $3",
            )
            .bind(self.staff_id)
            .bind(&self.route)
            .bind(&self.key)
            .fetch_optional(&state.pool)
            .await?;
            // Released between the insert and the select: try to claim it again.
            let Some((stored, status, response_status, response_body, headers, claim_id, age)) =
                row
            else {
                continue;
            };
            if stored != digest {
                return Err(Problem::validation(
                    "this Idempotency-Key was used for a different request body; \
                     use a new key for a new command",
                )
                .with_code("idempotency.key_reused"));
            }
            if status == "completed" {
                return Ok(Taken::Replay(replay(
                    response_status,
                    response_body,
                    headers,
                )));
            }
            let in_progress = |wait: f64| {
                Problem::new(
                    ProblemKind::Conflict,
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                )
                .with_code("idempotency.in_progress")
                // In whole seconds, at most ABANDONED_AFTER_SECONDS.
                .retry_after(wait.ceil().max(1.0) as u64)
            };
            // An unfenced claim is never taken over: it waits for its answer or its expiry.
            let (Some(old), Some(new)) = (claim_id, self.id) else {
                return Err(in_progress(1.0));
            };
            if age < ABANDONED_AFTER_SECONDS {
                return Err(in_progress(ABANDONED_AFTER_SECONDS - age));
            }
            match resolve(&state.pool, &self.path, old, Some(new)).await? {
                Resolved::Answered(response) => {
                    tracing::warn!(route = %self.route, "answered an abandoned idempotency claim from its events");
                    return Ok(Taken::Replay(response));
                }
                Resolved::NotDone => {
                    tracing::warn!(route = %self.route, "took over an abandoned idempotency claim");
                    return Ok(Taken::Ours);
                }
                Resolved::Gone => {}
            }
        }
        Err(Problem::new(
            ProblemKind::Conflict,
            "the Idempotency-Key is contended; retry shortly",
        )
        .with_code("idempotency.in_progress")
        .retry_after(1))
    }

    /// Stores the answer and returns it. After a server failure, or an answer that says to try
    /// again (`Retry-After`: a command that lost too many races), which are not answers to keep,
    /// the claim is resolved: the command may have committed before the failure (then its answer
    /// is built from its events), else the claim is released so a retry runs it. A claim taken
    /// over meanwhile is left to the retry that took it.
    async fn finish(self, pool: &sqlx::PgPool, response: Response) -> Response {
        if response.status().is_server_error()
            || response.headers().contains_key(header::RETRY_AFTER)
        {
            let Some(id) = self.id else {
                if let Err(e) = sqlx::query(
                    "DELETE FROM idempotency_keys \
                     WHERE staff_id = $1 AND route = $2 AND idempotency_key = $3 \
                       AND claim_id IS NULL AND status = 'in_progress'",
                )
                .bind(self.staff_id)
                .bind(&self.route)
                .bind(&self.key)
                .execute(pool)
                .await
                {
                    tracing::error!(error = %e, "cannot release an idempotency key");
                }
                return response;
            };
            return match resolve(pool, &self.path, id, None).await {
                Ok(Resolved::Answered(answer)) => {
                    tracing::warn!(route = %self.route, "a command failed after it committed; answered from its events");
                    answer
                }
                Ok(_) => response,
                // Left in progress: a retry resolves it once it is abandoned.
                Err(e) => {
                    tracing::error!(
                        error = e.detail.as_deref().unwrap_or_default(),
                        "cannot resolve an idempotency claim"
                    );
                    response
                }
            };
        }
        let (parts, body) = response.into_parts();
        let bytes = match to_bytes(body, 1024 * 1024).await {
            Ok(b) => b,
            Err(e) => return Problem::internal(format!("reading a response: {e}")).into_response(),
        };
        if let Err(e) = sqlx::query(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $5, \
             response_body = $6, response_headers = $7, completed_at = now() \
             WHERE staff_id = $1 AND route = $2 AND idempotency_key = $3 \
               AND claim_id IS NOT DISTINCT FROM $4 AND status = 'in_progress'",
        )
        .bind(self.staff_id)
        .bind(&self.route)
        .bind(&self.key)
        .bind(self.id)
        .bind(stored_status(parts.status))
        .bind(bytes.as_ref())
        .bind(kept_headers(&parts.headers))
        .execute(pool)
        .await
        {
            tracing::error!(error = %e, "cannot store an idempotent answer");
        }
        Response::from_parts(parts, Body::from(bytes))
    }
}

/// Resolves claim `id` in one transaction. Its row lock waits for a command of the claim that is
/// committing (the fence trigger holds the row `FOR SHARE`), so the events read after it are all
/// the claim will ever have. If they hold the command's answer, it is stored; otherwise the claim
/// moves to `new_id` (a takeover) or is released (`None`), either of which fences out anything
/// still running under `id`. An unreadable answer leaves the claim as it was.
async fn resolve(
    pool: &sqlx::PgPool,
    path: &str,
    id: Uuid,
    new_id: Option<Uuid>,
) -> Result<Resolved, Problem> {
    let mut tx = pool.begin().await?;
    let locked: Option<String> =
        sqlx::query_scalar("SELECT status FROM idempotency_keys WHERE claim_id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if locked.as_deref() != Some("in_progress") {
        return Ok(Resolved::Gone);
    }
    let events: Vec<WrittenEvent> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, global_position, payload::text AS payload \
         FROM events WHERE metadata ->> 'idempotency_claim' = $1 \
         ORDER BY global_position",
    )
    .bind(id.to_string())
    .fetch_all(&mut *tx)
    .await?;
    let answer = answer_from_events(path, &events).map_err(|e| {
        Problem::internal(format!(
            "the events of an earlier attempt of this request cannot be read back: {e}"
        ))
    })?;
    let Some(answer) = answer else {
        match new_id {
            Some(new_id) => {
                sqlx::query(
                    "UPDATE idempotency_keys SET claim_id = $2, claimed_at = now() \
                     WHERE claim_id = $1",
                )
                .bind(id)
                .bind(new_id)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM idempotency_keys WHERE claim_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        return Ok(Resolved::NotDone);
    };
    let response = answer.into_response();
    let status = response.status();
    let headers = kept_headers(response.headers());
    let body = to_bytes(response.into_body(), 1024 * 1024)
        .await
        .map_err(|e| Problem::internal(format!("reading a response: {e}")))?;
    sqlx::query(
        "UPDATE idempotency_keys SET status = 'completed', response_status = $2, \
         response_body = $3, response_headers = $4, completed_at = now() WHERE claim_id = $1",
    )
    .bind(id)
    .bind(stored_status(status))
    .bind(body.as_ref())
    .bind(&headers)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Resolved::Answered(replay(
        Some(stored_status(status)),
        Some(body.to_vec()),
        Some(headers),
    )))
}

fn stored_status(status: StatusCode) -> i16 {
    i16::try_from(status.as_u16()).unwrap_or(500)
}

/// The headers of an answer a replay sends again: those a client acts on.
const KEPT_HEADERS: [header::HeaderName; 2] = [header::ETAG, header::LOCATION];

/// `{name: value}` of the answer's [`KEPT_HEADERS`].
fn kept_headers(headers: &axum::http::HeaderMap) -> Value {
    let kept: serde_json::Map<String, Value> = KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_string(), Value::String(value.to_string())))
        })
        .collect();
    Value::Object(kept)
}

/// A stored answer, sent again (with its kept headers; answers stored before they were kept
/// have none).
fn replay(status: Option<i16>, body: Option<Vec<u8>>, kept: Option<Value>) -> Response {
    let status = status
        .and_then(|s| StatusCode::from_u16(u16::try_from(s).ok()?).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, body.unwrap_or_default()).into_response();
    let content_type = if status.is_success() {
        "application/json"
    } else {
        "application/problem+json"
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    for (name, value) in kept
        .as_ref()
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if let (Ok(name), Some(Ok(value))) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            value.as_str().map(HeaderValue::from_str),
        ) {
            headers.insert(name, value);
        }
    }
    response
}

/// Deletes keys older than the retention.
pub async fn expire(pool: &sqlx::PgPool) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)",
    )
    .bind(RETENTION_HOURS)
    .execute(pool)
    .await?
    .rows_affected())
}
