//! Booking commands: raw inputs; the aggregate parses them into value types.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{BookingType, Priority};

/// One additional service asked for on a booking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInput {
    /// Chosen by the caller so that a retried command names the same line.
    pub line_id: Uuid,
    pub service_id: Uuid,
    pub price: Decimal,
    pub quantity: i32,
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateBooking {
    /// `BK-...`, allocated by the caller (a database sequence) before the command.
    pub external_code: String,
    pub client_id: Uuid,
    pub owner_id: Uuid,
    pub booking_type: BookingType,
    pub priority: Priority,
    pub channel: String,
    pub start_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub vehicle_id: Option<Uuid>,
    pub driver_id: Option<Uuid>,
    pub price_daily: Decimal,
    pub deposit_amount: Decimal,
    pub advance_payment: Decimal,
    pub full_insurance_fee: Decimal,
    pub currency: Option<String>,
    pub pickup_location: Option<String>,
    pub dropoff_location: Option<String>,
    pub services: Vec<ServiceInput>,
    pub lead_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BookingCommand {
    Create(Box<CreateBooking>),
    AssignVehicle {
        vehicle_id: Uuid,
    },
    AssignDriver {
        driver_id: Uuid,
    },
    ChangeOwner {
        owner_id: Uuid,
    },
    Reschedule {
        start_at: DateTime<Utc>,
        end_at: DateTime<Utc>,
    },
    AddService(ServiceInput),
    RemoveService {
        line_id: Uuid,
    },
    Confirm,
    StartDelivery {
        driver_id: Option<Uuid>,
        promised_at: DateTime<Utc>,
    },
    StartRental {
        started_at: DateTime<Utc>,
        pickup_mileage_km: i32,
        fuel_level_pct: i16,
    },
    Extend {
        new_end_at: DateTime<Utc>,
        /// Daily price of the extra days; the booking's own when absent.
        price_daily: Option<Decimal>,
    },
    Complete {
        returned_at: DateTime<Utc>,
        return_mileage_km: i32,
        fuel_level_pct: i16,
    },
    Cancel {
        reason: String,
    },
    IssueInvoice {
        invoice_id: Uuid,
        invoice_type: String,
        amount: Decimal,
        issued_at: DateTime<Utc>,
        due_at: Option<DateTime<Utc>>,
    },
    RecordPayment {
        payment_id: Uuid,
        amount: Decimal,
        method: String,
        paid_at: DateTime<Utc>,
    },
    RateSalesService {
        rating: i16,
        feedback: Option<String>,
    },
    ApplyKommoStatus {
        kommo_status_id: i64,
    },
    LinkZohoSalesOrder {
        zoho_sales_order_id: String,
    },
    RecordZohoSyncFailure {
        error: String,
    },
}
