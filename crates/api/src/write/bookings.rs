//! Booking commands: `POST /v1/bookings` and `POST /v1/bookings/{id}/{action}`.

use axum::extract::State;
use chrono::{DateTime, Utc};
use commands::codes::CodeKind;
use domain::booking::{BookingCommand, BookingType, CreateBooking, Priority, ServiceInput};
use rust_decimal::Decimal;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Answer, Empty, Extra, action, execute_creation, refuse_before_numbering};
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{ApiJson, CommandContext};
use crate::refs::{self, Kind, Ref, now};

/// An additional service on a booking (`booking_additional_services`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    /// An `additional_services` id.
    pub service_id: Uuid,
    /// The unit price; the catalogue's default price when absent.
    #[schema(value_type = Option<String>, example = "150.00")]
    pub price: Option<Decimal>,
    /// Default 1.
    pub quantity: Option<i32>,
    pub description: Option<String>,
}

async fn service_input(state: &AppState, s: ServiceRequest) -> ApiResult<ServiceInput> {
    Ok(ServiceInput {
        line_id: Uuid::now_v7(),
        price: refs::service_price(&state.pool, s.service_id, s.price).await?,
        service_id: s.service_id,
        quantity: s.quantity.unwrap_or(1),
        description: s.description,
    })
}

/// `POST /v1/bookings`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBookingRequest {
    pub client_id: Uuid,
    /// The responsible staff member; the caller when absent.
    pub owner_id: Option<Uuid>,
    /// `rental` (default), `chauffeur`, `transfer`.
    #[schema(value_type = Option<String>, example = "rental")]
    pub booking_type: Option<BookingType>,
    /// `high`, `medium` (default), `low`.
    #[schema(value_type = Option<String>, example = "medium")]
    pub priority: Option<Priority>,
    /// `Kommo`, `Website`, ...; default `Website`.
    pub channel: Option<String>,
    #[serde(deserialize_with = "crate::time::instant")]
    pub start_at: DateTime<Utc>,
    #[serde(deserialize_with = "crate::time::instant")]
    pub end_at: DateTime<Utc>,
    pub vehicle_id: Option<Uuid>,
    /// A `driver_profiles` id.
    pub driver_id: Option<Uuid>,
    #[schema(value_type = String, example = "6500.00")]
    pub price_daily: Decimal,
    #[schema(value_type = Option<String>)]
    pub deposit_amount: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub advance_payment: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub full_insurance_fee: Option<Decimal>,
    /// ISO 4217; default `AED`.
    pub currency: Option<String>,
    pub pickup_location: Option<String>,
    pub dropoff_location: Option<String>,
    #[serde(default)]
    pub services: Vec<ServiceRequest>,
    pub lead_id: Option<Uuid>,
}

/// Creates a booking (status `lead`); allocates its `BK-` code.
#[utoipa::path(
    post,
    path = "/v1/bookings",
    tag = "bookings",
    request_body = CreateBookingRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry return the first answer")),
    responses(
        (status = 201, description = "Created", body = super::CommandAnswer),
        (status = "4XX", description = "Refused", body = crate::error::ProblemDocument, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    ctx: CommandContext,
    ApiJson(req): ApiJson<CreateBookingRequest>,
) -> ApiResult<Answer> {
    let owner_id = req.owner_id.unwrap_or(ctx.caller.staff_id);
    let optional = [
        req.vehicle_id.map(|v| ("vehicle_id", Ref::Vehicle, v)),
        req.driver_id.map(|d| ("driver_id", Ref::Driver, d)),
        req.lead_id.map(|l| ("lead_id", Ref::Lead, l)),
    ];
    let mut references = vec![
        ("client_id", Ref::Client, req.client_id),
        ("owner_id", Ref::Staff, owner_id),
    ];
    references.extend(optional.into_iter().flatten());
    let mut services = Vec::with_capacity(req.services.len());
    for s in req.services {
        services.push(service_input(&state, s).await?);
    }
    let id = Uuid::now_v7();
    let mut create = CreateBooking {
        external_code: CodeKind::Booking.code(0),
        client_id: req.client_id,
        owner_id,
        booking_type: req.booking_type.unwrap_or_default(),
        priority: req.priority.unwrap_or_default(),
        channel: req.channel.unwrap_or_else(|| "Website".into()),
        start_at: req.start_at,
        end_at: req.end_at,
        vehicle_id: req.vehicle_id,
        driver_id: req.driver_id,
        price_daily: req.price_daily,
        deposit_amount: req.deposit_amount.unwrap_or_default(),
        advance_payment: req.advance_payment.unwrap_or_default(),
        full_insurance_fee: req.full_insurance_fee.unwrap_or_default(),
        currency: req.currency,
        pickup_location: req.pickup_location,
        dropoff_location: req.dropoff_location,
        services,
        lead_id: req.lead_id,
    };
    refuse_before_numbering(
        &state.bus.bookings,
        None,
        BookingCommand::Create(Box::new(create.clone())),
    )
    .await?;
    let code = refs::require_all_and_take_code(&state.pool, &references, CodeKind::Booking).await?;
    create.external_code = code.clone();
    let outcome = execute_creation(
        &state.bus.bookings,
        &ctx,
        id,
        BookingCommand::Create(Box::new(create)),
    )
    .await?;
    Ok(Answer::created(
        &outcome,
        format!("/v1/bookings/{id}"),
        Some(code),
    ))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignVehicle {
    pub vehicle_id: Uuid,
}

action!(
    /// Assigns (or changes) the vehicle; a confirmed booking moves on the vehicle schedule.
    assign_vehicle, "/v1/bookings/{id}/assign-vehicle", "bookings", Kind::Booking, bookings,
    AssignVehicle, |state, ctx, id, req| {
        refs::require(&state.pool, "vehicle_id", Ref::Vehicle, req.vehicle_id).await?;
        (BookingCommand::AssignVehicle { vehicle_id: req.vehicle_id }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignDriver {
    /// A `driver_profiles` id.
    pub driver_id: Uuid,
}

action!(
    /// Assigns (or changes) the driver.
    assign_driver, "/v1/bookings/{id}/assign-driver", "bookings", Kind::Booking, bookings,
    AssignDriver, |state, ctx, id, req| {
        refs::require(&state.pool, "driver_id", Ref::Driver, req.driver_id).await?;
        (BookingCommand::AssignDriver { driver_id: req.driver_id }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeOwner {
    pub owner_id: Uuid,
}

action!(
    /// Hands the booking to another staff member.
    change_owner, "/v1/bookings/{id}/change-owner", "bookings", Kind::Booking, bookings,
    ChangeOwner, |state, ctx, id, req| {
        refs::require(&state.pool, "owner_id", Ref::Staff, req.owner_id).await?;
        (BookingCommand::ChangeOwner { owner_id: req.owner_id }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reschedule {
    #[serde(deserialize_with = "crate::time::instant")]
    pub start_at: DateTime<Utc>,
    #[serde(deserialize_with = "crate::time::instant")]
    pub end_at: DateTime<Utc>,
}

action!(
    /// Moves the period (re-checked against the vehicle schedule when confirmed).
    reschedule, "/v1/bookings/{id}/reschedule", "bookings", Kind::Booking, bookings,
    Reschedule, |state, ctx, id, req| {
        (BookingCommand::Reschedule { start_at: req.start_at, end_at: req.end_at }, None)
    }
);

action!(
    /// Adds an additional service (the line id is generated and returned as `line_id`).
    add_service, "/v1/bookings/{id}/add-service", "bookings", Kind::Booking, bookings,
    ServiceRequest, |state, ctx, id, req| {
        let input = service_input(&state, req).await?;
        let line = input.line_id;
        (BookingCommand::AddService(input), Some(Extra::Line(line)))
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveService {
    /// The line's id (`booking_additional_services.id`).
    pub line_id: Uuid,
}

action!(
    /// Removes an additional service line.
    remove_service, "/v1/bookings/{id}/remove-service", "bookings", Kind::Booking, bookings,
    RemoveService, |state, ctx, id, req| {
        (BookingCommand::RemoveService { line_id: req.line_id }, None)
    }
);

action!(
    /// Confirms the booking: it needs a vehicle, which must be free for the period.
    confirm, "/v1/bookings/{id}/confirm", "bookings", Kind::Booking, bookings,
    Empty, |state, ctx, id, req| {
        let Empty {} = req;
        (BookingCommand::Confirm, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartDelivery {
    /// A `driver_profiles` id; the assigned driver when absent.
    pub driver_id: Option<Uuid>,
    /// When the car is promised at the client (delivery SLA); now when absent.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub promised_at: Option<DateTime<Utc>>,
}

action!(
    /// The car leaves for the client.
    start_delivery, "/v1/bookings/{id}/start-delivery", "bookings", Kind::Booking, bookings,
    StartDelivery, |state, ctx, id, req| {
        if let Some(d) = req.driver_id {
            refs::require(&state.pool, "driver_id", Ref::Driver, d).await?;
        }
        (
            BookingCommand::StartDelivery {
                driver_id: req.driver_id,
                promised_at: req.promised_at.unwrap_or_else(now),
            },
            None,
        )
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRental {
    /// When the car was handed over; now when absent.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub started_at: Option<DateTime<Utc>>,
    pub pickup_mileage_km: i32,
    pub fuel_level_pct: i16,
}

action!(
    /// The car is handed over: the rental runs.
    start_rental, "/v1/bookings/{id}/start-rental", "bookings", Kind::Booking, bookings,
    StartRental, |state, ctx, id, req| {
        (
            BookingCommand::StartRental {
                started_at: req.started_at.unwrap_or_else(now),
                pickup_mileage_km: req.pickup_mileage_km,
                fuel_level_pct: req.fuel_level_pct,
            },
            None,
        )
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Extend {
    #[serde(deserialize_with = "crate::time::instant")]
    pub new_end_at: DateTime<Utc>,
    /// The daily price of the extra days; the booking's own when absent.
    #[schema(value_type = Option<String>)]
    pub price_daily: Option<Decimal>,
}

action!(
    /// Extends the rental (re-checked against the vehicle schedule).
    extend, "/v1/bookings/{id}/extend", "bookings", Kind::Booking, bookings,
    Extend, |state, ctx, id, req| {
        (BookingCommand::Extend { new_end_at: req.new_end_at, price_daily: req.price_daily }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Complete {
    /// When the car came back; now when absent.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub returned_at: Option<DateTime<Utc>>,
    pub return_mileage_km: i32,
    pub fuel_level_pct: i16,
}

action!(
    /// The car is back: the booking is completed and the vehicle freed from the return on.
    complete, "/v1/bookings/{id}/complete", "bookings", Kind::Booking, bookings,
    Complete, |state, ctx, id, req| {
        (
            BookingCommand::Complete {
                returned_at: req.returned_at.unwrap_or_else(now),
                return_mileage_km: req.return_mileage_km,
                fuel_level_pct: req.fuel_level_pct,
            },
            None,
        )
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    pub reason: String,
}

action!(
    /// Cancels the booking (from `lead`, `confirmed` or `delivery`) and frees the vehicle.
    cancel, "/v1/bookings/{id}/cancel", "bookings", Kind::Booking, bookings,
    Reason, |state, ctx, id, req| {
        (BookingCommand::Cancel { reason: req.reason }, None)
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueInvoice {
    /// Default `rental`.
    pub invoice_type: Option<String>,
    #[schema(value_type = String, example = "13000.00")]
    pub amount: Decimal,
    /// Now when absent.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub issued_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub due_at: Option<DateTime<Utc>>,
}

action!(
    /// Issues an invoice (`INV-<number>-<n>`; its id is returned as `invoice_id`).
    issue_invoice, "/v1/bookings/{id}/issue-invoice", "bookings", Kind::Booking, bookings,
    IssueInvoice, |state, ctx, id, req| {
        let invoice_id = Uuid::now_v7();
        (
            BookingCommand::IssueInvoice {
                invoice_id,
                invoice_type: req.invoice_type.unwrap_or_else(|| "rental".into()),
                amount: req.amount,
                issued_at: req.issued_at.unwrap_or_else(now),
                due_at: req.due_at,
            },
            Some(Extra::Invoice(invoice_id)),
        )
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordPayment {
    #[schema(value_type = String, example = "5000.00")]
    pub amount: Decimal,
    /// `card`, `cash`, `bank_transfer`, ...
    pub method: String,
    /// Now when absent.
    #[serde(default, deserialize_with = "crate::time::opt_instant")]
    pub paid_at: Option<DateTime<Utc>>,
}

action!(
    /// Records a payment (at most the outstanding amount; its id is returned as `payment_id`).
    record_payment, "/v1/bookings/{id}/record-payment", "bookings", Kind::Booking, bookings,
    RecordPayment, |state, ctx, id, req| {
        let payment_id = Uuid::now_v7();
        (
            BookingCommand::RecordPayment {
                payment_id,
                amount: req.amount,
                method: req.method,
                paid_at: req.paid_at.unwrap_or_else(now),
            },
            Some(Extra::Payment(payment_id)),
        )
    }
);

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// 0 to 10 (`rating` is accepted too).
    #[serde(alias = "rating")]
    pub sales_service_rating: i16,
    /// (`feedback` is accepted too.)
    #[serde(alias = "feedback")]
    pub sales_service_feedback: Option<String>,
}

action!(
    /// Rates the sales service of the booking (ceo only).
    rate, "/v1/bookings/{id}/rate", "bookings", Kind::Booking, bookings,
    Rate, |state, ctx, id, req| {
        (
            BookingCommand::RateSalesService {
                rating: req.sales_service_rating,
                feedback: req.sales_service_feedback,
            },
            None,
        )
    }
);
