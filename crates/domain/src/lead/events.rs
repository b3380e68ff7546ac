//! Lead events. The variant name is the stored `event_type` and never changes; a change of
//! shape bumps `event_version` and gets an upcaster (see `crate::upcasting`).

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::booking::{BookingStatus, BookingType};
use crate::types::Money;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LeadEvent {
    LeadCreated {
        lead_code: String,
        client_id: Option<Uuid>,
        owner_id: Uuid,
        stage_id: String,
        probability: Decimal,
        sla_days: i32,
        /// The stage's booking status mapping.
        booking_status: Option<BookingStatus>,
        value_amount: Money,
        source: String,
        title: Option<String>,
        requested_start_at: Option<DateTime<Utc>>,
        requested_end_at: Option<DateTime<Utc>>,
        fleet_size: i32,
        expected_close_at: Option<DateTime<Utc>>,
        kommo_lead_id: Option<i64>,
    },
    LeadStageMoved {
        from_stage_id: String,
        stage_id: String,
        probability: Decimal,
        sla_days: i32,
        /// The new stage's booking status mapping.
        booking_status: Option<BookingStatus>,
    },
    LeadValueChanged {
        value_amount: Money,
    },
    LeadOwnerAssigned {
        owner_id: Uuid,
    },
    LeadNextActionSet {
        next_action: String,
        next_action_at: DateTime<Utc>,
    },
    LeadClientAttached {
        client_id: Uuid,
    },
    /// A process manager turns this into exactly one booking, with `booking_id`.
    LeadWon {
        booking_id: Uuid,
        booking_code: String,
        client_id: Uuid,
        owner_id: Uuid,
        booking_type: BookingType,
        start_at: DateTime<Utc>,
        end_at: DateTime<Utc>,
        price_daily: Money,
        vehicle_id: Option<Uuid>,
        value_amount: Money,
        /// The lead's source, which becomes the booking's channel.
        source: String,
        /// The status the booking starts in (the current stage's mapping); `lead` when absent.
        booking_status: Option<BookingStatus>,
    },
    LeadLost {
        reason: String,
    },
    /// A lost lead taken out of Kommo's "Closed - lost" again: active, without its loss reason
    /// (the `LeadKommoStatusApplied` after it in the same commit sets its stage).
    LeadReopened {},
    /// A status from Kommo. When the lead was active and the status maps to another stage, the
    /// lead moved there too: `stage_id` and the stage fields are then set (otherwise `None`).
    LeadKommoStatusApplied {
        kommo_status_id: i64,
        stage_id: Option<String>,
        probability: Option<Decimal>,
        sla_days: Option<i32>,
        booking_status: Option<BookingStatus>,
        /// When the Kommo delivery was received (absent on events from before it was kept).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delivered_at: Option<DateTime<Utc>>,
    },
    LeadBookingLinked {
        booking_id: Uuid,
    },
}

impl DomainEvent for LeadEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::LeadCreated { .. } => "LeadCreated",
            Self::LeadStageMoved { .. } => "LeadStageMoved",
            Self::LeadValueChanged { .. } => "LeadValueChanged",
            Self::LeadOwnerAssigned { .. } => "LeadOwnerAssigned",
            Self::LeadNextActionSet { .. } => "LeadNextActionSet",
            Self::LeadClientAttached { .. } => "LeadClientAttached",
            Self::LeadWon { .. } => "LeadWon",
            Self::LeadLost { .. } => "LeadLost",
            Self::LeadReopened { .. } => "LeadReopened",
            Self::LeadKommoStatusApplied { .. } => "LeadKommoStatusApplied",
            Self::LeadBookingLinked { .. } => "LeadBookingLinked",
        };
        name.to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
