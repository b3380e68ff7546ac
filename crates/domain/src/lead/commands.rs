//! Lead commands: raw inputs; the aggregate parses them into value types.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::booking::{BookingStatus, BookingType};

/// A pipeline stage (`sales_pipeline_stages`), resolved by the caller before the command is built:
/// the domain cannot read the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRef {
    pub id: String,
    /// Win probability of the stage, `0..=1`.
    pub probability: Decimal,
    pub sla_days: i32,
    /// The status a booking created from a lead won in this stage starts in.
    pub booking_status: Option<BookingStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LeadCommand {
    Create {
        /// `LD-...`, allocated by the caller (a database sequence) before the command.
        lead_code: String,
        client_id: Option<Uuid>,
        owner_id: Uuid,
        stage: StageRef,
        value_amount: Decimal,
        source: String,
        title: Option<String>,
        requested_start_at: Option<DateTime<Utc>>,
        requested_end_at: Option<DateTime<Utc>>,
        fleet_size: i32,
        expected_close_at: Option<DateTime<Utc>>,
        kommo_lead_id: Option<i64>,
    },
    MoveToStage {
        stage: StageRef,
    },
    ChangeValue {
        value_amount: Decimal,
    },
    AssignOwner {
        owner_id: Uuid,
    },
    SetNextAction {
        next_action: String,
        next_action_at: DateTime<Utc>,
    },
    AttachClient {
        client_id: Uuid,
    },
    /// Wins the lead. The booking id is chosen here, so the booking the process manager creates
    /// from `LeadWon` is the same on every replay.
    Win {
        booking_id: Uuid,
        /// `BK-...`, allocated by the caller before the command.
        booking_code: String,
        booking_type: BookingType,
        /// The booked period; the lead's requested one when absent.
        start_at: Option<DateTime<Utc>>,
        end_at: Option<DateTime<Utc>>,
        price_daily: Decimal,
        vehicle_id: Option<Uuid>,
        /// Attaches this client first (in the same commit), when it is not the lead's already.
        #[serde(default)]
        client_id: Option<Uuid>,
    },
    Lose {
        reason: String,
    },
    /// A status change coming from Kommo, with the local stage it maps to (if any).
    ApplyKommoStatus {
        kommo_status_id: i64,
        /// Kommo's status before this move (the webhook's `old_status_id`), when known: a lead
        /// lost here is reopened only when Kommo moves it out of "Closed - lost", never by a
        /// delivery that predates the loss.
        #[serde(default)]
        previous_kommo_status_id: Option<i64>,
        stage: Option<StageRef>,
        /// When the delivery was received: one received before the status last applied
        /// changes nothing.
        #[serde(default)]
        delivered_at: Option<DateTime<Utc>>,
    },
    /// Records the booking created from the won lead.
    LinkBooking {
        booking_id: Uuid,
    },
}
