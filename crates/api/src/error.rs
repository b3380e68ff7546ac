//! Errors as RFC 9457 problem details (`application/problem+json`).
//!
//! Policy: every answer that is not a success is a [`Problem`] with a stable `type` URI per kind
//! (`https://skyluxse.ae/problems/<slug>`), a `title`, the HTTP `status`, a `detail` meant for the
//! person reading it and, for refusals by the domain, its stable `code` (`booking.invalid_transition`).
//! Database and unexpected failures are logged with their cause and answered as a bare 500: the
//! detail never leaves the process. Nothing here logs secrets or personal data.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use commands::CommandError;
use domain::ErrorKind;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The base of every problem `type`.
pub const PROBLEM_BASE: &str = "https://skyluxse.ae/problems/";

/// The kinds of problem the API answers with. Each has one status and one `type` URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// 422: the input is wrong (malformed JSON, wrong types, unknown fields, a broken rule).
    Validation,
    /// 404: no such resource (or route).
    NotFound,
    /// 409: the command does not fit the resource's current status.
    InvalidTransition,
    /// 409: the resource exists already, or was changed concurrently.
    Conflict,
    /// 409: the vehicle is taken for (part of) the period.
    VehicleUnavailable,
    /// 412: `If-Match` named another version than the current one.
    VersionMismatch,
    /// 401: no valid credentials.
    Unauthorized,
    /// 403: valid credentials, but the role may not do this.
    Forbidden,
    /// 405: the route exists, the method does not.
    MethodNotAllowed,
    /// 413: the body is larger than the limit.
    PayloadTooLarge,
    /// 415: the body is not JSON.
    UnsupportedMediaType,
    /// 503: a read model has not reached the position the caller asked for yet.
    NotYetProjected,
    /// 503: a dependency (the database, a table another component owns) is not available.
    Unavailable,
    /// 500: something failed inside; logged, never detailed.
    Internal,
}

impl ProblemKind {
    pub fn status(self) -> StatusCode {
        match self {
            Self::Validation => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::InvalidTransition | Self::Conflict | Self::VehicleUnavailable => {
                StatusCode::CONFLICT
            }
            Self::VersionMismatch => StatusCode::PRECONDITION_FAILED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotYetProjected | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn slug(self) -> &'static str {
        match self {
            Self::Validation => "validation",
            Self::NotFound => "not-found",
            Self::InvalidTransition => "invalid-transition",
            Self::Conflict => "conflict",
            Self::VehicleUnavailable => "vehicle-unavailable",
            Self::VersionMismatch => "version-mismatch",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::PayloadTooLarge => "payload-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::NotYetProjected => "not-yet-projected",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::Validation => "The request is not valid",
            Self::NotFound => "Not found",
            Self::InvalidTransition => "Not allowed in the current status",
            Self::Conflict => "Conflict",
            Self::VehicleUnavailable => "The vehicle is not available",
            Self::VersionMismatch => "The version does not match",
            Self::Unauthorized => "Authentication required",
            Self::Forbidden => "Not allowed for this role",
            Self::MethodNotAllowed => "Method not allowed",
            Self::PayloadTooLarge => "The body is too large",
            Self::UnsupportedMediaType => "Unsupported media type",
            Self::NotYetProjected => "Not projected yet",
            Self::Unavailable => "Temporarily unavailable",
            Self::Internal => "Internal error",
        }
    }

    pub fn type_uri(self) -> String {
        format!("{PROBLEM_BASE}{}", self.slug())
    }

    /// The kind of a bare status produced outside the handlers (the router, tower layers).
    pub fn from_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::FORBIDDEN => Self::Forbidden,
            StatusCode::CONFLICT => Self::Conflict,
            StatusCode::PRECONDITION_FAILED => Self::VersionMismatch,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT => Self::Unavailable,
            s if s.is_client_error() => Self::Validation,
            _ => Self::Internal,
        }
    }
}

/// An RFC 9457 problem, as sent (documentation shape for the OpenAPI document).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProblemDocument {
    /// A stable URI per kind, e.g. `https://skyluxse.ae/problems/invalid-transition`.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: Option<String>,
    /// The stable code of a domain refusal, e.g. `booking.invalid_transition`.
    pub code: Option<String>,
}

/// An error answer. Build with the constructors; extra members go into `extensions`.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: ProblemKind,
    pub detail: Option<String>,
    pub code: Option<String>,
    pub extensions: Map<String, Value>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

/// What handlers return on failure.
pub type ApiResult<T> = Result<T, Problem>;

impl Problem {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: Some(detail.into()),
            code: None,
            extensions: Map::new(),
            retry_after: None,
        }
    }

    pub fn bare(kind: ProblemKind) -> Self {
        Self {
            kind,
            detail: None,
            code: None,
            extensions: Map::new(),
            retry_after: None,
        }
    }

    pub fn validation(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Validation, detail).with_code("request.validation")
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::NotFound, detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Unauthorized, detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Forbidden, detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Conflict, detail)
    }

    /// A failure inside: logs `cause` (never sent) and answers a bare 500.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::bare(ProblemKind::Internal)
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(key.to_string(), value.into());
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), self.kind.type_uri().into());
        m.insert("title".into(), self.kind.title().into());
        m.insert("status".into(), self.kind.status().as_u16().into());
        if let Some(d) = &self.detail {
            m.insert("detail".into(), d.clone().into());
        }
        if let Some(c) = &self.code {
            m.insert("code".into(), c.clone().into());
        }
        for (k, v) in &self.extensions {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(m)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.detail {
            Some(d) => f.write_str(d),
            None => f.write_str(self.kind.title()),
        }
    }
}

impl std::error::Error for Problem {}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (self.kind.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        Self::internal(format!("database: {e}"))
    }
}

impl From<CommandError> for Problem {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Domain {
                kind,
                code,
                message,
            } => {
                let kind = match kind {
                    ErrorKind::Validation => ProblemKind::Validation,
                    ErrorKind::NotFound => ProblemKind::NotFound,
                    ErrorKind::InvalidTransition => ProblemKind::InvalidTransition,
                    ErrorKind::Conflict => ProblemKind::Conflict,
                };
                Self::new(kind, message).with_code(code)
            }
            CommandError::VersionMismatch {
                aggregate,
                expected,
                actual,
            } => Self::new(
                ProblemKind::VersionMismatch,
                format!("the {aggregate} is at version {actual}, not {expected} (If-Match)"),
            )
            .with_code("version_mismatch")
            .with("expected_version", expected)
            .with("current_version", actual),
            CommandError::Concurrency(aggregate) => Self::new(
                ProblemKind::Conflict,
                format!("the {aggregate} was changed concurrently; try again"),
            )
            .with_code("concurrency")
            .retry_after(1),
            CommandError::VehicleUnavailable { message, detail } => {
                let p = Self::new(ProblemKind::VehicleUnavailable, message)
                    .with_code("vehicle.unavailable");
                match detail {
                    Some(clash) => p.with("clash", clash),
                    None => p,
                }
            }
            CommandError::CodeTaken(code) => {
                Self::conflict(format!("the code {code} is already taken")).with_code("code_taken")
            }
            CommandError::Superseded => Self::new(
                ProblemKind::Conflict,
                "a retry with the same Idempotency-Key took this request over; \
                 the retry's answer is the request's answer",
            )
            .with_code("idempotency.superseded"),
            CommandError::Store(cause) => Self::internal(format!("event store: {cause}")),
        }
    }
}
