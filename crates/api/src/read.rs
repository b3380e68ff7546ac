//! Queries on the read models (SPEC §3), under the seeds' table and column names. Rows are sent
//! as JSON objects with the columns as members; numeric columns (money, rates) are sent as
//! decimal strings (`"6500.00"`), as they are accepted in requests, so no amount passes through
//! a float. Every query takes `min_position` (see [`crate::consistency`]).

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use domain::booking::BookingStatus;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::AppState;
use crate::consistency::{MinPosition, wait_for};
use crate::error::{ApiResult, Problem};
use crate::extract::ApiQuery;
use crate::refs::{self, Kind};

/// `to_jsonb(<alias>)` with the numeric columns replaced by their text.
fn row_json(alias: &str, numeric: &[&str]) -> String {
    if numeric.is_empty() {
        return format!("to_jsonb({alias})");
    }
    let pairs: Vec<String> = numeric
        .iter()
        .map(|c| format!("'{c}', {alias}.{c}::text"))
        .collect();
    format!(
        "(to_jsonb({alias}) || jsonb_build_object({}))",
        pairs.join(", ")
    )
}

const BOOKING_NUMERIC: &[&str] = &[
    "price_daily",
    "total_amount",
    "paid_amount",
    "outstanding_amount",
    "deposit_amount",
    "advance_payment",
    "full_insurance_fee",
];
const CLIENT_NUMERIC: &[&str] = &["lifetime_value", "outstanding_amount"];
const LEAD_NUMERIC: &[&str] = &["probability", "value_amount", "weighted_value"];
const DEAL_NUMERIC: &[&str] = &[
    "principal_amount",
    "monthly_payment",
    "interest_rate",
    "security_deposit",
    "total_paid",
];

async fn wait(state: &AppState, projections: &[&str], min: Option<i64>) -> ApiResult<()> {
    wait_for(&state.pool, projections, min, state.config.read_wait).await
}

fn not_found(noun: &str, raw: &str) -> Problem {
    Problem::not_found(format!(
        "no {noun} {raw} (or it is not projected yet: see min_position)"
    ))
    .with_code(format!("{noun}.not_found"))
}

/// Paging of lists: `limit` (1 to 200, default 50) and `offset`.
fn paging(limit: Option<i64>, offset: Option<i64>) -> ApiResult<(i64, i64)> {
    paging_up_to(limit, offset, 50, 200)
}

/// `limit` (`default` when absent, at most `max`) and `offset` (0 when absent), checked.
fn paging_up_to(
    limit: Option<i64>,
    offset: Option<i64>,
    default: i64,
    max: i64,
) -> ApiResult<(i64, i64)> {
    let limit = limit.unwrap_or(default);
    let offset = offset.unwrap_or(0);
    if !(1..=max).contains(&limit) || offset < 0 {
        return Err(Problem::validation(format!(
            "limit must be between 1 and {max} and offset must not be negative"
        )));
    }
    Ok((limit, offset))
}

/// A page of rows: the items, and `next_offset` when there are more.
fn page(mut rows: Vec<Value>, limit: i64, offset: i64) -> Value {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    json!({
        "items": rows,
        "limit": limit,
        "offset": offset,
        "next_offset": if more { Some(offset + limit) } else { None },
    })
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A client with tier, segment, lifetime value, last booking and outstanding amount.
#[utoipa::path(
    get,
    path = "/v1/clients/{id}",
    tag = "clients",
    params(("id" = Uuid, Path, description = "The client id"), MinPosition),
    responses(
        (status = 200, description = "The `clients` row", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "Not projected yet", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_client(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    let id = refs::resolve(&state.pool, &raw, Kind::Client).await?;
    wait(&state, &["clients"], q.min_position).await?;
    let row: Option<Value> = sqlx::query_scalar(&format!(
        "SELECT {} FROM clients c WHERE c.id = $1",
        row_json("c", CLIENT_NUMERIC)
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    row.map(Json).ok_or_else(|| not_found("client", &raw))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListClients {
    /// `vip`, `gold`, `silver`.
    #[param(value_type = Option<String>)]
    pub tier: Option<projections::rules::Tier>,
    /// `premier_loyalist`, `dormant_vip`, `growth_gold`, `at_risk`, `new_rising`,
    /// `high_value_dormant`, `general`.
    #[param(value_type = Option<String>)]
    pub segment: Option<projections::rules::Segment>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// See the single-client query.
    pub min_position: Option<i64>,
}

/// Clients, by lifetime value (highest first), filtered by tier and segment.
#[utoipa::path(
    get,
    path = "/v1/clients",
    tag = "clients",
    params(ListClients),
    responses(
        (status = 200, description = "`{items, limit, offset, next_offset}`", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_clients(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListClients>,
) -> ApiResult<Json<Value>> {
    let (limit, offset) = paging(q.limit, q.offset)?;
    wait(&state, &["clients"], q.min_position).await?;
    let rows: Vec<Value> = sqlx::query_scalar(&format!(
        "SELECT {} FROM clients c \
         WHERE ($1::text IS NULL OR c.tier::text = $1) AND ($2::text IS NULL OR c.segment::text = $2) \
         ORDER BY c.lifetime_value DESC, c.id LIMIT $3 OFFSET $4",
        row_json("c", CLIENT_NUMERIC)
    ))
    .bind(q.tier.map(projections::rules::Tier::as_str))
    .bind(q.segment.map(projections::rules::Segment::as_str))
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, offset)))
}

// ---------------------------------------------------------------------------------------------
// Bookings and calendar
// ---------------------------------------------------------------------------------------------

/// A booking with its additional services and invoices.
#[utoipa::path(
    get,
    path = "/v1/bookings/{id}",
    tag = "bookings",
    params(("id" = String, Path, description = "The booking id (UUID) or code (`BK-1052`)"), MinPosition),
    responses(
        (status = 200, description = "The `bookings` row with `services` and `invoices`", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "Not projected yet", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_booking(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    let id = refs::resolve(&state.pool, &raw, Kind::Booking).await?;
    wait(&state, &["bookings"], q.min_position).await?;
    let row: Option<Value> = sqlx::query_scalar(&format!(
        "SELECT {} || jsonb_build_object( \
           'services', coalesce((SELECT jsonb_agg({} ORDER BY s.id) \
                                 FROM booking_additional_services s WHERE s.booking_id = b.id), '[]'::jsonb), \
           'invoices', coalesce((SELECT jsonb_agg({} ORDER BY i.issued_at, i.label) \
                                 FROM booking_invoices i WHERE i.booking_id = b.id), '[]'::jsonb)) \
         FROM bookings b WHERE b.id = $1",
        row_json("b", BOOKING_NUMERIC),
        row_json("s", &["price"]),
        row_json("i", &["amount"]),
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    row.map(Json).ok_or_else(|| not_found("booking", &raw))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListBookings {
    /// `lead`, `confirmed`, `delivery`, `in_progress`, `completed`, `cancelled`.
    #[param(value_type = Option<String>)]
    pub status: Option<BookingStatus>,
    pub client_id: Option<Uuid>,
    pub vehicle_id: Option<Uuid>,
    /// Bookings whose period ends after this time.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub from: Option<DateTime<Utc>>,
    /// Bookings whose period starts before this time.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub to: Option<DateTime<Utc>>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    pub min_position: Option<i64>,
}

/// Bookings by start, filtered by status, client, vehicle and period.
#[utoipa::path(
    get,
    path = "/v1/bookings",
    tag = "bookings",
    params(ListBookings),
    responses(
        (status = 200, description = "`{items, limit, offset, next_offset}`", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_bookings(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListBookings>,
) -> ApiResult<Json<Value>> {
    let (limit, offset) = paging(q.limit, q.offset)?;
    if let (Some(from), Some(to)) = (q.from, q.to)
        && to < from
    {
        return Err(Problem::validation("to must not be before from"));
    }
    wait(&state, &["bookings"], q.min_position).await?;
    let rows: Vec<Value> = sqlx::query_scalar(&format!(
        "SELECT {} FROM bookings b \
         WHERE ($1::text IS NULL OR b.status::text = $1) \
           AND ($2::uuid IS NULL OR b.client_id = $2) \
           AND ($3::uuid IS NULL OR b.vehicle_id = $3) \
           AND ($4::timestamptz IS NULL OR b.end_at > $4) \
           AND ($5::timestamptz IS NULL OR b.start_at < $5) \
         ORDER BY b.start_at, b.id LIMIT $6 OFFSET $7",
        row_json("b", BOOKING_NUMERIC)
    ))
    .bind(q.status.map(BookingStatus::as_str))
    .bind(q.client_id)
    .bind(q.vehicle_id)
    .bind(q.from)
    .bind(q.to)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, offset)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CalendarQuery {
    pub vehicle_id: Option<Uuid>,
    /// Default: 7 days ago, or 67 days before `to`.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub from: Option<DateTime<Utc>>,
    /// Default: 60 days from now, or 67 days after `from`.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub to: Option<DateTime<Utc>>,
    /// At most this many events (1 to 2,000, default 2,000); `next_offset` says where the rest
    /// begin.
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    pub min_position: Option<i64>,
}

/// The most calendar events one answer holds.
const CALENDAR_PAGE: i64 = 2_000;

/// Calendar events (bookings with a vehicle, maintenance and repair blocks) overlapping a range.
#[utoipa::path(
    get,
    path = "/v1/calendar",
    tag = "bookings",
    params(CalendarQuery),
    responses(
        (status = 200, description = "`{from, to, items, limit, offset, next_offset}` of `calendar_events` rows", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn calendar(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<CalendarQuery>,
) -> ApiResult<Json<Value>> {
    // A range given at one end only spans the default's 67 days from it.
    let span = Duration::days(67);
    let (from, to) = match (q.from, q.to) {
        (Some(from), Some(to)) => (from, to),
        (Some(from), None) => (from, from + span),
        (None, Some(to)) => (to - span, to),
        (None, None) => (
            Utc::now() - Duration::days(7),
            Utc::now() + Duration::days(60),
        ),
    };
    if to <= from {
        return Err(Problem::validation("to must be after from"));
    }
    let (limit, offset) = paging_up_to(q.limit, q.offset, CALENDAR_PAGE, CALENDAR_PAGE)?;
    wait(&state, &["bookings"], q.min_position).await?;
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(e) FROM calendar_events e \
         WHERE ($1::uuid IS NULL OR e.vehicle_id = $1) \
           AND tstzrange(e.start_at, e.end_at) && tstzrange($2, $3) \
         ORDER BY e.start_at, e.id LIMIT $4 OFFSET $5",
    )
    .bind(q.vehicle_id)
    .bind(from)
    .bind(to)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(&state.pool)
    .await?;
    let mut answer = page(rows, limit, offset);
    answer["from"] = json!(from);
    answer["to"] = json!(to);
    Ok(Json(answer))
}

// ---------------------------------------------------------------------------------------------
// Sales
// ---------------------------------------------------------------------------------------------

/// A lead with its stage, probability, value and velocity.
#[utoipa::path(
    get,
    path = "/v1/leads/{id}",
    tag = "leads",
    params(("id" = String, Path, description = "The lead id (UUID) or code (`LD-1201`)"), MinPosition),
    responses(
        (status = 200, description = "The `sales_leads` row", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "Not projected yet", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_lead(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    let id = refs::resolve(&state.pool, &raw, Kind::Lead).await?;
    wait(&state, &["sales"], q.min_position).await?;
    let row: Option<Value> = sqlx::query_scalar(&format!(
        "SELECT {} FROM sales_leads l WHERE l.id = $1",
        row_json("l", LEAD_NUMERIC)
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    row.map(Json).ok_or_else(|| not_found("lead", &raw))
}

/// The pipeline: each stage with its active leads, their value and weighted value.
#[utoipa::path(
    get,
    path = "/v1/pipeline",
    tag = "leads",
    params(MinPosition),
    responses(
        (status = 200, description = "`{stages: [...], value_amount, weighted_value}`", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn pipeline(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    wait(&state, &["sales"], q.min_position).await?;
    let stages: Vec<Value> = sqlx::query_scalar(&format!(
        "SELECT jsonb_build_object( \
            'id', s.id, 'name', s.name, 'probability', s.probability::text, 'sla_days', s.sla_days, \
            'order_index', s.order_index, 'kommo_status_id', s.kommo_status_id, \
            'booking_status', s.booking_status, \
            'lead_count', count(l.id), \
            'value_amount', coalesce(sum(l.value_amount), 0)::numeric(14,2)::text, \
            'weighted_value', coalesce(sum(l.weighted_value), 0)::numeric(14,2)::text, \
            'leads', coalesce(jsonb_agg({} ORDER BY l.created_at, l.id) FILTER (WHERE l.id IS NOT NULL), '[]'::jsonb)) \
         FROM sales_pipeline_stages s \
         LEFT JOIN sales_leads l ON l.stage_id = s.id AND l.status = 'active' \
         GROUP BY s.id ORDER BY s.order_index",
        row_json("l", LEAD_NUMERIC)
    ))
    .fetch_all(&state.pool)
    .await?;
    let (value, weighted): (String, String) = sqlx::query_as(
        "SELECT coalesce(sum(value_amount), 0)::numeric(14,2)::text, \
                coalesce(sum(weighted_value), 0)::numeric(14,2)::text \
         FROM sales_leads WHERE status = 'active'",
    )
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(json!({
        "stages": stages,
        "value_amount": value,
        "weighted_value": weighted,
    })))
}

/// A deal (financing or leasing contract).
#[utoipa::path(
    get,
    path = "/v1/deals/{id}",
    tag = "deals",
    params(("id" = String, Path, description = "The deal id (UUID) or number (`DL-101`)"), MinPosition),
    responses(
        (status = 200, description = "The `deals` row", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "Not projected yet", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_deal(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    let id = refs::resolve(&state.pool, &raw, Kind::Deal).await?;
    wait(&state, &["sales"], q.min_position).await?;
    let row: Option<Value> = sqlx::query_scalar(&format!(
        "SELECT {} FROM deals d WHERE d.id = $1",
        row_json("d", DEAL_NUMERIC)
    ))
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    row.map(Json).ok_or_else(|| not_found("deal", &raw))
}

/// The deal's audit trail (`deal_events`).
#[utoipa::path(
    get,
    path = "/v1/deals/{id}/events",
    tag = "deals",
    params(("id" = String, Path, description = "The deal id (UUID) or number (`DL-101`)"), MinPosition),
    responses(
        (status = 200, description = "`{items}` of `deal_events` rows, oldest first", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn deal_events(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<MinPosition>,
) -> ApiResult<Json<Value>> {
    let id = refs::resolve(&state.pool, &raw, Kind::Deal).await?;
    wait(&state, &["sales"], q.min_position).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM deals WHERE id = $1)")
        .bind(id)
        .fetch_one(&state.pool)
        .await?;
    if !exists {
        return Err(not_found("deal", &raw));
    }
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(e) FROM deal_events e WHERE e.deal_id = $1 \
         ORDER BY e.created_at, e.last_position",
    )
    .bind(id)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({ "deal_id": id, "items": rows })))
}

// ---------------------------------------------------------------------------------------------
// KPIs
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KpiQuery {
    /// First business day (Asia/Dubai), `YYYY-MM-DD`; default 30 days before `to`.
    #[serde(default, deserialize_with = "crate::time::opt_date")]
    pub from: Option<NaiveDate>,
    /// Last business day; default today.
    #[serde(default, deserialize_with = "crate::time::opt_date")]
    pub to: Option<NaiveDate>,
    pub min_position: Option<i64>,
}

/// Daily KPI snapshots over a date range.
#[utoipa::path(
    get,
    path = "/v1/kpis",
    tag = "kpis",
    params(KpiQuery),
    responses(
        (status = 200, description = "`{from, to, items}` of `kpi_snapshots` rows", body = Object),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn kpis(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<KpiQuery>,
) -> ApiResult<Json<Value>> {
    let to =
        q.to.unwrap_or_else(|| (Utc::now() + Duration::hours(4)).date_naive());
    let from = q.from.unwrap_or(to - Duration::days(30));
    if to < from || (to - from).num_days() > 3660 {
        return Err(Problem::validation(
            "to must not be before from, and the range at most ten years",
        ));
    }
    wait(&state, &["kpis"], q.min_position).await?;
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(k) FROM kpi_snapshots k \
         WHERE k.snapshot_date BETWEEN $1 AND $2 ORDER BY k.snapshot_date",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({ "from": from, "to": to, "items": rows })))
}
