//! Value types built by a `parse` that can fail ("parse, don't validate").

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A rule broken by an input value: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A non-negative amount with at most two decimals (`numeric(12,2)`), in the booking's currency.
/// Always carried with scale 2 and serialized with cents (`"0.00"`, never `"0"`), so equal
/// amounts serialize identically however they were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "Decimal")]
pub struct Money(Decimal);

impl Default for Money {
    fn default() -> Self {
        Self::ZERO
    }
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // rust_decimal prints a zero without its scale ("0"); write every amount with cents.
        let mut v = self.0;
        v.rescale(2);
        let text = if v.is_zero() {
            "0.00".to_string()
        } else {
            v.to_string()
        };
        serializer.serialize_str(&text)
    }
}

impl Money {
    pub const ZERO: Self = Self(Decimal::from_parts(0, 0, 0, false, 2));

    pub fn parse(field: &str, value: Decimal) -> Result<Self, ValidationError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(ValidationError::new(field, "must not be negative"));
        }
        if value.normalize().scale() > 2 {
            return Err(ValidationError::new(
                field,
                "must have at most two decimals",
            ));
        }
        if value > Decimal::new(999_999_999_999, 2) {
            return Err(ValidationError::new(field, "is too large"));
        }
        let mut v = value;
        v.rescale(2);
        Ok(Self(v))
    }

    pub fn amount(self) -> Decimal {
        self.0
    }

    pub fn checked_add(self, other: Self) -> Option<Self> {
        Self::parse("amount", self.0.checked_add(other.0)?).ok()
    }

    pub fn saturating_sub(self, other: Self) -> Self {
        let mut v = (self.0 - other.0).max(Decimal::ZERO);
        v.rescale(2);
        Self(v)
    }

    pub fn times(self, n: i64) -> Option<Self> {
        Self::parse("amount", self.0.checked_mul(Decimal::from(n))?).ok()
    }
}

impl TryFrom<Decimal> for Money {
    type Error = ValidationError;
    fn try_from(value: Decimal) -> Result<Self, Self::Error> {
        Self::parse("amount", value)
    }
}

impl From<Money> for Decimal {
    fn from(m: Money) -> Self {
        m.0
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

const DAY_SECONDS: i64 = 24 * 60 * 60;

/// A time span with `end_at > start_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Period {
    pub start_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
}

impl Period {
    pub fn parse(start_at: DateTime<Utc>, end_at: DateTime<Utc>) -> Result<Self, ValidationError> {
        if end_at <= start_at {
            return Err(ValidationError::new("end_at", "must be after start_at"));
        }
        Ok(Self { start_at, end_at })
    }

    /// `ceil((end_at - start_at) / 24h)`: a rental of 24h01m is two days.
    pub fn duration_days(&self) -> i64 {
        let secs = (self.end_at - self.start_at).num_seconds();
        let extra = i64::from((self.end_at - self.start_at).subsec_nanos() > 0);
        let secs = secs + extra;
        (secs + DAY_SECONDS - 1) / DAY_SECONDS
    }

    pub fn overlaps(&self, other: &Period) -> bool {
        self.start_at < other.end_at && other.start_at < self.end_at
    }
}

/// Trims and requires a non-empty text.
pub fn required_text(field: &str, value: &str) -> Result<String, ValidationError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if v.chars().count() > 2000 {
        return Err(ValidationError::new(
            field,
            "is too long (at most 2000 characters)",
        ));
    }
    Ok(v.to_string())
}

/// Trims an optional text; empty becomes `None`.
pub fn optional_text(field: &str, value: Option<&str>) -> Result<Option<String>, ValidationError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => required_text(field, v).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    #[test]
    fn duration_rounds_partial_days_up() {
        for (hours, days) in [(1, 1), (24, 1), (25, 2), (48, 2), (49, 3), (24 * 7, 7)] {
            assert_eq!(
                Period::parse(at(0), at(hours)).unwrap().duration_days(),
                days,
                "{hours}h"
            );
        }
        let p = Period::parse(at(0), at(24) + chrono::Duration::seconds(1)).unwrap();
        assert_eq!(p.duration_days(), 2);
    }

    #[test]
    fn a_period_must_end_after_it_starts() {
        assert!(Period::parse(at(5), at(5)).is_err());
        assert!(Period::parse(at(5), at(4)).is_err());
    }

    #[test]
    fn money_serializes_the_same_however_it_was_made() {
        let json = |m: Money| serde_json::to_string(&m).unwrap();
        assert_eq!(
            json(Money::default()),
            json(Money::parse("x", Decimal::ZERO).unwrap())
        );
        let round_trip: Money = serde_json::from_str(&json(Money::ZERO)).unwrap();
        assert_eq!(json(round_trip), "\"0.00\"");
    }

    #[test]
    fn money_refuses_negative_and_sub_cent_amounts() {
        assert!(Money::parse("x", Decimal::new(-1, 2)).is_err());
        assert!(Money::parse("x", Decimal::new(1001, 3)).is_err());
        assert_eq!(
            Money::parse("x", Decimal::new(1000, 3)).unwrap().amount(),
            Decimal::new(100, 2)
        );
        assert!(Money::parse("x", Decimal::new(1_000_000_000_000, 2)).is_err());
    }

    proptest! {
        #[test]
        fn duration_is_the_smallest_whole_number_of_days_covering_the_period(
            start in 0i64..1_000_000, len in 1i64..10_000_000
        ) {
            let s = at(0) + chrono::Duration::seconds(start);
            let p = Period::parse(s, s + chrono::Duration::seconds(len)).unwrap();
            let d = p.duration_days();
            prop_assert!(d * DAY_SECONDS >= len);
            prop_assert!((d - 1) * DAY_SECONDS < len);
        }

        #[test]
        fn money_parses_every_cent_amount_and_keeps_it(cents in 0i64..99_999_999_999) {
            let m = Money::parse("x", Decimal::new(cents, 2)).unwrap();
            prop_assert_eq!(m.amount(), Decimal::new(cents, 2));
        }
    }
}
