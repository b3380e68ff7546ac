//! A maintenance or repair block on a vehicle: the vehicle cannot be booked during it.
//!
//! Like a confirmed booking, a block takes its place in the vehicle schedule that the store
//! guards in the events' own transaction (no overlap with bookings or other blocks).

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::types::{Period, ValidationError, optional_text};
use crate::{DomainError, ErrorKind};

/// `maintenance_job_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    #[default]
    Maintenance,
    Repair,
    Detailing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VehicleBlockCommand {
    Create {
        vehicle_id: Uuid,
        kind: BlockKind,
        start_at: DateTime<Utc>,
        end_at: DateTime<Utc>,
        description: Option<String>,
    },
    Remove,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VehicleBlockEvent {
    VehicleBlocked {
        vehicle_id: Uuid,
        kind: BlockKind,
        start_at: DateTime<Utc>,
        end_at: DateTime<Utc>,
        description: Option<String>,
    },
    VehicleBlockRemoved {
        vehicle_id: Uuid,
    },
}

impl DomainEvent for VehicleBlockEvent {
    fn event_type(&self) -> String {
        match self {
            Self::VehicleBlocked { .. } => "VehicleBlocked",
            Self::VehicleBlockRemoved { .. } => "VehicleBlockRemoved",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VehicleBlockError {
    #[error("the block does not exist")]
    NotFound,
    #[error("the block already exists")]
    AlreadyExists,
    #[error("the block was removed already")]
    Removed,
    #[error(transparent)]
    Validation(#[from] ValidationError),
}

impl DomainError for VehicleBlockError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists => ErrorKind::Conflict,
            Self::Removed => ErrorKind::InvalidTransition,
            Self::Validation(_) => ErrorKind::Validation,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "vehicle_block.not_found",
            Self::AlreadyExists => "vehicle_block.already_exists",
            Self::Removed => "vehicle_block.removed",
            Self::Validation(_) => "vehicle_block.validation",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VehicleBlock {
    pub created: bool,
    pub removed: bool,
    pub vehicle_id: Uuid,
    pub kind: BlockKind,
    pub period: Option<Period>,
    pub description: Option<String>,
}

impl Aggregate for VehicleBlock {
    const TYPE: &'static str = "VehicleBlock";
    type Command = VehicleBlockCommand;
    type Event = VehicleBlockEvent;
    type Error = VehicleBlockError;
    type Services = ();

    async fn handle(
        &mut self,
        command: VehicleBlockCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), VehicleBlockError> {
        let event = match command {
            VehicleBlockCommand::Create {
                vehicle_id,
                kind,
                start_at,
                end_at,
                description,
            } => {
                if self.created {
                    return Err(VehicleBlockError::AlreadyExists);
                }
                let period = Period::parse(start_at, end_at)?;
                VehicleBlockEvent::VehicleBlocked {
                    vehicle_id,
                    kind,
                    start_at: period.start_at,
                    end_at: period.end_at,
                    description: optional_text("description", description.as_deref())?,
                }
            }
            VehicleBlockCommand::Remove => {
                if !self.created {
                    return Err(VehicleBlockError::NotFound);
                }
                if self.removed {
                    return Err(VehicleBlockError::Removed);
                }
                VehicleBlockEvent::VehicleBlockRemoved {
                    vehicle_id: self.vehicle_id,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: VehicleBlockEvent) {
        match event {
            VehicleBlockEvent::VehicleBlocked {
                vehicle_id,
                kind,
                start_at,
                end_at,
                description,
            } => {
                *self = Self {
                    created: true,
                    removed: false,
                    vehicle_id,
                    kind,
                    period: Some(Period { start_at, end_at }),
                    description,
                };
            }
            VehicleBlockEvent::VehicleBlockRemoved { .. } => self.removed = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use cqrs_es::test::TestFramework;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, day, 10, 0, 0).unwrap()
    }
    const V: Uuid = Uuid::from_u128(7);

    fn blocked() -> VehicleBlockEvent {
        VehicleBlockEvent::VehicleBlocked {
            vehicle_id: V,
            kind: BlockKind::Repair,
            start_at: t(1),
            end_at: t(3),
            description: Some("brake discs".into()),
        }
    }

    fn create(start: DateTime<Utc>, end: DateTime<Utc>) -> VehicleBlockCommand {
        VehicleBlockCommand::Create {
            vehicle_id: V,
            kind: BlockKind::Repair,
            start_at: start,
            end_at: end,
            description: Some("  brake discs ".into()),
        }
    }

    #[test]
    fn blocks_a_vehicle_for_a_period() {
        TestFramework::<VehicleBlock>::with(())
            .given_no_previous_events()
            .when(create(t(1), t(3)))
            .then_expect_events(vec![blocked()]);
    }

    #[test]
    fn refuses_an_empty_period_and_a_second_create() {
        TestFramework::<VehicleBlock>::with(())
            .given_no_previous_events()
            .when(create(t(3), t(3)))
            .then_expect_error(ValidationError::new("end_at", "must be after start_at").into());
        TestFramework::<VehicleBlock>::with(())
            .given(vec![blocked()])
            .when(create(t(1), t(3)))
            .then_expect_error(VehicleBlockError::AlreadyExists);
    }

    #[test]
    fn removes_once() {
        TestFramework::<VehicleBlock>::with(())
            .given(vec![blocked()])
            .when(VehicleBlockCommand::Remove)
            .then_expect_events(vec![VehicleBlockEvent::VehicleBlockRemoved {
                vehicle_id: V,
            }]);
        TestFramework::<VehicleBlock>::with(())
            .given(vec![
                blocked(),
                VehicleBlockEvent::VehicleBlockRemoved { vehicle_id: V },
            ])
            .when(VehicleBlockCommand::Remove)
            .then_expect_error(VehicleBlockError::Removed);
        TestFramework::<VehicleBlock>::with(())
            .given_no_previous_events()
            .when(VehicleBlockCommand::Remove)
            .then_expect_error(VehicleBlockError::NotFound);
    }
}
