//! Booking events. The variant name is the stored `event_type` and never changes; a change of
//! shape bumps `event_version` and gets an upcaster (see `crate::upcasting`).

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{BookingStatus, BookingType, Priority};
use crate::types::Money;

/// A service line on a booking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLine {
    pub line_id: Uuid,
    pub service_id: Uuid,
    pub price: Money,
    pub quantity: i32,
    pub description: Option<String>,
}

// `BookingCreated` is large; events are built once and moved, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BookingEvent {
    BookingCreated {
        external_code: String,
        client_id: Uuid,
        owner_id: Uuid,
        booking_type: BookingType,
        priority: Priority,
        channel: String,
        start_at: DateTime<Utc>,
        end_at: DateTime<Utc>,
        rental_duration_days: i64,
        vehicle_id: Option<Uuid>,
        driver_id: Option<Uuid>,
        price_daily: Money,
        deposit_amount: Money,
        advance_payment: Money,
        full_insurance_fee: Money,
        currency: String,
        pickup_location: Option<String>,
        dropoff_location: Option<String>,
        services: Vec<ServiceLine>,
        lead_id: Option<Uuid>,
        total_amount: Money,
    },
    BookingVehicleAssigned {
        vehicle_id: Uuid,
        /// Whether the booking already holds its vehicle (it is confirmed): the schedule moves.
        holds_vehicle: bool,
    },
    BookingDriverAssigned {
        driver_id: Uuid,
    },
    BookingOwnerChanged {
        owner_id: Uuid,
    },
    BookingRescheduled {
        start_at: DateTime<Utc>,
        end_at: DateTime<Utc>,
        rental_duration_days: i64,
        total_amount: Money,
        holds_vehicle: bool,
    },
    BookingServiceAdded {
        line: ServiceLine,
        total_amount: Money,
    },
    BookingServiceRemoved {
        line_id: Uuid,
        total_amount: Money,
    },
    BookingConfirmed {
        vehicle_id: Uuid,
        start_at: DateTime<Utc>,
        end_at: DateTime<Utc>,
    },
    BookingDeliveryStarted {
        driver_id: Option<Uuid>,
        promised_at: DateTime<Utc>,
    },
    BookingRentalStarted {
        /// When the car was handed over: the delivery's `actual_at`.
        started_at: DateTime<Utc>,
        promised_at: Option<DateTime<Utc>>,
        delivered_on_time: bool,
        pickup_mileage_km: i32,
        fuel_level_pct: i16,
    },
    BookingExtended {
        previous_end_at: DateTime<Utc>,
        new_end_at: DateTime<Utc>,
        extra_days: i64,
        price_daily: Money,
        amount: Money,
        total_amount: Money,
    },
    BookingCompleted {
        returned_at: DateTime<Utc>,
        return_mileage_km: i32,
        fuel_level_pct: i16,
    },
    BookingCancelled {
        reason: String,
        previous_status: BookingStatus,
    },
    BookingInvoiceIssued {
        invoice_id: Uuid,
        label: String,
        invoice_type: String,
        amount: Money,
        issued_at: DateTime<Utc>,
        due_at: Option<DateTime<Utc>>,
    },
    BookingPaymentRecorded {
        payment_id: Uuid,
        amount: Money,
        method: String,
        paid_at: DateTime<Utc>,
        paid_amount: Money,
        outstanding_amount: Money,
    },
    BookingSalesServiceRated {
        rating: i16,
        feedback: Option<String>,
    },
    BookingKommoStatusApplied {
        kommo_status_id: i64,
    },
    BookingZohoSalesOrderLinked {
        zoho_sales_order_id: String,
    },
    BookingZohoSyncFailed {
        error: String,
    },
}

impl DomainEvent for BookingEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::BookingCreated { .. } => "BookingCreated",
            Self::BookingVehicleAssigned { .. } => "BookingVehicleAssigned",
            Self::BookingDriverAssigned { .. } => "BookingDriverAssigned",
            Self::BookingOwnerChanged { .. } => "BookingOwnerChanged",
            Self::BookingRescheduled { .. } => "BookingRescheduled",
            Self::BookingServiceAdded { .. } => "BookingServiceAdded",
            Self::BookingServiceRemoved { .. } => "BookingServiceRemoved",
            Self::BookingConfirmed { .. } => "BookingConfirmed",
            Self::BookingDeliveryStarted { .. } => "BookingDeliveryStarted",
            Self::BookingRentalStarted { .. } => "BookingRentalStarted",
            Self::BookingExtended { .. } => "BookingExtended",
            Self::BookingCompleted { .. } => "BookingCompleted",
            Self::BookingCancelled { .. } => "BookingCancelled",
            Self::BookingInvoiceIssued { .. } => "BookingInvoiceIssued",
            Self::BookingPaymentRecorded { .. } => "BookingPaymentRecorded",
            Self::BookingSalesServiceRated { .. } => "BookingSalesServiceRated",
            Self::BookingKommoStatusApplied { .. } => "BookingKommoStatusApplied",
            Self::BookingZohoSalesOrderLinked { .. } => "BookingZohoSalesOrderLinked",
            Self::BookingZohoSyncFailed { .. } => "BookingZohoSyncFailed",
        };
        name.to_string()
    }

    fn event_version(&self) -> String {
        match self {
            // 2.0: `BookingCreated` gained `currency` (1.0 events are upcast to AED).
            Self::BookingCreated { .. } => "2.0".to_string(),
            _ => "1.0".to_string(),
        }
    }
}
