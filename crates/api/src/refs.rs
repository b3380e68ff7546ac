//! Looking up outside data before a command is built (the domain cannot read the database):
//! ids behind human codes, reference data (vehicles, staff, drivers, the services catalogue,
//! pipeline stages) and whether an aggregate exists.

use chrono::{DateTime, Utc};
use commands::codes::{self, CodeKind};
use domain::booking::BookingStatus;
use domain::lead::StageRef;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ApiResult, Problem};

/// What an id in a path names.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Booking,
    Lead,
    Deal,
    Client,
}

impl Kind {
    fn prefix(self) -> Option<&'static str> {
        match self {
            Self::Booking => Some("BK-"),
            Self::Lead => Some("LD-"),
            Self::Deal => Some("DL-"),
            Self::Client => None,
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Self::Booking => "booking",
            Self::Lead => "lead",
            Self::Deal => "deal",
            Self::Client => "client",
        }
    }
}

/// A UUID, or a human code of the kind (`BK-1052`) resolved through `commands::codes`.
pub async fn resolve(pool: &PgPool, raw: &str, kind: Kind) -> ApiResult<Uuid> {
    if let Ok(id) = Uuid::parse_str(raw) {
        return Ok(id);
    }
    let noun = kind.noun();
    match kind.prefix() {
        Some(prefix) if raw.to_ascii_uppercase().starts_with(prefix) => {
            codes::resolve(pool, &raw.to_ascii_uppercase())
                .await?
                .ok_or_else(|| {
                    Problem::not_found(format!("no {noun} has the code {raw}"))
                        .with_code(format!("{noun}.not_found"))
                })
        }
        Some(prefix) => Err(Problem::not_found(format!(
            "{raw:?} is neither a {noun} id (UUID) nor a code such as {prefix}1052"
        ))
        .with_code(format!("{noun}.not_found"))),
        None => Err(
            Problem::not_found(format!("{raw:?} is not a {noun} id (UUID)"))
                .with_code(format!("{noun}.not_found")),
        ),
    }
}

/// Whether the aggregate has any event (write-side truth, no projection lag).
pub async fn aggregate_exists(pool: &PgPool, aggregate_type: &str, id: Uuid) -> ApiResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2)",
    )
    .bind(aggregate_type)
    .bind(id.to_string())
    .fetch_one(pool)
    .await?)
}

/// Refuses (422) an id that names no row of a reference table or no aggregate.
pub async fn require(pool: &PgPool, field: &str, what: Ref, id: Uuid) -> ApiResult<()> {
    let exists: bool = match what {
        Ref::Client => return require_aggregate(pool, field, "Client", id).await,
        Ref::Lead => return require_aggregate(pool, field, "Lead", id).await,
        Ref::Vehicle => {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM vehicles WHERE id = $1)")
                .bind(id)
                .fetch_one(pool)
                .await?
        }
        Ref::Staff => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM staff_accounts WHERE id = $1 AND is_active)",
            )
            .bind(id)
            .fetch_one(pool)
            .await?
        }
        Ref::Driver => {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM driver_profiles WHERE id = $1)")
                .bind(id)
                .fetch_one(pool)
                .await?
        }
    };
    if exists {
        Ok(())
    } else {
        Err(unknown(field, what.noun(), id))
    }
}

/// [`require`] for several ids in one round trip; refuses the first missing one, in order.
pub async fn require_all(pool: &PgPool, refs: &[(&str, Ref, Uuid)]) -> ApiResult<()> {
    if refs.is_empty() {
        return Ok(());
    }
    check_all(pool, refs, None).await.map(drop)
}

/// [`require_all`], then the next code of `kind` (`codes::allocate`), in the same round trip. A
/// refused reference takes no number.
pub async fn require_all_and_take_code(
    pool: &PgPool,
    refs: &[(&str, Ref, Uuid)],
    kind: CodeKind,
) -> ApiResult<String> {
    match check_all(pool, refs, Some(kind)).await? {
        Some(n) => Ok(kind.code(n)),
        None => Err(Problem::internal("no code number was taken")),
    }
}

/// Checks `refs` in one statement and, if all exist and `code` is given, takes its next number.
async fn check_all(
    pool: &PgPool,
    refs: &[(&str, Ref, Uuid)],
    code: Option<CodeKind>,
) -> ApiResult<Option<i64>> {
    let checks: Vec<String> = refs
        .iter()
        .enumerate()
        .map(|(i, (_, what, _))| {
            let n = i + 1;
            match what {
                Ref::Client => format!(
                    "EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'Client' \
                       AND aggregate_id = (${n}::uuid)::text)"
                ),
                Ref::Lead => format!(
                    "EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'Lead' \
                       AND aggregate_id = (${n}::uuid)::text)"
                ),
                Ref::Vehicle => format!("EXISTS (SELECT 1 FROM vehicles WHERE id = ${n})"),
                Ref::Staff => {
                    format!("EXISTS (SELECT 1 FROM staff_accounts WHERE id = ${n} AND is_active)")
                }
                Ref::Driver => format!("EXISTS (SELECT 1 FROM driver_profiles WHERE id = ${n})"),
            }
        })
        .collect();
    // `nextval` is volatile: CASE evaluates it only when every reference exists. `OFFSET 0`
    // keeps the checks in their subquery (inlined, they would run twice: once per use).
    let number = match code {
        Some(kind) => format!("nextval('{}')", kind.sequence()),
        None => "NULL::bigint".into(),
    };
    let sql = format!(
        "SELECT found, CASE WHEN true = ALL (found) THEN {number} END \
         FROM (SELECT ARRAY[{}]::bool[] AS found OFFSET 0) AS checks",
        checks.join(", ")
    );
    let mut query = sqlx::query_as::<_, (Vec<bool>, Option<i64>)>(&sql);
    for (_, _, id) in refs {
        query = query.bind(*id);
    }
    let (found, number) = query.fetch_one(pool).await?;
    match refs.iter().zip(found).find(|(_, exists)| !exists) {
        Some(((field, what, id), _)) => Err(unknown(field, what.noun(), *id)),
        None => Ok(number),
    }
}

async fn require_aggregate(
    pool: &PgPool,
    field: &str,
    aggregate_type: &str,
    id: Uuid,
) -> ApiResult<()> {
    if aggregate_exists(pool, aggregate_type, id).await? {
        Ok(())
    } else {
        Err(unknown(field, &aggregate_type.to_ascii_lowercase(), id))
    }
}

fn unknown(field: &str, noun: &str, id: Uuid) -> Problem {
    Problem::validation(format!("{field}: no {noun} has the id {id}"))
        .with_code("request.unknown_reference")
        .with("field", field)
}

/// Reference data an id may name.
#[derive(Debug, Clone, Copy)]
pub enum Ref {
    Client,
    Lead,
    Vehicle,
    /// An active staff account.
    Staff,
    /// A driver profile (`driver_profiles.id`).
    Driver,
}

impl Ref {
    fn noun(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Lead => "lead",
            Self::Vehicle => "vehicle",
            Self::Staff => "active staff account",
            Self::Driver => "driver profile",
        }
    }
}

/// The price of a catalogue service: the given one, else its default price. Unknown or inactive
/// services are refused.
pub async fn service_price(
    pool: &PgPool,
    service_id: Uuid,
    price: Option<Decimal>,
) -> ApiResult<Decimal> {
    let default: Option<Decimal> = sqlx::query_scalar(
        "SELECT default_price FROM additional_services WHERE id = $1 AND is_active",
    )
    .bind(service_id)
    .fetch_optional(pool)
    .await?;
    match (default, price) {
        (None, _) => Err(unknown(
            "service_id",
            "active additional service",
            service_id,
        )),
        (Some(_), Some(p)) => Ok(p),
        (Some(d), None) => Ok(d),
    }
}

/// A pipeline stage by id, as the domain wants it.
pub async fn stage(pool: &PgPool, stage_id: &str) -> ApiResult<Option<StageRef>> {
    let row: Option<(String, Decimal, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, probability, sla_days, booking_status::text FROM sales_pipeline_stages WHERE id = $1",
    )
    .bind(stage_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(stage_ref))
}

/// The stage mapped to a Kommo status id, if any.
pub async fn stage_for_kommo_status(
    pool: &PgPool,
    kommo_status_id: i64,
) -> ApiResult<Option<StageRef>> {
    let row: Option<(String, Decimal, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, probability, sla_days, booking_status::text FROM sales_pipeline_stages \
         WHERE kommo_status_id = $1 ORDER BY order_index LIMIT 1",
    )
    .bind(kommo_status_id.to_string())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(stage_ref))
}

fn stage_ref(
    (id, probability, sla_days, booking_status): (String, Decimal, i32, Option<String>),
) -> StageRef {
    StageRef {
        id,
        probability,
        sla_days,
        booking_status: booking_status.and_then(|s| {
            serde_json::from_value::<BookingStatus>(serde_json::Value::String(s)).ok()
        }),
    }
}

/// Now, for commands that need a time the caller did not give.
pub fn now() -> DateTime<Utc> {
    Utc::now()
}
