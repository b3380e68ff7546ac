//! Times and dates from outside: every one the API takes lies within [`EARLIEST`, `LATEST`).
//!
//! chrono reads years from -262143 to +262142, PostgreSQL stores years 1 to 294276 (and reads
//! none with a sign or of five digits as chrono writes them): a time outside the business's range
//! would be stored in an event and then stop every projection that writes it. Used as
//! `#[serde(deserialize_with = "crate::time::instant")]` (`opt_instant`, `date`, `opt_date` for
//! the others; `Option`s also need `default`), so a value out of range is a 422 like any other
//! that does not fit.

use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, de::Error};

/// The first day a time or date may fall on.
pub const EARLIEST: NaiveDate = NaiveDate::from_ymd_opt(1900, 1, 1).expect("a valid date");
/// The first day after the last a time or date may fall on.
pub const LATEST: NaiveDate = NaiveDate::from_ymd_opt(2200, 1, 1).expect("a valid date");

fn in_range<E: Error>(day: NaiveDate) -> Result<(), E> {
    if (EARLIEST..LATEST).contains(&day) {
        Ok(())
    } else {
        Err(E::custom(format_args!(
            "{day} is out of range: times and dates must fall within {EARLIEST} and {}",
            LATEST.pred_opt().unwrap_or(LATEST)
        )))
    }
}

/// An RFC 3339 time within the range, to the microsecond.
///
/// PostgreSQL keeps microseconds: a finer time would be one thing in the event (a period of
/// 24 hours and 400 ns is two rental days) and another in the read models (exactly one day), so
/// it is rounded here, as PostgreSQL would round it, before anything decides on it.
pub fn instant<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let t = DateTime::<Utc>::deserialize(d)?.round_subsecs(6);
    in_range(t.date_naive())?;
    Ok(t)
}

/// An optional RFC 3339 time within the range, to the microsecond (as [`instant`]).
pub fn opt_instant<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let t = Option::<DateTime<Utc>>::deserialize(d)?.map(|t| t.round_subsecs(6));
    if let Some(t) = t {
        in_range(t.date_naive())?;
    }
    Ok(t)
}

/// A `YYYY-MM-DD` date within the range.
pub fn date<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveDate, D::Error> {
    let day = NaiveDate::deserialize(d)?;
    in_range(day)?;
    Ok(day)
}

/// An optional `YYYY-MM-DD` date within the range.
pub fn opt_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NaiveDate>, D::Error> {
    let day = Option::<NaiveDate>::deserialize(d)?;
    if let Some(day) = day {
        in_range(day)?;
    }
    Ok(day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Body {
        #[serde(deserialize_with = "instant")]
        at: DateTime<Utc>,
        #[serde(default, deserialize_with = "opt_date")]
        day: Option<NaiveDate>,
    }

    fn parse(json: &str) -> Result<Body, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn times_and_dates_out_of_the_business_range_are_refused_naming_it() {
        for json in [
            r#"{"at": "-10000-01-01T00:00:00Z"}"#,
            r#"{"at": "0000-06-01T00:00:00Z"}"#,
            r#"{"at": "+10000-01-01T00:00:00Z"}"#,
            r#"{"at": "2200-01-01T00:00:00Z"}"#,
            r#"{"at": "2026-01-01T00:00:00Z", "day": "1899-12-31"}"#,
        ] {
            let err = parse(json).expect_err(json);
            assert!(err.contains("out of range"), "{json}: {err}");
            assert!(err.contains("1900-01-01 and 2199-12-31"), "{err}");
        }
        let ok = parse(r#"{"at": "2199-12-31T23:59:59+00:00", "day": "1900-01-01"}"#).unwrap();
        assert_eq!(
            (ok.day, ok.at.date_naive()),
            (Some(EARLIEST), LATEST.pred_opt().unwrap())
        );
        // A time just past midnight UTC of the first day, given in an earlier offset.
        assert!(parse(r#"{"at": "1899-12-31T23:00:00-02:00"}"#).is_ok());
        assert!(
            parse(r#"{"at": "2026-01-01T00:00:00Z"}"#)
                .unwrap()
                .day
                .is_none()
        );
    }

    #[test]
    fn times_are_kept_to_the_microsecond_as_postgresql_keeps_them() {
        let at = |json: &str| parse(json).unwrap().at.to_rfc3339();
        assert_eq!(
            at(r#"{"at": "2026-03-02T10:00:00.0000004Z"}"#),
            "2026-03-02T10:00:00+00:00"
        );
        assert_eq!(
            at(r#"{"at": "2026-03-02T10:00:00.123456789Z"}"#),
            "2026-03-02T10:00:00.123457+00:00"
        );
        // Rounding up may reach the next day, checked against the range after it.
        assert_eq!(
            at(r#"{"at": "2199-12-31T23:59:59.9999999Z"}"#.replace("2199", "2026").as_str()),
            "2027-01-01T00:00:00+00:00"
        );
        assert!(parse(r#"{"at": "2199-12-31T23:59:59.9999999Z"}"#).is_err());
    }
}
