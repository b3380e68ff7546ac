//! Fake Kommo and Zoho servers on loopback that follow `shared/crm-contracts.md`, faults included.
//!
//! Used by the tests (each test starts its own fakes on port 0) and by `skyluxse serve` as a
//! local sandbox when no CRM credentials are configured. Both fakes are stateful: what a client
//! creates can be searched, updated and inspected afterwards.
//!
//! - [`FakeKommo`]: contacts, leads and notes (`/api/v4/...`), search by any filled field (custom
//!   field values included; 204 when nothing matches), OAuth with single-use refresh tokens
//!   (`POST /oauth2/access_token`; a used or unknown refresh token gets 400, bad client
//!   credentials 401), a long-lived token, and the account limit of 7 requests in any one-second
//!   window (429 with an HTML body beyond it; [`FakeKommo::max_rps_observed`]).
//! - [`FakeZoho`]: upserts on `Contacts` and `Sales_Orders` keyed by the external-id fields
//!   (`POST /crm/v6/{Module}/upsert`, per-record results, 207 when mixed), mandatory-field
//!   checks, `Zoho-oauthtoken` access tokens from its own accounts endpoint
//!   (`POST /oauth/v2/token`, HTTP 200 `{"error":"invalid_code"}` for a bad refresh token), the
//!   limits of 10 tokens per 10 minutes and 15 live tokens, and a concurrency limit (429 without
//!   `Retry-After`).
//!
//! Faults are queued with [`FakeKommo::inject`] / [`FakeZoho::inject`] as [`FaultRule`]s and apply
//! to the next matching requests in order.

mod kommo;
mod server;
mod zoho;

pub use kommo::{DEFAULT_EXTERNAL_ID_FIELD_ID, FakeKommo, FakeKommoConfig};
pub use server::{Fault, FaultRule, RecordedRequest};
pub use zoho::{FakeZoho, FakeZohoConfig};

pub use axum::http::Method;
