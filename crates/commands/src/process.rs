//! The process manager that turns a won lead into its booking.
//!
//! `LeadWon` fixes the booking's id and code, so creating the booking is idempotent: running the
//! manager twice on the same event (a crash before its checkpoint moved, two instances in a
//! failover) finds the booking already created and only re-links it. Its checkpoint moves after
//! the commands, once per batch (at-least-once: a crash handles at most that batch again), which
//! that idempotency makes exactly-once in effect.

use std::time::Duration;

use domain::booking::{BookingCommand, BookingStatus, CreateBooking, Priority};
use domain::lead::{LeadCommand, LeadEvent};
use domain::{Actor, CommandMetadata};
use rust_decimal::Decimal;
use store::checkpoints::{self, Leadership};
use store::global_log::{LogFollower, RecordedEvent};
use uuid::Uuid;

use crate::{CommandBus, CommandError};

/// The consumer name of this process manager.
pub const NAME: &str = "process:lead_to_booking";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot read event {position}: {source}")]
    BadEvent {
        position: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// What handling one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Ignored,
    BookingCreated,
    AlreadyDone,
}

/// Handles one event of the log; anything but `LeadWon` is ignored.
pub async fn handle(bus: &CommandBus, event: &RecordedEvent) -> Result<Handled, ProcessError> {
    if event.aggregate_type != "Lead" || event.event_type != "LeadWon" {
        return Ok(Handled::Ignored);
    }
    let bad = |source| ProcessError::BadEvent {
        position: event.position.global_position,
        source,
    };
    let payload = domain::upcasting::upcast(
        &event.event_type,
        &event.event_version,
        event.payload.parse().map_err(bad)?,
    );
    let won: LeadEvent = serde_json::from_value(payload).map_err(bad)?;
    let LeadEvent::LeadWon {
        booking_id,
        booking_code,
        client_id,
        owner_id,
        booking_type,
        start_at,
        end_at,
        price_daily,
        vehicle_id,
        source,
        booking_status,
        ..
    } = won
    else {
        return Ok(Handled::Ignored);
    };
    let lead_id = Uuid::parse_str(&event.aggregate_id).map_err(|_| ProcessError::BadEvent {
        position: event.position.global_position,
        source: serde::de::Error::custom("the lead id is not a UUID"),
    })?;
    let correlation = event
        .metadata
        .get("correlation_id")
        .and_then(|v| v.as_str())
        .map_or_else(|| lead_id.to_string(), str::to_string);
    let meta = CommandMetadata::caused_by(
        Actor::system(),
        correlation,
        format!("Lead/{}/{}", event.aggregate_id, event.sequence),
    );

    let create = CreateBooking {
        external_code: booking_code,
        client_id,
        owner_id,
        booking_type,
        priority: Priority::Medium,
        channel: if source.trim().is_empty() {
            "Kommo".into()
        } else {
            source
        },
        start_at,
        end_at,
        vehicle_id,
        driver_id: None,
        price_daily: price_daily.amount(),
        deposit_amount: Decimal::ZERO,
        advance_payment: Decimal::ZERO,
        full_insurance_fee: Decimal::ZERO,
        currency: None,
        pickup_location: None,
        dropoff_location: None,
        services: vec![],
        lead_id: Some(lead_id),
    };
    let outcome = match bus
        .bookings
        .create(
            booking_id,
            BookingCommand::Create(Box::new(create)),
            &meta,
            None,
        )
        .await
    {
        Ok(_) => Handled::BookingCreated,
        Err(CommandError::Domain {
            code: "booking.already_exists",
            ..
        }) => Handled::AlreadyDone,
        Err(e) => return Err(e.into()),
    };

    // The stage says the booking starts confirmed: try, but a missing or busy vehicle leaves it
    // a lead for operations to handle (the refusal is logged, the booking exists).
    if booking_status == Some(BookingStatus::Confirmed) {
        match bus
            .bookings
            .execute(booking_id, BookingCommand::Confirm, &meta, None)
            .await
        {
            Ok(_) => {}
            Err(e @ (CommandError::Domain { .. } | CommandError::VehicleUnavailable { .. })) => {
                tracing::info!(%booking_id, reason = %e, "won lead's booking left unconfirmed");
            }
            Err(e) => return Err(e.into()),
        }
    }

    bus.leads
        .execute(
            lead_id,
            LeadCommand::LinkBooking { booking_id },
            &meta,
            None,
        )
        .await?;
    Ok(outcome)
}

/// Runs the process manager until `shutdown` resolves: one active instance per database, the
/// others wait to take over.
pub async fn run(bus: &CommandBus, shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut shutdown = shutdown;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match Leadership::try_acquire(&bus.pool, NAME).await {
            Ok(Some(mut lead)) => {
                if let Err(e) = follow(bus, &mut lead, &mut shutdown).await {
                    tracing::error!(consumer = NAME, error = %e, "process manager stopped; retrying");
                }
                lead.release().await;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(consumer = NAME, error = %e, "cannot reach the database"),
        }
        tokio::select! {
            _ = shutdown.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn follow(
    bus: &CommandBus,
    lead: &mut Leadership,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), ProcessError> {
    let from = checkpoints::load(&bus.pool, NAME).await?;
    let mut follower = LogFollower::new(bus.pool.clone(), from);
    loop {
        let batch = tokio::select! {
            batch = follower.next_batch() => batch?,
            _ = shutdown.changed() => return Ok(()),
        };
        if !lead.still_held().await {
            return Ok(());
        }
        // The checkpoint moves once per batch, past the events handled: handling is
        // idempotent (the booking's id and code are fixed in `LeadWon`), so after a crash the
        // events of an unsaved batch are handled again harmlessly. Saving after every event
        // made each event a durable commit of its own, and the manager fell far behind a busy
        // log.
        let mut handled = None;
        let mut count = 0;
        for event in &batch {
            if let Err(e) = handle(bus, event).await {
                if let Some(position) = handled {
                    checkpoints::save(&bus.pool, NAME, position, count).await?;
                }
                checkpoints::record_error(
                    &bus.pool,
                    NAME,
                    event.position.global_position,
                    &e.to_string(),
                )
                .await?;
                return Err(e);
            }
            handled = Some(event.position);
            count += 1;
        }
        if let Some(position) = handled {
            checkpoints::save(&bus.pool, NAME, position, count).await?;
        }
        tracing::debug!(consumer = NAME, events = batch.len(), "batch handled");
    }
}
