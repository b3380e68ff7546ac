//! Human codes: `BK-1052`, `LD-1201`, `DL-101`. Numbers come from database sequences, so they
//! are unique and increasing and never handed out twice, also across API replicas; a number
//! whose command then fails is skipped, never reused. The `entity_codes` table (filled by the
//! events' own transaction) refuses a code that is already taken.

use sqlx::PgExecutor;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    Booking,
    Lead,
    Deal,
}

impl CodeKind {
    /// The sequence its numbers come from.
    pub fn sequence(self) -> &'static str {
        match self {
            Self::Booking => "booking_code_seq",
            Self::Lead => "lead_code_seq",
            Self::Deal => "deal_code_seq",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Self::Booking => "BK",
            Self::Lead => "LD",
            Self::Deal => "DL",
        }
    }
    /// The code of number `n` taken from [`CodeKind::sequence`].
    pub fn code(self, n: i64) -> String {
        format!("{}-{n}", self.prefix())
    }
}

/// Takes the next code of `kind`.
pub async fn allocate<'e, E: PgExecutor<'e>>(
    executor: E,
    kind: CodeKind,
) -> Result<String, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(&format!("SELECT nextval('{}')", kind.sequence()))
        .fetch_one(executor)
        .await?;
    Ok(kind.code(n))
}

/// The aggregate id behind a code such as `BK-1052` (write-side truth, not a read model).
pub async fn resolve<'e, E: PgExecutor<'e>>(
    executor: E,
    code: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let id: Option<String> =
        sqlx::query_scalar("SELECT aggregate_id FROM entity_codes WHERE code = $1")
            .bind(code)
            .fetch_optional(executor)
            .await?;
    Ok(id.and_then(|s| Uuid::parse_str(&s).ok()))
}
