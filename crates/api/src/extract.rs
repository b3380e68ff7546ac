//! Extractors whose rejections are problem+json like every other error: a JSON body
//! ([`ApiJson`]), a query string ([`ApiQuery`]), and the context of a command ([`CommandContext`]:
//! caller, request id, `If-Match`).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header;
use axum::http::request::Parts;
use domain::CommandMetadata;
use serde::de::DeserializeOwned;

use crate::auth::Caller;
use crate::error::{Problem, ProblemKind};

/// The request id header (set by tower-http's request-id layer when the client sent none).
pub const REQUEST_ID: &str = "x-request-id";

/// A JSON body. An empty body reads as `{}`, so actions without fields need no body. Malformed
/// JSON, wrong types and unknown fields (request types deny them) are 422 problems; a body that
/// is not JSON is 415; one over the limit is 413.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.to_ascii_lowercase();
                ct.starts_with("application/json") || ct.contains("+json")
            });
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| body_rejection(e.status()))?;
        parse_json(&bytes, is_json).map(ApiJson)
    }
}

/// Maps a failure to read the body to a problem.
pub fn body_rejection(status: axum::http::StatusCode) -> Problem {
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            ProblemKind::PayloadTooLarge,
            format!(
                "the body is larger than {} KiB",
                crate::BODY_LIMIT_BYTES / 1024
            ),
        )
    } else {
        Problem::validation("the request body could not be read")
    }
}

/// Parses a JSON body (empty = `{}`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8], is_json: bool) -> Result<T, Problem> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else if !is_json {
        return Err(Problem::new(
            ProblemKind::UnsupportedMediaType,
            "send the body as JSON with Content-Type: application/json",
        ));
    } else {
        bytes
    };
    // PostgreSQL's text and jsonb hold no NUL character: refused here, before anything is
    // written (only JSON's escape can put one into a string).
    if text.windows(6).any(|w| w == b"\\u0000") && holds_nul(text) {
        return Err(nul_problem("the body"));
    }
    let mut json = serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        use serde_json::error::Category;
        let path = e.path().to_string();
        let e = e.into_inner();
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                Problem::validation(format!("the body is not well-formed JSON: {e}"))
                    .with_code("request.malformed_json")
            }
            Category::Data => {
                let at = if path == "." {
                    String::new()
                } else {
                    format!(" at `{path}`")
                };
                Problem::validation(format!(
                    "the body does not fit{at}: {}",
                    store::redact::serde_message(&e.to_string())
                ))
                .with_code("request.invalid_body")
            }
        }
    })
}

/// Whether a string (or key) of the JSON document holds a NUL character.
fn holds_nul(text: &[u8]) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(a) => a.iter().any(walk),
            serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || walk(v)),
            _ => false,
        }
    }
    serde_json::from_slice::<serde_json::Value>(text).is_ok_and(|v| walk(&v))
}

fn nul_problem(place: &str) -> Problem {
    Problem::validation(format!(
        "{place} holds a NUL character (\\u0000), which no text may"
    ))
    .with_code("request.nul_character")
}

/// Refuses a request whose path or query holds an encoded NUL character (`%00`), which no id,
/// code or filter can be: PostgreSQL's text holds none.
pub async fn refuse_nul(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let uri = request.uri();
    let nul = |s: &str| s.contains("%00");
    if nul(uri.path()) || uri.query().is_some_and(nul) {
        return axum::response::IntoResponse::into_response(nul_problem("the address"));
    }
    next.run(request).await
}

/// The raw body (for webhooks), within the body limit.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|e| body_rejection(e.status()))
    }
}

/// A query string; a wrong parameter is a 422 problem. A parameter given empty (`status=`, as
/// in SPEC §4's `?status=&client_id=...`) is no filter, as if it were not given.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let given = parts.uri.query().unwrap_or_default();
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form_urlencoded::parse(given.as_bytes()).filter(|(_, v)| !v.is_empty()))
            .finish();
        let uri: axum::http::Uri = format!("/?{query}")
            .parse()
            .map_err(|_| Problem::validation("the query string cannot be read"))?;
        Query::<T>::try_from_uri(&uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| {
                Problem::validation(format!("a query parameter is wrong: {}", e.body_text()))
                    .with_code("request.invalid_query")
            })
    }
}

/// Who sends a command, under which request id, expecting which version.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub caller: Caller,
    pub request_id: String,
    /// From `If-Match`: the version the caller expects the resource to be at.
    pub expected_version: Option<i64>,
    /// Recorded on the events of every command of this request (one correlation id).
    pub metadata: CommandMetadata,
}

impl<S: Send + Sync> FromRequestParts<S> for CommandContext {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let caller =
            parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
                Problem::unauthorized("send an API key: Authorization: Bearer <key>")
            })?;
        let request_id = request_id(parts);
        let mut metadata = CommandMetadata::new(caller.actor(), request_id.clone());
        metadata.idempotency_claim = parts
            .extensions
            .get::<crate::idempotency::ClaimId>()
            .map(|c| c.0);
        Ok(Self {
            metadata,
            caller,
            request_id,
            expected_version: if_match(parts)?,
        })
    }
}

/// The request id of the request (always set by the request-id layer).
pub fn request_id(parts: &Parts) -> String {
    parts
        .headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(200).collect())
        .unwrap_or_default()
}

/// `If-Match: 3`, `If-Match: "3"` or `W/"3"`: the expected version. `If-Match: *` (any current
/// version, RFC 9110) expects none: a command on a resource that does not exist is refused anyway.
fn if_match(parts: &Parts) -> Result<Option<i64>, Problem> {
    let Some(value) = parts.headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .map(Some)
        .ok_or_else(|| {
            Problem::validation("If-Match must be the version number the resource is expected at")
                .with_code("request.invalid_if_match")
        })
}
