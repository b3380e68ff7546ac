//! The one place that sends a request and reads the whole answer, turning transport failures into
//! `CrmError`s.

use std::time::Duration;

use reqwest::header::RETRY_AFTER;

use crate::error::{CrmError, classify_transport};

/// A complete HTTP answer.
pub(crate) struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..=204).contains(&self.status)
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Builds the shared HTTP client: `timeout` bounds a whole call, connecting included.
pub(crate) fn build_client(timeout: Duration) -> Result<reqwest::Client, ConfigError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("skyluxse-crm/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ConfigError(format!("HTTP client: {e}")))
}

/// Sends `req` and reads the body. `context` names the call in error messages.
pub(crate) async fn send(req: reqwest::RequestBuilder, context: &str) -> Result<Answer, CrmError> {
    let response = req
        .send()
        .await
        .map_err(|e| classify_transport(context, &e))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .bytes()
        .await
        .map_err(|e| classify_transport(context, &e))?
        .to_vec();
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

/// A client could not be built from its configuration (bad URL, TLS setup).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CRM client configuration: {0}")]
pub struct ConfigError(pub String);

/// Parses a base URL, dropping a trailing slash so paths can be appended.
pub(crate) fn base_url(raw: &str, what: &str) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(raw).map_err(|e| ConfigError(format!("{what}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError(format!("{what}: not an http(s) URL")));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}
