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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use commands::CommandBus;
use crm::{
    ContactInput, CrmError, KommoClient, SalesOrder, SalesOrderItem, ZohoClient, ZohoContact,
};
use domain::booking::{Booking, BookingCommand, BookingStatus};
use domain::client::{Client, ClientCommand};
use domain::{Actor, CommandMetadata};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use crate::backoff::Backoff;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `OUTBOX_MAX_ATTEMPTS`.
    pub max_attempts: i32,
    /// `OUTBOX_LEASE_SECONDS`.
    pub lease: Duration,
    /// Most rows claimed at once (a round of [`Worker::try_execute_task`], or one refill of
    /// [`Worker::run`]).
    pub batch: i64,
    /// Most rows one worker keeps in delivery at once ([`Worker::run`]).
    pub max_in_flight: usize,
    pub backoff: Backoff,
    /// Who this worker is (stored as the lease owner).
    pub owner: String,
    /// How long to wait when nothing is due.
    pub idle: Duration,
}

impl WorkerConfig {
    /// From `OUTBOX_MAX_ATTEMPTS` (1 to 1,000, default 12) and `OUTBOX_LEASE_SECONDS` (1 to
    /// 86,400, default 60: renewed every third of it); a value that does not fit is an error.
    pub fn from_env() -> Result<Self, crate::setup::SetupError> {
        use crate::setup::number;
        Ok(Self {
            max_attempts: number("OUTBOX_MAX_ATTEMPTS", 12, 1, 1_000)? as i32,
            lease: Duration::from_secs(number("OUTBOX_LEASE_SECONDS", 60, 1, 86_400)?),
            batch: 32,
            max_in_flight: 64,
            backoff: Backoff::default(),
            owner: format!("worker-{}-{}", std::process::id(), Uuid::now_v7()),
            idle: Duration::from_millis(200),
        })
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
    /// 429s in a row so far (they use no attempt).
    pub rate_limited: i32,
}

/// What the contact and sales-order deliveries of one claim read: the bookings of its sales
/// orders, the clients of its contacts and of those bookings, and the bookings' vehicles. Loaded
/// for all of them together when the first delivery asks (a query per kind instead of a few per
/// row), then shared. The states are as current as a delivery's own replay at its start would
/// be: rows of one entity and target are never in delivery at once. If that load fails, each
/// delivery reads its own, as if there were no prefetch, so a failure stays with its row.
struct Prefetch {
    bookings: Vec<Uuid>,
    clients: Vec<Uuid>,
    /// `None` once the load failed.
    loaded: tokio::sync::OnceCell<Option<Loaded>>,
}

#[derive(Default)]
struct Loaded {
    bookings: HashMap<Uuid, Booking>,
    clients: HashMap<Uuid, Client>,
    /// Name and Zoho item id, by vehicle.
    vehicles: HashMap<Uuid, (String, Option<String>)>,
}

impl Prefetch {
    fn for_rows(rows: &[Claimed]) -> Arc<Self> {
        let mut bookings = Vec::new();
        let mut clients = Vec::new();
        for row in rows {
            match (row.target_system.as_str(), row.event_type.as_str()) {
                ("zoho", "sales_order.upsert") => bookings.push(row.entity_id),
                (_, "contact.upsert") => clients.push(row.entity_id),
                _ => {}
            }
        }
        Arc::new(Self {
            bookings,
            clients,
            loaded: tokio::sync::OnceCell::new(),
        })
    }

    /// Everything this claim's deliveries read, loaded once, on the first call (a delivery
    /// cancelled while loading leaves the load to the next caller); `None` if it failed.
    async fn get(&self, worker: &Inner) -> Option<&Loaded> {
        self.loaded
            .get_or_init(|| async {
                match self.load(worker).await {
                    Ok(loaded) => Some(loaded),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox worker could not load a claim's records together; each delivery reads its own");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    async fn load(&self, worker: &Inner) -> Result<Loaded, CrmError> {
        let bookings: HashMap<Uuid, Booking> = worker
            .bus
            .bookings
            .replay_many(&self.bookings)
            .await
            .map_err(internal)?
            .into_iter()
            .map(|(id, (booking, _))| (id, booking))
            .collect();
        let mut client_ids = self.clients.clone();
        client_ids.extend(bookings.values().filter(|b| b.created).map(|b| b.client_id));
        client_ids.sort_unstable();
        client_ids.dedup();
        let clients = worker
            .bus
            .clients
            .replay_many(&client_ids)
            .await
            .map_err(internal)?
            .into_iter()
            .map(|(id, (client, _))| (id, client))
            .collect();
        let mut vehicle_ids: Vec<Uuid> = bookings.values().filter_map(|b| b.vehicle_id).collect();
        vehicle_ids.sort_unstable();
        vehicle_ids.dedup();
        let vehicles = if vehicle_ids.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, (Uuid, String, Option<String>)>(
                "SELECT id, name, zoho_item_id FROM vehicles WHERE id = ANY($1)",
            )
            .bind(&vehicle_ids)
            .fetch_all(&worker.pool)
            .await
            .map_err(|e| internal(e.to_string()))?
            .into_iter()
            .map(|(id, name, item)| (id, (name, item)))
            .collect()
        };
        Ok(Loaded {
            bookings,
            clients,
            vehicles,
        })
    }
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
    /// Given up before it ended: the row was claimed again after this claim's lease ran out (by
    /// another worker, or by this one), so this delivery must not call the CRM for it. The row
    /// is left to the newer claim.
    Abandoned,
}

pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    bus: Arc<CommandBus>,
    targets: Targets,
    config: WorkerConfig,
}

/// Tallies of settled rows.
#[derive(Default)]
struct Tally {
    delivered: usize,
    retried: usize,
    snoozed: usize,
    dead: usize,
}

impl Tally {
    fn add(&mut self, s: Settled) {
        match s {
            Settled::Delivered => self.delivered += 1,
            Settled::Retried => self.retried += 1,
            Settled::Snoozed => self.snoozed += 1,
            Settled::Dead => self.dead += 1,
            Settled::LeaseLost => {}
        }
    }
}

impl Worker {
    pub fn new(pool: PgPool, bus: Arc<CommandBus>, targets: Targets, config: WorkerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                bus,
                targets,
                config,
            }),
        }
    }

    /// One round: claims up to `batch` due rows, delivers them concurrently (they belong to
    /// distinct entities), and settles them. [`Worker::run`] does not wait for rounds.
    pub async fn try_execute_task(&self) -> Result<ExecutionOutcome, sqlx::Error> {
        let inner = &self.inner;
        let rows = inner.claim(inner.config.batch, false).await?;
        if rows.is_empty() {
            return Ok(ExecutionOutcome::Empty);
        }
        let prefetch = Prefetch::for_rows(&rows);
        let outcomes =
            futures::future::join_all(rows.iter().map(|r| inner.deliver_leased(r, &prefetch)))
                .await;
        let done: Vec<(Claimed, Delivery)> = rows.into_iter().zip(outcomes).collect();
        let mut tally = Tally::default();
        inner.settle(done, &mut tally).await?;
        Ok(ExecutionOutcome::Round {
            delivered: tally.delivered,
            retried: tally.retried,
            snoozed: tally.snoozed,
            dead: tally.dead,
        })
    }

    /// Runs until `shutdown` turns true, keeping up to `max_in_flight` rows in delivery: rows
    /// are claimed as slots free up (never waiting for the slowest row of a claim), and
    /// finished rows are settled together. On shutdown it stops claiming and settles the rows
    /// it holds.
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let inner = &self.inner;
        let limit = inner.config.max_in_flight.max(1);
        // Claim again once this many slots are free (or nothing is in flight), so that claims
        // stay batches rather than one query per finished row.
        let refill = (limit / 4).max(1);
        let wants_rows = |len: usize| len < limit && (len == 0 || limit - len >= refill);
        let mut in_flight: tokio::task::JoinSet<(Claimed, Delivery)> = tokio::task::JoinSet::new();
        let mut done: Vec<(Claimed, Delivery)> = Vec::new();
        // When to look for due rows again if nothing finishes before.
        let mut next_claim = Instant::now();
        // The last claim found fewer due rows than it asked for: claim with the query for that
        // case, and not again before `SHORT_CLAIM_PAUSE` even when rows finish.
        let mut few_due = false;
        let mut earliest_claim = Instant::now();
        let mut stop_by: Option<Instant> = None;
        let mut tally = Tally::default();
        loop {
            if stop_by.is_none() && *shutdown.borrow() {
                stop_by = Some(Instant::now() + SHUTDOWN_GRACE);
            }
            if !done.is_empty() {
                let batch = std::mem::take(&mut done);
                if let Err(e) = inner.settle(batch, &mut tally).await {
                    // The rows stay leased; their leases run out and they are delivered again
                    // (harmlessly: deliveries are idempotent).
                    tracing::warn!(error = %e, "outbox worker cannot settle rows");
                    next_claim = Instant::now() + Duration::from_secs(2);
                }
            }
            if let Some(deadline) = stop_by {
                if in_flight.is_empty() {
                    return;
                }
                if Instant::now() >= deadline {
                    // Deliveries still waiting (for Kommo's pacing, say) are given up and their
                    // rows handed back at once; repeating a cut-off call is harmless.
                    in_flight.shutdown().await;
                    inner.release_all().await;
                    return;
                }
            } else if wants_rows(in_flight.len()) && next_claim <= Instant::now() {
                let want = (limit - in_flight.len()).min(inner.config.batch.max(1) as usize);
                let claimed_at = Instant::now();
                match inner.claim(want as i64, few_due).await {
                    Ok(rows) => {
                        few_due = rows.len() < want;
                        earliest_claim = claimed_at
                            + if few_due {
                                SHORT_CLAIM_PAUSE
                            } else {
                                Duration::ZERO
                            };
                        if few_due {
                            // Nothing more is due now: look again after `idle`, or sooner
                            // when a row finishes (it may unblock the next row of its entity).
                            next_claim = Instant::now() + inner.config.idle;
                        }
                        let prefetch = Prefetch::for_rows(&rows);
                        for row in rows {
                            let inner = self.inner.clone();
                            let prefetch = prefetch.clone();
                            in_flight.spawn(async move {
                                let d = inner.deliver_leased(&row, &prefetch).await;
                                (row, d)
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox worker cannot reach the database");
                        next_claim = Instant::now() + Duration::from_secs(2);
                    }
                }
                if wants_rows(in_flight.len()) && next_claim <= Instant::now() {
                    // Rows are still due and slots free: claim more at once.
                    continue;
                }
            }
            let claim_at = match stop_by {
                None if wants_rows(in_flight.len()) => Some(next_claim),
                None => None,
                Some(deadline) => Some(deadline),
            };
            tokio::select! {
                joined = in_flight.join_next(), if !in_flight.is_empty() => {
                    collect(joined, &mut done);
                    // Everything else that finished meanwhile is settled with it.
                    while let Some(joined) = in_flight.try_join_next() {
                        collect(Some(joined), &mut done);
                    }
                    // A finished row may unblock the next row of its entity.
                    next_claim = next_claim.min(Instant::now().max(earliest_claim));
                }
                () = sleep_until_some(claim_at) => {}
                changed = shutdown.changed(), if stop_by.is_none() => {
                    if changed.is_err() {
                        // The sender is gone: nobody can ask for a stop any more; stop now.
                        stop_by = Some(Instant::now() + SHUTDOWN_GRACE);
                    }
                }
            }
        }
    }
}

/// How soon a sales order waiting for its client's Zoho contact looks again after the contact's
/// row is due (it is usually delivered within one call).
const CONTACT_LOOK_AGAIN: Duration = Duration::from_millis(250);

/// The longest a sales order waits for its contact's row before looking again (an operator may
/// requeue a contact that waits longer).
const CONTACT_WAIT_CAP: Duration = Duration::from_secs(60);

/// How long a sales order waits when its client has no Zoho contact row yet (not derived yet).
const NO_CONTACT_ROW_WAIT: Duration = Duration::from_secs(2);

/// The least time between a claim that found fewer due rows than it asked for and the next one.
const SHORT_CLAIM_PAUSE: Duration = Duration::from_millis(20);

/// How long a stopping worker waits for its deliveries in flight before handing them back.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A finished delivery task. A task that panicked leaves its row leased: the lease runs out
/// and the row is delivered again.
fn collect(
    joined: Option<Result<(Claimed, Delivery), tokio::task::JoinError>>,
    done: &mut Vec<(Claimed, Delivery)>,
) {
    match joined {
        Some(Ok(d)) => done.push(d),
        Some(Err(e)) => tracing::error!(error = %e, "an outbox delivery task failed"),
        None => {}
    }
}

impl Inner {
    /// Claims up to `limit` due rows. `few_due`: the last claim found fewer rows than it asked
    /// for, so most open rows are probably waiting behind an earlier row of their entity.
    ///
    /// Two equivalent queries (a row is claimable when it is due, no earlier row of its entity
    /// and target is open, and no other row of them is in delivery under a live lease: a dead
    /// letter requeued while a later row of its entity is in delivery waits for it, so two
    /// deliveries never look the same record up and create it twice): walking the open rows in
    /// log order stops as soon as `limit` rows are found, which is cheap when most open rows are claimable; when most wait behind an earlier
    /// row (a long backlog for few entities), that walk would visit every open row, so the first
    /// open row of each entity and target is taken instead, in one pass over an index.
    async fn claim(&self, limit: i64, few_due: bool) -> Result<Vec<Claimed>, sqlx::Error> {
        let due = if few_due {
            "heads AS ( \
               SELECT DISTINCT ON (entity_id, target_system) id, source_position \
               FROM integrations_outbox WHERE status IN ('pending', 'processing') \
               ORDER BY entity_id, target_system, source_position), \
             due AS ( \
               SELECT o.id FROM heads h JOIN integrations_outbox o ON o.id = h.id \
               WHERE ((o.status = 'pending' AND o.next_run_at <= now()) \
                   OR (o.status = 'processing' AND o.lease_expires_at < now())) \
                 AND NOT EXISTS ( \
                   SELECT 1 FROM integrations_outbox p \
                   WHERE p.entity_id = o.entity_id AND p.target_system = o.target_system \
                     AND p.id <> o.id \
                     AND p.status = 'processing' AND p.lease_expires_at >= now()) \
               ORDER BY h.source_position \
               LIMIT $1 \
               FOR UPDATE OF o SKIP LOCKED)"
        } else {
            "due AS ( \
               SELECT o.id FROM integrations_outbox o \
               WHERE ((o.status = 'pending' AND o.next_run_at <= now()) \
                   OR (o.status = 'processing' AND o.lease_expires_at < now())) \
                 AND NOT EXISTS ( \
                   SELECT 1 FROM integrations_outbox p \
                   WHERE p.entity_id = o.entity_id AND p.target_system = o.target_system \
                     AND p.id <> o.id AND p.status IN ('pending', 'processing') \
                     AND (p.source_position < o.source_position \
                          OR (p.status = 'processing' AND p.lease_expires_at >= now()))) \
               ORDER BY o.source_position \
               LIMIT $1 \
               FOR UPDATE SKIP LOCKED)"
        };
        sqlx::query_as(&format!(
            "WITH {due} \
             UPDATE integrations_outbox o SET status = 'processing', lease_owner = $2, \
               lease_expires_at = now() + make_interval(secs => $3), attempts = o.attempts + 1, \
               updated_at = now() \
             WHERE o.id = ANY (ARRAY(SELECT id FROM due)) \
             RETURNING o.id, o.entity_type, o.entity_id, o.target_system, o.event_type, o.payload, o.attempts, \
               o.rate_limited"
        ))
        .bind(limit)
        .bind(&self.config.owner)
        .bind(self.config.lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await
    }

    /// Delivers a row, keeping its lease while the delivery runs (pacing may make it wait): a
    /// live worker never loses its row to another; a dead one stops renewing and its lease runs
    /// out. A delivery that finds its claim superseded (it was stalled past the lease and the
    /// row was claimed again) gives up, so that two deliveries do not both call the CRM for it.
    async fn deliver_leased(&self, row: &Claimed, prefetch: &Prefetch) -> Delivery {
        let delivery = self.deliver(row, prefetch);
        tokio::pin!(delivery);
        // Until when the lease is surely held: the claim set it a lease from a moment before now.
        let mut held_until = Instant::now() + self.config.lease;
        let mut renew = tokio::time::interval(self.config.lease / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                // A renewal that is due goes first: after a stall, the lease is checked before
                // the delivery goes on.
                biased;
                _ = renew.tick() => {
                    let asked = Instant::now();
                    match self.renew_lease(row).await {
                        Ok(true) => held_until = asked + self.config.lease,
                        Ok(false) => {
                            tracing::warn!(row = %row.id, "this outbox row was claimed again; giving this delivery up");
                            break Delivery::Abandoned;
                        }
                        // The lease as last renewed may run out before the next renewal: then
                        // another worker may take the row over, while this one cannot know.
                        Err(e) if Instant::now() + self.config.lease / 3 >= held_until => {
                            tracing::warn!(row = %row.id, error = %e, "could not renew this outbox row's lease before it may run out; giving this delivery up");
                            break Delivery::Abandoned;
                        }
                        Err(e) => {
                            tracing::warn!(row = %row.id, error = %e, "could not renew an outbox lease; trying again");
                        }
                    }
                }
                d = &mut delivery => break d,
            }
        }
    }

    /// Records how deliveries ended: delivered rows in one statement, the others one by one.
    async fn settle(
        &self,
        done: Vec<(Claimed, Delivery)>,
        tally: &mut Tally,
    ) -> Result<(), sqlx::Error> {
        let mut delivered = Vec::new();
        let mut responses = Vec::new();
        let mut others = Vec::new();
        for (row, d) in done {
            match d {
                Delivery::Done(response) => {
                    delivered.push(row);
                    responses.push(response);
                }
                other => others.push((row, other)),
            }
        }
        if !delivered.is_empty() {
            let rows: Vec<&Claimed> = delivered.iter().collect();
            let finished = self.finish(&rows, &responses).await?;
            for _ in 0..finished {
                tally.add(Settled::Delivered);
            }
        }
        for (row, d) in others {
            tally.add(self.settle_one(&row, d).await?);
        }
        Ok(())
    }

    async fn settle_one(&self, row: &Claimed, outcome: Delivery) -> Result<Settled, sqlx::Error> {
        match outcome {
            Delivery::Done(response) => {
                let finished = self.finish(&[row], &[response]).await?;
                Ok(if finished == 1 {
                    Settled::Delivered
                } else {
                    Settled::LeaseLost
                })
            }
            Delivery::Abandoned => Ok(Settled::LeaseLost),
            Delivery::Wait(after, why) => self.reschedule(row, after, &why, Outcome::Waits).await,
            Delivery::Failed(CrmError::RateLimited { retry_after }) => {
                // With Retry-After, as asked, but never at once (`Retry-After: 0` would earn the
                // next 429 straight away) nor beyond an hour. Without, a second (the rate
                // window), doubling with each 429 in a row up to 15 minutes (Zoho's 24-hour
                // credits run out for hours), plus a little jitter so that snoozed rows do not
                // come back as a burst.
                let after = match retry_after {
                    Some(asked) => asked.clamp(Duration::from_secs(1), Duration::from_secs(3600)),
                    None => rate_limited_wait(row.rate_limited) + self.config.backoff.delay(1),
                };
                self.reschedule(row, after, "rate limited", Outcome::RateLimited)
                    .await
            }
            Delivery::Failed(e) if e.is_retryable() && row.attempts < self.config.max_attempts => {
                // Not sooner than the CRM asked (a 503's Retry-After), capped at an hour.
                let after = self.config.backoff.delay(row.attempts as u32).max(
                    e.retry_after()
                        .unwrap_or_default()
                        .min(Duration::from_secs(3600)),
                );
                self.reschedule(row, after, &e.to_string(), Outcome::Retried)
                    .await
            }
            Delivery::Failed(e) => {
                self.record_failure(row, &e).await;
                self.dead_letter(row, &e.to_string()).await
            }
        }
    }

    /// Extends the row's lease; false when the row is no longer this claim's: another worker
    /// took it over, or this one claimed it again (its attempt count moved on). A database error
    /// says nothing either way (the caller gives up once the lease may have run out).
    async fn renew_lease(&self, row: &Claimed) -> Result<bool, sqlx::Error> {
        let renewed = sqlx::query(
            "UPDATE integrations_outbox SET lease_expires_at = now() + make_interval(secs => $3) \
             WHERE id = $1 AND lease_owner = $2 AND attempts = $4 AND status = 'processing'",
        )
        .bind(row.id)
        .bind(&self.config.owner)
        .bind(self.config.lease.as_secs_f64())
        .bind(row.attempts)
        .execute(&self.pool)
        .await;
        Ok(renewed?.rows_affected() == 1)
    }

    /// Hands back every row this worker holds (on shutdown): due again at once, the cut-off
    /// attempt not counted.
    async fn release_all(&self) {
        let released = sqlx::query(
            "UPDATE integrations_outbox SET status = 'pending', attempts = greatest(attempts - 1, 0), \
               next_run_at = now(), lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
             WHERE lease_owner = $1 AND status = 'processing'",
        )
        .bind(&self.config.owner)
        .execute(&self.pool)
        .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "outbox worker could not hand back its rows; their leases will run out");
        }
    }

    /// Marks rows processed (with their CRM answers), those whose claim this worker still
    /// holds; returns how many.
    async fn finish(&self, rows: &[&Claimed], responses: &[Value]) -> Result<u64, sqlx::Error> {
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
        let done = sqlx::query(
            "UPDATE integrations_outbox o SET status = 'processed', response = d.response, \
               last_error = NULL, lease_owner = NULL, lease_expires_at = NULL, \
               processed_at = now(), updated_at = now() \
             FROM unnest($1::uuid[], $3::jsonb[], $4::int4[]) AS d(id, response, attempts) \
             WHERE o.id = d.id AND o.lease_owner = $2 AND o.attempts = d.attempts \
               AND o.status = 'processing'",
        )
        .bind(&ids)
        .bind(&self.config.owner)
        .bind(responses)
        .bind(&attempts)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn reschedule(
        &self,
        row: &Claimed,
        after: Duration,
        why: &str,
        outcome: Outcome,
    ) -> Result<Settled, sqlx::Error> {
        let counts = outcome == Outcome::Retried;
        let done = sqlx::query(
            "UPDATE integrations_outbox SET status = 'pending', last_error = $3, \
               attempts = attempts - CASE WHEN $5 THEN 0 ELSE 1 END, \
               rate_limited = CASE WHEN $7 THEN rate_limited + 1 ELSE 0 END, \
               next_run_at = now() + make_interval(secs => $4), lease_owner = NULL, \
               lease_expires_at = NULL, updated_at = now() \
             WHERE id = $1 AND lease_owner = $2 AND attempts = $6 AND status = 'processing'",
        )
        .bind(row.id)
        .bind(&self.config.owner)
        .bind(why)
        .bind(after.as_secs_f64())
        .bind(counts)
        .bind(row.attempts)
        .bind(outcome == Outcome::RateLimited)
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
             WHERE id = $1 AND lease_owner = $2 AND attempts = $4 AND status = 'processing'",
        )
        .bind(row.id)
        .bind(&self.config.owner)
        .bind(why)
        .bind(row.attempts)
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

    async fn deliver(&self, row: &Claimed, prefetch: &Prefetch) -> Delivery {
        // Every claim counts an attempt, but only a delivery that ends checks the limit: a row
        // whose deliveries never end (each takes its worker down, is killed with it, or is
        // given up when its lease cannot be kept) would otherwise be claimed for ever. Past the
        // limit it is a dead letter, uncalled.
        if row.attempts > self.config.max_attempts {
            return Delivery::Failed(permanent(format!(
                "no delivery ended in {} attempts (each was cut off before it ended)",
                self.config.max_attempts
            )));
        }
        let result = match (row.target_system.as_str(), row.event_type.as_str()) {
            ("kommo", "contact.upsert") => self.kommo_contact(row, prefetch).await,
            ("zoho", "contact.upsert") => self.zoho_contact(row, prefetch).await,
            ("zoho", "sales_order.upsert") => self.zoho_sales_order(row, prefetch).await,
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
    async fn existing_client(&self, id: Uuid, prefetch: &Prefetch) -> Result<Client, CrmError> {
        let client = self.client(id, prefetch).await?;
        if !client.created {
            return Err(permanent("the client does not exist".into()));
        }
        Ok(client)
    }

    /// A client's current state: from the claim's prefetch, else replayed.
    async fn client(&self, id: Uuid, prefetch: &Prefetch) -> Result<Client, CrmError> {
        match prefetch.get(self).await.and_then(|l| l.clients.get(&id)) {
            Some(client) => Ok(client.clone()),
            None => Ok(self.bus.clients.replay(id, None).await.map_err(internal)?.0),
        }
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

    async fn kommo_contact(
        &self,
        row: &Claimed,
        prefetch: &Prefetch,
    ) -> Result<Delivery, CrmError> {
        let client = self.existing_client(row.entity_id, prefetch).await?;
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

    async fn zoho_contact(&self, row: &Claimed, prefetch: &Prefetch) -> Result<Delivery, CrmError> {
        let client = self.existing_client(row.entity_id, prefetch).await?;
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

    async fn zoho_sales_order(
        &self,
        row: &Claimed,
        prefetch: &Prefetch,
    ) -> Result<Delivery, CrmError> {
        let loaded = prefetch.get(self).await;
        let booking: Booking = match loaded.and_then(|l| l.bookings.get(&row.entity_id)) {
            Some(booking) => booking.clone(),
            None => {
                self.bus
                    .bookings
                    .replay(row.entity_id, None)
                    .await
                    .map_err(internal)?
                    .0
            }
        };
        if !booking.created {
            return Err(permanent("the booking does not exist".into()));
        }
        let client = self.client(booking.client_id, prefetch).await?;
        let Some(contact_id) = client.zoho_contact_id.clone() else {
            // The contact comes first. While a contact row is open, this one waits (no attempt
            // used): until the earliest open one (the one the others wait behind) is due, or
            // briefly while it is in delivery. Otherwise the latest contact row tells: delivered
            // (its id on the way back) waits briefly, dead means this one cannot succeed either
            // (an older dead one does not, when a later one went through or is still open); and
            // with no contact row yet it waits as before.
            let contact: Option<(String, f64)> = sqlx::query_as(
                "SELECT status, greatest(extract(epoch FROM next_run_at - now()), 0)::float8 \
                 FROM integrations_outbox WHERE entity_id = $1 \
                   AND target_system = 'zoho' AND event_type = 'contact.upsert' \
                 ORDER BY status IN ('pending', 'processing') DESC, \
                   CASE WHEN status IN ('pending', 'processing') THEN source_position \
                        ELSE -source_position END \
                 LIMIT 1",
            )
            .bind(booking.client_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| internal(e.to_string()))?;
            let wait = match contact {
                Some((status, _)) if status == "failed" => None,
                Some((status, due_in)) if status == "pending" => {
                    Some(Duration::from_secs_f64(due_in).min(CONTACT_WAIT_CAP) + CONTACT_LOOK_AGAIN)
                }
                Some(_) => Some(CONTACT_LOOK_AGAIN),
                None => Some(NO_CONTACT_ROW_WAIT),
            };
            let (Some(wait), true) = (wait, client.created) else {
                return Err(permanent(
                    "the client's Zoho contact could not be synced; requeue it first".into(),
                ));
            };
            return Ok(Delivery::Wait(
                wait,
                "waiting for the client's Zoho contact".into(),
            ));
        };
        let vehicle: Option<(String, Option<String>)> = match (booking.vehicle_id, loaded) {
            (Some(v), Some(loaded)) => loaded.vehicles.get(&v).cloned(),
            (Some(v), None) => {
                sqlx::query_as("SELECT name, zoho_item_id FROM vehicles WHERE id = $1")
                    .bind(v)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| internal(e.to_string()))?
            }
            (None, _) => None,
        };
        let (vehicle_name, item) = vehicle.unwrap_or_default();
        let service_ids: Vec<Uuid> = booking
            .services
            .iter()
            .filter(|s| s.description.is_none())
            .map(|s| s.service_id)
            .collect();
        let service_names: HashMap<Uuid, String> = if service_ids.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, (Uuid, String)>(
                "SELECT id, name FROM additional_services WHERE id = ANY($1)",
            )
            .bind(&service_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| internal(e.to_string()))?
            .into_iter()
            .collect()
        };
        let items = item
            .map(|product| sales_order_items(&booking, &product, &vehicle_name, &service_names))
            .unwrap_or_default();
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
        // Written back only when it is news (the command would be a no-op otherwise): another
        // id, or the same one after a failure was recorded (the order is in sync again).
        if booking.zoho_sales_order_id.as_deref() != Some(id.as_str())
            || booking.zoho_sync_status.as_deref() != Some("synced")
        {
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
        }
        Ok(Delivery::Done(json!({ "zoho_sales_order_id": id })))
    }

    async fn kommo_lead_status(&self, row: &Claimed) -> Result<Delivery, CrmError> {
        let db = |e: sqlx::Error| internal(e.to_string());
        // The statuses of one Kommo lead go out in log order; a dead letter requeued after the
        // latest one was sent would put an older status back. (When the latest failed too,
        // this one sends the current status.)
        let superseded: bool = sqlx::query_scalar(
            "SELECT coalesce((SELECT n.status = 'processed' AND coalesce(n.response ? 'status_id', false) \
               FROM integrations_outbox o JOIN integrations_outbox n \
                 ON n.entity_id = o.entity_id AND n.target_system = o.target_system \
                   AND n.source_position > o.source_position \
               WHERE o.id = $1 AND n.event_type = 'lead.status' \
               ORDER BY n.source_position DESC LIMIT 1), false)",
        )
        .bind(row.id)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        if superseded {
            return Ok(Delivery::Done(
                json!({ "skipped": "a later status of this Kommo lead was sent first" }),
            ));
        }
        // A booking's status goes under its lead, naming the booking; rows derived before that
        // (entity type `booking`) are the booking's own.
        let booking_id = match row.payload.get("booking_id") {
            Some(id) => Some(
                id.as_str()
                    .and_then(|id| Uuid::parse_str(id).ok())
                    .ok_or_else(|| permanent("the row names no valid booking".into()))?,
            ),
            None => (row.entity_type == "booking").then_some(row.entity_id),
        };
        let (lead_id, status): (Option<Uuid>, Option<(String, Option<String>)>) = match booking_id {
            Some(booking_id) => {
                let (booking, _) = self
                    .bus
                    .bookings
                    .replay(booking_id, None)
                    .await
                    .map_err(internal)?;
                // A booking without a lead has no Kommo lead to move: no mapping to look up.
                let status: Option<(String, Option<String>)> = match booking.lead_id {
                    Some(_) => sqlx::query_as(
                        "SELECT k.id, (SELECT kommo_pipeline_id FROM sales_pipeline_stages \
                           WHERE kommo_pipeline_id IS NOT NULL ORDER BY order_index LIMIT 1) \
                         FROM kommo_pipeline_stages k WHERE k.booking_status = $1::booking_status \
                         ORDER BY k.order_index LIMIT 1",
                    )
                    .bind(booking.status.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?,
                    None => None,
                };
                (booking.lead_id, status)
            }
            None => {
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
    CrmError::transient(None, format!("internal: {e}"))
}

fn split_name(name: &str) -> (Option<String>, Option<String>) {
    match name.trim().rsplit_once(' ') {
        Some((first, last)) => (Some(first.to_string()), Some(last.to_string())),
        None => (None, Some(name.trim().to_string())),
    }
}

/// Why a row goes back to `pending`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It waits for something else (its contact); no attempt used.
    Waits,
    /// The CRM answered 429; no attempt used, one more 429 in a row.
    RateLimited,
    /// A transient failure: an attempt used.
    Retried,
}

/// How long a row waits after its `n`+1-th 429 in a row without Retry-After: a second, doubling,
/// at most 15 minutes.
fn rate_limited_wait(n: i32) -> Duration {
    Duration::from_secs(1u64 << n.clamp(0, 10)).min(Duration::from_secs(900))
}

/// A booking's sales-order lines, on its vehicle's Zoho product: the rental days, each
/// extension, each additional service and the insurance, so that the order adds up to the
/// booking's `total_amount` (SPEC §2) as finance sees it in Zoho.
fn sales_order_items(
    booking: &Booking,
    product: &str,
    vehicle_name: &str,
    service_names: &HashMap<Uuid, String>,
) -> Vec<SalesOrderItem> {
    let line = |quantity: Decimal, list_price: Decimal, description: String| SalesOrderItem {
        product_id: product.to_string(),
        quantity,
        list_price,
        description: Some(description),
    };
    let mut items = vec![line(
        Decimal::from(booking.rental_duration_days),
        booking.price_daily.amount(),
        format!("{vehicle_name} rental").trim().to_string(),
    )];
    for e in &booking.extensions {
        items.push(line(
            Decimal::ONE,
            e.amount.amount(),
            format!(
                "Extension from {} to {}",
                e.previous_end_at.format("%Y-%m-%d %H:%M UTC"),
                e.new_end_at.format("%Y-%m-%d %H:%M UTC")
            ),
        ));
    }
    for s in &booking.services {
        let name = s
            .description
            .clone()
            .or_else(|| service_names.get(&s.service_id).cloned())
            .unwrap_or_else(|| "Additional service".into());
        items.push(line(Decimal::from(s.quantity), s.price.amount(), name));
    }
    if booking.full_insurance_fee.amount() > Decimal::ZERO {
        items.push(line(
            Decimal::ONE,
            booking.full_insurance_fee.amount(),
            "Full insurance".into(),
        ));
    }
    items
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

/// Requeues a dead letter (operators): back to `pending`, attempts reset, due in two seconds.
///
/// Due a moment later, not at once: a claim running meanwhile may be taking a later row of the
/// same record (uncommitted, so its statement's snapshot would not show it to a second claim);
/// once it has committed, the claim rules keep the two deliveries apart.
pub async fn requeue(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE integrations_outbox SET status = 'pending', attempts = 0, \
           next_run_at = now() + interval '2 seconds', \
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
