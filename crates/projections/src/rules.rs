//! The exact derivation rules of SPEC §3: client tier and segment, vehicle utilization. Pure
//! functions, so the boundaries are tested as tables.

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Vip,
    Gold,
    Silver,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vip => "vip",
            Self::Gold => "gold",
            Self::Silver => "silver",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Segment {
    PremierLoyalist,
    DormantVip,
    GrowthGold,
    AtRisk,
    NewRising,
    HighValueDormant,
    General,
}

impl Segment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PremierLoyalist => "premier_loyalist",
            Self::DormantVip => "dormant_vip",
            Self::GrowthGold => "growth_gold",
            Self::AtRisk => "at_risk",
            Self::NewRising => "new_rising",
            Self::HighValueDormant => "high_value_dormant",
            Self::General => "general",
        }
    }
}

/// `vip` if LTV >= 50,000; `gold` if LTV >= 35,000; otherwise `silver`.
pub fn tier(ltv: Decimal) -> Tier {
    if ltv >= Decimal::from(50_000) {
        Tier::Vip
    } else if ltv >= Decimal::from(35_000) {
        Tier::Gold
    } else {
        Tier::Silver
    }
}

/// Whole days since the last booking's start: `max(0, now - start_at)`, floored.
pub fn days_since(last_start: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (now - last_start).num_days().max(0)
}

/// The first matching rule of SPEC §3; a client with no (non-cancelled) booking is `general`.
pub fn segment(ltv: Decimal, days_since_last: Option<i64>) -> Segment {
    let Some(days) = days_since_last else {
        return Segment::General;
    };
    let t = tier(ltv);
    if t == Tier::Vip && days <= 30 {
        Segment::PremierLoyalist
    } else if t == Tier::Vip && days > 60 {
        Segment::DormantVip
    } else if t == Tier::Gold && days <= 45 {
        Segment::GrowthGold
    } else if matches!(t, Tier::Gold | Tier::Silver) && days > 90 {
        Segment::AtRisk
    } else if t == Tier::Silver && days <= 30 && ltv < Decimal::from(15_000) {
        Segment::NewRising
    } else if ltv >= Decimal::from(35_000) && days > 45 {
        Segment::HighValueDormant
    } else {
        Segment::General
    }
}

/// A stretch of time, start to end.
pub type Span = (DateTime<Utc>, DateTime<Utc>);

/// The window utilization looks at.
pub const UTILIZATION_WINDOW_DAYS: i64 = 30;

/// The window utilization looks at as of `now`: the last 30 days, start and end. A period
/// outside it counts for nothing.
pub fn utilization_window(now: DateTime<Utc>) -> Span {
    (now - Duration::days(UTILIZATION_WINDOW_DAYS), now)
}

/// The span covering the utilization windows as of each of `instants`: from the earliest one's
/// window start to the latest instant. `None` without instants.
pub fn utilization_windows_cover(
    instants: impl IntoIterator<Item = DateTime<Utc>>,
) -> Option<Span> {
    instants.into_iter().fold(None, |cover, at| {
        let (start, end) = utilization_window(at);
        Some(match cover {
            None => (start, end),
            Some((s, e)) => (start.min(s), end.max(e)),
        })
    })
}

/// Overlap of the periods with the last 30 days, divided by 30 days, clamped to 0..1, rounded to
/// two decimals. Overlapping periods of one vehicle cannot happen (the schedule forbids them),
/// but are merged anyway so the result never exceeds 1.
pub fn utilization(periods: &[(DateTime<Utc>, DateTime<Utc>)], now: DateTime<Utc>) -> Decimal {
    let (window_start, now) = utilization_window(now);
    let mut clipped: Vec<(DateTime<Utc>, DateTime<Utc>)> = periods
        .iter()
        .map(|&(s, e)| (s.max(window_start), e.min(now)))
        .filter(|(s, e)| e > s)
        .collect();
    clipped.sort();
    let mut used = Duration::zero();
    let mut current: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
    for (s, e) in clipped {
        match current {
            Some((cs, ce)) if s <= ce => current = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                used += ce - cs;
                current = Some((s, e));
            }
            None => current = Some((s, e)),
        }
    }
    if let Some((cs, ce)) = current {
        used += ce - cs;
    }
    let window = Duration::days(UTILIZATION_WINDOW_DAYS).num_seconds();
    let ratio = Decimal::from(used.num_seconds()) / Decimal::from(window);
    round(ratio.min(Decimal::ONE), 2)
}

/// Rounds half away from zero, as PostgreSQL's `numeric` does; every figure a projection
/// rounds is rounded so (`round_dp` rounds half to even: a figure would then differ from the
/// same sum shown elsewhere by a cent).
pub fn round(d: Decimal, places: u32) -> Decimal {
    d.round_dp_with_strategy(places, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
}

/// A booking's outstanding amount: `total - paid`, never below zero (the booking's own rule,
/// SPEC §2).
pub fn outstanding(total: Decimal, paid: Decimal) -> Decimal {
    (total - paid).max(Decimal::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn tier_boundaries() {
        for (ltv, expected) in [
            ("0", Tier::Silver),
            ("34999.99", Tier::Silver),
            ("35000", Tier::Gold),
            ("49999.99", Tier::Gold),
            ("50000", Tier::Vip),
            ("50000.01", Tier::Vip),
        ] {
            assert_eq!(tier(d(ltv)), expected, "LTV {ltv}");
        }
    }

    #[test]
    fn segment_boundaries() {
        use Segment::*;
        let table: &[(&str, Option<i64>, Segment)] = &[
            // No bookings.
            ("0", None, General),
            // VIP: <= 30 loyal, 31..60 general (or high-value dormant past 45), > 60 dormant.
            ("50000", Some(0), PremierLoyalist),
            ("50000", Some(30), PremierLoyalist),
            ("50000", Some(31), General),
            ("50000", Some(45), General),
            ("50000", Some(46), HighValueDormant),
            ("50000", Some(60), HighValueDormant),
            ("50000", Some(61), DormantVip),
            ("49999.99", Some(10), GrowthGold),
            // Gold: <= 45 growth, 46..90 high-value dormant, > 90 at risk.
            ("35000", Some(45), GrowthGold),
            ("35000", Some(46), HighValueDormant),
            ("35000", Some(90), HighValueDormant),
            ("35000", Some(91), AtRisk),
            // Silver: <= 30 and LTV < 15,000 new and rising; > 90 at risk.
            ("14999.99", Some(30), NewRising),
            ("15000", Some(30), General),
            ("14999.99", Some(31), General),
            ("34999.99", Some(90), General),
            ("34999.99", Some(91), AtRisk),
            ("100", Some(91), AtRisk),
        ];
        for (ltv, days, expected) in table {
            assert_eq!(
                segment(d(ltv), *days),
                *expected,
                "LTV {ltv}, {days:?} days"
            );
        }
    }

    #[test]
    fn days_since_counts_whole_days_and_upcoming_bookings_as_zero() {
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
        assert_eq!(days_since(now + Duration::days(5), now), 0);
        assert_eq!(days_since(now - Duration::hours(23), now), 0);
        assert_eq!(days_since(now - Duration::hours(24), now), 1);
        assert_eq!(
            days_since(now - Duration::days(30) - Duration::hours(23), now),
            30
        );
        assert_eq!(days_since(now - Duration::days(31), now), 31);
    }

    #[test]
    fn utilization_is_the_share_of_the_last_30_days() {
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let ago = |days: i64| now - Duration::days(days);
        let cases: &[(&[(i64, i64)], &str)] = &[
            (&[], "0"),
            (&[(30, 0)], "1"),
            (&[(45, 0)], "1"),
            (&[(15, 0)], "0.5"),
            (&[(40, 29)], "0.03"),
            (&[(40, 30)], "0"),
            // A future booking does not count yet.
            (&[(-1, -5)], "0"),
            (&[(10, 5), (3, 0)], "0.27"),
            // Overlaps (impossible by the schedule) are merged, never above 1.
            (&[(30, 0), (20, 10)], "1"),
            (&[(1, 0)], "0.03"),
        ];
        for (periods, expected) in cases {
            let p: Vec<_> = periods.iter().map(|&(s, e)| (ago(s), ago(e))).collect();
            assert_eq!(utilization(&p, now), d(expected), "{periods:?}");
        }
    }

    #[test]
    fn the_cover_of_several_windows_runs_from_the_earliest_start_to_the_latest_instant() {
        let first = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let last = first + Duration::days(10);
        assert_eq!(utilization_windows_cover([]), None);
        assert_eq!(
            utilization_windows_cover([last, first, first + Duration::days(3)]),
            Some((first - Duration::days(30), last))
        );
        // Every period one of the windows counts lies inside the cover.
        for at in [first, last] {
            let (start, end) = utilization_window(at);
            let (from, to) = utilization_windows_cover([first, last]).unwrap();
            assert!(from <= start && end <= to);
        }
    }
}
