//! The Lead aggregate: a sales lead through the pipeline to won or lost (SPEC §2, `sales_leads`).
//!
//! Status: `active -> won`, `active -> lost`. Pipeline stages live in `sales_pipeline_stages`,
//! which the domain cannot read: commands carry them already resolved ([`StageRef`]). Winning
//! fixes the booking id in `LeadWon`; a process manager creates that one booking and links it
//! back with [`LeadCommand::LinkBooking`].

mod commands;
mod events;
#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use commands::{LeadCommand, StageRef};
pub use events::LeadEvent;

use crate::booking::BookingStatus;
use crate::types::{Money, Period, ValidationError, optional_text, required_text};
use crate::{DomainError, ErrorKind};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeadStatus {
    #[default]
    Active,
    Won,
    Lost,
}

impl LeadStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Won => "won",
            Self::Lost => "lost",
        }
    }
}

impl std::fmt::Display for LeadStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LeadError {
    #[error("the lead does not exist")]
    NotFound,
    #[error("the lead already exists")]
    AlreadyExists,
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("cannot {action} a lead that is {status}")]
    InvalidTransition {
        action: &'static str,
        status: LeadStatus,
    },
    #[error("winning a lead needs a client: attach one first")]
    ClientRequired,
    #[error("the lead is already linked to booking {linked}")]
    BookingConflict { linked: Uuid },
}

impl DomainError for LeadError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists | Self::BookingConflict { .. } => ErrorKind::Conflict,
            Self::Validation(_) | Self::ClientRequired => ErrorKind::Validation,
            Self::InvalidTransition { .. } => ErrorKind::InvalidTransition,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "lead.not_found",
            Self::AlreadyExists => "lead.already_exists",
            Self::Validation(_) => "lead.validation",
            Self::InvalidTransition { .. } => "lead.invalid_transition",
            Self::ClientRequired => "lead.client_required",
            Self::BookingConflict { .. } => "lead.booking_conflict",
        }
    }
}

/// The lead's state, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lead {
    pub created: bool,
    pub lead_code: String,
    pub status: LeadStatus,
    pub client_id: Option<Uuid>,
    pub owner_id: Uuid,
    pub stage_id: String,
    pub probability: Decimal,
    pub sla_days: i32,
    /// The current stage's booking status mapping.
    pub booking_status: Option<BookingStatus>,
    pub value_amount: Money,
    pub source: String,
    pub title: Option<String>,
    pub requested_start_at: Option<DateTime<Utc>>,
    pub requested_end_at: Option<DateTime<Utc>>,
    pub fleet_size: i32,
    pub expected_close_at: Option<DateTime<Utc>>,
    pub next_action: Option<String>,
    pub next_action_at: Option<DateTime<Utc>>,
    pub loss_reason: Option<String>,
    /// The booking the win asked for (`LeadWon`), before it is linked.
    pub won_booking_id: Option<Uuid>,
    /// The booking linked to this lead (`LeadBookingLinked`).
    pub booking_id: Option<Uuid>,
    pub kommo_lead_id: Option<i64>,
    pub kommo_status_id: Option<i64>,
    /// When the Kommo delivery of the latest status applied was received, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kommo_status_delivered_at: Option<DateTime<Utc>>,
}

/// A stage whose fields were checked.
struct Stage {
    id: String,
    probability: Decimal,
    sla_days: i32,
    booking_status: Option<BookingStatus>,
}

fn parse_stage(stage: StageRef) -> Result<Stage, ValidationError> {
    if stage.probability < Decimal::ZERO || stage.probability > Decimal::ONE {
        return Err(ValidationError::new(
            "probability",
            "must be between 0 and 1",
        ));
    }
    if stage.sla_days < 0 {
        return Err(ValidationError::new("sla_days", "must not be negative"));
    }
    Ok(Stage {
        id: required_text("stage_id", &stage.id)?,
        probability: stage.probability,
        sla_days: stage.sla_days,
        booking_status: stage.booking_status,
    })
}

impl Lead {
    fn require_active(&self, action: &'static str) -> Result<(), LeadError> {
        self.require(action, LeadStatus::Active)
    }

    fn require(&self, action: &'static str, allowed: LeadStatus) -> Result<(), LeadError> {
        if !self.created {
            return Err(LeadError::NotFound);
        }
        if self.status == allowed {
            Ok(())
        } else {
            Err(LeadError::InvalidTransition {
                action,
                status: self.status,
            })
        }
    }

    fn move_to(
        &mut self,
        stage_id: String,
        probability: Decimal,
        sla_days: i32,
        booking_status: Option<BookingStatus>,
    ) {
        self.stage_id = stage_id;
        self.probability = probability;
        self.sla_days = sla_days;
        self.booking_status = booking_status;
    }
}

use LeadStatus as S;

/// Kommo's own status "Closed - lost", the same id in every pipeline of every account.
pub const KOMMO_CLOSED_LOST: i64 = 143;

impl Aggregate for Lead {
    const TYPE: &'static str = "Lead";
    type Command = LeadCommand;
    type Event = LeadEvent;
    type Error = LeadError;
    type Services = ();

    async fn handle(
        &mut self,
        command: LeadCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), LeadError> {
        let event = match command {
            LeadCommand::Create {
                lead_code,
                client_id,
                owner_id,
                stage,
                value_amount,
                source,
                title,
                requested_start_at,
                requested_end_at,
                fleet_size,
                expected_close_at,
                kommo_lead_id,
            } => {
                if self.created {
                    return Err(LeadError::AlreadyExists);
                }
                let stage = parse_stage(stage)?;
                if let (Some(start_at), Some(end_at)) = (requested_start_at, requested_end_at) {
                    Period::parse(start_at, end_at)?;
                }
                if !(1..=100).contains(&fleet_size) {
                    return Err(
                        ValidationError::new("fleet_size", "must be between 1 and 100").into(),
                    );
                }
                LeadEvent::LeadCreated {
                    lead_code: required_text("lead_code", &lead_code)?,
                    client_id,
                    owner_id,
                    stage_id: stage.id,
                    probability: stage.probability,
                    sla_days: stage.sla_days,
                    booking_status: stage.booking_status,
                    value_amount: Money::parse("value_amount", value_amount)?,
                    source: required_text("source", &source)?,
                    title: optional_text("title", title.as_deref())?,
                    requested_start_at,
                    requested_end_at,
                    fleet_size,
                    expected_close_at,
                    kommo_lead_id,
                }
            }
            LeadCommand::MoveToStage { stage } => {
                self.require_active("move")?;
                let stage = parse_stage(stage)?;
                if stage.id == self.stage_id {
                    return Ok(());
                }
                LeadEvent::LeadStageMoved {
                    from_stage_id: self.stage_id.clone(),
                    stage_id: stage.id,
                    probability: stage.probability,
                    sla_days: stage.sla_days,
                    booking_status: stage.booking_status,
                }
            }
            LeadCommand::ChangeValue { value_amount } => {
                self.require_active("change the value of")?;
                let value_amount = Money::parse("value_amount", value_amount)?;
                if value_amount == self.value_amount {
                    return Ok(());
                }
                LeadEvent::LeadValueChanged { value_amount }
            }
            LeadCommand::AssignOwner { owner_id } => {
                self.require_active("assign an owner to")?;
                if owner_id == self.owner_id {
                    return Ok(());
                }
                LeadEvent::LeadOwnerAssigned { owner_id }
            }
            LeadCommand::SetNextAction {
                next_action,
                next_action_at,
            } => {
                self.require_active("set the next action of")?;
                let next_action = required_text("next_action", &next_action)?;
                if self.next_action.as_deref() == Some(next_action.as_str())
                    && self.next_action_at == Some(next_action_at)
                {
                    return Ok(());
                }
                LeadEvent::LeadNextActionSet {
                    next_action,
                    next_action_at,
                }
            }
            LeadCommand::AttachClient { client_id } => {
                self.require_active("attach a client to")?;
                if self.client_id == Some(client_id) {
                    return Ok(());
                }
                LeadEvent::LeadClientAttached { client_id }
            }
            LeadCommand::Win {
                booking_id,
                booking_code,
                booking_type,
                start_at,
                end_at,
                price_daily,
                vehicle_id,
                client_id,
            } => {
                self.require_active("win")?;
                let attach = client_id.filter(|&c| self.client_id != Some(c));
                let client_id = client_id
                    .or(self.client_id)
                    .ok_or(LeadError::ClientRequired)?;
                let start_at = start_at.or(self.requested_start_at).ok_or_else(|| {
                    ValidationError::new(
                        "start_at",
                        "is required: the lead has no requested period",
                    )
                })?;
                let end_at = end_at.or(self.requested_end_at).ok_or_else(|| {
                    ValidationError::new("end_at", "is required: the lead has no requested period")
                })?;
                let period = Period::parse(start_at, end_at)?;
                let price_daily = Money::parse("price_daily", price_daily)?;
                // The booking the win makes will be refused if its total is: refused here, so
                // that no won lead waits for a booking that can never be made.
                if price_daily.times(period.duration_days()).is_none() {
                    return Err(ValidationError::new(
                        "price_daily",
                        "is too large: the booking's total for the period would be too",
                    )
                    .into());
                }
                let booking_code = required_text("booking_code", &booking_code)?;
                // Everything is checked: the client attached and the win commit together.
                if let Some(client_id) = attach {
                    sink.write(LeadEvent::LeadClientAttached { client_id }, self)
                        .await;
                }
                LeadEvent::LeadWon {
                    booking_id,
                    booking_code,
                    client_id,
                    owner_id: self.owner_id,
                    booking_type,
                    start_at: period.start_at,
                    end_at: period.end_at,
                    price_daily,
                    vehicle_id,
                    value_amount: self.value_amount,
                    source: self.source.clone(),
                    booking_status: self.booking_status,
                }
            }
            LeadCommand::Lose { reason } => {
                self.require_active("lose")?;
                LeadEvent::LeadLost {
                    reason: required_text("reason", &reason)?,
                }
            }
            LeadCommand::ApplyKommoStatus {
                kommo_status_id,
                previous_kommo_status_id,
                stage,
                delivered_at,
            } => {
                if !self.created {
                    return Err(LeadError::NotFound);
                }
                // Deliveries can be processed out of order (a retried one, several processes):
                // one received before the status already applied is older news.
                if let (Some(at), Some(seen)) = (delivered_at, self.kommo_status_delivered_at)
                    && at < seen
                {
                    return Ok(());
                }
                let stage = stage.map(parse_stage).transpose()?;
                // Moved in Kommo out of "Closed - lost": active again, at the stage the status
                // maps to (or at its own when it maps to none).
                let reopened = self.status == S::Lost
                    && previous_kommo_status_id == Some(KOMMO_CLOSED_LOST)
                    && kommo_status_id != KOMMO_CLOSED_LOST;
                if reopened {
                    sink.write(LeadEvent::LeadReopened {}, self).await;
                }
                let moved = stage
                    .filter(|s| (self.status == S::Active || reopened) && s.id != self.stage_id);
                // Closed as lost in Kommo (its fixed status 143, in every pipeline): the lead is
                // lost here too, in the same commit. (Closed as won needs the booking's details:
                // the lead stays active at its stage until it is won here.)
                let lost = kommo_status_id == KOMMO_CLOSED_LOST && self.status == S::Active;
                let lose = || LeadEvent::LeadLost {
                    reason: "closed as lost in Kommo".into(),
                };
                if moved.is_none() && self.kommo_status_id == Some(kommo_status_id) {
                    if lost {
                        sink.write(lose(), self).await;
                    }
                    return Ok(());
                }
                let applied = match moved {
                    Some(s) => LeadEvent::LeadKommoStatusApplied {
                        kommo_status_id,
                        stage_id: Some(s.id),
                        probability: Some(s.probability),
                        sla_days: Some(s.sla_days),
                        booking_status: s.booking_status,
                        delivered_at,
                    },
                    None => LeadEvent::LeadKommoStatusApplied {
                        kommo_status_id,
                        stage_id: None,
                        probability: None,
                        sla_days: None,
                        booking_status: None,
                        delivered_at,
                    },
                };
                if !lost {
                    applied
                } else {
                    sink.write(applied, self).await;
                    lose()
                }
            }
            LeadCommand::LinkBooking { booking_id } => {
                self.require("link a booking to", S::Won)?;
                match self.booking_id {
                    Some(linked) if linked == booking_id => return Ok(()),
                    Some(linked) => return Err(LeadError::BookingConflict { linked }),
                    None => LeadEvent::LeadBookingLinked { booking_id },
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: LeadEvent) {
        use LeadEvent as E;
        match event {
            E::LeadCreated {
                lead_code,
                client_id,
                owner_id,
                stage_id,
                probability,
                sla_days,
                booking_status,
                value_amount,
                source,
                title,
                requested_start_at,
                requested_end_at,
                fleet_size,
                expected_close_at,
                kommo_lead_id,
            } => {
                *self = Self {
                    created: true,
                    lead_code,
                    status: S::Active,
                    client_id,
                    owner_id,
                    stage_id,
                    probability,
                    sla_days,
                    booking_status,
                    value_amount,
                    source,
                    title,
                    requested_start_at,
                    requested_end_at,
                    fleet_size,
                    expected_close_at,
                    kommo_lead_id,
                    ..Self::default()
                };
            }
            E::LeadStageMoved {
                stage_id,
                probability,
                sla_days,
                booking_status,
                ..
            } => self.move_to(stage_id, probability, sla_days, booking_status),
            E::LeadValueChanged { value_amount } => self.value_amount = value_amount,
            E::LeadOwnerAssigned { owner_id } => self.owner_id = owner_id,
            E::LeadNextActionSet {
                next_action,
                next_action_at,
            } => {
                self.next_action = Some(next_action);
                self.next_action_at = Some(next_action_at);
            }
            E::LeadClientAttached { client_id } => self.client_id = Some(client_id),
            E::LeadWon { booking_id, .. } => {
                self.status = S::Won;
                self.won_booking_id = Some(booking_id);
            }
            E::LeadLost { reason } => {
                self.status = S::Lost;
                self.loss_reason = Some(reason);
            }
            E::LeadReopened {} => {
                self.status = S::Active;
                self.loss_reason = None;
            }
            E::LeadKommoStatusApplied {
                kommo_status_id,
                stage_id,
                probability,
                sla_days,
                booking_status,
                delivered_at,
            } => {
                self.kommo_status_id = Some(kommo_status_id);
                if delivered_at.is_some() {
                    self.kommo_status_delivered_at = delivered_at;
                }
                if let Some(stage_id) = stage_id {
                    self.move_to(
                        stage_id,
                        probability.unwrap_or(self.probability),
                        sla_days.unwrap_or(self.sla_days),
                        booking_status,
                    );
                }
            }
            E::LeadBookingLinked { booking_id } => self.booking_id = Some(booking_id),
        }
    }
}
