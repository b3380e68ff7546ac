//! Kommo account webhooks (`crm-contracts.md`, "Kommo webhooks (inbound)").
//!
//! Intake (`POST /webhooks/kommo/{secret}`): the secret in the URL is compared with
//! `KOMMO_WEBHOOK_SECRET` in constant time; an `X-Signature` header, when present, must be the
//! hex HMAC-SHA1 of the raw body keyed with the same secret (`hmac_validated` records it). The raw
//! delivery is stored in `kommo_webhook_events` unless its body (by SHA-256) is that of the
//! delivery received just before it (Kommo repeating it), and answered 200 at once; nothing is
//! stored for a bad secret or signature. A body received earlier with other deliveries between
//! is kept: its status applies only where it continues the lead's statuses (its `old_status_id`
//! is the lead's Kommo status), so a late repeat of an older move changes nothing while a lead
//! moved the same way again follows Kommo.
//!
//! Processing ([`run_intake`], a drain loop woken by each delivery and polling as the fallback):
//! a stored row is leased (`next_attempt_at` pushed a minute ahead, so a crashed process's row
//! comes back), `leads[add]` items become Lead `Create` commands (actor `kommo`, the Kommo lead id
//! recorded, stage by `kommo_status_id`, else `new`) and `leads[status]` items become
//! `ApplyKommoStatus` on the lead with that Kommo id (which also loses an active lead on Kommo's
//! "Closed - lost", and reopens a lost one moved out of it). `kommo_lead_links` is claimed before a lead
//! is created, so one Kommo lead becomes one lead however often it is delivered; every step is
//! idempotent, so a retried row does no harm. Database failures retry with backoff (5 attempts,
//! then `failed`); a refusal by the domain is recorded in `fetched_data` and not retried.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use commands::CommandError;
use commands::codes::{self, CodeKind};
use domain::lead::LeadCommand;
use domain::{Actor, CommandMetadata};
use hmac::{Hmac, KeyInit, Mac};
use rust_decimal::Decimal;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiResult, Problem};
use crate::extract::RawBody;
use crate::refs;

/// How often a stored delivery is tried before it is marked `failed`.
const MAX_ATTEMPTS: i32 = 5;

/// The hex HMAC-SHA1 of `body` keyed with `secret` (what Kommo sends as `X-Signature`).
pub fn signature(secret: &str, body: &[u8]) -> String {
    match Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length.
        Err(_) => String::new(),
    }
}

fn verify_signature(secret: &str, body: &[u8], signature: &str) -> bool {
    let Ok(expected) = hex::decode(signature.trim()) else {
        return false;
    };
    match Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            mac.verify_slice(&expected).is_ok()
        }
        Err(_) => false,
    }
}

/// Constant-time comparison of two secrets (of their digests, so lengths do not leak either).
fn same_secret(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

/// Receives a Kommo account webhook (form-encoded).
#[utoipa::path(
    post,
    path = "/webhooks/kommo/{secret}",
    tag = "webhooks",
    params(
        ("secret" = String, Path, description = "The shared secret configured in the webhook URL"),
        ("X-Signature" = Option<String>, Header, description = "Hex HMAC-SHA1 of the raw body, keyed with the secret"),
    ),
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
        description = "Kommo's `{entity}[{action}][{index}][{field}]` fields"),
    responses(
        (status = 200, description = "Stored (or already stored); processed in the background", body = Object),
        (status = 401, description = "Wrong secret or signature; nothing stored", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn webhook(
    State(state): State<AppState>,
    Path(secret): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<Json<Value>> {
    let Some(expected) = state.config.kommo_webhook_secret.as_ref() else {
        return Err(
            Problem::not_found("Kommo webhooks are not configured (KOMMO_WEBHOOK_SECRET)")
                .with_code("webhook.not_configured"),
        );
    };
    let expected = expected.expose_secret();
    if !same_secret(&secret, expected) {
        tracing::warn!("Kommo webhook with a wrong secret refused");
        return Err(
            Problem::unauthorized("the webhook secret is wrong").with_code("webhook.bad_secret")
        );
    }
    let hmac_validated = match headers.get("x-signature").and_then(|v| v.to_str().ok()) {
        None => false,
        Some(sig) if verify_signature(expected, &body, sig) => true,
        Some(_) => {
            tracing::warn!("Kommo webhook with a wrong signature refused");
            return Err(
                Problem::unauthorized("the X-Signature does not match the body")
                    .with_code("webhook.bad_signature"),
            );
        }
    };

    let payload = form_to_json(&body);
    let status_id = payload
        .iter()
        .find(|(k, _)| k.starts_with("leads[status]") && k.ends_with("[status_id]"))
        .and_then(|(_, v)| v.as_str().map(str::to_string));
    let source_payload_id = hex::encode(Sha256::digest(&body));
    // A repeat is the same body as the delivery received just before it (Kommo sending it
    // again); the same body after another delivery is news (a lead moved back and forth). One
    // intake at a time decides, so two copies of one delivery arriving together are one.
    let mut tx = state.pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('kommo webhook intake', 0))")
        .execute(&mut *tx)
        .await?;
    let latest: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT id, source_payload_id FROM kommo_webhook_events \
         ORDER BY created_at DESC, id DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let (id, duplicate) = match latest {
        Some((id, hash)) if hash == source_payload_id => (id, true),
        _ => {
            let id: Uuid = sqlx::query_scalar(
                "INSERT INTO kommo_webhook_events \
                    (source_payload_id, hmac_validated, payload, raw_body, kommo_status_id, \
                     kommo_status_label, created_at) \
                 VALUES ($1, $2, $3, $4, $5, \
                     (SELECT label FROM kommo_pipeline_stages WHERE id = $5), clock_timestamp()) \
                 RETURNING id",
            )
            .bind(&source_payload_id)
            .bind(hmac_validated)
            .bind(Value::Object(payload))
            .bind(body.as_ref())
            .bind(status_id)
            .fetch_one(&mut *tx)
            .await?;
            (id, false)
        }
    };
    tx.commit().await?;
    if !duplicate {
        state.intake.notify_one();
    }
    Ok(Json(
        json!({ "status": "accepted", "id": id, "duplicate": duplicate }),
    ))
}

/// The form fields as a JSON object of strings (a repeated field keeps its last value).
/// The form's fields; a NUL character (`%00`), which no PostgreSQL text holds, is dropped.
fn form_to_json(body: &[u8]) -> Map<String, Value> {
    let text = |s: std::borrow::Cow<'_, str>| {
        if s.contains('\0') {
            s.replace('\0', "")
        } else {
            s.into_owned()
        }
    };
    form_urlencoded::parse(body)
        .map(|(k, v)| (text(k), Value::String(text(v))))
        .collect()
}

/// The items of `{entity}[{action}][{index}][{field}]`, by index, with their top-level fields.
fn items(
    payload: &Map<String, Value>,
    entity: &str,
    action: &str,
) -> Vec<BTreeMap<String, String>> {
    let prefix = format!("{entity}[{action}][");
    let mut by_index: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
    for (key, value) in payload {
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        let Some((index, rest)) = rest.split_once(']') else {
            continue;
        };
        let Ok(index) = index.parse::<u32>() else {
            continue;
        };
        let Some(field) = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
            continue;
        };
        if field.contains('[') || field.contains(']') {
            continue; // nested (custom fields): not used here
        }
        if let Some(v) = value.as_str() {
            by_index
                .entry(index)
                .or_default()
                .insert(field.to_string(), v.to_string());
        }
    }
    by_index.into_values().collect()
}

/// Runs the drain loop until `shutdown` turns true.
pub async fn run_intake(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        loop {
            match process_next(&state).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Kommo webhook intake cannot reach the database");
                    break;
                }
            }
        }
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() { return },
            () = state.intake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Leases and processes one due delivery; `false` when none is due.
pub async fn process_next(state: &AppState) -> Result<bool, sqlx::Error> {
    // `seen_before`: the same body was received earlier (with other deliveries between, or
    // it would not have been kept): Kommo repeating an older delivery, or a lead moved the same
    // way again.
    let row: Option<(Uuid, Value, i32, DateTime<Utc>, bool)> = sqlx::query_as(
        "UPDATE kommo_webhook_events k SET attempts = attempts + 1, \
            next_attempt_at = now() + interval '60 seconds' \
         WHERE id = (SELECT id FROM kommo_webhook_events \
                     WHERE status = 'received' AND next_attempt_at <= now() \
                     ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING id, payload, attempts, created_at, \
           EXISTS (SELECT 1 FROM kommo_webhook_events e \
                   WHERE e.source_payload_id = k.source_payload_id AND e.created_at < k.created_at)",
    )
    .fetch_optional(&state.pool)
    .await?;
    let Some((id, payload, attempts, received_at, seen_before)) = row else {
        return Ok(false);
    };
    let payload = payload.as_object().cloned().unwrap_or_default();
    let delivery = Delivery {
        id,
        received_at,
        seen_before,
    };
    match process(state, &delivery, &payload).await {
        Ok(results) => {
            sqlx::query(
                "UPDATE kommo_webhook_events SET status = 'processed', processed_at = now(), \
                 error_message = NULL, fetched_data = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(Value::Array(results))
            .execute(&state.pool)
            .await?;
        }
        Err(e) => {
            let failed = attempts >= MAX_ATTEMPTS;
            tracing::warn!(webhook_event = %id, attempts, failed, error = %e, "Kommo webhook processing failed");
            sqlx::query(
                "UPDATE kommo_webhook_events SET status = CASE WHEN $3 THEN 'failed' ELSE 'received' END, \
                 error_message = $2, next_attempt_at = now() + make_interval(secs => $4) WHERE id = $1",
            )
            .bind(id)
            .bind(e.to_string())
            .bind(failed)
            .bind(f64::from(2 * attempts * attempts))
            .execute(&state.pool)
            .await?;
        }
    }
    Ok(true)
}

/// A failure worth retrying (the database, a lost race); refusals are results, not failures.
#[derive(Debug, thiserror::Error)]
enum IntakeError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("command: {0}")]
    Command(CommandError),
    #[error("{0}")]
    Setup(String),
}

impl From<Problem> for IntakeError {
    fn from(p: Problem) -> Self {
        Self::Setup(p.detail.unwrap_or_else(|| p.kind.title().to_string()))
    }
}

/// The outcome of one command: refusals are recorded; failures are errors (retried).
fn outcome(
    item: Value,
    result: Result<commands::Outcome, CommandError>,
) -> Result<Value, IntakeError> {
    let mut item = item;
    let extra = match result {
        Ok(o) => {
            json!({ "result": "ok", "lead_id": o.id, "version": o.version, "events": o.events })
        }
        Err(CommandError::Domain { code, message, .. }) => {
            json!({ "result": "refused", "code": code, "message": message })
        }
        Err(e @ (CommandError::VehicleUnavailable { .. } | CommandError::CodeTaken(_))) => {
            json!({ "result": "refused", "message": e.to_string() })
        }
        Err(e) => return Err(IntakeError::Command(e)),
    };
    if let (Some(obj), Some(extra)) = (item.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    Ok(item)
}

/// A stored delivery being processed.
struct Delivery {
    id: Uuid,
    received_at: DateTime<Utc>,
    /// The same body was received before (see [`process_next`]).
    seen_before: bool,
}

async fn process(
    state: &AppState,
    delivery: &Delivery,
    payload: &Map<String, Value>,
) -> Result<Vec<Value>, IntakeError> {
    let meta = CommandMetadata::new(Actor::kommo(), format!("kommo-webhook:{}", delivery.id));
    let mut results = Vec::new();
    for item in items(payload, "leads", "add") {
        results.push(add_lead(state, &meta, &item).await?);
    }
    for item in items(payload, "leads", "status") {
        results.push(apply_status(state, &meta, &item, delivery).await?);
    }
    Ok(results)
}

fn kommo_id(item: &BTreeMap<String, String>, field: &str) -> Option<i64> {
    item.get(field).and_then(|v| v.trim().parse::<i64>().ok())
}

async fn add_lead(
    state: &AppState,
    meta: &CommandMetadata,
    item: &BTreeMap<String, String>,
) -> Result<Value, IntakeError> {
    let Some(kommo_lead_id) = kommo_id(item, "id") else {
        return Ok(json!({ "action": "leads[add]", "result": "skipped", "message": "no lead id" }));
    };
    let base = json!({ "action": "leads[add]", "kommo_lead_id": kommo_lead_id });
    let lead_id = link_lead(state, kommo_lead_id).await?;
    // Delivered before: the lead exists already (asked before a code number is taken, so a
    // repeated delivery takes none).
    let already_created = |base: Value| {
        let mut v = base;
        if let Some(o) = v.as_object_mut() {
            o.insert("result".into(), "already_created".into());
            o.insert("lead_id".into(), json!(lead_id));
        }
        Ok(v)
    };
    if refs::aggregate_exists(&state.pool, "Lead", lead_id).await? {
        return already_created(base);
    }
    let stage = match kommo_id(item, "status_id") {
        Some(s) => refs::stage_for_kommo_status(&state.pool, s).await?,
        None => None,
    };
    let stage = match stage {
        Some(s) => s,
        None => refs::stage(&state.pool, "new")
            .await?
            .ok_or_else(|| IntakeError::Setup("the pipeline has no stage `new`".into()))?,
    };
    let owner_id = owner(state, item.get("responsible_user_id")).await?;
    let value_amount = item
        .get("price")
        .and_then(|p| p.trim().parse::<Decimal>().ok())
        .filter(|p| !p.is_sign_negative())
        .unwrap_or_default();
    let mut command = LeadCommand::Create {
        lead_code: CodeKind::Lead.code(0),
        client_id: None,
        owner_id,
        stage,
        value_amount,
        source: "Kommo".into(),
        title: item.get("name").cloned(),
        requested_start_at: None,
        requested_end_at: None,
        fleet_size: 1,
        expected_close_at: None,
        kommo_lead_id: Some(kommo_lead_id),
    };
    // A lead the domain refuses takes no code number.
    if let Err(refused) = state.bus.leads.would_accept(None, command.clone()).await {
        return outcome(base, Err(refused));
    }
    let code = codes::allocate(&state.pool, CodeKind::Lead).await?;
    if let LeadCommand::Create { lead_code, .. } = &mut command {
        *lead_code = code;
    }
    let result = state.bus.leads.create(lead_id, command, meta, None).await;
    match result {
        // Delivered at the same moment by another intake: the lead exists already.
        Err(CommandError::Domain {
            code: "lead.already_exists",
            ..
        }) => already_created(base),
        other => outcome(base, other),
    }
}

/// The lead a Kommo lead is (or becomes): claimed in `kommo_lead_links` before it is created.
async fn link_lead(state: &AppState, kommo_lead_id: i64) -> Result<Uuid, IntakeError> {
    let known: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM sales_leads WHERE kommo_lead_id = $1 LIMIT 1")
            .bind(kommo_lead_id)
            .fetch_optional(&state.pool)
            .await?;
    sqlx::query(
        "INSERT INTO kommo_lead_links (kommo_lead_id, lead_id) VALUES ($1, $2) \
         ON CONFLICT (kommo_lead_id) DO NOTHING",
    )
    .bind(kommo_lead_id)
    .bind(known.unwrap_or_else(Uuid::now_v7))
    .execute(&state.pool)
    .await?;
    Ok(
        sqlx::query_scalar("SELECT lead_id FROM kommo_lead_links WHERE kommo_lead_id = $1")
            .bind(kommo_lead_id)
            .fetch_one(&state.pool)
            .await?,
    )
}

/// The lead of a Kommo lead id, if it is known.
async fn find_lead(state: &AppState, kommo_lead_id: i64) -> Result<Option<Uuid>, sqlx::Error> {
    let linked: Option<Uuid> =
        sqlx::query_scalar("SELECT lead_id FROM kommo_lead_links WHERE kommo_lead_id = $1")
            .bind(kommo_lead_id)
            .fetch_optional(&state.pool)
            .await?;
    if linked.is_some() {
        return Ok(linked);
    }
    sqlx::query_scalar("SELECT id FROM sales_leads WHERE kommo_lead_id = $1 LIMIT 1")
        .bind(kommo_lead_id)
        .fetch_optional(&state.pool)
        .await
}

/// The owner of a lead from Kommo: the staff account whose `external_crm_id` is the responsible
/// Kommo user, else the first active salesperson, else the integration account.
async fn owner(state: &AppState, responsible: Option<&String>) -> Result<Uuid, IntakeError> {
    let id: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM staff_accounts \
         WHERE is_active AND (external_crm_id = $1 OR role IN ('sales', 'integration')) \
         ORDER BY coalesce(external_crm_id = $1, false) DESC, (role = 'sales') DESC, created_at, id \
         LIMIT 1",
    )
    .bind(responsible)
    .fetch_optional(&state.pool)
    .await?;
    id.ok_or_else(|| IntakeError::Setup("no active sales or integration staff account".into()))
}

async fn apply_status(
    state: &AppState,
    meta: &CommandMetadata,
    item: &BTreeMap<String, String>,
    delivery: &Delivery,
) -> Result<Value, IntakeError> {
    let (Some(kommo_lead_id), Some(status_id)) =
        (kommo_id(item, "id"), kommo_id(item, "status_id"))
    else {
        return Ok(
            json!({ "action": "leads[status]", "result": "skipped", "message": "no lead or status id" }),
        );
    };
    let base = json!({ "action": "leads[status]", "kommo_lead_id": kommo_lead_id, "kommo_status_id": status_id });
    let Some(lead_id) = find_lead(state, kommo_lead_id).await? else {
        let mut v = base;
        if let Some(o) = v.as_object_mut() {
            o.insert("result".into(), "skipped".into());
            o.insert("message".into(), "no lead has this Kommo lead id".into());
        }
        return Ok(v);
    };
    let previous = kommo_id(item, "old_status_id");
    // A body received before is either Kommo repeating an older move (late: the lead moved on
    // since) or the lead moved the same way again. Only the second continues the lead's
    // statuses: the move starts from the status the lead has.
    if delivery.seen_before
        && let Some(previous) = previous
    {
        let (lead, _) = state
            .bus
            .leads
            .replay(lead_id, None)
            .await
            .map_err(IntakeError::Command)?;
        if lead.kommo_status_id.is_some_and(|now| now != previous) {
            let mut v = base;
            if let Some(o) = v.as_object_mut() {
                o.insert("result".into(), "stale_repeat".into());
                o.insert(
                    "message".into(),
                    "a repeat of an earlier delivery: the lead has moved on since".into(),
                );
            }
            return Ok(v);
        }
    }
    let stage = refs::stage_for_kommo_status(&state.pool, status_id).await?;
    let command = LeadCommand::ApplyKommoStatus {
        kommo_status_id: status_id,
        previous_kommo_status_id: previous,
        stage,
        delivered_at: Some(delivery.received_at),
    };
    let result = state.bus.leads.execute(lead_id, command, meta, None).await;
    outcome(base, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_indexed_items_and_ignores_nested_fields() {
        let body = b"leads[status][0][id]=23802129&leads[status][0][status_id]=47873533&leads[status][1][id]=7&leads[status][1][status_id]=142&leads[update][0][custom_fields][0][values][0][value]=x&account[id]=29013640";
        let payload = form_to_json(body);
        let statuses = items(&payload, "leads", "status");
        assert_eq!(statuses.len(), 2);
        assert_eq!(statuses[0]["id"], "23802129");
        assert_eq!(statuses[1]["status_id"], "142");
        assert!(items(&payload, "leads", "update").is_empty());
    }

    #[test]
    fn signatures_verify_only_for_the_same_body_and_secret() {
        let sig = signature("s3cret", b"a=1");
        assert!(verify_signature("s3cret", b"a=1", &sig));
        assert!(!verify_signature("s3cret", b"a=2", &sig));
        assert!(!verify_signature("other", b"a=1", &sig));
        assert!(!verify_signature("s3cret", b"a=1", "zz"));
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abcd"));
    }
}
