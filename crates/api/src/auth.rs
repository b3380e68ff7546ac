//! Authentication (API keys) and authorization (the role matrix).
//!
//! An API key is `slx_` followed by 48 hex digits (192 random bits), issued by
//! `skyluxse keys create --role <role> --staff <email>` and shown once. Only its SHA-256 digest
//! is stored (`api_keys`), linked to a staff account whose `role` is the caller's role. A request
//! sends `Authorization: Bearer <key>`; the digest is looked up and compared again in constant
//! time. Keys are long random strings, so a fast digest is enough (a password hash such as argon2
//! would cost ~100 ms a request for nothing).
//!
//! Every `/v1` route has one row in [`ROLE_MATRIX`]; a route without a row is refused to
//! everyone (deny by default).

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use domain::{Actor, Role};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::AppState;
use crate::error::Problem;

/// Who is calling: a staff account, through one of its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub staff_id: Uuid,
    pub role: Role,
    pub key_id: Uuid,
}

impl Caller {
    /// The actor recorded on the events of the caller's commands.
    pub fn actor(&self) -> Actor {
        Actor::staff(self.staff_id, self.role)
    }
}

/// One row of the role matrix: who may call `method path`.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub method: &'static str,
    /// The route template, as routed (`/v1/bookings/{id}/confirm`).
    pub path: &'static str,
    pub roles: &'static [Role],
}

const OPS: Role = Role::Operations;
const SALES: Role = Role::Sales;
const CEO: Role = Role::Ceo;
const DRIVER: Role = Role::Driver;
const INTEGRATION: Role = Role::Integration;

const fn rule(method: &'static str, path: &'static str, roles: &'static [Role]) -> Rule {
    Rule {
        method,
        path,
        roles,
    }
}

/// The role matrix: every `/v1` route and the roles that may call it.
///
/// - **operations** run the fleet: every booking command but `rate`, vehicle blocks, clients,
///   outbox and projections; they read everything but leads and deals.
/// - **sales** own clients, leads, deals and the creation and commercial changes of bookings
///   (vehicle, owner, period, services, confirm, extend, cancel); no payments, invoices or
///   fleet operations.
/// - **drivers** only move bookings through delivery, rental and return, and read bookings and
///   the calendar.
/// - **ceo** reads everything and is the only one who rates the sales service.
/// - **integration** (scripts, sync) reads the event feed, the outbox and projection status and
///   requeues dead letters.
pub const ROLE_MATRIX: &[Rule] = &[
    // Clients
    rule("POST", "/v1/clients", &[SALES, OPS]),
    rule("PATCH", "/v1/clients/{id}", &[SALES, OPS]),
    rule("GET", "/v1/clients", &[OPS, SALES, CEO]),
    rule("GET", "/v1/clients/{id}", &[OPS, SALES, CEO]),
    // Bookings: commands
    rule("POST", "/v1/bookings", &[SALES, OPS]),
    rule("POST", "/v1/bookings/{id}/assign-vehicle", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/assign-driver", &[OPS]),
    rule("POST", "/v1/bookings/{id}/change-owner", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/reschedule", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/add-service", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/remove-service", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/confirm", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/start-delivery", &[OPS, DRIVER]),
    rule("POST", "/v1/bookings/{id}/start-rental", &[OPS, DRIVER]),
    rule("POST", "/v1/bookings/{id}/extend", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/complete", &[OPS, DRIVER]),
    rule("POST", "/v1/bookings/{id}/cancel", &[OPS, SALES]),
    rule("POST", "/v1/bookings/{id}/issue-invoice", &[OPS]),
    rule("POST", "/v1/bookings/{id}/record-payment", &[OPS]),
    rule("POST", "/v1/bookings/{id}/rate", &[CEO]),
    // Bookings: reads and audit
    rule("GET", "/v1/bookings", &[OPS, SALES, CEO, DRIVER]),
    rule("GET", "/v1/bookings/{id}", &[OPS, SALES, CEO, DRIVER]),
    rule("GET", "/v1/bookings/{id}/timeline", &[OPS, SALES, CEO]),
    rule("GET", "/v1/bookings/{id}/state", &[OPS, SALES, CEO]),
    rule("GET", "/v1/calendar", &[OPS, SALES, CEO, DRIVER]),
    // Fleet
    rule("POST", "/v1/vehicles/{id}/blocks", &[OPS]),
    rule("DELETE", "/v1/vehicles/{id}/blocks/{block_id}", &[OPS]),
    // Leads
    rule("POST", "/v1/leads", &[SALES]),
    rule("POST", "/v1/leads/{id}/move-stage", &[SALES]),
    rule("POST", "/v1/leads/{id}/change-value", &[SALES]),
    rule("POST", "/v1/leads/{id}/assign-owner", &[SALES]),
    rule("POST", "/v1/leads/{id}/set-next-action", &[SALES]),
    rule("POST", "/v1/leads/{id}/win", &[SALES]),
    rule("POST", "/v1/leads/{id}/lose", &[SALES]),
    rule("GET", "/v1/leads/{id}", &[SALES, CEO]),
    rule("GET", "/v1/pipeline", &[SALES, CEO]),
    // Deals
    rule("POST", "/v1/deals", &[SALES]),
    rule("POST", "/v1/deals/{id}/activate", &[SALES]),
    rule("POST", "/v1/deals/{id}/record-payment", &[SALES]),
    rule("POST", "/v1/deals/{id}/record-missed-payment", &[SALES]),
    rule("POST", "/v1/deals/{id}/mark-defaulted", &[SALES]),
    rule("POST", "/v1/deals/{id}/complete", &[SALES]),
    rule("POST", "/v1/deals/{id}/cancel", &[SALES]),
    rule("GET", "/v1/deals/{id}", &[SALES, CEO]),
    rule("GET", "/v1/deals/{id}/events", &[SALES, CEO]),
    // Executive and audit
    rule("GET", "/v1/kpis", &[CEO, OPS, SALES]),
    rule("GET", "/v1/events", &[CEO, OPS, INTEGRATION]),
    // Operations
    rule("GET", "/v1/outbox", &[OPS, INTEGRATION, CEO]),
    rule("POST", "/v1/outbox/{id}/requeue", &[OPS, INTEGRATION]),
    rule("GET", "/v1/projections", &[OPS, INTEGRATION, CEO]),
    rule("POST", "/v1/projections/{name}/rebuild", &[OPS]),
];

/// The rule of a route, if it has one.
pub fn rule_for(method: &Method, path: &str) -> Option<&'static Rule> {
    // axum answers `HEAD` with the `GET` handler (the body dropped): the same rule applies.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    ROLE_MATRIX
        .iter()
        .find(|r| r.method == method.as_str() && r.path == path)
}

/// Authenticates the caller and applies the role matrix; puts the [`Caller`] into the request's
/// extensions for the handlers.
pub async fn guard(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match authenticate(&state.pool, &state.keys, request.headers()).await {
        Ok(c) => c,
        Err(p) => {
            let mut response = p.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    let path = matched
        .as_ref()
        .map(MatchedPath::as_str)
        .unwrap_or_default();
    match rule_for(request.method(), path) {
        Some(rule) if rule.roles.contains(&caller.role) => {}
        Some(_) => {
            return Problem::forbidden(format!(
                "the {} role may not call {} {path}",
                caller.role.as_str(),
                request.method()
            ))
            .with_code("auth.role_not_allowed")
            .into_response();
        }
        // The route exists with other methods: let the router answer 405.
        None if ROLE_MATRIX.iter().any(|r| r.path == path) => {}
        None => {
            tracing::error!(method = %request.method(), path, "route without a role rule: refused");
            return Problem::forbidden("this route is not open to any role")
                .with_code("auth.no_rule")
                .into_response();
        }
    }
    tracing::Span::current().record("staff_id", tracing::field::display(caller.staff_id));
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The caller behind the request's bearer key.
pub async fn authenticate(
    pool: &PgPool,
    keys: &KeyCache,
    headers: &axum::http::HeaderMap,
) -> Result<Caller, Problem> {
    let missing = || Problem::unauthorized("send an API key: Authorization: Bearer <key>");
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(missing)?;
    let (scheme, key) = value.trim().split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(missing());
    }
    let key = key.trim();
    let invalid = || {
        Problem::unauthorized(
            "the API key is not valid (unknown, revoked, or its account is inactive)",
        )
        .with_code("auth.invalid_key")
    };
    if !key.starts_with(KEY_PREFIX) || key.len() > 200 {
        return Err(invalid());
    }
    let digest = key_digest(key);
    // Read before the lookup: a change committed after it is then sure to end what it finds.
    let epoch = keys.notifications.auth_epoch();
    if let Some(caller) = epoch.and_then(|e| keys.get(&digest, e)) {
        touch(pool.clone(), caller.key_id);
        return Ok(caller);
    }
    let row: Option<(Uuid, Vec<u8>, Uuid, String, bool)> = sqlx::query_as(
        "SELECT k.id, k.key_digest, s.id, s.role::text, s.is_active \
         FROM api_keys k JOIN staff_accounts s ON s.id = k.staff_id \
         WHERE k.key_digest = $1 AND k.revoked_at IS NULL",
    )
    .bind(digest.as_slice())
    .fetch_optional(pool)
    .await?;
    let Some((key_id, stored, staff_id, role, active)) = row else {
        return Err(invalid());
    };
    if !bool::from(stored.as_slice().ct_eq(digest.as_slice())) || !active {
        return Err(invalid());
    }
    let role =
        Role::parse(&role).ok_or_else(|| Problem::internal("unknown role in staff_accounts"))?;
    touch(pool.clone(), key_id);
    let caller = Caller {
        staff_id,
        role,
        key_id,
    };
    if let Some(e) = epoch {
        keys.put(digest, &caller, e);
    }
    Ok(caller)
}

/// The key lookups this process has made, reused while no API key and no staff account has
/// changed since: every such change notifies every API process (`skyluxse_auth`, see
/// `store::listener`), which then looks keys up again. A revoked key thus stops working as soon
/// as each process has heard of it (milliseconds), or within seconds when a process's listening
/// connection has silently died (its probes find that out). A process whose connection is not
/// trusted looks every key up, and no lookup is reused for longer than [`KeyCache::REUSE_FOR`]. Only keys that
/// were found are kept; a refused key is looked up on every request.
pub struct KeyCache {
    notifications: store::listener::Notifications,
    entries: std::sync::Mutex<std::collections::HashMap<Vec<u8>, CachedKey>>,
}

struct CachedKey {
    caller: Caller,
    epoch: u64,
    at: std::time::Instant,
}

impl KeyCache {
    /// The longest a lookup is reused, notifications or not.
    pub const REUSE_FOR: std::time::Duration = std::time::Duration::from_secs(10);
    /// At most this many keys are kept.
    const MAX_KEYS: usize = 10_000;

    pub fn new(pool: PgPool) -> Self {
        Self {
            notifications: store::listener::Notifications::new(pool),
            entries: Default::default(),
        }
    }

    fn get(&self, digest: &[u8], epoch: u64) -> Option<Caller> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hit = entries.get(digest)?;
        (hit.epoch == epoch && hit.at.elapsed() < Self::REUSE_FOR).then(|| hit.caller.clone())
    }

    fn put(&self, digest: Vec<u8>, caller: &Caller, epoch: u64) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= Self::MAX_KEYS {
            entries.retain(|_, c| c.epoch == epoch && c.at.elapsed() < Self::REUSE_FOR);
            if entries.len() >= Self::MAX_KEYS {
                entries.clear();
            }
        }
        entries.insert(
            digest,
            CachedKey {
                caller: caller.clone(),
                epoch,
                at: std::time::Instant::now(),
            },
        );
    }
}

/// Records when a key was last used (at most once a minute; best effort, off the request path).
/// This process remembers when it last did, so a busy key costs no statement per request.
fn touch(pool: PgPool, key_id: Uuid) {
    static TOUCHED: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<Uuid, std::time::Instant>>,
    > = std::sync::OnceLock::new();
    let now = std::time::Instant::now();
    if let Ok(mut touched) = TOUCHED.get_or_init(Default::default).lock() {
        if touched
            .get(&key_id)
            .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(60))
        {
            return;
        }
        touched.insert(key_id, now);
    }
    tokio::spawn(async move {
        let _ = sqlx::query(
            "UPDATE api_keys SET last_used_at = now() WHERE id = $1 \
             AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
        )
        .bind(key_id)
        .execute(&pool)
        .await;
    });
}

/// Every key starts with this.
pub const KEY_PREFIX: &str = "slx_";

/// SHA-256 of a key.
pub fn key_digest(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Why a key could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not a role; choose operations, sales, ceo, driver or integration")]
    UnknownRole(String),
    #[error("no staff account has the e-mail {0}; keys are issued for existing accounts only")]
    NoSuchStaff(String),
    #[error("the staff account {email} has the role {actual}, not {requested}")]
    RoleMismatch {
        email: String,
        actual: String,
        requested: String,
    },
    #[error("the staff account {0} is not active")]
    Inactive(String),
    #[error("no random numbers available: {0}")]
    Random(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Parses a role name (`role_type`).
pub fn parse_role(role: &str) -> Result<Role, KeyError> {
    Role::parse(role.trim()).ok_or_else(|| KeyError::UnknownRole(role.to_string()))
}

/// A new key for the staff account with `email`, whose role must be `role`. Returns the key
/// (shown once; only its digest is stored).
pub async fn create_key(pool: &PgPool, email: &str, role: Role) -> Result<String, KeyError> {
    let row: Option<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT id, role::text, is_active FROM staff_accounts WHERE email = $1::citext",
    )
    .bind(email.trim())
    .fetch_optional(pool)
    .await?;
    let Some((staff_id, actual, active)) = row else {
        return Err(KeyError::NoSuchStaff(email.to_string()));
    };
    if actual != role.as_str() {
        return Err(KeyError::RoleMismatch {
            email: email.to_string(),
            actual,
            requested: role.as_str().to_string(),
        });
    }
    if !active {
        return Err(KeyError::Inactive(email.to_string()));
    }
    let mut random = [0u8; 24];
    getrandom::fill(&mut random).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = format!("{KEY_PREFIX}{}", hex::encode(random));
    sqlx::query("INSERT INTO api_keys (staff_id, key_prefix, key_digest) VALUES ($1, $2, $3)")
        .bind(staff_id)
        .bind(&key[..KEY_PREFIX.len() + 8])
        .bind(key_digest(&key))
        .execute(pool)
        .await?;
    Ok(key)
}
