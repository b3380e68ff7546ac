//! Audit, straight from the event store (not the read models): a booking's timeline with the
//! metadata of every event (who, in answer to what), its state at a past version or time by
//! replaying its events through the domain's own `apply`, and the global feed in log order.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use store::global_log::{self, LogPosition};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::AppState;
use crate::consistency::MinPosition;
use crate::error::{ApiResult, Problem};
use crate::extract::ApiQuery;
use crate::refs::{self, Kind};

/// The events of booking `id`, in order, each with its metadata and the actor drawn from it.
pub async fn booking_timeline(pool: &PgPool, id: Uuid) -> Result<Vec<Value>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT jsonb_build_object( \
            'sequence', sequence, 'event_type', event_type, 'event_version', event_version, \
            'payload', payload::jsonb, 'metadata', metadata::jsonb, \
            'actor', jsonb_build_object('type', metadata->>'actor_type', \
                                        'id', metadata->>'actor_id', \
                                        'role', metadata->>'actor_role'), \
            'recorded_at', recorded_at, 'global_position', global_position) \
         FROM events WHERE aggregate_type = 'Booking' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await
}

/// A booking's events from the event store, with metadata (actor, correlation, causation,
/// request id).
#[utoipa::path(
    get,
    path = "/v1/bookings/{id}/timeline",
    tag = "audit",
    params(("id" = String, Path, description = "The booking id (UUID) or code (`BK-1052`)"), MinPosition),
    responses(
        (status = 200, description = "`{booking_id, events: [{sequence, event_type, event_version, payload, metadata, actor, recorded_at, global_position}]}`", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn timeline(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    ApiQuery(_min): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    let id = refs::resolve(&state.pool, &raw, Kind::Booking).await?;
    let events = booking_timeline(&state.pool, id).await?;
    if events.is_empty() {
        return Err(no_booking(&raw));
    }
    Ok(Json(json!({ "booking_id": id, "events": events })))
}

fn no_booking(raw: &str) -> Problem {
    Problem::not_found(format!("no booking {raw}")).with_code("booking.not_found")
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StateQuery {
    /// The state as it was at this time (RFC 3339): after the last event recorded at or before it.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub as_of: Option<DateTime<Utc>>,
    /// The state after this version (event sequence).
    pub version: Option<i64>,
    /// Accepted for uniformity; the event store is always current.
    pub min_position: Option<i64>,
}

/// Which point of a booking's history to replay to.
#[derive(Debug, Clone, Copy)]
pub enum At {
    Now,
    Version(i64),
    Time(DateTime<Utc>),
}

/// The booking's state at `at`, by replaying its events: `{booking_id, version, recorded_at,
/// as_of, state}`.
pub async fn booking_state(state: &AppState, id: Uuid, at: At, raw: &str) -> ApiResult<Value> {
    let up_to = match at {
        At::Now => None,
        At::Version(v) => {
            if v < 1 {
                return Err(Problem::validation("version must be 1 or more"));
            }
            Some(v)
        }
        At::Time(t) => {
            let seq: Option<i64> = sqlx::query_scalar(
                "SELECT max(sequence) FROM events \
                 WHERE aggregate_type = 'Booking' AND aggregate_id = $1 AND recorded_at <= $2",
            )
            .bind(id.to_string())
            .bind(t)
            .fetch_one(&state.pool)
            .await?;
            match seq {
                Some(s) => Some(s),
                None if refs::aggregate_exists(&state.pool, "Booking", id).await? => {
                    return Err(Problem::not_found(format!(
                        "booking {raw} did not exist yet at {}",
                        t.to_rfc3339()
                    ))
                    .with_code("booking.not_yet_created"));
                }
                None => return Err(no_booking(raw)),
            }
        }
    };
    let (booking, version) = state
        .bus
        .bookings
        .replay(id, up_to)
        .await
        .map_err(Problem::from)?;
    if version == 0 || !booking.created {
        return Err(no_booking(raw));
    }
    // A version the booking has not reached is not its state at that version.
    if let At::Version(asked) = at
        && asked > version
    {
        return Err(Problem::not_found(format!(
            "booking {raw} has no version {asked}: it is at version {version}"
        ))
        .with_code("booking.no_such_version"));
    }
    let recorded_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT recorded_at FROM events \
         WHERE aggregate_type = 'Booking' AND aggregate_id = $1 AND sequence = $2",
    )
    .bind(id.to_string())
    .bind(version)
    .fetch_optional(&state.pool)
    .await?;
    let state_json = serde_json::to_value(&booking).map_err(Problem::internal)?;
    Ok(json!({
        "booking_id": id,
        "version": version,
        "recorded_at": recorded_at,
        "as_of": match at { At::Time(t) => Some(t), _ => None },
        "state": state_json,
    }))
}

/// The audit report of the `skyluxse audit` command: the booking's events with their actors,
/// and its state at `as_of` (RFC 3339) or `version`, or now.
pub async fn report(
    state: &AppState,
    booking: &str,
    as_of: Option<&str>,
    version: Option<i64>,
) -> ApiResult<Value> {
    let at = match (as_of, version) {
        (Some(_), Some(_)) => {
            return Err(Problem::validation("give --as-of or --version, not both"));
        }
        (Some(t), None) => At::Time(
            DateTime::parse_from_rfc3339(t)
                .map_err(|e| Problem::validation(format!("--as-of is not an RFC 3339 time: {e}")))?
                .with_timezone(&Utc),
        ),
        (None, Some(v)) => At::Version(v),
        (None, None) => At::Now,
    };
    let id = refs::resolve(&state.pool, booking, Kind::Booking).await?;
    let events = booking_timeline(&state.pool, id).await?;
    if events.is_empty() {
        return Err(no_booking(booking));
    }
    let at_state = booking_state(state, id, at, booking).await?;
    Ok(json!({ "booking_id": id, "events": events, "state": at_state }))
}

/// A booking's state at a past version or time, by replaying its events.
#[utoipa::path(
    get,
    path = "/v1/bookings/{id}/state",
    tag = "audit",
    params(("id" = String, Path, description = "The booking id (UUID) or code (`BK-1052`)"), StateQuery),
    responses(
        (status = 200, description = "`{booking_id, version, recorded_at, as_of, state}`", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn state(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<StateQuery>,
) -> ApiResult<Json<Value>> {
    let id = refs::resolve(&state.pool, &raw, Kind::Booking).await?;
    let at = match (q.as_of, q.version) {
        (Some(_), Some(_)) => {
            return Err(Problem::validation("give as_of or version, not both"));
        }
        (Some(t), None) => At::Time(t),
        (None, Some(v)) => At::Version(v),
        (None, None) => At::Now,
    };
    Ok(Json(booking_state(&state, id, at, &raw).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FeedQuery {
    /// The global position of the last event already seen (0 or absent: from the start).
    pub after: Option<i64>,
    /// 1 to 1000, default 100.
    pub limit: Option<i64>,
    /// Accepted for uniformity; the event store is always current.
    pub min_position: Option<i64>,
}

/// Members of personal data in event payloads, replaced in the feed.
const PII_MEMBERS: &[&str] = &["passport_number", "emirates_id"];

/// Replaces personal data members (at any depth) with `"[redacted]"`.
fn redact(value: &mut Value) {
    match value {
        Value::Object(obj) => {
            for (k, v) in obj.iter_mut() {
                if PII_MEMBERS.contains(&k.as_str()) && !v.is_null() {
                    *v = Value::String("[redacted]".into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The global event feed in log order (only events whose order is final). Page with
/// `after=<next_after>`. Passport and Emirates ID numbers are redacted.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "audit",
    params(FeedQuery),
    responses(
        (status = 200, description = "`{events: [...], next_after}`", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn feed(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<FeedQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::validation("limit must be between 1 and 1000"));
    }
    let after = q.after.unwrap_or(0);
    let from = if after <= 0 {
        LogPosition::START
    } else {
        let txid: Option<i64> = sqlx::query_scalar(
            "SELECT transaction_id::text::bigint FROM events WHERE global_position = $1",
        )
        .bind(after)
        .fetch_optional(&state.pool)
        .await?;
        LogPosition {
            transaction_id: txid.ok_or_else(|| {
                Problem::validation(format!("after={after} is not the position of any event"))
                    .with_code("request.unknown_position")
            })?,
            global_position: after,
        }
    };
    let events = global_log::read_after(&state.pool, from, limit).await?;
    let next_after = events
        .last()
        .map_or(after.max(0), |e| e.position.global_position);
    let events: Vec<Value> = events
        .into_iter()
        .map(|e| {
            let mut payload = e.payload.into_value();
            redact(&mut payload);
            json!({
                "global_position": e.position.global_position,
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "sequence": e.sequence,
                "event_type": e.event_type,
                "event_version": e.event_version,
                "payload": payload,
                "metadata": e.metadata.into_value(),
                "recorded_at": e.recorded_at,
            })
        })
        .collect();
    Ok(Json(json!({ "events": events, "next_after": next_after })))
}
