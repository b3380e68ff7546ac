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
//! Trade-off: if the process dies between running the command and storing its answer, the claim
//! stays `in_progress` (409) until it expires, rather than risk running the command twice; the
//! caller can read the resource (and its timeline) to see whether the command happened.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{Problem, ProblemKind};
use crate::extract::body_rejection;

pub const HEADER: &str = "idempotency-key";

/// How long keys are kept.
pub const RETENTION_HOURS: i32 = 24;

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
    let claim = Claim {
        staff_id: caller.staff_id,
        route,
        key,
    };

    match claim.try_take(&state, &digest).await {
        Ok(Taken::Ours) => {}
        Ok(Taken::Replay(response)) => return response,
        Err(p) => return p.into_response(),
    }

    let request = Request::from_parts(parts, Body::from(bytes));
    let pool = state.pool.clone();
    let task = tokio::spawn(async move {
        let response = next.run(request).await;
        claim.finish(&pool, response).await
    });
    match task.await {
        Ok(response) => response,
        Err(e) => Problem::internal(format!("command task failed: {e}")).into_response(),
    }
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

/// A stored key: request digest, status, response status and body.
type StoredKey = (Vec<u8>, String, Option<i16>, Option<Vec<u8>>);

struct Claim {
    staff_id: Uuid,
    route: String,
    key: String,
}

enum Taken {
    Ours,
    Replay(Response),
}

impl Claim {
    async fn try_take(&self, state: &AppState, digest: &[u8]) -> Result<Taken, Problem> {
        for _ in 0..3 {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (staff_id, route, idempotency_key, request_digest) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(self.staff_id)
            .bind(&self.route)
            .bind(&self.key)
            .bind(digest)
            .execute(&state.pool)
            .await?
            .rows_affected();
            if inserted == 1 {
                return Ok(Taken::Ours);
            }
            let row: Option<StoredKey> = sqlx::query_as(
                "SELECT request_digest, status, response_status, response_body \
                 FROM idempotency_keys \
                 WHERE staff_id = $1 AND route = $2 AND idempotency_key = $3",
            )
            .bind(self.staff_id)
            .bind(&self.route)
            .bind(&self.key)
            .fetch_optional(&state.pool)
            .await?;
            // Released between the insert and the select: try to claim it again.
            let Some((stored, status, response_status, response_body)) = row else {
                continue;
            };
            if stored != digest {
                return Err(Problem::validation(
                    "this Idempotency-Key was used for a different request body; \
                     use a new key for a new command",
                )
                .with_code("idempotency.key_reused"));
            }
            if status != "completed" {
                return Err(Problem::new(
                    ProblemKind::Conflict,
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                )
                .with_code("idempotency.in_progress")
                .retry_after(1));
            }
            let status = response_status
                .and_then(|s| StatusCode::from_u16(u16::try_from(s).ok()?).ok())
                .unwrap_or(StatusCode::OK);
            let mut response = (status, response_body.unwrap_or_default()).into_response();
            let content_type = if status.is_success() {
                "application/json"
            } else {
                "application/problem+json"
            };
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(Taken::Replay(response));
        }
        Err(Problem::new(
            ProblemKind::Conflict,
            "the Idempotency-Key is contended; retry shortly",
        )
        .with_code("idempotency.in_progress")
        .retry_after(1))
    }

    /// Stores the answer (or releases the claim after a server failure) and returns it.
    async fn finish(self, pool: &sqlx::PgPool, response: Response) -> Response {
        let status = response.status();
        if status.is_server_error() {
            if let Err(e) = sqlx::query(
                "DELETE FROM idempotency_keys \
                 WHERE staff_id = $1 AND route = $2 AND idempotency_key = $3",
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
        }
        let (parts, body) = response.into_parts();
        let bytes = match to_bytes(body, 1024 * 1024).await {
            Ok(b) => b,
            Err(e) => return Problem::internal(format!("reading a response: {e}")).into_response(),
        };
        if let Err(e) = sqlx::query(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $4, \
             response_body = $5, completed_at = now() \
             WHERE staff_id = $1 AND route = $2 AND idempotency_key = $3",
        )
        .bind(self.staff_id)
        .bind(&self.route)
        .bind(&self.key)
        .bind(i16::try_from(status.as_u16()).unwrap_or(500))
        .bind(bytes.as_ref())
        .execute(pool)
        .await
        {
            tracing::error!(error = %e, "cannot store an idempotent answer");
        }
        Response::from_parts(parts, Body::from(bytes))
    }
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
