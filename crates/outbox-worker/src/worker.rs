//! Delivering outbox rows.
//!
//! States: `pending` (due at `next_run_at`) -> `processing` (claimed, leased until
//! `lease_expires_at`) -> `processed`, or back to `pending` with a backoff, or `failed` (a dead
//! letter: permanent error, or attempts exhausted; an operator may requeue it).
//!
//! * Claims use `FOR UPDATE SKIP LOCKED`, so workers never wait on each other; a row whose lease
//!   expired (its worker died) is claimed again.
//! * A row is claimable only when no earlier row of the same entity and target is still pending
//!   or processing: per entity and target, deliveries happen in log order.
//! * Every delivery is an upsert on a stable key (or a lookup before a create), so delivering a
//!   row twice (a worker killed between the CRM's answer and its own commit) changes nothing.
//! * Returned external ids are written back as commands (events too), then the row is marked.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use commands::CommandBus;
use crm::{
    ContactInput, CrmError, KommoClient, SalesOrder, SalesOrderItem, ZohoClient, ZohoContact,
};
use domain::booking::{BookingCommand, BookingStatus};
use domain::client::ClientCommand;
use domain::{Actor, CommandMetadata};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::backoff::Backoff;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `OUTBOX_MAX_ATTEMPTS`.
    pub max_attempts: i32,
    /// `OUTBOX_LEASE_SECONDS`.
    pub lease: Duration,
    /// Rows claimed (and delivered concurrently) per round.
    pub batch: i64,
    pub backoff: Backoff,
    /// Who this worker is (stored as the lease owner).
    pub owner: String,
    /// How long to wait when nothing is due.
    pub idle: Duration,
}

impl WorkerConfig {
    pub fn from_env() -> Self {
        let num = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            max_attempts: num("OUTBOX_MAX_ATTEMPTS", 12) as i32,
            lease: Duration::from_secs(num("OUTBOX_LEASE_SECONDS", 60)),
            batch: 16,
            backoff: Backoff::default(),
            owner: format!("worker-{}-{}", std::process::id(), Uuid::now_v7()),
            idle: Duration::from_millis(200),
        }
    }
}

/// The CRM clients a worker delivers to.
pub struct Targets {
    pub kommo: Arc<KommoClient>,
    pub zoho: Arc<ZohoClient>,
}

/// A claimed row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub target_system: String,
    pub event_type: String,
    pub payload: Value,
    pub attempts: i32,
}

/// What one step of the worker did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionOutcome {
    /// Nothing was due.
    Empty,
    /// Rows handled this round, by outcome.
    Round {
        delivered: usize,
        retried: usize,
        snoozed: usize,
        dead: usize,
    },
}

/// How a delivery ended.
enum Delivery {
    Done(Value),
    /// Not yet possible (e.g. the client's Zoho contact is not synced): try later, no attempt used.
    Wait(Duration, String),
    Failed(CrmError),
}

pub struct Worker {
    pool: PgPool,
    bus: Arc<CommandBus>,
    targets: Targets,
    config: WorkerConfig,
}

impl Worker {
    pub fn new(pool: PgPool, bus: Arc<CommandBus>, targets: Targets, config: WorkerConfig) -> Self {
        Self {
            pool,
            bus,
            targets,
            config,
        }
    }

    /// Claims due rows and delivers them (concurrently; they belong to distinct entities).
    pub async fn try_execute_task(&self) -> Result<ExecutionOutcome, sqlx::Error> {
        let rows = self.claim().await?;
        if rows.is_empty() {
            return Ok(ExecutionOutcome::Empty);
        }
        let results = futures::future::join_all(rows.iter().map(|r| self.handle(r))).await;
        let (mut delivered, mut retried, mut snoozed, mut dead) = (0, 0, 0, 0);
        for r in results {
            match r? {
                Settled::Delivered => delivered += 1,
                Settled::Retried => retried += 1,
                Settled::Snoozed => snoozed += 1,
                Settled::Dead => dead += 1,
                Settled::LeaseLost => {}
            }
        }
        Ok(ExecutionOutcome::Round {
            delivered,
            retried,
            snoozed,
            dead,
        })
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let wait = match self.try_execute_task().await {
                Ok(ExecutionOutcome::Empty) => self.config.idle,
                Ok(_) => Duration::ZERO,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox worker cannot reach the database");
                    Duration::from_secs(2)
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.changed() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    async fn claim(&self) -> Result<Vec<Claimed>, sqlx::Error> {
        sqlx::query_as(
            "WITH due AS ( \
               SELECT o.id FROM integrations_outbox o \
               WHERE ((o.status = 'pending' AND o.next_run_at <= now()) \
                   OR (o.status = 'processing' AND o.lease_expires_at < now())) \
                 AND NOT EXISTS ( \
                   SELECT 1 FROM integrations_outbox p \
                   WHERE p.entity_id = o.entity_id AND p.target_system = o.target_system \
                     AND p.source_position < o.source_position \
                     AND p.status IN ('pending', 'processing')) \
               ORDER BY o.source_position \
               LIMIT $1 \
               FOR UPDATE SKIP LOCKED) \
             UPDATE integrations_outbox o SET status = 'processing', lease_owner = $2, \
               lease_expires_at = now() + make_interval(secs => $3), attempts = o.attempts + 1, \
               updated_at = now() \
             FROM due WHERE o.id = due.id \
             RETURNING o.id, o.entity_type, o.entity_id, o.target_system, o.event_type, o.payload, o.attempts",
        )
        .bind(self.config.batch)
        .bind(&self.config.owner)
        .bind(self.config.lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await
    }

    async fn handle(&self, row: &Claimed) -> Result<Settled, sqlx::Error> {
        // Keep the lease while the delivery runs (pacing may make it wait): a live worker never
        // loses its row to another; a dead one stops renewing and its lease runs out.
        let outcome = {
            let delivery = self.deliver(row);
            tokio::pin!(delivery);
            let mut renew = tokio::time::interval(self.config.lease / 3);
            renew.tick().await;
            loop {
                tokio::select! {
                    d = &mut delivery => break d,
                    _ = renew.tick() => self.renew_lease(row).await,
                }
            }
        };
        match outcome {
            Delivery::Done(response) => self.finish(row, response).await,
            Delivery::Wait(after, why) => self.reschedule(row, after, &why, false).await,
            Delivery::Failed(CrmError::RateLimited { retry_after }) => {
                // Without Retry-After, wait at least the rate window (one second) plus backoff, so
                // snoozed rows do not come back as a burst.
                let after = retry_after.unwrap_or_else(|| {
                    Duration::from_secs(1) + self.config.backoff.delay(row.attempts as u32)
                });
                self.reschedule(row, after, "rate limited", false).await
            }
            Delivery::Failed(e) if e.is_retryable() && row.attempts < self.config.max_attempts => {
                let after = self.config.backoff.delay(row.attempts as u32);
                self.reschedule(row, after, &e.to_string(), true).await
            }
            Delivery::Failed(e) => {
                self.record_failure(row, &e).await;
                self.dead_letter(row, &e.to_string()).await
            }
        }
    }

    async fn renew_lease(&self, row: &Claimed) {
        let _ = sqlx::query(
            "UPDATE integrations_outbox SET lease_expires_at = now() + make_interval(secs => $3) \
             WHERE id = $1 AND lease_owner = $2 AND status = 'processing'",
        )
        .bind(row.id)
        .bind(&self.config.owner)
        .bind(self.config.lease.as_secs_f64())
        .execute(&self.pool)
        .await;
    }

    /// Marks a row processed, if this worker still holds its lease.
    async fn finish(&self, row: &Claimed, response: Value) -> Result<Settled, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE integrations_outbox SET status = 'processed', response = $3, last_error = NULL, \
               lease_owner = NULL, lease_expires_at = NULL, processed_at = now(), updated_at = now() \
             WHERE id = $1 AND lease_owner = $2 AND status = 'processing'",
        )
        .bind(row.id)
        .bind(&self.config.owner)
        .bind(response)
        .execute(&self.pool)
        .await?;
        Ok(if done.rows_affected() == 1 {
            Settled::Delivered
        } else {
            Settled::LeaseLost
        })
    }

    async fn reschedule(
        &self,
        row: &Claimed,
        after: Duration,
        why: &str,
        counts: bool,
    ) -> Result<Settled, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE integrations_outbox SET status = 'pending', last_error = $3, \
               attempts = attempts - CASE WHEN $5 THEN 0 ELSE 1 END, \
               next_run_at = now() + make_interval(secs => $4), lease_owner = NULL, \
               lease_expires_at = NULL, updated_at = now() \
             WHERE id = $1 AND lease_owner = $2 AND status = 'processing'",
        )
        .bind(row.id)
        .bind(&self.config.owner)
        .bind(why)
        .bind(after.as_secs_f64())
        .bind(counts)
        .execute(&self.pool)
        .await?;
        Ok(match (done.rows_affected(), counts) {
            (0, _) => Settled::LeaseLost,
            (_, true) => Settled::Retried,
            (_, false) => Settled::Snoozed,
        })
    }

    async fn dead_letter(&self, row: &Claimed, why: &str) -> Result<Settled, sqlx::Error> {
        tracing::warn!(row = %row.id, target = %row.target_system, action = %row.event_type, error = %why, "outbox row dead-lettered");
        let done = sqlx::query(
            "UPDATE integrations_outbox SET status = 'failed', last_error = $3, lease_owner = NULL, \
               lease_expires_at = NULL, updated_at = now() \
             WHERE id = $1 AND lease_owner = $2 AND status = 'processing'",
        )
        .bind(row.id)
        .bind(&self.config.owner)
        .bind(why)
        .execute(&self.pool)
        .await?;
        Ok(if done.rows_affected() == 1 {
            Settled::Dead
        } else {
            Settled::LeaseLost
        })
    }

    fn meta(&self, row: &Claimed) -> CommandMetadata {
        let correlation = row
            .payload
            .get("correlation_id")
            .and_then(|v| v.as_str())
            .map_or_else(|| row.entity_id.to_string(), str::to_string);
        CommandMetadata::caused_by(
            Actor::outbox_worker(),
            correlation,
            format!("outbox/{}", row.id),
        )
    }

    /// A sales order that fails for good is recorded on the booking (`zoho_sync_status`).
    async fn record_failure(&self, row: &Claimed, error: &CrmError) {
        if row.target_system == "zoho" && row.event_type == "sales_order.upsert" {
            let _ = self
                .bus
                .bookings
                .execute(
                    row.entity_id,
                    BookingCommand::RecordZohoSyncFailure {
                        error: error.to_string(),
                    },
                    &self.meta(row),
                    None,
                )
                .await;
        }
    }

    async fn deliver(&self, row: &Claimed) -> Delivery {
        let result = match (row.target_system.as_str(), row.event_type.as_str()) {
            ("kommo", "contact.upsert") => self.kommo_contact(row).await,
            ("zoho", "contact.upsert") => self.zoho_contact(row).await,
            ("zoho", "sales_order.upsert") => self.zoho_sales_order(row).await,
            ("kommo", "lead.status") => self.kommo_lead_status(row).await,
            (target, action) => Err(permanent(format!(
                "unknown outbox action {target}/{action}"
            ))),
        };
        match result {
            Ok(d) => d,
            Err(e) => Delivery::Failed(e),
        }
    }

    /// The current state of a client that must exist.
    async fn existing_client(&self, id: Uuid) -> Result<domain::client::Client, CrmError> {
        let (client, _) = self.bus.clients.replay(id, None).await.map_err(internal)?;
        if !client.created {
            return Err(permanent("the client does not exist".into()));
        }
        Ok(client)
    }

    /// Records an external id on the row's client, as the outbox worker.
    async fn write_back_client(&self, row: &Claimed, link: ClientCommand) -> Result<(), CrmError> {
        self.bus
            .clients
            .execute(row.entity_id, link, &self.meta(row), None)
            .await
            .map_err(internal)?;
        Ok(())
    }

    async fn kommo_contact(&self, row: &Claimed) -> Result<Delivery, CrmError> {
        let client = self.existing_client(row.entity_id).await?;
        let known = client
            .kommo_contact_id
            .as_deref()
            .and_then(|s| s.parse().ok());
        let (first, last) = split_name(&client.name);
        let input = ContactInput {
            external_key: row.entity_id,
            name: client.name.clone(),
            first_name: first,
            last_name: last,
            phone: client.phone.as_ref().map(|p| p.as_str().to_string()),
            email: client.email.as_ref().map(|e| e.as_str().to_string()),
        };
        let id = self.targets.kommo.upsert_contact(&input, known).await?;
        if known != Some(id) {
            let link = ClientCommand::LinkKommoContact {
                kommo_contact_id: id.to_string(),
            };
            self.write_back_client(row, link).await?;
        }
        Ok(Delivery::Done(json!({ "kommo_contact_id": id })))
    }

    async fn zoho_contact(&self, row: &Claimed) -> Result<Delivery, CrmError> {
        let client = self.existing_client(row.entity_id).await?;
        let (first, last) = split_name(&client.name);
        let contact = ZohoContact {
            external_key: row.entity_id,
            last_name: last.unwrap_or_else(|| client.name.clone()),
            first_name: first,
            email: client.email.as_ref().map(|e| e.as_str().to_string()),
            phone: client.phone.as_ref().map(|p| p.as_str().to_string()),
            mailing_country: client
                .residency_country
                .as_ref()
                .map(|c| c.as_str().to_string()),
        };
        let id = self.targets.zoho.upsert_contact(&contact).await?;
        if client.zoho_contact_id.as_deref() != Some(id.as_str()) {
            let link = ClientCommand::LinkZohoContact {
                zoho_contact_id: id.clone(),
            };
            self.write_back_client(row, link).await?;
        }
        Ok(Delivery::Done(json!({ "zoho_contact_id": id })))
    }

    async fn zoho_sales_order(&self, row: &Claimed) -> Result<Delivery, CrmError> {
        let (booking, _) = self
            .bus
            .bookings
            .replay(row.entity_id, None)
            .await
            .map_err(internal)?;
        if !booking.created {
            return Err(permanent("the booking does not exist".into()));
        }
        let (client, _) = self
            .bus
            .clients
            .replay(booking.client_id, None)
            .await
            .map_err(internal)?;
        let Some(contact_id) = client.zoho_contact_id.clone() else {
            // The contact comes first. If its delivery is dead, this one cannot succeed either.
            let contact_dead: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM integrations_outbox WHERE entity_id = $1 \
                   AND target_system = 'zoho' AND event_type = 'contact.upsert' AND status = 'failed')",
            )
            .bind(booking.client_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| internal(e.to_string()))?;
            if contact_dead || !client.created {
                return Err(permanent(
                    "the client's Zoho contact could not be synced; requeue it first".into(),
                ));
            }
            return Ok(Delivery::Wait(
                Duration::from_secs(2),
                "waiting for the client's Zoho contact".into(),
            ));
        };
        let vehicle: Option<(String, Option<String>)> = match booking.vehicle_id {
            Some(v) => sqlx::query_as("SELECT name, zoho_item_id FROM vehicles WHERE id = $1")
                .bind(v)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| internal(e.to_string()))?,
            None => None,
        };
        let (vehicle_name, item) = vehicle.unwrap_or_default();
        let mut items = Vec::new();
        if let Some(product_id) = item {
            items.push(SalesOrderItem {
                product_id,
                quantity: Decimal::from(booking.rental_duration_days),
                list_price: booking.price_daily.amount(),
                description: Some(format!("{} rental", vehicle_name)),
            });
        }
        let order = SalesOrder {
            booking_code: booking.external_code.clone(),
            subject: format!("{} {}", booking.external_code, vehicle_name)
                .trim()
                .to_string(),
            contact_id,
            status: zoho_status(booking.status).into(),
            items,
        };
        let id = self.targets.zoho.upsert_sales_order(&order).await?;
        self.bus
            .bookings
            .execute(
                row.entity_id,
                BookingCommand::LinkZohoSalesOrder {
                    zoho_sales_order_id: id.clone(),
                },
                &self.meta(row),
                None,
            )
            .await
            .map_err(internal)?;
        Ok(Delivery::Done(json!({ "zoho_sales_order_id": id })))
    }

    async fn kommo_lead_status(&self, row: &Claimed) -> Result<Delivery, CrmError> {
        let db = |e: sqlx::Error| internal(e.to_string());
        let (lead_id, status): (Option<Uuid>, Option<(String, Option<String>)>) = match row
            .entity_type
            .as_str()
        {
            "booking" => {
                let (booking, _) = self
                    .bus
                    .bookings
                    .replay(row.entity_id, None)
                    .await
                    .map_err(internal)?;
                let status: Option<(String, Option<String>)> = sqlx::query_as(
                    "SELECT k.id, (SELECT kommo_pipeline_id FROM sales_pipeline_stages \
                       WHERE kommo_pipeline_id IS NOT NULL ORDER BY order_index LIMIT 1) \
                     FROM kommo_pipeline_stages k WHERE k.booking_status = $1::booking_status \
                     ORDER BY k.order_index LIMIT 1",
                )
                .bind(booking.status.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                (booking.lead_id, status)
            }
            _ => {
                let (lead, _) = self
                    .bus
                    .leads
                    .replay(row.entity_id, None)
                    .await
                    .map_err(internal)?;
                let stage = match lead.status {
                    domain::lead::LeadStatus::Won => "won".to_string(),
                    domain::lead::LeadStatus::Lost => "lost".to_string(),
                    domain::lead::LeadStatus::Active => lead.stage_id.clone(),
                };
                let status: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                    "SELECT kommo_status_id, kommo_pipeline_id FROM sales_pipeline_stages WHERE id = $1",
                )
                .bind(stage)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                (
                    Some(row.entity_id),
                    status.and_then(|(s, p)| s.map(|s| (s, p))),
                )
            }
        };
        let kommo_lead = match lead_id {
            Some(id) => {
                self.bus
                    .leads
                    .replay(id, None)
                    .await
                    .map_err(internal)?
                    .0
                    .kommo_lead_id
            }
            None => None,
        };
        let (Some(kommo_lead), Some((status_id, pipeline))) = (kommo_lead, status) else {
            return Ok(Delivery::Done(
                json!({ "skipped": "no Kommo lead or stage mapping" }),
            ));
        };
        let (Ok(status_id), Some(Ok(pipeline_id))) =
            (status_id.parse::<i64>(), pipeline.map(|p| p.parse::<i64>()))
        else {
            return Err(permanent("the Kommo stage mapping is not numeric".into()));
        };
        self.targets
            .kommo
            .update_lead_status(kommo_lead, status_id, pipeline_id)
            .await?;
        Ok(Delivery::Done(
            json!({ "kommo_lead_id": kommo_lead, "status_id": status_id }),
        ))
    }
}

enum Settled {
    Delivered,
    Retried,
    Snoozed,
    Dead,
    LeaseLost,
}

fn permanent(message: String) -> CrmError {
    CrmError::Permanent {
        status: 0,
        code: None,
        message,
    }
}

/// Our own failure (database, write-back): transient, retried like a CRM outage.
fn internal(e: impl std::fmt::Display) -> CrmError {
    CrmError::Transient {
        status: None,
        message: format!("internal: {e}"),
    }
}

fn split_name(name: &str) -> (Option<String>, Option<String>) {
    match name.trim().rsplit_once(' ') {
        Some((first, last)) => (Some(first.to_string()), Some(last.to_string())),
        None => (None, Some(name.trim().to_string())),
    }
}

/// The Zoho sales-order status of a booking status.
fn zoho_status(status: BookingStatus) -> &'static str {
    match status {
        BookingStatus::Lead => "Created",
        BookingStatus::Confirmed => "Approved",
        BookingStatus::Delivery | BookingStatus::InProgress => "Delivered",
        BookingStatus::Completed => "Closed",
        BookingStatus::Cancelled => "Cancelled",
    }
}

/// Requeues a dead letter (operators): back to `pending`, attempts reset, due now.
pub async fn requeue(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE integrations_outbox SET status = 'pending', attempts = 0, next_run_at = now(), \
           last_error = NULL, updated_at = now() WHERE id = $1 AND status = 'failed'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// When the next row is due (for tests and status pages).
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(next_run_at) FROM integrations_outbox WHERE status = 'pending'")
        .fetch_one(pool)
        .await
}
