//! `CrmError`: every failure of a CRM call, classified so the caller can decide (retry, snooze, give up).
//!
//! Error policy: the variants say what the worker should do, not which layer failed. Messages are
//! built by this crate from status codes, error codes and field paths only: never from request
//! bodies, tokens, or free text that a CRM might echo back (it could hold a phone or an email).

use std::time::{Duration, SystemTime};

use serde_json::Value;

/// A failed CRM call, classified for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrmError {
    /// Try again later with backoff: HTTP 5xx or 408, connection refused or reset, a connect
    /// timeout, an unreadable success body, or the token store being unavailable. When `status`
    /// is `None` the request may or may not have reached the CRM; every operation of this crate
    /// is safe to repeat (lookups before creates, upserts on an external key) except
    /// `KommoClient::add_note`.
    #[error("transient CRM failure ({}): {message}", status_text(*status))]
    Transient {
        /// The HTTP status, when an answer came.
        status: Option<u16>,
        /// What failed, without secrets or personal data.
        message: String,
        /// The wait the answer asked for (`Retry-After` on a 503, say), if any.
        retry_after: Option<Duration>,
    },
    /// HTTP 429 (or Zoho's token-rate refusal): wait `retry_after` when given, else back off.
    /// This should not burn an attempt ("snooze").
    #[error("rate limited by the CRM (retry after {retry_after:?})")]
    RateLimited {
        /// From the `Retry-After` header (seconds or HTTP-date), when present.
        retry_after: Option<Duration>,
    },
    /// The CRM refused the credentials again after one token refresh (or a long-lived token
    /// was refused): an operator must re-authorize.
    #[error("unauthorized: the CRM refused the credentials after a token refresh")]
    Unauthorized,
    /// Retrying the same request cannot help: validation (400), payment (402), forbidden (403),
    /// not found (404), Zoho `INVALID_DATA`/`MANDATORY_NOT_FOUND`/`INVALID_MODULE`/`NO_PERMISSION`,
    /// or a refresh token the CRM rejects (Zoho answers that with HTTP 200 and `{"error":...}`).
    #[error("permanent CRM failure (HTTP {status}{}): {message}", code_text(code.as_deref()))]
    Permanent {
        /// The HTTP status of the answer (`200` for Zoho's token errors, `207` for one record of
        /// a multi-status answer, `0` when no request was possible).
        status: u16,
        /// The CRM's error code (`INVALID_DATA`, `invalid_code`, `NotSupportedChoice`...), if any.
        code: Option<String>,
        /// What failed, without secrets or personal data.
        message: String,
    },
    /// The request was sent but no answer came in time: the CRM may have applied it. Look the
    /// record up before creating it again (the `upsert_*` methods of this crate always do).
    #[error("no answer in time after the request was sent: outcome unknown")]
    Timeout,
}

impl CrmError {
    /// Whether a later attempt may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Transient { .. } | Self::RateLimited { .. } | Self::Timeout
        )
    }

    /// The wait the CRM asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } | Self::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status behind the error, if an answer came.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Transient { status, .. } => *status,
            Self::RateLimited { .. } => Some(429),
            Self::Unauthorized => Some(401),
            Self::Permanent { status, .. } => Some(*status),
            Self::Timeout => None,
        }
    }

    /// The CRM's error code, if it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Permanent { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    pub fn transient(status: Option<u16>, message: impl Into<String>) -> Self {
        Self::Transient {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// This error with the wait the CRM asked for (a transient one only; others keep theirs).
    #[must_use]
    pub fn with_retry_after(mut self, wait: Option<Duration>) -> Self {
        if let Self::Transient { retry_after, .. } = &mut self {
            *retry_after = wait;
        }
        self
    }

    pub(crate) fn permanent(status: u16, code: Option<String>, message: impl Into<String>) -> Self {
        Self::Permanent {
            status,
            code,
            message: message.into(),
        }
    }
}

fn status_text(status: Option<u16>) -> String {
    match status {
        Some(s) => format!("HTTP {s}"),
        None => "no answer".to_owned(),
    }
}

fn code_text(code: Option<&str>) -> String {
    code.map(|c| format!(", {c}")).unwrap_or_default()
}

/// Parses a `Retry-After` value: delta-seconds (`"120"`) or an HTTP-date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`, measured from `now`; a past date gives zero).
/// Anything else gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Shortens server-provided text that is safe to show (codes, paths) so a hostile or broken
/// server cannot blow up log lines.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 120;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Classifies a Kommo answer that is not a success (anything but 200-204).
///
/// `context` names the call (`"kommo POST /api/v4/contacts"`); `retry_after` is the raw header.
pub fn classify_kommo(
    context: &str,
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> CrmError {
    match status {
        429 => CrmError::RateLimited {
            retry_after: retry_after.and_then(|v| parse_retry_after(v, SystemTime::now())),
        },
        401 => CrmError::Unauthorized,
        408 | 500..=599 => CrmError::transient(Some(status), format!("{context}: HTTP {status}"))
            .with_retry_after(retry_after.and_then(|v| parse_retry_after(v, SystemTime::now()))),
        _ => {
            let (code, detail) = kommo_problem(body);
            let what = match status {
                400 => "validation failed",
                402 => "account not paid",
                403 => "forbidden or IP blocked",
                404 => "not found",
                _ => "request refused",
            };
            let message = match detail {
                Some(d) => format!("{context}: {what} ({d})"),
                None => format!("{context}: {what}"),
            };
            CrmError::permanent(status, code, message)
        }
    }
}

/// Reads a Kommo `application/problem+json` body: the first validation error's code and a
/// summary of the failing paths, else the problem's title. Details are not copied (they can
/// quote submitted values).
fn kommo_problem(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let errors: Vec<&Value> = v
        .get("validation-errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("errors").and_then(Value::as_array))
        .flatten()
        .collect();
    if let Some(first) = errors.first() {
        let code = str_at(first, "code").map(clip);
        let paths: Vec<String> = errors
            .iter()
            .take(5)
            .map(|e| {
                format!(
                    "{} at {}",
                    str_at(e, "code").map(clip).unwrap_or_default(),
                    str_at(e, "path").map(clip).unwrap_or_default()
                )
            })
            .collect();
        return (code, Some(paths.join("; ")));
    }
    (str_at(&v, "title").map(clip), None)
}

/// Whether a Zoho 401 may be cured by refreshing the token (all but a scope mismatch).
pub(crate) fn zoho_refresh_may_help(body: &[u8]) -> bool {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| str_at(&v, "code").map(str::to_owned));
    // OAUTH_SCOPE_MISMATCH is a 401 a refresh cannot cure.
    code.as_deref() != Some("OAUTH_SCOPE_MISMATCH")
}

/// Classifies a Zoho answer that carries no per-record results (a top-level error).
pub fn classify_zoho(
    context: &str,
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> CrmError {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| str_at(v, "code").map(clip))
        .or_else(|| {
            // A body of per-record errors with no top-level code: take the first record's.
            parsed
                .as_ref()
                .and_then(|v| v.get("data"))
                .and_then(Value::as_array)
                .and_then(|d| d.first())
                .and_then(|r| str_at(r, "code").map(clip))
        });
    match status {
        429 => CrmError::RateLimited {
            retry_after: retry_after.and_then(|v| parse_retry_after(v, SystemTime::now())),
        },
        401 if code.as_deref() == Some("OAUTH_SCOPE_MISMATCH") => CrmError::permanent(
            status,
            code,
            format!("{context}: the token lacks the scope for this call"),
        ),
        401 => CrmError::Unauthorized,
        408 | 500..=599 => CrmError::transient(
            Some(status),
            format!("{context}: HTTP {status}{}", code_text(code.as_deref())),
        )
        .with_retry_after(retry_after.and_then(|v| parse_retry_after(v, SystemTime::now()))),
        _ => {
            let message = parsed
                .as_ref()
                .and_then(|v| str_at(v, "message"))
                .map(clip)
                .unwrap_or_else(|| "request refused".to_owned());
            CrmError::permanent(status, code, format!("{context}: {message}"))
        }
    }
}

/// Classifies one record of a Zoho upsert answer (`{"code","details","message","status"}`).
pub fn classify_zoho_record(
    context: &str,
    http_status: u16,
    record: &Value,
) -> Result<String, CrmError> {
    if str_at(record, "status") == Some("success") {
        let id = record.get("details").and_then(|d| d.get("id"));
        return match id {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(CrmError::transient(
                Some(http_status),
                format!("{context}: success without a record id"),
            )),
        };
    }
    let code = str_at(record, "code").map(clip);
    let details = record.get("details");
    let api_name = details.and_then(|d| str_at(d, "api_name")).map(clip);
    let json_path = details.and_then(|d| str_at(d, "json_path")).map(clip);
    let message = str_at(record, "message").map(clip).unwrap_or_default();
    let mut text = format!("{context}: {message}");
    if let Some(f) = api_name {
        text.push_str(&format!(" (field {f}"));
        if let Some(p) = json_path {
            text.push_str(&format!(" at {p}"));
        }
        text.push(')');
    }
    match code.as_deref() {
        Some("INTERNAL_ERROR") => Err(CrmError::transient(Some(http_status), text)),
        _ => Err(CrmError::permanent(http_status, code, text)),
    }
}

/// Classifies a transport failure (no HTTP answer was read).
pub(crate) fn classify_transport(context: &str, err: &reqwest::Error) -> CrmError {
    if err.is_timeout() {
        if err.is_connect() {
            return CrmError::transient(None, format!("{context}: connect timeout"));
        }
        return CrmError::Timeout;
    }
    if err.is_connect() {
        return CrmError::transient(None, format!("{context}: connection failed"));
    }
    if err.is_builder() {
        return CrmError::permanent(0, None, format!("{context}: request could not be built"));
    }
    // Reset or closed before an answer: the outcome is unknown, like a timeout, but the worker
    // treats it as transient (every operation here is safe to repeat).
    CrmError::transient(
        None,
        format!(
            "{context}: connection closed before an answer ({})",
            clip(&source_chain(err))
        ),
    )
}

/// The error's text with its causes, without the URL (whose query may carry our keys).
fn source_chain(err: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut parts = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = err.source();
    while let Some(e) = cur {
        parts.push(e.to_string());
        cur = e.source();
    }
    if parts.is_empty() {
        "transport error".to_owned()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CTX: &str = "kommo POST /api/v4/contacts";

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let cases: &[(&str, Option<Duration>)] = &[
            ("120", Some(Duration::from_secs(120))),
            (" 0 ", Some(Duration::ZERO)),
            (
                "Wed, 21 Oct 2015 07:28:30 GMT",
                Some(Duration::from_secs(30)),
            ),
            ("Wed, 21 Oct 2015 07:27:00 GMT", Some(Duration::ZERO)),
            (
                "Wednesday, 21-Oct-15 07:29:00 GMT",
                Some(Duration::from_secs(60)),
            ),
            ("Wed Oct 21 07:28:05 2015", Some(Duration::from_secs(5))),
            ("-5", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
            ("99999999999999999999999", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_retry_after(raw, now), *want, "{raw:?}");
        }
    }

    #[test]
    fn kommo_statuses() {
        let validation = json!({
            "validation-errors": [{"request_id": "0", "errors": [
                {"code": "NotSupportedChoice", "path": "custom_fields_values.0.field_id", "detail": "x@example.com is bad"}
            ]}],
            "title": "Bad Request", "status": 400
        })
        .to_string();
        let cases: Vec<(u16, Option<&str>, &str, CrmError)> = vec![
            (
                429,
                None,
                "<html>Too Many Requests</html>",
                CrmError::RateLimited { retry_after: None },
            ),
            (
                429,
                Some("2"),
                "",
                CrmError::RateLimited {
                    retry_after: Some(Duration::from_secs(2)),
                },
            ),
            (
                500,
                None,
                "",
                CrmError::transient(Some(500), format!("{CTX}: HTTP 500")),
            ),
            (
                503,
                None,
                "oops",
                CrmError::transient(Some(503), format!("{CTX}: HTTP 503")),
            ),
            (
                408,
                None,
                "",
                CrmError::transient(Some(408), format!("{CTX}: HTTP 408")),
            ),
            (401, None, "", CrmError::Unauthorized),
            (
                400,
                None,
                &validation,
                CrmError::permanent(
                    400,
                    Some("NotSupportedChoice".into()),
                    format!(
                        "{CTX}: validation failed (NotSupportedChoice at custom_fields_values.0.field_id)"
                    ),
                ),
            ),
            (
                402,
                None,
                r#"{"title":"Payment Required","status":402,"detail":"Account is not paid"}"#,
                CrmError::permanent(
                    402,
                    Some("Payment Required".into()),
                    format!("{CTX}: account not paid"),
                ),
            ),
            (
                403,
                None,
                "Forbidden",
                CrmError::permanent(403, None, format!("{CTX}: forbidden or IP blocked")),
            ),
            (
                404,
                None,
                "",
                CrmError::permanent(404, None, format!("{CTX}: not found")),
            ),
        ];
        for (status, ra, body, want) in cases {
            assert_eq!(
                classify_kommo(CTX, status, ra, body.as_bytes()),
                want,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn kommo_messages_never_quote_details() {
        let body = json!({"validation-errors": [{"errors": [
            {"code": "InvalidEmail", "path": "custom_fields_values.1", "detail": "secret@example.com"}
        ]}]})
        .to_string();
        let err = classify_kommo(CTX, 400, None, body.as_bytes());
        assert!(!err.to_string().contains("secret@example.com"));
    }

    #[test]
    fn zoho_statuses() {
        let ctx = "zoho POST /crm/v6/Contacts/upsert";
        let cases: Vec<(u16, &str, CrmError)> = vec![
            (
                429,
                r#"{"code":"TOO_MANY_REQUESTS","details":{},"message":"too many","status":"error"}"#,
                CrmError::RateLimited { retry_after: None },
            ),
            (
                401,
                r#"{"code":"INVALID_TOKEN","details":{},"message":"invalid oauth token","status":"error"}"#,
                CrmError::Unauthorized,
            ),
            (
                401,
                r#"{"code":"OAUTH_SCOPE_MISMATCH","details":{},"message":"invalid oauth scope","status":"error"}"#,
                CrmError::permanent(
                    401,
                    Some("OAUTH_SCOPE_MISMATCH".into()),
                    format!("{ctx}: the token lacks the scope for this call"),
                ),
            ),
            (
                500,
                r#"{"code":"INTERNAL_ERROR","details":{},"message":"x","status":"error"}"#,
                CrmError::transient(Some(500), format!("{ctx}: HTTP 500, INTERNAL_ERROR")),
            ),
            (
                502,
                "<html>bad gateway</html>",
                CrmError::transient(Some(502), format!("{ctx}: HTTP 502")),
            ),
            (
                400,
                r#"{"code":"INVALID_MODULE","details":{},"message":"the module name given seems to be invalid","status":"error"}"#,
                CrmError::permanent(
                    400,
                    Some("INVALID_MODULE".into()),
                    format!("{ctx}: the module name given seems to be invalid"),
                ),
            ),
            (
                403,
                r#"{"code":"NO_PERMISSION","details":{},"message":"permission denied","status":"error"}"#,
                CrmError::permanent(
                    403,
                    Some("NO_PERMISSION".into()),
                    format!("{ctx}: permission denied"),
                ),
            ),
            (
                400,
                r#"{"data":[{"code":"MANDATORY_NOT_FOUND","details":{"api_name":"Last_Name"},"message":"required field not found","status":"error"}]}"#,
                CrmError::permanent(
                    400,
                    Some("MANDATORY_NOT_FOUND".into()),
                    format!("{ctx}: request refused"),
                ),
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                classify_zoho(ctx, status, None, body.as_bytes()),
                want,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn zoho_records() {
        let ctx = "zoho upsert";
        let ok = json!({"code":"SUCCESS","action":"insert","details":{"id":"4150868000003194003"},"message":"record added","status":"success"});
        assert_eq!(
            classify_zoho_record(ctx, 200, &ok),
            Ok("4150868000003194003".to_owned())
        );
        let bad = json!({"code":"INVALID_DATA","details":{"api_name":"Email","json_path":"$.data[1].Email"},"message":"invalid data","status":"error"});
        assert_eq!(
            classify_zoho_record(ctx, 207, &bad),
            Err(CrmError::permanent(
                207,
                Some("INVALID_DATA".into()),
                format!("{ctx}: invalid data (field Email at $.data[1].Email)")
            ))
        );
        let no_id = json!({"status":"success","details":{}});
        assert!(matches!(
            classify_zoho_record(ctx, 200, &no_id),
            Err(CrmError::Transient { .. })
        ));
        let internal = json!({"code":"INTERNAL_ERROR","status":"error","message":"x"});
        assert!(
            classify_zoho_record(ctx, 207, &internal)
                .unwrap_err()
                .is_retryable()
        );
    }

    #[test]
    fn helpers() {
        assert!(CrmError::Timeout.is_retryable());
        assert!(!CrmError::Unauthorized.is_retryable());
        assert_eq!(
            CrmError::RateLimited {
                retry_after: Some(Duration::from_secs(3))
            }
            .retry_after(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            CrmError::permanent(400, Some("X".into()), "m").code(),
            Some("X")
        );
        assert_eq!(clip(&"a".repeat(500)).chars().count(), 121);
        assert!(zoho_refresh_may_help(br#"{"code":"INVALID_TOKEN"}"#));
        assert!(zoho_refresh_may_help(b"not json"));
        assert!(!zoho_refresh_may_help(
            br#"{"code":"OAUTH_SCOPE_MISMATCH"}"#
        ));
    }
}
