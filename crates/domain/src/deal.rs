//! The Deal aggregate: a financing or leasing contract for a client (SPEC §2).
//!
//! Status: `draft -> active -> completed`, `active -> defaulted`, `draft -> cancelled`. Payments
//! and missed payments are recorded only while the deal is active; a payment is identified by
//! its `payment_id` and a missed payment by its `due_date`, so a retried command is a no-op.
//! `deal_events` is the audit projection of the events below.

use chrono::{DateTime, NaiveDate, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::types::{Money, ValidationError, required_text};
use crate::{DomainError, ErrorKind};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DealStatus {
    #[default]
    Draft,
    Active,
    Completed,
    Defaulted,
    Cancelled,
}

impl DealStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Defaulted => "defaulted",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Defaulted | Self::Cancelled)
    }
}

impl std::fmt::Display for DealStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest contract accepted, in months (ten years).
pub const MAX_TERM_MONTHS: i32 = 120;

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Deal commands: raw inputs; the aggregate parses them into value types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DealCommand {
    Draft {
        /// `DL-...`, allocated by the caller (a database sequence) before the command.
        deal_number: String,
        client_id: Uuid,
        vehicle_id: Option<Uuid>,
        application_id: Option<Uuid>,
        principal_amount: Decimal,
        monthly_payment: Decimal,
        /// Yearly interest, in percent (`0..=100`).
        interest_rate: Decimal,
        security_deposit: Decimal,
        term_months: i32,
        contract_start_date: NaiveDate,
        contract_end_date: NaiveDate,
        first_payment_date: NaiveDate,
        /// Free-form contract terms; a JSON object when present.
        contract_terms: Option<serde_json::Value>,
    },
    Activate,
    RecordPayment {
        /// Chosen by the caller so that a retried command names the same payment.
        payment_id: Uuid,
        amount: Decimal,
        paid_at: DateTime<Utc>,
    },
    RecordMissedPayment {
        due_date: NaiveDate,
        amount: Decimal,
    },
    MarkDefaulted {
        reason: String,
    },
    Complete,
    Cancel {
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// Deal events. The variant name is the stored `event_type` and never changes; a change of
/// shape bumps `event_version` and gets an upcaster (see `crate::upcasting`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DealEvent {
    DealDrafted {
        deal_number: String,
        client_id: Uuid,
        vehicle_id: Option<Uuid>,
        application_id: Option<Uuid>,
        principal_amount: Money,
        monthly_payment: Money,
        interest_rate: Decimal,
        security_deposit: Money,
        term_months: i32,
        contract_start_date: NaiveDate,
        contract_end_date: NaiveDate,
        first_payment_date: NaiveDate,
        contract_terms: Option<serde_json::Value>,
    },
    /// Has no fields, but is a struct variant so that its payload is an object like the others.
    DealActivated {},
    DealPaymentRecorded {
        payment_id: Uuid,
        amount: Money,
        paid_at: DateTime<Utc>,
        /// Sum of all payments so far, this one included.
        total_paid: Money,
    },
    DealPaymentMissed {
        due_date: NaiveDate,
        amount: Money,
        /// Number of missed payments so far, this one included.
        missed_payments: i32,
    },
    DealDefaulted {
        reason: String,
    },
    DealCompleted {
        total_paid: Money,
    },
    DealCancelled {
        reason: String,
    },
}

impl DomainEvent for DealEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::DealDrafted { .. } => "DealDrafted",
            Self::DealActivated { .. } => "DealActivated",
            Self::DealPaymentRecorded { .. } => "DealPaymentRecorded",
            Self::DealPaymentMissed { .. } => "DealPaymentMissed",
            Self::DealDefaulted { .. } => "DealDefaulted",
            Self::DealCompleted { .. } => "DealCompleted",
            Self::DealCancelled { .. } => "DealCancelled",
        };
        name.to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DealError {
    #[error("the deal does not exist")]
    NotFound,
    #[error("the deal already exists")]
    AlreadyExists,
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("cannot {action} a deal that is {status}")]
    InvalidTransition {
        action: &'static str,
        status: DealStatus,
    },
}

impl DomainError for DealError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists => ErrorKind::Conflict,
            Self::Validation(_) => ErrorKind::Validation,
            Self::InvalidTransition { .. } => ErrorKind::InvalidTransition,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "deal.not_found",
            Self::AlreadyExists => "deal.already_exists",
            Self::Validation(_) => "deal.validation",
            Self::InvalidTransition { .. } => "deal.invalid_transition",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// The deal's state, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Deal {
    pub created: bool,
    pub deal_number: String,
    pub status: DealStatus,
    pub client_id: Uuid,
    pub vehicle_id: Option<Uuid>,
    pub application_id: Option<Uuid>,
    pub principal_amount: Money,
    pub monthly_payment: Money,
    pub interest_rate: Decimal,
    pub security_deposit: Money,
    pub term_months: i32,
    pub contract_start_date: Option<NaiveDate>,
    pub contract_end_date: Option<NaiveDate>,
    pub first_payment_date: Option<NaiveDate>,
    pub contract_terms: Option<serde_json::Value>,
    pub total_paid: Money,
    /// Ids of the payments recorded, for idempotency.
    pub payment_ids: Vec<Uuid>,
    /// Due dates of the missed payments recorded, for idempotency.
    pub missed_due_dates: Vec<NaiveDate>,
    pub missed_payments: i32,
    pub default_reason: Option<String>,
    pub cancel_reason: Option<String>,
}

impl Deal {
    fn require(&self, action: &'static str, allowed: &[DealStatus]) -> Result<(), DealError> {
        if !self.created {
            return Err(DealError::NotFound);
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(DealError::InvalidTransition {
                action,
                status: self.status,
            })
        }
    }
}

/// A money amount that must be above zero.
fn positive_money(field: &str, value: Decimal) -> Result<Money, ValidationError> {
    let m = Money::parse(field, value)?;
    if m == Money::ZERO {
        return Err(ValidationError::new(field, "must be positive"));
    }
    Ok(m)
}

/// A yearly interest rate in percent: `0..=100`, at most four decimals.
fn parse_interest_rate(value: Decimal) -> Result<Decimal, ValidationError> {
    if value < Decimal::ZERO || value > Decimal::ONE_HUNDRED {
        return Err(ValidationError::new(
            "interest_rate",
            "must be between 0 and 100 (percent)",
        ));
    }
    let v = value.normalize();
    if v.scale() > 4 {
        return Err(ValidationError::new(
            "interest_rate",
            "must have at most four decimals",
        ));
    }
    Ok(v)
}

fn parse_term_months(value: i32) -> Result<i32, ValidationError> {
    if !(1..=MAX_TERM_MONTHS).contains(&value) {
        return Err(ValidationError::new(
            "term_months",
            format!("must be between 1 and {MAX_TERM_MONTHS}"),
        ));
    }
    Ok(value)
}

fn parse_contract_terms(
    value: Option<serde_json::Value>,
) -> Result<Option<serde_json::Value>, ValidationError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_object() => Ok(Some(v)),
        Some(_) => Err(ValidationError::new(
            "contract_terms",
            "must be a JSON object",
        )),
    }
}

use DealStatus as S;

impl Aggregate for Deal {
    const TYPE: &'static str = "Deal";
    type Command = DealCommand;
    type Event = DealEvent;
    type Error = DealError;
    type Services = ();

    async fn handle(
        &mut self,
        command: DealCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), DealError> {
        let event = match command {
            DealCommand::Draft {
                deal_number,
                client_id,
                vehicle_id,
                application_id,
                principal_amount,
                monthly_payment,
                interest_rate,
                security_deposit,
                term_months,
                contract_start_date,
                contract_end_date,
                first_payment_date,
                contract_terms,
            } => {
                if self.created {
                    return Err(DealError::AlreadyExists);
                }
                if contract_end_date <= contract_start_date {
                    return Err(ValidationError::new(
                        "contract_end_date",
                        "must be after contract_start_date",
                    )
                    .into());
                }
                if first_payment_date < contract_start_date
                    || first_payment_date > contract_end_date
                {
                    return Err(ValidationError::new(
                        "first_payment_date",
                        "must be within the contract dates",
                    )
                    .into());
                }
                DealEvent::DealDrafted {
                    deal_number: required_text("deal_number", &deal_number)?,
                    client_id,
                    vehicle_id,
                    application_id,
                    principal_amount: positive_money("principal_amount", principal_amount)?,
                    monthly_payment: positive_money("monthly_payment", monthly_payment)?,
                    interest_rate: parse_interest_rate(interest_rate)?,
                    security_deposit: Money::parse("security_deposit", security_deposit)?,
                    term_months: parse_term_months(term_months)?,
                    contract_start_date,
                    contract_end_date,
                    first_payment_date,
                    contract_terms: parse_contract_terms(contract_terms)?,
                }
            }
            DealCommand::Activate => {
                self.require("activate", &[S::Draft])?;
                DealEvent::DealActivated {}
            }
            DealCommand::RecordPayment {
                payment_id,
                amount,
                paid_at,
            } => {
                if !self.created {
                    return Err(DealError::NotFound);
                }
                if self.payment_ids.contains(&payment_id) {
                    return Ok(());
                }
                self.require("record a payment on", &[S::Active])?;
                let amount = positive_money("amount", amount)?;
                let total_paid = self
                    .total_paid
                    .checked_add(amount)
                    .ok_or_else(|| ValidationError::new("amount", "is too large"))?;
                DealEvent::DealPaymentRecorded {
                    payment_id,
                    amount,
                    paid_at,
                    total_paid,
                }
            }
            DealCommand::RecordMissedPayment { due_date, amount } => {
                if !self.created {
                    return Err(DealError::NotFound);
                }
                if self.missed_due_dates.contains(&due_date) {
                    return Ok(());
                }
                self.require("record a missed payment on", &[S::Active])?;
                let amount = positive_money("amount", amount)?;
                if self.first_payment_date.is_some_and(|d| due_date < d)
                    || self.contract_end_date.is_some_and(|d| due_date > d)
                {
                    return Err(ValidationError::new(
                        "due_date",
                        "must be between the first payment date and the contract end date",
                    )
                    .into());
                }
                DealEvent::DealPaymentMissed {
                    due_date,
                    amount,
                    missed_payments: self.missed_payments.saturating_add(1),
                }
            }
            DealCommand::MarkDefaulted { reason } => {
                self.require("mark as defaulted", &[S::Active])?;
                DealEvent::DealDefaulted {
                    reason: required_text("reason", &reason)?,
                }
            }
            DealCommand::Complete => {
                self.require("complete", &[S::Active])?;
                DealEvent::DealCompleted {
                    total_paid: self.total_paid,
                }
            }
            DealCommand::Cancel { reason } => {
                self.require("cancel", &[S::Draft])?;
                DealEvent::DealCancelled {
                    reason: required_text("reason", &reason)?,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: DealEvent) {
        use DealEvent as E;
        match event {
            E::DealDrafted {
                deal_number,
                client_id,
                vehicle_id,
                application_id,
                principal_amount,
                monthly_payment,
                interest_rate,
                security_deposit,
                term_months,
                contract_start_date,
                contract_end_date,
                first_payment_date,
                contract_terms,
            } => {
                *self = Self {
                    created: true,
                    deal_number,
                    status: S::Draft,
                    client_id,
                    vehicle_id,
                    application_id,
                    principal_amount,
                    monthly_payment,
                    interest_rate,
                    security_deposit,
                    term_months,
                    contract_start_date: Some(contract_start_date),
                    contract_end_date: Some(contract_end_date),
                    first_payment_date: Some(first_payment_date),
                    contract_terms,
                    ..Self::default()
                };
            }
            E::DealActivated {} => self.status = S::Active,
            E::DealPaymentRecorded {
                payment_id,
                total_paid,
                ..
            } => {
                self.payment_ids.push(payment_id);
                self.total_paid = total_paid;
            }
            E::DealPaymentMissed {
                due_date,
                missed_payments,
                ..
            } => {
                self.missed_due_dates.push(due_date);
                self.missed_payments = missed_payments;
            }
            E::DealDefaulted { reason } => {
                self.status = S::Defaulted;
                self.default_reason = Some(reason);
            }
            E::DealCompleted { total_paid } => {
                self.status = S::Completed;
                self.total_paid = total_paid;
            }
            E::DealCancelled { reason } => {
                self.status = S::Cancelled;
                self.cancel_reason = Some(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use cqrs_es::test::{AggregateResultValidator, TestFramework};
    use serde_json::json;

    type Deals = TestFramework<Deal>;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn money(s: &str) -> Money {
        Money::parse("x", dec(s)).unwrap()
    }

    fn client_id() -> Uuid {
        Uuid::from_u128(1)
    }

    fn vehicle_id() -> Uuid {
        Uuid::from_u128(2)
    }

    fn draft_cmd() -> DealCommand {
        DealCommand::Draft {
            deal_number: " DL-1001 ".into(),
            client_id: client_id(),
            vehicle_id: Some(vehicle_id()),
            application_id: None,
            principal_amount: dec("120000"),
            monthly_payment: dec("5500.50"),
            interest_rate: dec("4.50"),
            security_deposit: dec("0"),
            term_months: 24,
            contract_start_date: date(2026, 1, 1),
            contract_end_date: date(2027, 12, 31),
            first_payment_date: date(2026, 2, 1),
            contract_terms: Some(json!({"mileage_limit_km": 30000})),
        }
    }

    fn drafted() -> DealEvent {
        DealEvent::DealDrafted {
            deal_number: "DL-1001".into(),
            client_id: client_id(),
            vehicle_id: Some(vehicle_id()),
            application_id: None,
            principal_amount: money("120000"),
            monthly_payment: money("5500.50"),
            interest_rate: dec("4.5"),
            security_deposit: Money::ZERO,
            term_months: 24,
            contract_start_date: date(2026, 1, 1),
            contract_end_date: date(2027, 12, 31),
            first_payment_date: date(2026, 2, 1),
            contract_terms: Some(json!({"mileage_limit_km": 30000})),
        }
    }

    fn activated() -> DealEvent {
        DealEvent::DealActivated {}
    }

    fn paid_at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 2, 1, 10, 0, 0).unwrap()
    }

    fn payment(id: u128, amount: &str, total: &str) -> DealEvent {
        DealEvent::DealPaymentRecorded {
            payment_id: Uuid::from_u128(id),
            amount: money(amount),
            paid_at: paid_at(),
            total_paid: money(total),
        }
    }

    fn pay_cmd(id: u128, amount: &str) -> DealCommand {
        DealCommand::RecordPayment {
            payment_id: Uuid::from_u128(id),
            amount: dec(amount),
            paid_at: paid_at(),
        }
    }

    fn missed_cmd(due: NaiveDate, amount: &str) -> DealCommand {
        DealCommand::RecordMissedPayment {
            due_date: due,
            amount: dec(amount),
        }
    }

    fn with_draft(f: impl FnOnce(&mut DealCommand)) -> DealCommand {
        let mut c = draft_cmd();
        f(&mut c);
        c
    }

    trait ThenInvalid {
        fn then_expect_invalid(self, field: &str);
    }

    impl ThenInvalid for AggregateResultValidator<Deal> {
        /// Expects a validation error on `field`.
        fn then_expect_invalid(self, field: &str) {
            match self.inspect_result() {
                Err(DealError::Validation(e)) => assert_eq!(e.field, field, "{e}"),
                other => panic!("expected a validation error on {field}, got {other:?}"),
            }
        }
    }

    fn transition(action: &'static str, status: DealStatus) -> DealError {
        DealError::InvalidTransition { action, status }
    }

    /// Events that bring a deal to each status.
    fn history(status: DealStatus) -> Vec<DealEvent> {
        match status {
            S::Draft => vec![drafted()],
            S::Active => vec![drafted(), activated()],
            S::Completed => vec![
                drafted(),
                activated(),
                DealEvent::DealCompleted {
                    total_paid: Money::ZERO,
                },
            ],
            S::Defaulted => vec![
                drafted(),
                activated(),
                DealEvent::DealDefaulted {
                    reason: "stopped paying".into(),
                },
            ],
            S::Cancelled => vec![
                drafted(),
                DealEvent::DealCancelled {
                    reason: "client withdrew".into(),
                },
            ],
        }
    }

    const ALL: [DealStatus; 5] = [
        S::Draft,
        S::Active,
        S::Completed,
        S::Defaulted,
        S::Cancelled,
    ];

    /// Checks that `command` is refused as an invalid transition in every status but `allowed`.
    fn refused_outside(allowed: &[DealStatus], action: &'static str, command: &DealCommand) {
        for status in ALL.into_iter().filter(|s| !allowed.contains(s)) {
            Deals::with(())
                .given(history(status))
                .when(command.clone())
                .then_expect_error(transition(action, status));
        }
    }

    // --- draft ---

    #[test]
    fn drafting_records_the_parsed_terms() {
        Deals::with(())
            .given_no_previous_events()
            .when(draft_cmd())
            .then_expect_events(vec![drafted()]);
    }

    #[test]
    fn drafting_twice_is_refused() {
        Deals::with(())
            .given(vec![drafted()])
            .when(draft_cmd())
            .then_expect_error(DealError::AlreadyExists);
    }

    #[test]
    fn drafting_allows_a_deal_without_terms_or_vehicle_and_a_zero_rate() {
        let c = with_draft(|c| {
            if let DealCommand::Draft {
                vehicle_id,
                contract_terms,
                interest_rate,
                first_payment_date,
                ..
            } = c
            {
                *vehicle_id = None;
                *contract_terms = None;
                *interest_rate = dec("0");
                *first_payment_date = date(2027, 12, 31);
            }
        });
        let events = Deals::with(())
            .given_no_previous_events()
            .when(c)
            .inspect_result()
            .unwrap();
        assert!(matches!(
            &events[..],
            [DealEvent::DealDrafted {
                vehicle_id: None,
                contract_terms: None,
                ..
            }]
        ));
    }

    #[test]
    fn drafting_refuses_bad_dates() {
        for (start, end, first, field) in [
            // end on start
            (
                date(2026, 1, 1),
                date(2026, 1, 1),
                date(2026, 1, 1),
                "contract_end_date",
            ),
            // end before start
            (
                date(2026, 1, 1),
                date(2025, 12, 1),
                date(2026, 1, 1),
                "contract_end_date",
            ),
            // first payment before start
            (
                date(2026, 1, 1),
                date(2027, 1, 1),
                date(2025, 12, 31),
                "first_payment_date",
            ),
            // first payment after end
            (
                date(2026, 1, 1),
                date(2027, 1, 1),
                date(2027, 1, 2),
                "first_payment_date",
            ),
        ] {
            let c = with_draft(|c| {
                if let DealCommand::Draft {
                    contract_start_date,
                    contract_end_date,
                    first_payment_date,
                    ..
                } = c
                {
                    *contract_start_date = start;
                    *contract_end_date = end;
                    *first_payment_date = first;
                }
            });
            Deals::with(())
                .given_no_previous_events()
                .when(c)
                .then_expect_invalid(field);
        }
    }

    #[test]
    fn drafting_refuses_zero_negative_and_sub_cent_money() {
        type Setter = fn(&mut DealCommand, Decimal);
        let setters: [(&str, Setter); 3] = [
            ("principal_amount", |c, v| {
                if let DealCommand::Draft {
                    principal_amount, ..
                } = c
                {
                    *principal_amount = v;
                }
            }),
            ("monthly_payment", |c, v| {
                if let DealCommand::Draft {
                    monthly_payment, ..
                } = c
                {
                    *monthly_payment = v;
                }
            }),
            ("security_deposit", |c, v| {
                if let DealCommand::Draft {
                    security_deposit, ..
                } = c
                {
                    *security_deposit = v;
                }
            }),
        ];
        for (field, set) in setters {
            let mut bad = vec!["-1", "0.001"];
            if field != "security_deposit" {
                bad.push("0");
            }
            for v in bad {
                let c = with_draft(|c| set(c, dec(v)));
                Deals::with(())
                    .given_no_previous_events()
                    .when(c)
                    .then_expect_invalid(field);
            }
        }
    }

    #[test]
    fn drafting_refuses_an_interest_rate_outside_zero_to_one_hundred() {
        for v in ["-0.01", "100.01", "250", "1.00001"] {
            let c = with_draft(|c| {
                if let DealCommand::Draft { interest_rate, .. } = c {
                    *interest_rate = dec(v);
                }
            });
            Deals::with(())
                .given_no_previous_events()
                .when(c)
                .then_expect_invalid("interest_rate");
        }
        let c = with_draft(|c| {
            if let DealCommand::Draft { interest_rate, .. } = c {
                *interest_rate = dec("100");
            }
        });
        assert!(
            Deals::with(())
                .given_no_previous_events()
                .when(c)
                .inspect_result()
                .is_ok()
        );
    }

    #[test]
    fn drafting_refuses_a_term_outside_one_to_one_hundred_twenty_months() {
        for v in [0, -1, 121] {
            let c = with_draft(|c| {
                if let DealCommand::Draft { term_months, .. } = c {
                    *term_months = v;
                }
            });
            Deals::with(())
                .given_no_previous_events()
                .when(c)
                .then_expect_invalid("term_months");
        }
    }

    #[test]
    fn drafting_refuses_contract_terms_that_are_not_an_object() {
        for v in [json!([1, 2]), json!("terms"), json!(null), json!(3)] {
            let c = with_draft(|c| {
                if let DealCommand::Draft { contract_terms, .. } = c {
                    *contract_terms = Some(v.clone());
                }
            });
            Deals::with(())
                .given_no_previous_events()
                .when(c)
                .then_expect_invalid("contract_terms");
        }
    }

    #[test]
    fn drafting_refuses_a_blank_deal_number() {
        let c = with_draft(|c| {
            if let DealCommand::Draft { deal_number, .. } = c {
                *deal_number = "  ".into();
            }
        });
        Deals::with(())
            .given_no_previous_events()
            .when(c)
            .then_expect_invalid("deal_number");
    }

    // --- not found ---

    #[test]
    fn every_command_before_the_draft_is_not_found() {
        for c in [
            DealCommand::Activate,
            pay_cmd(1, "100"),
            missed_cmd(date(2026, 3, 1), "100"),
            DealCommand::MarkDefaulted { reason: "x".into() },
            DealCommand::Complete,
            DealCommand::Cancel { reason: "x".into() },
        ] {
            Deals::with(())
                .given_no_previous_events()
                .when(c)
                .then_expect_error(DealError::NotFound);
        }
    }

    // --- activate ---

    #[test]
    fn a_draft_is_activated() {
        Deals::with(())
            .given(history(S::Draft))
            .when(DealCommand::Activate)
            .then_expect_events(vec![activated()]);
    }

    #[test]
    fn only_a_draft_is_activated() {
        refused_outside(&[S::Draft], "activate", &DealCommand::Activate);
    }

    // --- payments ---

    #[test]
    fn a_payment_adds_to_the_total_paid() {
        Deals::with(())
            .given(history(S::Active))
            .and(vec![payment(1, "5500.50", "5500.50")])
            .when(pay_cmd(2, "100"))
            .then_expect_events(vec![payment(2, "100", "5600.50")]);
    }

    #[test]
    fn a_repeated_payment_id_is_a_no_op() {
        Deals::with(())
            .given(history(S::Active))
            .and(vec![payment(1, "5500.50", "5500.50")])
            .when(pay_cmd(1, "5500.50"))
            .then_expect_events(vec![]);
        // Also once the deal has moved on: the retry of a recorded payment still succeeds.
        Deals::with(())
            .given(history(S::Active))
            .and(vec![
                payment(1, "5500.50", "5500.50"),
                DealEvent::DealCompleted {
                    total_paid: money("5500.50"),
                },
            ])
            .when(pay_cmd(1, "5500.50"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_payment_must_be_positive() {
        for v in ["0", "-5", "0.001"] {
            Deals::with(())
                .given(history(S::Active))
                .when(pay_cmd(1, v))
                .then_expect_invalid("amount");
        }
    }

    #[test]
    fn payments_are_recorded_only_while_active() {
        refused_outside(&[S::Active], "record a payment on", &pay_cmd(9, "100"));
    }

    #[test]
    fn a_missed_payment_is_counted() {
        Deals::with(())
            .given(history(S::Active))
            .and(vec![DealEvent::DealPaymentMissed {
                due_date: date(2026, 2, 1),
                amount: money("5500.50"),
                missed_payments: 1,
            }])
            .when(missed_cmd(date(2026, 3, 1), "5500.50"))
            .then_expect_events(vec![DealEvent::DealPaymentMissed {
                due_date: date(2026, 3, 1),
                amount: money("5500.50"),
                missed_payments: 2,
            }]);
    }

    #[test]
    fn a_missed_payment_already_recorded_for_its_due_date_is_a_no_op() {
        Deals::with(())
            .given(history(S::Active))
            .and(vec![DealEvent::DealPaymentMissed {
                due_date: date(2026, 2, 1),
                amount: money("5500.50"),
                missed_payments: 1,
            }])
            .when(missed_cmd(date(2026, 2, 1), "5500.50"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_missed_payment_must_be_positive_and_within_the_contract() {
        for v in ["0", "-1"] {
            Deals::with(())
                .given(history(S::Active))
                .when(missed_cmd(date(2026, 3, 1), v))
                .then_expect_invalid("amount");
        }
        for due in [date(2026, 1, 31), date(2028, 1, 1)] {
            Deals::with(())
                .given(history(S::Active))
                .when(missed_cmd(due, "100"))
                .then_expect_invalid("due_date");
        }
    }

    #[test]
    fn missed_payments_are_recorded_only_while_active() {
        refused_outside(
            &[S::Active],
            "record a missed payment on",
            &missed_cmd(date(2026, 3, 1), "100"),
        );
    }

    // --- default, complete, cancel ---

    #[test]
    fn an_active_deal_is_marked_defaulted() {
        Deals::with(())
            .given(history(S::Active))
            .when(DealCommand::MarkDefaulted {
                reason: "  three missed payments ".into(),
            })
            .then_expect_events(vec![DealEvent::DealDefaulted {
                reason: "three missed payments".into(),
            }]);
    }

    #[test]
    fn defaulting_needs_a_reason_and_an_active_deal() {
        Deals::with(())
            .given(history(S::Active))
            .when(DealCommand::MarkDefaulted { reason: " ".into() })
            .then_expect_invalid("reason");
        refused_outside(
            &[S::Active],
            "mark as defaulted",
            &DealCommand::MarkDefaulted { reason: "x".into() },
        );
    }

    #[test]
    fn an_active_deal_is_completed_with_its_total_paid() {
        Deals::with(())
            .given(history(S::Active))
            .and(vec![
                payment(1, "5500.50", "5500.50"),
                payment(2, "1000", "6500.50"),
            ])
            .when(DealCommand::Complete)
            .then_expect_events(vec![DealEvent::DealCompleted {
                total_paid: money("6500.50"),
            }]);
    }

    #[test]
    fn only_an_active_deal_is_completed() {
        refused_outside(&[S::Active], "complete", &DealCommand::Complete);
    }

    #[test]
    fn a_draft_is_cancelled() {
        Deals::with(())
            .given(history(S::Draft))
            .when(DealCommand::Cancel {
                reason: "client withdrew".into(),
            })
            .then_expect_events(vec![DealEvent::DealCancelled {
                reason: "client withdrew".into(),
            }]);
    }

    #[test]
    fn cancelling_needs_a_reason_and_a_draft() {
        Deals::with(())
            .given(history(S::Draft))
            .when(DealCommand::Cancel { reason: "".into() })
            .then_expect_invalid("reason");
        refused_outside(
            &[S::Draft],
            "cancel",
            &DealCommand::Cancel { reason: "x".into() },
        );
    }

    // --- state, events, errors ---

    #[test]
    fn state_folds_the_whole_life_of_a_deal() {
        let mut deal = Deal::default();
        for e in [
            drafted(),
            activated(),
            payment(1, "100", "100"),
            DealEvent::DealPaymentMissed {
                due_date: date(2026, 3, 1),
                amount: money("5500.50"),
                missed_payments: 1,
            },
            DealEvent::DealDefaulted {
                reason: "gone".into(),
            },
        ] {
            deal.apply(e);
        }
        assert!(deal.created);
        assert_eq!(deal.deal_number, "DL-1001");
        assert_eq!(deal.status, S::Defaulted);
        assert!(deal.status.is_terminal());
        assert_eq!(deal.total_paid, money("100"));
        assert_eq!(deal.missed_payments, 1);
        assert_eq!(deal.payment_ids, vec![Uuid::from_u128(1)]);
        assert_eq!(deal.default_reason.as_deref(), Some("gone"));
        assert_eq!(deal.first_payment_date, Some(date(2026, 2, 1)));
    }

    #[test]
    fn event_type_is_the_variant_name_and_events_round_trip() {
        let events = [
            drafted(),
            activated(),
            payment(1, "1", "1"),
            DealEvent::DealPaymentMissed {
                due_date: date(2026, 3, 1),
                amount: money("1"),
                missed_payments: 1,
            },
            DealEvent::DealDefaulted { reason: "r".into() },
            DealEvent::DealCompleted {
                total_paid: money("1"),
            },
            DealEvent::DealCancelled { reason: "r".into() },
        ];
        for e in events {
            let value = serde_json::to_value(&e).unwrap();
            let obj = value.as_object().unwrap();
            assert!(obj.contains_key(&e.event_type()), "{value}");
            assert_eq!(e.event_version(), "1.0");
            assert_eq!(serde_json::from_value::<DealEvent>(value).unwrap(), e);
        }
    }

    #[test]
    fn status_serializes_in_snake_case() {
        assert_eq!(
            serde_json::to_value(S::Defaulted).unwrap(),
            json!("defaulted")
        );
        assert_eq!(S::Cancelled.to_string(), "cancelled");
    }

    #[test]
    fn errors_have_stable_codes_and_kinds() {
        let cases = [
            (DealError::NotFound, "deal.not_found", ErrorKind::NotFound),
            (
                DealError::AlreadyExists,
                "deal.already_exists",
                ErrorKind::Conflict,
            ),
            (
                DealError::Validation(ValidationError::new("a", "b")),
                "deal.validation",
                ErrorKind::Validation,
            ),
            (
                transition("activate", S::Active),
                "deal.invalid_transition",
                ErrorKind::InvalidTransition,
            ),
        ];
        for (e, code, kind) in cases {
            assert_eq!(e.code(), code);
            assert_eq!(e.kind(), kind);
        }
        assert_eq!(
            transition("activate", S::Active).to_string(),
            "cannot activate a deal that is active"
        );
    }
}
