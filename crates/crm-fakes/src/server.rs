//! What both fakes share: the accept loop (with a way to drop a connection without answering),
//! the scripted-fault queue, the request log and the optional latency.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// A scripted fault, applied to the next matching request(s) (see [`FaultRule`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer 500 without applying the request.
    Status500,
    /// Answer 503 with `Retry-After: <secs>` without applying the request (maintenance).
    Unavailable {
        /// Seconds for the `Retry-After` header.
        retry_after: u64,
    },
    /// Answer 429 without applying the request, with `Retry-After: <secs>` when given, and a
    /// JSON body or (as Kommo's front servers may) an HTML one.
    TooManyRequests {
        /// Seconds for the `Retry-After` header; `None` sends no header.
        retry_after: Option<u64>,
        /// A JSON error body when true, else a non-JSON one.
        json_body: bool,
    },
    /// Apply the request, then wait this long before answering: past a client's timeout this is
    /// "the server did the work but the answer was lost".
    Delay(Duration),
    /// Drop the connection without any answer, after applying the request when `apply`.
    ResetConnection {
        /// Whether the request takes effect before the connection is dropped.
        apply: bool,
    },
    /// Answer 401 as for an expired token, and stop accepting the access token presented (a
    /// long-lived Kommo token keeps working afterwards).
    ExpiredToken,
    /// Zoho upserts: the last record of the request fails with `INVALID_DATA` (not applied), the
    /// others are applied; the answer is 207 when some succeeded. Ignored by the Kommo fake.
    PartialSuccess,
    /// Answer 400 with the service's validation-error body, without applying the request.
    Validation400,
}

/// Which requests a fault applies to, and how many times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// The fault to apply.
    pub fault: Fault,
    /// How many matching requests it applies to.
    pub times: usize,
    /// Only requests with this method (any when `None`).
    pub method: Option<Method>,
    /// Only requests whose path starts with this. When `None`, only API calls match
    /// (`/api/...` on Kommo, `/crm/...` on Zoho), not the OAuth token endpoints.
    pub path_prefix: Option<String>,
}

impl FaultRule {
    /// `fault` once, on the next API call.
    pub fn new(fault: Fault) -> Self {
        Self {
            fault,
            times: 1,
            method: None,
            path_prefix: None,
        }
    }

    /// Applies to the next `n` matching requests.
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }

    /// Only requests with `method` whose path starts with `path_prefix`.
    pub fn on(mut self, method: Method, path_prefix: impl Into<String>) -> Self {
        self.method = Some(method);
        self.path_prefix = Some(path_prefix.into());
        self
    }

    /// Only requests (any method) whose path starts with `path_prefix`; use this to reach the
    /// token endpoints.
    pub fn path(mut self, path_prefix: impl Into<String>) -> Self {
        self.path_prefix = Some(path_prefix.into());
        self
    }

    fn matches(&self, method: &Method, path: &str, is_api: bool) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && match &self.path_prefix {
                Some(prefix) => path.starts_with(prefix.as_str()),
                None => is_api,
            }
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// The raw body (JSON for API calls, a form for Zoho's token endpoint).
    pub body: String,
    /// The status answered; `None` while in progress or when the connection was dropped.
    pub status: Option<u16>,
    /// Whether a fault was applied to it.
    pub fault: Option<Fault>,
}

impl RecordedRequest {
    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fault queue, request log and latency.
#[derive(Default)]
pub(crate) struct Core {
    faults: Mutex<VecDeque<FaultRule>>,
    requests: Mutex<Vec<RecordedRequest>>,
    pub latency: Option<Duration>,
}

impl Core {
    pub fn new(latency: Option<Duration>) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }

    pub fn inject(&self, rule: FaultRule) {
        if rule.times > 0 {
            lock(&self.faults).push_back(rule);
        }
    }

    pub fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    pub fn pending_faults(&self) -> usize {
        lock(&self.faults).iter().map(|r| r.times).sum()
    }

    /// Takes the first queued fault matching the request.
    pub fn take_fault(&self, method: &Method, path: &str, is_api: bool) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let index = faults
            .iter()
            .position(|r| r.matches(method, path, is_api))?;
        let rule = faults.get_mut(index)?;
        rule.times -= 1;
        let fault = rule.fault.clone();
        if rule.times == 0 {
            faults.remove(index);
        }
        Some(fault)
    }

    pub fn record(&self, method: &Method, path: &str, query: Option<&str>, body: &Bytes) -> usize {
        let mut requests = lock(&self.requests);
        requests.push(RecordedRequest {
            method: method.clone(),
            path: path.to_owned(),
            query: query.map(str::to_owned),
            body: String::from_utf8_lossy(body).into_owned(),
            status: None,
            fault: None,
        });
        requests.len() - 1
    }

    pub fn finish(&self, index: usize, status: Option<u16>, fault: Option<Fault>) {
        if let Some(r) = lock(&self.requests).get_mut(index) {
            r.status = status;
            r.fault = fault;
        }
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.requests).clear();
    }
}

/// Lets a handler drop its own connection without answering.
#[derive(Clone)]
pub(crate) struct ConnKill(Arc<Notify>);

impl ConnKill {
    /// Drops the connection; never returns.
    pub async fn kill(&self) -> Response {
        self.0.notify_one();
        std::future::pending::<Response>().await
    }
}

/// What to do once the request has been applied.
pub(crate) enum After {
    Answer,
    Delay(Duration),
    Kill,
}

/// Runs a handler-level plan for a fault that does not replace the answer.
pub(crate) async fn finish_with(after: After, kill: &ConnKill, response: Response) -> Response {
    match after {
        After::Answer => response,
        After::Delay(d) => {
            tokio::time::sleep(d).await;
            response
        }
        After::Kill => kill.kill().await,
    }
}

/// A running server; stops when dropped.
pub(crate) struct Running {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.accept.abort();
    }
}

/// Serves `router` on `bind`, one task per connection. A handler can drop its connection
/// (no answer at all) through the `ConnKill` extension.
pub(crate) async fn serve(bind: SocketAddr, router: Router) -> io::Result<Running> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let (shutdown, stop) = watch::channel(false);
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Dropping the socket then sends a reset rather than an orderly close.
            let _ = stream.set_zero_linger();
            let kill = Arc::new(Notify::new());
            let conn_kill = ConnKill(kill.clone());
            let service =
                router
                    .clone()
                    .map_request(move |mut req: Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(conn_kill.clone());
                        req
                    });
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
                tokio::select! {
                    _ = conn => {}
                    () = kill.notified() => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        }
    });
    Ok(Running {
        addr,
        accept,
        shutdown,
    })
}

/// An answer with a body and a content type.
pub(crate) fn answer(status: u16, content_type: &'static str, body: String) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Body::from(body),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// An empty answer (204).
pub(crate) fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// A 429 as described by the fault.
pub(crate) fn too_many(retry_after: Option<u64>, json_body: Option<String>) -> Response {
    let mut r = match json_body {
        Some(body) => answer(429, "application/json", body),
        None => answer(
            429,
            "text/html",
            "<html><head><title>429 Too Many Requests</title></head><body>Too Many Requests</body></html>"
                .to_owned(),
        ),
    };
    if let Some(secs) = retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// The bearer-like token after `scheme` in the Authorization header.
pub(crate) fn auth_token<'a>(headers: &'a axum::http::HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (given, token) = value.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then_some(token.trim())
}

/// Decodes `%XX` escapes and `+` in a query or form value.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `response` with a `Retry-After: <secs>` header.
pub(crate) fn with_retry_after(mut response: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}
