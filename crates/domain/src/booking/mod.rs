//! The Booking aggregate: a rental, chauffeur job or transfer from lead to completion (SPEC §2).
//!
//! Status: `lead -> confirmed -> delivery -> in_progress -> completed`; `cancelled` from `lead`,
//! `confirmed` or `delivery`. The vehicle schedule (no two overlapping confirmed/active bookings,
//! no booking over a maintenance block) spans aggregates: it is enforced by the store in the
//! events' own transaction, from the `vehicle_id`/period carried by the events below.

mod commands;
mod events;
#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use commands::{BookingCommand, CreateBooking, ServiceInput};
pub use events::{BookingEvent, ServiceLine};

use crate::types::{Money, Period, ValidationError, optional_text, required_text};
use crate::{DomainError, ErrorKind};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BookingStatus {
    #[default]
    Lead,
    Confirmed,
    Delivery,
    InProgress,
    Completed,
    Cancelled,
}

impl BookingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Confirmed => "confirmed",
            Self::Delivery => "delivery",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

impl std::fmt::Display for BookingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BookingType {
    #[default]
    Rental,
    Chauffeur,
    Transfer,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Medium,
    Low,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BookingError {
    #[error("the booking does not exist")]
    NotFound,
    #[error("the booking already exists")]
    AlreadyExists,
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("cannot {action} a booking that is {status}")]
    InvalidTransition {
        action: &'static str,
        status: BookingStatus,
    },
    #[error("confirming needs a vehicle: assign one first")]
    VehicleRequired,
    #[error("a payment of {amount} exceeds the outstanding {outstanding}")]
    Overpayment { amount: Money, outstanding: Money },
}

impl DomainError for BookingError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists => ErrorKind::Conflict,
            Self::Validation(_) | Self::Overpayment { .. } => ErrorKind::Validation,
            Self::InvalidTransition { .. } | Self::VehicleRequired => ErrorKind::InvalidTransition,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "booking.not_found",
            Self::AlreadyExists => "booking.already_exists",
            Self::Validation(_) => "booking.validation",
            Self::InvalidTransition { .. } => "booking.invalid_transition",
            Self::VehicleRequired => "booking.vehicle_required",
            Self::Overpayment { .. } => "booking.overpayment",
        }
    }
}

/// An extension of the rental, priced on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    pub previous_end_at: DateTime<Utc>,
    pub new_end_at: DateTime<Utc>,
    pub amount: Money,
}

/// The booking's state, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Booking {
    pub created: bool,
    pub external_code: String,
    pub status: BookingStatus,
    pub client_id: Uuid,
    pub owner_id: Uuid,
    pub booking_type: BookingType,
    pub priority: Priority,
    pub channel: String,
    /// The booked period; `end_at` moves with extensions.
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    /// Days of the booked period (before extensions), priced at `price_daily`.
    pub rental_duration_days: i64,
    pub vehicle_id: Option<Uuid>,
    pub driver_id: Option<Uuid>,
    pub price_daily: Money,
    pub deposit_amount: Money,
    pub advance_payment: Money,
    pub full_insurance_fee: Money,
    pub currency: String,
    pub pickup_location: Option<String>,
    pub dropoff_location: Option<String>,
    pub services: Vec<ServiceLine>,
    pub extensions: Vec<Extension>,
    pub total_amount: Money,
    pub paid_amount: Money,
    pub invoices_issued: u32,
    pub lead_id: Option<Uuid>,
    pub promised_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub pickup_mileage_km: Option<i32>,
    pub return_mileage_km: Option<i32>,
    pub returned_at: Option<DateTime<Utc>>,
    pub cancel_reason: Option<String>,
    pub sales_service_rating: Option<i16>,
    pub sales_service_feedback: Option<String>,
    pub kommo_status_id: Option<i64>,
    pub zoho_sales_order_id: Option<String>,
    pub zoho_sync_status: Option<String>,
    pub zoho_sync_error: Option<String>,
}

impl Booking {
    /// `total_amount - paid_amount`, never below zero.
    pub fn outstanding_amount(&self) -> Money {
        self.total_amount.saturating_sub(self.paid_amount)
    }

    fn period(&self) -> Option<Period> {
        Some(Period {
            start_at: self.start_at?,
            end_at: self.end_at?,
        })
    }

    /// `price_daily * days + sum(services) + insurance + extensions`.
    fn total_with(
        price_daily: Money,
        days: i64,
        services: &[ServiceLine],
        insurance: Money,
        extensions: &[Extension],
    ) -> Result<Money, ValidationError> {
        let too_large = || ValidationError::new("total_amount", "is too large");
        let mut total = price_daily.times(days).ok_or_else(too_large)?;
        for s in services {
            let line = s.price.times(i64::from(s.quantity)).ok_or_else(too_large)?;
            total = total.checked_add(line).ok_or_else(too_large)?;
        }
        total = total.checked_add(insurance).ok_or_else(too_large)?;
        for e in extensions {
            total = total.checked_add(e.amount).ok_or_else(too_large)?;
        }
        Ok(total)
    }

    fn total(
        &self,
        days: i64,
        services: &[ServiceLine],
        extensions: &[Extension],
    ) -> Result<Money, ValidationError> {
        Self::total_with(
            self.price_daily,
            days,
            services,
            self.full_insurance_fee,
            extensions,
        )
    }

    fn require(&self, action: &'static str, allowed: &[BookingStatus]) -> Result<(), BookingError> {
        if !self.created {
            return Err(BookingError::NotFound);
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(BookingError::InvalidTransition {
                action,
                status: self.status,
            })
        }
    }

    fn holds_vehicle(&self) -> bool {
        matches!(
            self.status,
            BookingStatus::Confirmed | BookingStatus::Delivery | BookingStatus::InProgress
        )
    }
}

fn parse_service(s: ServiceInput) -> Result<ServiceLine, ValidationError> {
    if s.quantity < 1 || s.quantity > 1000 {
        return Err(ValidationError::new(
            "quantity",
            "must be between 1 and 1000",
        ));
    }
    Ok(ServiceLine {
        line_id: s.line_id,
        service_id: s.service_id,
        price: Money::parse("price", s.price)?,
        quantity: s.quantity,
        description: optional_text("description", s.description.as_deref())?,
    })
}

fn check_mileage(field: &str, km: i32) -> Result<(), ValidationError> {
    if km < 0 {
        return Err(ValidationError::new(field, "must not be negative"));
    }
    Ok(())
}

fn check_fuel(fuel: i16) -> Result<(), ValidationError> {
    if !(0..=100).contains(&fuel) {
        return Err(ValidationError::new(
            "fuel_level_pct",
            "must be between 0 and 100",
        ));
    }
    Ok(())
}

/// `BK-1052` -> `1052`, for invoice labels.
fn code_number(code: &str) -> &str {
    code.rsplit('-').next().unwrap_or(code)
}

use BookingStatus as S;

impl Aggregate for Booking {
    const TYPE: &'static str = "Booking";
    type Command = BookingCommand;
    type Event = BookingEvent;
    type Error = BookingError;
    type Services = ();

    async fn handle(
        &mut self,
        command: BookingCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), BookingError> {
        let event = match command {
            BookingCommand::Create(c) => {
                if self.created {
                    return Err(BookingError::AlreadyExists);
                }
                let c = *c;
                let period = Period::parse(c.start_at, c.end_at)?;
                let services = c
                    .services
                    .into_iter()
                    .map(parse_service)
                    .collect::<Result<Vec<_>, _>>()?;
                let price_daily = Money::parse("price_daily", c.price_daily)?;
                let full_insurance_fee = Money::parse("full_insurance_fee", c.full_insurance_fee)?;
                let days = period.duration_days();
                let total_amount =
                    Self::total_with(price_daily, days, &services, full_insurance_fee, &[])?;
                let currency = match c.currency.as_deref().map(str::trim) {
                    None | Some("") => "AED".to_string(),
                    Some(cur)
                        if cur.len() == 3 && cur.chars().all(|ch| ch.is_ascii_uppercase()) =>
                    {
                        cur.to_string()
                    }
                    Some(_) => {
                        return Err(ValidationError::new(
                            "currency",
                            "must be an ISO 4217 code such as AED",
                        )
                        .into());
                    }
                };
                BookingEvent::BookingCreated {
                    external_code: required_text("external_code", &c.external_code)?,
                    client_id: c.client_id,
                    owner_id: c.owner_id,
                    booking_type: c.booking_type,
                    priority: c.priority,
                    channel: required_text("channel", &c.channel)?,
                    start_at: period.start_at,
                    end_at: period.end_at,
                    rental_duration_days: days,
                    vehicle_id: c.vehicle_id,
                    driver_id: c.driver_id,
                    price_daily,
                    deposit_amount: Money::parse("deposit_amount", c.deposit_amount)?,
                    advance_payment: Money::parse("advance_payment", c.advance_payment)?,
                    full_insurance_fee,
                    currency,
                    pickup_location: optional_text(
                        "pickup_location",
                        c.pickup_location.as_deref(),
                    )?,
                    dropoff_location: optional_text(
                        "dropoff_location",
                        c.dropoff_location.as_deref(),
                    )?,
                    services,
                    lead_id: c.lead_id,
                    total_amount,
                }
            }
            BookingCommand::AssignVehicle { vehicle_id } => {
                self.require("assign a vehicle to", &[S::Lead, S::Confirmed])?;
                if self.vehicle_id == Some(vehicle_id) {
                    return Ok(());
                }
                BookingEvent::BookingVehicleAssigned {
                    vehicle_id,
                    holds_vehicle: self.holds_vehicle(),
                }
            }
            BookingCommand::AssignDriver { driver_id } => {
                self.require(
                    "assign a driver to",
                    &[S::Lead, S::Confirmed, S::Delivery, S::InProgress],
                )?;
                if self.driver_id == Some(driver_id) {
                    return Ok(());
                }
                BookingEvent::BookingDriverAssigned { driver_id }
            }
            BookingCommand::ChangeOwner { owner_id } => {
                self.require(
                    "change the owner of",
                    &[S::Lead, S::Confirmed, S::Delivery, S::InProgress],
                )?;
                if self.owner_id == owner_id {
                    return Ok(());
                }
                BookingEvent::BookingOwnerChanged { owner_id }
            }
            BookingCommand::Reschedule { start_at, end_at } => {
                self.require("reschedule", &[S::Lead, S::Confirmed])?;
                let period = Period::parse(start_at, end_at)?;
                let days = period.duration_days();
                BookingEvent::BookingRescheduled {
                    start_at,
                    end_at,
                    rental_duration_days: days,
                    total_amount: self.total(days, &self.services, &self.extensions)?,
                    holds_vehicle: self.holds_vehicle(),
                }
            }
            BookingCommand::AddService(input) => {
                self.require(
                    "add a service to",
                    &[S::Lead, S::Confirmed, S::Delivery, S::InProgress],
                )?;
                let line = parse_service(input)?;
                if self.services.iter().any(|s| s.line_id == line.line_id) {
                    return Err(
                        ValidationError::new("line_id", "is already on this booking").into(),
                    );
                }
                let mut services = self.services.clone();
                services.push(line.clone());
                BookingEvent::BookingServiceAdded {
                    total_amount: self.total(
                        self.rental_duration_days,
                        &services,
                        &self.extensions,
                    )?,
                    line,
                }
            }
            BookingCommand::RemoveService { line_id } => {
                self.require(
                    "remove a service from",
                    &[S::Lead, S::Confirmed, S::Delivery, S::InProgress],
                )?;
                if !self.services.iter().any(|s| s.line_id == line_id) {
                    return Err(ValidationError::new("line_id", "is not on this booking").into());
                }
                let services: Vec<_> = self
                    .services
                    .iter()
                    .filter(|s| s.line_id != line_id)
                    .cloned()
                    .collect();
                BookingEvent::BookingServiceRemoved {
                    line_id,
                    total_amount: self.total(
                        self.rental_duration_days,
                        &services,
                        &self.extensions,
                    )?,
                }
            }
            BookingCommand::Confirm => {
                self.require("confirm", &[S::Lead])?;
                let vehicle_id = self.vehicle_id.ok_or(BookingError::VehicleRequired)?;
                let period = self.period().ok_or(BookingError::NotFound)?;
                BookingEvent::BookingConfirmed {
                    vehicle_id,
                    start_at: period.start_at,
                    end_at: period.end_at,
                }
            }
            BookingCommand::StartDelivery {
                driver_id,
                promised_at,
            } => {
                self.require("start the delivery of", &[S::Confirmed])?;
                BookingEvent::BookingDeliveryStarted {
                    driver_id: driver_id.or(self.driver_id),
                    promised_at,
                }
            }
            BookingCommand::StartRental {
                started_at,
                pickup_mileage_km,
                fuel_level_pct,
            } => {
                self.require("start the rental of", &[S::Delivery])?;
                check_mileage("pickup_mileage_km", pickup_mileage_km)?;
                check_fuel(fuel_level_pct)?;
                BookingEvent::BookingRentalStarted {
                    started_at,
                    promised_at: self.promised_at,
                    delivered_on_time: self.promised_at.is_none_or(|p| started_at <= p),
                    pickup_mileage_km,
                    fuel_level_pct,
                }
            }
            BookingCommand::Extend {
                new_end_at,
                price_daily,
            } => {
                self.require("extend", &[S::Delivery, S::InProgress])?;
                let current_end = self.end_at.ok_or(BookingError::NotFound)?;
                let extra = Period::parse(current_end, new_end_at).map_err(|_| {
                    ValidationError::new("new_end_at", "must be after the current end_at")
                })?;
                let price_daily = match price_daily {
                    Some(p) => Money::parse("price_daily", p)?,
                    None => self.price_daily,
                };
                let extra_days = extra.duration_days();
                let amount = price_daily
                    .times(extra_days)
                    .ok_or_else(|| ValidationError::new("price_daily", "is too large"))?;
                let mut extensions = self.extensions.clone();
                extensions.push(Extension {
                    previous_end_at: current_end,
                    new_end_at,
                    amount,
                });
                BookingEvent::BookingExtended {
                    previous_end_at: current_end,
                    new_end_at,
                    extra_days,
                    price_daily,
                    amount,
                    total_amount: self.total(
                        self.rental_duration_days,
                        &self.services,
                        &extensions,
                    )?,
                }
            }
            BookingCommand::Complete {
                returned_at,
                return_mileage_km,
                fuel_level_pct,
            } => {
                self.require("complete", &[S::InProgress])?;
                check_mileage("return_mileage_km", return_mileage_km)?;
                check_fuel(fuel_level_pct)?;
                if self
                    .pickup_mileage_km
                    .is_some_and(|p| return_mileage_km < p)
                {
                    return Err(ValidationError::new(
                        "return_mileage_km",
                        "must not be below the pickup mileage",
                    )
                    .into());
                }
                if self.delivered_at.is_some_and(|d| returned_at < d) {
                    return Err(ValidationError::new(
                        "returned_at",
                        "must not be before the rental started",
                    )
                    .into());
                }
                BookingEvent::BookingCompleted {
                    returned_at,
                    return_mileage_km,
                    fuel_level_pct,
                }
            }
            BookingCommand::Cancel { reason } => {
                self.require("cancel", &[S::Lead, S::Confirmed, S::Delivery])?;
                BookingEvent::BookingCancelled {
                    reason: required_text("reason", &reason)?,
                    previous_status: self.status,
                }
            }
            BookingCommand::IssueInvoice {
                invoice_id,
                invoice_type,
                amount,
                issued_at,
                due_at,
            } => {
                self.require(
                    "invoice",
                    &[
                        S::Lead,
                        S::Confirmed,
                        S::Delivery,
                        S::InProgress,
                        S::Completed,
                    ],
                )?;
                let amount = Money::parse("amount", amount)?;
                if amount == Money::ZERO {
                    return Err(ValidationError::new("amount", "must be positive").into());
                }
                if due_at.is_some_and(|d| d < issued_at) {
                    return Err(
                        ValidationError::new("due_at", "must not be before issued_at").into(),
                    );
                }
                BookingEvent::BookingInvoiceIssued {
                    invoice_id,
                    label: format!(
                        "INV-{}-{}",
                        code_number(&self.external_code),
                        self.invoices_issued + 1
                    ),
                    invoice_type: required_text("invoice_type", &invoice_type)?,
                    amount,
                    issued_at,
                    due_at,
                }
            }
            BookingCommand::RecordPayment {
                payment_id,
                amount,
                method,
                paid_at,
            } => {
                self.require(
                    "record a payment on",
                    &[
                        S::Lead,
                        S::Confirmed,
                        S::Delivery,
                        S::InProgress,
                        S::Completed,
                    ],
                )?;
                let amount = Money::parse("amount", amount)?;
                if amount == Money::ZERO {
                    return Err(ValidationError::new("amount", "must be positive").into());
                }
                let outstanding = self.outstanding_amount();
                if amount > outstanding {
                    return Err(BookingError::Overpayment {
                        amount,
                        outstanding,
                    });
                }
                let paid_amount = self
                    .paid_amount
                    .checked_add(amount)
                    .ok_or_else(|| ValidationError::new("amount", "is too large"))?;
                BookingEvent::BookingPaymentRecorded {
                    payment_id,
                    amount,
                    method: required_text("method", &method)?,
                    paid_at,
                    paid_amount,
                    outstanding_amount: self.total_amount.saturating_sub(paid_amount),
                }
            }
            BookingCommand::RateSalesService { rating, feedback } => {
                self.require(
                    "rate the sales service of",
                    &[S::Confirmed, S::Delivery, S::InProgress, S::Completed],
                )?;
                if !(0..=10).contains(&rating) {
                    return Err(ValidationError::new("rating", "must be between 0 and 10").into());
                }
                BookingEvent::BookingSalesServiceRated {
                    rating,
                    feedback: optional_text("feedback", feedback.as_deref())?,
                }
            }
            BookingCommand::ApplyKommoStatus { kommo_status_id } => {
                if !self.created {
                    return Err(BookingError::NotFound);
                }
                if self.kommo_status_id == Some(kommo_status_id) {
                    return Ok(());
                }
                BookingEvent::BookingKommoStatusApplied { kommo_status_id }
            }
            BookingCommand::LinkZohoSalesOrder {
                zoho_sales_order_id,
            } => {
                if !self.created {
                    return Err(BookingError::NotFound);
                }
                let id = required_text("zoho_sales_order_id", &zoho_sales_order_id)?;
                if self.zoho_sales_order_id.as_deref() == Some(id.as_str())
                    && self.zoho_sync_status.as_deref() == Some("synced")
                {
                    return Ok(());
                }
                BookingEvent::BookingZohoSalesOrderLinked {
                    zoho_sales_order_id: id,
                }
            }
            BookingCommand::RecordZohoSyncFailure { error } => {
                if !self.created {
                    return Err(BookingError::NotFound);
                }
                BookingEvent::BookingZohoSyncFailed {
                    error: required_text("error", &error)?,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: BookingEvent) {
        use BookingEvent as E;
        match event {
            E::BookingCreated {
                external_code,
                client_id,
                owner_id,
                booking_type,
                priority,
                channel,
                start_at,
                end_at,
                rental_duration_days,
                vehicle_id,
                driver_id,
                price_daily,
                deposit_amount,
                advance_payment,
                full_insurance_fee,
                currency,
                pickup_location,
                dropoff_location,
                services,
                lead_id,
                total_amount,
            } => {
                *self = Self {
                    created: true,
                    external_code,
                    status: S::Lead,
                    client_id,
                    owner_id,
                    booking_type,
                    priority,
                    channel,
                    start_at: Some(start_at),
                    end_at: Some(end_at),
                    rental_duration_days,
                    vehicle_id,
                    driver_id,
                    price_daily,
                    deposit_amount,
                    advance_payment,
                    full_insurance_fee,
                    currency,
                    pickup_location,
                    dropoff_location,
                    services,
                    lead_id,
                    total_amount,
                    ..Self::default()
                };
            }
            E::BookingVehicleAssigned { vehicle_id, .. } => self.vehicle_id = Some(vehicle_id),
            E::BookingDriverAssigned { driver_id } => self.driver_id = Some(driver_id),
            E::BookingOwnerChanged { owner_id } => self.owner_id = owner_id,
            E::BookingRescheduled {
                start_at,
                end_at,
                rental_duration_days,
                total_amount,
                ..
            } => {
                self.start_at = Some(start_at);
                self.end_at = Some(end_at);
                self.rental_duration_days = rental_duration_days;
                self.total_amount = total_amount;
            }
            E::BookingServiceAdded { line, total_amount } => {
                self.services.push(line);
                self.total_amount = total_amount;
            }
            E::BookingServiceRemoved {
                line_id,
                total_amount,
            } => {
                self.services.retain(|s| s.line_id != line_id);
                self.total_amount = total_amount;
            }
            E::BookingConfirmed { .. } => self.status = S::Confirmed,
            E::BookingDeliveryStarted {
                driver_id,
                promised_at,
            } => {
                self.status = S::Delivery;
                self.driver_id = driver_id;
                self.promised_at = Some(promised_at);
            }
            E::BookingRentalStarted {
                started_at,
                pickup_mileage_km,
                ..
            } => {
                self.status = S::InProgress;
                self.delivered_at = Some(started_at);
                self.pickup_mileage_km = Some(pickup_mileage_km);
            }
            E::BookingExtended {
                previous_end_at,
                new_end_at,
                amount,
                total_amount,
                ..
            } => {
                self.extensions.push(Extension {
                    previous_end_at,
                    new_end_at,
                    amount,
                });
                self.end_at = Some(new_end_at);
                self.total_amount = total_amount;
            }
            E::BookingCompleted {
                returned_at,
                return_mileage_km,
                ..
            } => {
                self.status = S::Completed;
                self.returned_at = Some(returned_at);
                self.return_mileage_km = Some(return_mileage_km);
            }
            E::BookingCancelled { reason, .. } => {
                self.status = S::Cancelled;
                self.cancel_reason = Some(reason);
            }
            E::BookingInvoiceIssued { .. } => self.invoices_issued += 1,
            E::BookingPaymentRecorded { paid_amount, .. } => self.paid_amount = paid_amount,
            E::BookingSalesServiceRated { rating, feedback } => {
                self.sales_service_rating = Some(rating);
                self.sales_service_feedback = feedback;
            }
            E::BookingKommoStatusApplied { kommo_status_id } => {
                self.kommo_status_id = Some(kommo_status_id);
            }
            E::BookingZohoSalesOrderLinked {
                zoho_sales_order_id,
            } => {
                self.zoho_sales_order_id = Some(zoho_sales_order_id);
                self.zoho_sync_status = Some("synced".into());
                self.zoho_sync_error = None;
            }
            E::BookingZohoSyncFailed { error } => {
                self.zoho_sync_status = Some("failed".into());
                self.zoho_sync_error = Some(error);
            }
        }
    }
}
