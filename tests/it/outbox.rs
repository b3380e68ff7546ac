//! The outbox against fake Kommo and Zoho servers: the fault matrix, dead letters and requeue,
//! and three workers draining a large backlog in order, within Kommo's pacing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use commands::CommandBus;
use commands::codes::{self, CodeKind};
use crm::{LeadInput, LocalPacer, Pacer, TokenStore};
use crm_fakes::{FakeKommo, FakeZoho, Fault, FaultRule, Method};
use domain::booking::{BookingCommand, BookingType, CreateBooking, Priority, ServiceInput};
use domain::client::ClientCommand;
use domain::lead::{LeadCommand, StageRef};
use domain::{Actor, CommandMetadata, Role};
use outbox_worker::backoff::Backoff;
use outbox_worker::pg::{EncryptionKey, PgCallSlots, PgPacer, PgTokenStore};
use outbox_worker::projector::OutboxProjector;
use outbox_worker::worker::{Targets, Worker, WorkerConfig};
use rust_decimal::Decimal;
use sqlx::PgPool;
use store::testing::TestDb;
use uuid::Uuid;

const SALES: Uuid = Uuid::from_u128(0x00000000_0000_4000_a000_000000000003);
const GHOST: Uuid = Uuid::from_u128(0x00000000_0000_4000_c000_000000000001);

fn meta() -> CommandMetadata {
    CommandMetadata::new(Actor::staff(SALES, Role::Sales), "outbox-test")
}

/// The workers' lease: long enough that a busy machine never lets one lapse where no test
/// wants it to.
const LEASE: Duration = Duration::from_secs(30);

/// A worker's settings in these tests, with a fresh owner.
fn worker_config(max_attempts: i32, lease: Duration) -> WorkerConfig {
    WorkerConfig {
        max_attempts,
        lease,
        batch: 16,
        max_in_flight: 64,
        backoff: Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(200),
        },
        owner: format!("test-{}", Uuid::now_v7()),
        idle: Duration::from_millis(20),
    }
}

fn key() -> EncryptionKey {
    EncryptionKey::from_hex(&"ab".repeat(32)).unwrap()
}

struct Harness {
    db: TestDb,
    bus: Arc<CommandBus>,
    kommo: FakeKommo,
    zoho: FakeZoho,
}

impl Harness {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let bus = Arc::new(CommandBus::new(db.pool.clone()));
        Self {
            db,
            bus,
            kommo: FakeKommo::start().await.unwrap(),
            zoho: FakeZoho::start().await.unwrap(),
        }
    }

    fn worker(&self, pacer: Arc<dyn Pacer>, max_attempts: i32) -> Worker {
        self.worker_with(pacer, max_attempts, Arc::new(crm::Unshared), LEASE)
    }

    /// Clients of the fakes, as a worker has them. `zoho_slots`: Zoho's concurrency limit (10
    /// on the fake), shared or not.
    fn targets(&self, pacer: Arc<dyn Pacer>, zoho_slots: Arc<dyn crm::CallSlots>) -> Targets {
        let store: Arc<dyn TokenStore> = Arc::new(PgTokenStore::new(self.db.pool.clone(), key()));
        outbox_worker::setup::for_fakes(
            &self.kommo,
            &self.zoho,
            store,
            pacer,
            // Long enough that a busy machine does not turn a normal call into a timeout; the
            // fault matrix's delayed answer (5 s) still is one.
            Duration::from_secs(2),
            10,
            zoho_slots,
        )
        .unwrap()
    }

    /// `zoho_slots`: Zoho's concurrency limit (10 on the fake), shared or not.
    fn worker_with(
        &self,
        pacer: Arc<dyn Pacer>,
        max_attempts: i32,
        zoho_slots: Arc<dyn crm::CallSlots>,
        lease: Duration,
    ) -> Worker {
        let targets = self.targets(pacer, zoho_slots);
        Worker::new(
            self.db.pool.clone(),
            self.bus.clone(),
            targets,
            worker_config(max_attempts, lease),
        )
    }

    async fn client(&self, name: &str) -> Uuid {
        let id = Uuid::now_v7();
        self.bus
            .clients
            .execute(
                id,
                ClientCommand::Register {
                    name: name.into(),
                    phone: Some("+971501234567".into()),
                    email: Some("guest@example.com".into()),
                    residency_country: Some("AE".into()),
                    preferred_language: None,
                    preferred_channels: vec![],
                    timezone: None,
                    gender: None,
                    date_of_birth: None,
                    passport_number: None,
                    emirates_id: None,
                    kommo_contact_id: None,
                },
                &meta(),
                None,
            )
            .await
            .unwrap();
        id
    }

    /// Changes a client's name, phone or email (those given).
    async fn change_client(
        &self,
        client: Uuid,
        name: Option<&str>,
        phone: Option<&str>,
        email: Option<&str>,
    ) {
        let update = ClientCommand::UpdateDetails {
            name: name.map(str::to_string),
            phone: phone.map(str::to_string),
            email: email.map(str::to_string),
            residency_country: None,
            preferred_language: None,
            preferred_channels: None,
            timezone: None,
            gender: None,
            date_of_birth: None,
            passport_number: None,
            emirates_id: None,
        };
        self.bus
            .clients
            .execute(client, update, &meta(), None)
            .await
            .unwrap();
    }

    /// A booking confirmed at once.
    async fn confirmed_booking(&self, client: Uuid, day: i64) -> (Uuid, String) {
        let (id, code) = self.booking(client, day, None).await;
        self.confirm(id).await;
        (id, code)
    }

    async fn confirm(&self, booking: Uuid) {
        self.bus
            .bookings
            .execute(booking, BookingCommand::Confirm, &meta(), None)
            .await
            .unwrap();
    }

    /// A new booking, won from `lead` if given.
    async fn booking(&self, client: Uuid, day: i64, lead: Option<Uuid>) -> (Uuid, String) {
        self.booking_with(client, day, lead, Decimal::ZERO, vec![])
            .await
    }

    /// A new two-day booking at 6,500 a day with its insurance fee and services.
    async fn booking_with(
        &self,
        client: Uuid,
        day: i64,
        lead: Option<Uuid>,
        full_insurance_fee: Decimal,
        services: Vec<ServiceInput>,
    ) -> (Uuid, String) {
        let id = Uuid::now_v7();
        let code = codes::allocate(&self.db.pool, CodeKind::Booking)
            .await
            .unwrap();
        let start = Utc::now() + chrono::Duration::days(day);
        let create = CreateBooking {
            external_code: code.clone(),
            client_id: client,
            owner_id: SALES,
            booking_type: BookingType::Rental,
            priority: Priority::High,
            channel: "Website".into(),
            start_at: start,
            end_at: start + chrono::Duration::days(2),
            vehicle_id: Some(GHOST),
            driver_id: None,
            price_daily: Decimal::from(6500),
            deposit_amount: Decimal::ZERO,
            advance_payment: Decimal::ZERO,
            full_insurance_fee,
            currency: None,
            pickup_location: None,
            dropoff_location: None,
            services,
            lead_id: lead,
        };
        self.bus
            .bookings
            .execute(id, BookingCommand::Create(Box::new(create)), &meta(), None)
            .await
            .unwrap();
        (id, code)
    }

    /// A sales lead at the negotiation stage, linked to a lead of the fake Kommo: (our lead,
    /// Kommo's lead id).
    async fn kommo_lead(&self, code: &str) -> (Uuid, i64) {
        let targets = self.targets(paced(), Arc::new(crm::Unshared));
        let kommo_lead = targets
            .kommo
            .upsert_lead(
                &LeadInput {
                    external_key: code.into(),
                    name: "Two supercars for a week".into(),
                    price: 90_000,
                    status_id: Some(47_873_539),
                    pipeline_id: Some(5_389_528),
                    contact_id: None,
                },
                None,
            )
            .await
            .unwrap();
        let lead = Uuid::now_v7();
        self.bus
            .leads
            .execute(
                lead,
                LeadCommand::Create {
                    lead_code: code.into(),
                    client_id: None,
                    owner_id: SALES,
                    stage: stage("negotiation", 7),
                    value_amount: Decimal::from(90_000),
                    source: "Kommo".into(),
                    title: None,
                    requested_start_at: None,
                    requested_end_at: None,
                    fleet_size: 1,
                    expected_close_at: None,
                    kommo_lead_id: Some(kommo_lead),
                },
                &meta(),
                None,
            )
            .await
            .unwrap();
        (lead, kommo_lead)
    }

    /// A lead linked to a Kommo lead and a booking won from it, everything delivered: (lead,
    /// Kommo's lead id, booking).
    async fn lead_with_booking(&self, worker: &Worker, code: &str) -> (Uuid, i64, Uuid) {
        let (lead, kommo_lead) = self.kommo_lead(code).await;
        let client = self.client("Omar Farouk").await;
        let (booking, _) = self.booking(client, 1, Some(lead)).await;
        self.drain(worker, Duration::from_secs(20)).await;
        (lead, kommo_lead, booking)
    }

    /// Moves `lead` to stage `id` while Kommo refuses that update for good; returns the dead
    /// letter.
    async fn refused_move(&self, worker: &Worker, lead: Uuid, id: &str, probability: i64) -> Uuid {
        self.kommo.inject(
            FaultRule::new(Fault::Validation400)
                .times(1)
                .on(Method::PATCH, "/api/v4/leads"),
        );
        self.move_lead(lead, id, probability).await;
        self.drain(worker, Duration::from_secs(20)).await;
        sqlx::query_scalar(
            "SELECT id FROM integrations_outbox \
             WHERE event_type = 'lead.status' AND status = 'failed' \
             ORDER BY source_position DESC LIMIT 1",
        )
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// Moves `lead` to stage `id` (probability in tenths).
    async fn move_lead(&self, lead: Uuid, id: &str, probability: i64) {
        let moved = LeadCommand::MoveToStage {
            stage: stage(id, probability),
        };
        self.bus
            .leads
            .execute(lead, moved, &meta(), None)
            .await
            .unwrap();
    }

    /// The Kommo lead's status is `expected`.
    async fn assert_kommo_status(&self, kommo_lead: i64, expected: i64) {
        let status = &self.kommo.lead(kommo_lead).unwrap()["status_id"];
        assert_eq!(status, expected, "{:?}", statuses(&self.db.pool).await);
    }

    /// Derives outbox rows from everything in the log so far.
    async fn derive(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            projections::runner::catch_up(&self.db.pool, &OutboxProjector, 500)
                .await
                .unwrap();
            let at = store::checkpoints::load(&self.db.pool, "projection:outbox")
                .await
                .unwrap();
            if !store::global_log::has_pending_after(&self.db.pool, at)
                .await
                .unwrap()
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs the worker until no row is pending or processing (derives write-back follow-ups too).
    async fn drain(&self, worker: &Worker, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.derive().await;
            worker.try_execute_task().await.unwrap();
            if open_rows(&self.db.pool).await == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the outbox did not drain: {:?}",
                statuses(&self.db.pool).await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn open_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM integrations_outbox WHERE status IN ('pending', 'processing')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn statuses(pool: &PgPool) -> Vec<(String, String, String, i32, Option<String>)> {
    sqlx::query_as("SELECT target_system, event_type, status, attempts, last_error FROM integrations_outbox ORDER BY source_position")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A pipeline stage as the seeds have it (`probability` in tenths).
fn stage(id: &str, probability: i64) -> StageRef {
    StageRef {
        id: id.into(),
        probability: Decimal::new(probability, 1),
        sla_days: 3,
        booking_status: None,
    }
}

/// Kommo's pacing as configured by default (6 requests/s, under the fake's limit of 7).
fn paced() -> Arc<dyn Pacer> {
    Arc::new(LocalPacer::from_rps(6))
}

#[tokio::test]
async fn a_client_and_a_confirmed_booking_reach_both_crms_once_with_ids_written_back() {
    let h = Harness::new().await;
    let client = h.client("Layla Hassan").await;
    let (booking, code) = h.confirmed_booking(client, 1).await;
    let worker = h.worker(paced(), 5);
    h.drain(&worker, Duration::from_secs(20)).await;

    assert_eq!(h.kommo.contacts().len(), 1);
    assert_eq!(h.zoho.contacts().len(), 1);
    let order = h
        .zoho
        .sales_order_by_external(&code)
        .expect("the sales order exists");
    assert_eq!(h.zoho.sales_orders().len(), 1);
    let (c, _) = h.bus.clients.replay(client, None).await.unwrap();
    assert!(c.kommo_contact_id.is_some() && c.zoho_contact_id.is_some());
    let (b, _) = h.bus.bookings.replay(booking, None).await.unwrap();
    assert_eq!(b.zoho_sync_status.as_deref(), Some("synced"));
    assert_eq!(
        Some(order["id"].as_str().unwrap_or_default()),
        b.zoho_sales_order_id.as_deref()
    );
    // The order is the booking as it stands, with its client's contact and its vehicle's item.
    assert_eq!(
        order["Subject"],
        format!("{code} Rolls-Royce Ghost").as_str()
    );
    assert_eq!(order["Status"], "Approved");
    assert_eq!(
        order["Contact_Name"]["id"].as_str(),
        c.zoho_contact_id.as_deref()
    );
    let items = order["Ordered_Items"]
        .as_array()
        .expect("the order's items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["Product_Name"]["id"], "4150868000000100001");
    assert_eq!(items[0]["Quantity"].as_f64(), Some(2.0));
    assert_eq!(items[0]["List_Price"].as_f64(), Some(6500.0));
    // Write-backs are events of the outbox worker and derive nothing more.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM integrations_outbox")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    // Two contacts and the sales order; a booking that did not come from a lead has no Kommo
    // lead to move.
    assert_eq!(rows, 3, "{:?}", statuses(&h.db.pool).await);
    let actors: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE metadata::jsonb ->> 'actor_type' = 'outbox-worker'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(actors, 3, "kommo id, zoho id, sales order id");
}

/// A client's Kommo contact deleted in Kommo (or merged away): the next change of the client
/// creates it again and stores its new id, instead of dead-lettering every later update on the
/// stored id's 404.
#[tokio::test]
async fn a_contact_deleted_in_kommo_is_created_again_and_relinked() {
    let h = Harness::new().await;
    let client = h.client("Rania Aziz").await;
    let worker = h.worker(paced(), 5);
    h.drain(&worker, Duration::from_secs(20)).await;
    let (c, _) = h.bus.clients.replay(client, None).await.unwrap();
    let first: i64 = c.kommo_contact_id.unwrap().parse().unwrap();
    assert!(h.kommo.delete_contact(first));

    h.change_client(client, None, Some("+971502223344"), None)
        .await;
    h.drain(&worker, Duration::from_secs(20)).await;

    let (c, _) = h.bus.clients.replay(client, None).await.unwrap();
    let now: i64 = c.kommo_contact_id.unwrap().parse().unwrap();
    assert_ne!(now, first);
    assert_eq!(h.kommo.contacts().len(), 1);
    assert!(h.kommo.contact(now).is_some());
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM integrations_outbox WHERE status = 'failed'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(failed, 0, "{:?}", statuses(&h.db.pool).await);
}

/// Finance works in Zoho: a sales order adds up to its booking's total, line by line (the
/// rental days, each extension, each service by its name, the insurance), and follows the
/// booking when an extension or a service changes it after confirmation.
#[tokio::test]
async fn a_sales_order_adds_up_to_its_bookings_total_through_every_change() {
    let h = Harness::new().await;
    let client = h.client("Omar Farouk").await;
    let child_seat = Uuid::from_u128(0x00000000_0000_4000_d000_000000000001);
    let airport = Uuid::from_u128(0x00000000_0000_4000_d000_000000000004);
    let service = |service_id, price, quantity, description: Option<&str>| ServiceInput {
        line_id: Uuid::now_v7(),
        service_id,
        price: Decimal::from(price),
        quantity,
        description: description.map(str::to_string),
    };
    let (booking, code) = h
        .booking_with(
            client,
            3,
            None,
            Decimal::from(750),
            vec![service(child_seat, 150, 2, None)],
        )
        .await;
    h.confirm(booking).await;
    let worker = h.worker(paced(), 5);
    h.drain(&worker, Duration::from_secs(20)).await;
    let lines = |order: &serde_json::Value| -> Vec<(String, f64, f64)> {
        order["Ordered_Items"]
            .as_array()
            .expect("the order's items")
            .iter()
            .map(|i| {
                assert_eq!(i["Product_Name"]["id"], "4150868000000100001");
                (
                    i["Description"].as_str().unwrap_or_default().to_string(),
                    i["Quantity"].as_f64().unwrap_or_default(),
                    i["List_Price"].as_f64().unwrap_or_default(),
                )
            })
            .collect()
    };
    let sum = |lines: &[(String, f64, f64)]| lines.iter().map(|(_, q, p)| q * p).sum::<f64>();
    let order = h.zoho.sales_order_by_external(&code).unwrap();
    let first = lines(&order);
    assert_eq!(
        first,
        vec![
            ("Rolls-Royce Ghost rental".to_string(), 2.0, 6500.0),
            ("Child Seat".to_string(), 2.0, 150.0),
            ("Full insurance".to_string(), 1.0, 750.0),
        ]
    );
    let (b, _) = h.bus.bookings.replay(booking, None).await.unwrap();
    assert_eq!(sum(&first), 14_050.0);
    assert_eq!(b.total_amount.amount(), Decimal::from(14_050));

    // On the road, a day more at another price, and a service with its own description.
    let (start, end) = (b.start_at.unwrap(), b.end_at.unwrap());
    for command in crate::on_the_road(start).into_iter().chain([
        BookingCommand::Extend {
            new_end_at: end + chrono::Duration::days(1),
            price_daily: Some(Decimal::from(7000)),
        },
        BookingCommand::AddService(service(airport, 500, 1, Some("Delivery to DXB arrivals"))),
    ]) {
        h.bus
            .bookings
            .execute(booking, command, &meta(), None)
            .await
            .unwrap();
    }
    h.drain(&worker, Duration::from_secs(20)).await;
    let order = h.zoho.sales_order_by_external(&code).unwrap();
    let now = lines(&order);
    let (b, _) = h.bus.bookings.replay(booking, None).await.unwrap();
    assert_eq!(b.total_amount.amount(), Decimal::from(21_550));
    assert_eq!(sum(&now), 21_550.0, "{now:?}");
    assert_eq!(now.len(), 5, "{now:?}");
    assert!(now[1].0.starts_with("Extension from "), "{now:?}");
    assert_eq!((now[1].1, now[1].2), (1.0, 7000.0));
    assert_eq!(now[3].0, "Delivery to DXB arrivals");
    assert_eq!(h.zoho.sales_orders().len(), 1);
}

/// A client whose first Zoho contact delivery failed for good, and whose details then changed
/// (a new contact row): a sales order waits for that new row rather than failing with the old.
#[tokio::test]
async fn a_sales_order_waits_for_a_new_contact_row_after_an_older_one_failed() {
    let h = Harness::new().await;
    h.zoho.inject(
        FaultRule::new(Fault::Validation400)
            .times(1)
            .path("/crm/v6/Contacts"),
    );
    let client = h.client("Second Chance").await;
    let worker = h.worker(paced(), 5);
    h.drain(&worker, Duration::from_secs(20)).await;
    assert!(h.zoho.contacts().is_empty());

    h.change_client(client, None, None, Some("second.chance@example.com"))
        .await;
    let (booking, code) = h.confirmed_booking(client, 1).await;
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(h.zoho.contacts().len(), 1);
    assert!(
        h.zoho.sales_order_by_external(&code).is_some(),
        "{:?}",
        statuses(&h.db.pool).await
    );
    let (b, _) = h.bus.bookings.replay(booking, None).await.unwrap();
    assert_eq!(b.zoho_sync_status.as_deref(), Some("synced"));
}

/// A sales order that failed for good after it was linked shows `failed` on its booking; once
/// the operator requeues it and it goes through (Zoho answers with the id already linked), the
/// booking shows `synced` again.
#[tokio::test]
async fn a_sales_order_synced_again_after_a_failure_shows_synced_on_its_booking() {
    let h = Harness::new().await;
    let client = h.client("Sync Again").await;
    let (booking, _) = h.confirmed_booking(client, 1).await;
    let worker = h.worker(paced(), 5);
    h.drain(&worker, Duration::from_secs(20)).await;
    let sync = async || {
        let (b, _) = h.bus.bookings.replay(booking, None).await.unwrap();
        (b.zoho_sync_status, b.zoho_sales_order_id)
    };
    let (status, linked) = sync().await;
    assert_eq!(status.as_deref(), Some("synced"));

    h.zoho.inject(
        FaultRule::new(Fault::Validation400)
            .times(1)
            .path("/crm/v6/Sales_Orders"),
    );
    h.bus
        .bookings
        .execute(
            booking,
            BookingCommand::Cancel {
                reason: "the guest changed plans".into(),
            },
            &meta(),
            None,
        )
        .await
        .unwrap();
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(
        sync().await.0.as_deref(),
        Some("failed"),
        "{:?}",
        statuses(&h.db.pool).await
    );

    let failed: Uuid = sqlx::query_scalar(
        "SELECT id FROM integrations_outbox WHERE status = 'failed' AND target_system = 'zoho'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(
        outbox_worker::worker::requeue(&h.db.pool, failed)
            .await
            .unwrap()
    );
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(sync().await, (Some("synced".to_string()), linked));
    assert_eq!(h.zoho.sales_orders().len(), 1);
}

/// The deliveries of one claim read their clients together; when that shared read fails (one
/// client's stream holds an event this code cannot decode), each delivery reads its own, so
/// only that client's rows fail (and are retried) and the others are delivered.
#[tokio::test]
async fn a_record_that_cannot_be_read_fails_only_its_own_rows_of_a_claim() {
    let h = Harness::new().await;
    let good = h.client("Layla Hassan").await;
    let bad = h.client("Omar Farouk").await;
    h.derive().await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Client', $1, 2, 'ClientDetailsUpdated', '1.0', '{\"ClientDetailsUpdated\": {\"name\": 42}}', '{}')",
    )
    .bind(bad.to_string())
    .execute(&h.db.pool)
    .await
    .unwrap();
    let worker = h.worker(paced(), 5);
    let outcome = worker.try_execute_task().await.unwrap();
    assert_eq!(
        outcome,
        outbox_worker::worker::ExecutionOutcome::Round {
            delivered: 2,
            retried: 2,
            snoozed: 0,
            dead: 0
        },
        "{:?}",
        statuses(&h.db.pool).await
    );
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT entity_id, target_system, status FROM integrations_outbox ORDER BY entity_id, target_system",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    for (entity, target, status) in rows {
        let expected = if entity == good {
            "processed"
        } else {
            "pending"
        };
        assert_eq!(status, expected, "{target} row of {entity}");
    }
    assert_eq!(h.kommo.contacts().len(), 1);
    assert_eq!(h.zoho.contacts().len(), 1);
    let (c, _) = h.bus.clients.replay(good, None).await.unwrap();
    assert!(c.kommo_contact_id.is_some() && c.zoho_contact_id.is_some());
}

/// The rows derived per booking and action, in log order (its Kommo lead status rows are its
/// lead's, naming it).
async fn booking_rows(pool: &PgPool, booking: Uuid) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT event_type, payload ->> 'cause' FROM integrations_outbox \
         WHERE entity_id = $1 OR payload ->> 'booking_id' = $1::text \
         ORDER BY source_position, event_type",
    )
    .bind(booking)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn only_a_booking_won_from_a_lead_moves_its_kommo_lead_through_every_status() {
    let h = Harness::new().await;
    let worker = h.worker(paced(), 5);
    let (lead, kommo_lead) = h.kommo_lead("LD-000001").await;
    let client = h.client("Omar Farouk").await;
    // The won booking is confirmed in a batch after its creation's: the projector looks its
    // lead up. The others are created and confirmed in one batch: learnt from the batch itself.
    let (won, _) = h.booking(client, 1, Some(lead)).await;
    h.derive().await;
    h.confirm(won).await;
    let (won_at_once, _) = h.booking(client, 9, Some(lead)).await;
    h.confirm(won_at_once).await;
    let (walk_in, _) = h.confirmed_booking(client, 5).await;
    h.drain(&worker, Duration::from_secs(20)).await;
    let status = |h: &Harness| h.kommo.lead(kommo_lead).unwrap()["status_id"].clone();
    assert_eq!(status(&h), 47_888_833, "Deposit received");

    // Later batches: the projector looks each stream's creation and confirmation up.
    let now = Utc::now();
    for booking in [won, walk_in] {
        let delivery = BookingCommand::StartDelivery {
            driver_id: None,
            promised_at: now,
        };
        h.bus
            .bookings
            .execute(booking, delivery, &meta(), None)
            .await
            .unwrap();
    }
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(status(&h), 47_888_836, "Car delivered");
    for booking in [won, walk_in] {
        let cancel = BookingCommand::Cancel {
            reason: "the client changed plans".into(),
        };
        h.bus
            .bookings
            .execute(booking, cancel, &meta(), None)
            .await
            .unwrap();
        h.derive().await;
    }
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(status(&h), 143, "Closed - lost");

    let pairs = |rows: &[(&str, &str)]| -> Vec<(String, String)> {
        rows.iter()
            .map(|(a, c)| (a.to_string(), c.to_string()))
            .collect()
    };
    assert_eq!(
        booking_rows(&h.db.pool, won).await,
        pairs(&[
            ("lead.status", "BookingConfirmed"),
            ("sales_order.upsert", "BookingConfirmed"),
            ("lead.status", "BookingDeliveryStarted"),
            ("lead.status", "BookingCancelled"),
            ("sales_order.upsert", "BookingCancelled"),
        ])
    );
    assert_eq!(
        booking_rows(&h.db.pool, won_at_once).await,
        pairs(&[
            ("lead.status", "BookingConfirmed"),
            ("sales_order.upsert", "BookingConfirmed"),
        ])
    );
    assert_eq!(
        booking_rows(&h.db.pool, walk_in).await,
        pairs(&[
            ("sales_order.upsert", "BookingConfirmed"),
            ("sales_order.upsert", "BookingCancelled"),
        ])
    );
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM integrations_outbox WHERE status <> 'processed'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(failed, 0, "{:?}", statuses(&h.db.pool).await);
}

/// Rows for one Kommo lead come from the lead and from every booking won from it. A retried row
/// of the lead must not land after a later booking's row and put back an older status.
#[tokio::test]
async fn a_retried_lead_status_never_lands_after_a_later_status_of_its_bookings() {
    let h = Harness::new().await;
    let worker = h.worker(paced(), 5);
    let (lead, kommo_lead, booking) = h.lead_with_booking(&worker, "LD-000002").await;

    // The lead moves on; Kommo is briefly down for that update and asks to come back in 1 s.
    h.kommo.inject(
        FaultRule::new(Fault::Unavailable { retry_after: 1 })
            .times(1)
            .on(Method::PATCH, "/api/v4/leads"),
    );
    h.move_lead(lead, "offer_sent", 5).await;
    h.derive().await;
    worker.try_execute_task().await.unwrap();
    assert_eq!(
        h.kommo.pending_faults(),
        0,
        "the lead's update met the outage"
    );

    // Meanwhile its booking is confirmed: Kommo's lead must end at "Deposit received".
    h.confirm(booking).await;
    h.drain(&worker, Duration::from_secs(20)).await;
    h.assert_kommo_status(kommo_lead, 47_888_833).await;
}

/// Rows derived before a booking's Kommo lead status was ordered under its lead are moved there
/// by the migration, and delivered as the booking's status.
#[tokio::test]
async fn the_migration_moves_older_booking_lead_status_rows_under_their_lead() {
    let h = Harness::new().await;
    let (lead, kommo_lead) = h.kommo_lead("LD-000003").await;
    let client = h.client("Omar Farouk").await;
    let (booking, _) = h.booking(client, 1, Some(lead)).await;
    h.confirm(booking).await;
    h.derive().await;
    // As the projector used to derive it.
    let older = sqlx::query(
        "UPDATE integrations_outbox SET entity_type = 'booking', entity_id = $1, \
           payload = payload - 'booking_id' \
         WHERE event_type = 'lead.status'",
    )
    .bind(booking)
    .execute(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(older.rows_affected(), 1);

    sqlx::raw_sql(include_str!(
        "../../migrations/20261124000007_booking_lead_status_rows_under_their_lead.sql"
    ))
    .execute(&h.db.pool)
    .await
    .unwrap();
    let row: (String, Uuid, Option<String>) = sqlx::query_as(
        "SELECT entity_type, entity_id, payload ->> 'booking_id' FROM integrations_outbox \
         WHERE event_type = 'lead.status'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(row, ("lead".into(), lead, Some(booking.to_string())));

    let worker = h.worker(paced(), 5);
    h.drain(&worker, Duration::from_secs(20)).await;
    h.assert_kommo_status(kommo_lead, 47_888_833).await;
}

/// A dead letter of a Kommo lead's status, requeued after a later status of that lead went out,
/// would put the older status back: it is marked done without a call.
#[tokio::test]
async fn a_requeued_lead_status_does_not_undo_a_later_one() {
    let h = Harness::new().await;
    let worker = h.worker(paced(), 5);
    let (lead, kommo_lead, booking) = h.lead_with_booking(&worker, "LD-000004").await;

    // The lead moves on, and Kommo refuses that update for good.
    let dead = h.refused_move(&worker, lead, "offer_sent", 5).await;

    // Then its booking is confirmed, and only then is the dead letter requeued.
    h.confirm(booking).await;
    h.drain(&worker, Duration::from_secs(20)).await;
    let status = |h: &Harness| h.kommo.lead(kommo_lead).unwrap()["status_id"].clone();
    assert_eq!(status(&h), 47_888_833);
    assert!(
        outbox_worker::worker::requeue(&h.db.pool, dead)
            .await
            .unwrap()
    );
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(status(&h), 47_888_833, "{:?}", statuses(&h.db.pool).await);
    let response: serde_json::Value =
        sqlx::query_scalar("SELECT response FROM integrations_outbox WHERE id = $1")
            .bind(dead)
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert!(response.get("skipped").is_some(), "{response}");
}

/// ... unless the latest status failed too: then the requeued one sends the lead's status now.
#[tokio::test]
async fn a_requeued_lead_status_is_sent_when_the_latest_one_failed_too() {
    let h = Harness::new().await;
    let worker = h.worker(paced(), 5);
    let (lead, kommo_lead, booking) = h.lead_with_booking(&worker, "LD-000005").await;
    let first = h.refused_move(&worker, lead, "offer_sent", 5).await;
    h.confirm(booking).await;
    h.drain(&worker, Duration::from_secs(20)).await;
    h.refused_move(&worker, lead, "qualified", 3).await;
    h.assert_kommo_status(kommo_lead, 47_888_833).await;

    assert!(
        outbox_worker::worker::requeue(&h.db.pool, first)
            .await
            .unwrap()
    );
    h.drain(&worker, Duration::from_secs(20)).await;
    h.assert_kommo_status(kommo_lead, 47_873_533).await;
}

#[tokio::test]
async fn the_fault_matrix_ends_with_exactly_one_record_per_entity() {
    let h = Harness::new().await;
    // Each fault hits the first matching request(s).
    h.kommo.inject(
        FaultRule::new(Fault::Status500)
            .times(2)
            .on(Method::POST, "/api/v4/contacts"),
    );
    h.kommo.inject(
        FaultRule::new(Fault::TooManyRequests {
            retry_after: None,
            json_body: false,
        })
        .times(1)
        .on(Method::GET, "/api/v4/contacts"),
    );
    h.kommo.inject(
        FaultRule::new(Fault::ResetConnection { apply: true })
            .times(1)
            .on(Method::POST, "/api/v4/contacts"),
    );
    h.zoho.inject(
        FaultRule::new(Fault::Delay(Duration::from_millis(5000)))
            .times(1)
            .path("/crm/v6/Contacts"),
    );
    h.zoho.inject(
        FaultRule::new(Fault::TooManyRequests {
            retry_after: Some(1),
            json_body: true,
        })
        .times(1)
        .path("/crm/v6/Contacts"),
    );
    h.zoho.inject(
        FaultRule::new(Fault::ExpiredToken)
            .times(1)
            .path("/crm/v6/Sales_Orders"),
    );

    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(h.client(&format!("Guest Number{i}")).await);
    }
    let mut codes = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        codes.push(h.confirmed_booking(*c, 3 * i as i64).await.1);
    }
    let worker = h.worker(paced(), 8);
    h.drain(&worker, Duration::from_secs(40)).await;

    let failed: Vec<_> = statuses(&h.db.pool)
        .await
        .into_iter()
        .filter(|s| s.2 != "processed")
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        h.kommo.pending_faults() + h.zoho.pending_faults(),
        0,
        "every fault was exercised"
    );
    assert_eq!(
        h.kommo.contacts().len(),
        3,
        "no duplicate after a reset after apply"
    );
    assert_eq!(
        h.zoho.contacts().len(),
        3,
        "no duplicate after a timeout after apply"
    );
    assert_eq!(h.zoho.sales_orders().len(), 3);
    for code in &codes {
        assert!(h.zoho.sales_order_by_external(code).is_some());
    }
    assert!(h.zoho.refreshes() >= 2, "the expired token was refreshed");
    // 429s snoozed without burning attempts; 500s and timeouts used attempts.
    let attempts: Vec<i32> = statuses(&h.db.pool).await.iter().map(|s| s.3).collect();
    assert!(attempts.iter().any(|a| *a > 1));
}

#[tokio::test]
async fn permanent_errors_and_exhausted_attempts_dead_letter_and_a_requeue_delivers() {
    let h = Harness::new().await;
    h.kommo.inject(
        FaultRule::new(Fault::Validation400)
            .times(1)
            .on(Method::POST, "/api/v4/contacts"),
    );
    h.zoho.inject(
        FaultRule::new(Fault::Status500)
            .times(50)
            .path("/crm/v6/Contacts"),
    );
    let client = h.client("Omar Farouk").await;
    let worker = h.worker(paced(), 3);
    h.drain(&worker, Duration::from_secs(20)).await;

    let rows = statuses(&h.db.pool).await;
    let kommo = rows.iter().find(|r| r.0 == "kommo").unwrap();
    assert_eq!(
        (kommo.2.as_str(), kommo.3),
        ("failed", 1),
        "a validation error fails at once"
    );
    let zoho = rows.iter().find(|r| r.0 == "zoho").unwrap();
    assert_eq!(
        (zoho.2.as_str(), zoho.3),
        ("failed", 3),
        "after the configured attempts"
    );
    assert!(zoho.4.as_deref().unwrap_or_default().contains("500"));
    assert!(h.kommo.contacts().is_empty() && h.zoho.contacts().is_empty());

    // The operator fixes things and requeues the dead letters.
    h.zoho.clear_faults();
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM integrations_outbox WHERE status = 'failed'")
            .fetch_all(&h.db.pool)
            .await
            .unwrap();
    for id in ids {
        assert!(
            outbox_worker::worker::requeue(&h.db.pool, id)
                .await
                .unwrap()
        );
    }
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(h.kommo.contacts().len(), 1);
    assert_eq!(h.zoho.contacts().len(), 1);
    let (c, _) = h.bus.clients.replay(client, None).await.unwrap();
    assert!(c.zoho_contact_id.is_some());
}

/// A dead letter requeued while a later row of the same client is in delivery (another worker
/// holds it under a live lease) waits until that delivery ends: two deliveries of one record
/// would both look it up, find nothing, and create it twice.
#[tokio::test]
async fn a_dead_letter_requeued_during_a_later_delivery_of_its_record_waits_for_it() {
    let h = Harness::new().await;
    h.kommo.inject(
        FaultRule::new(Fault::Validation400)
            .times(1)
            .on(Method::POST, "/api/v4/contacts"),
    );
    let client = h.client("Huda Saleh").await;
    let worker = h.worker(paced(), 3);
    h.drain(&worker, Duration::from_secs(20)).await;
    let first: Uuid = sqlx::query_scalar(
        "SELECT id FROM integrations_outbox WHERE target_system = 'kommo' AND status = 'failed'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(h.kommo.contacts().is_empty());

    // The client's details change; another worker is delivering that row.
    h.change_client(client, Some("Huda Saleh Al Amiri"), None, None)
        .await;
    h.derive().await;
    let later: Uuid = sqlx::query_scalar(
        "UPDATE integrations_outbox SET status = 'processing', lease_owner = 'another-worker', \
           lease_expires_at = now() + interval '60 seconds', attempts = 1 \
         WHERE target_system = 'kommo' AND status = 'pending' RETURNING id",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(
        outbox_worker::worker::requeue(&h.db.pool, first)
            .await
            .unwrap()
    );
    // A round (it delivers the client's Zoho row) leaves the requeued row alone.
    worker.try_execute_task().await.unwrap();
    let status: String = sqlx::query_scalar("SELECT status FROM integrations_outbox WHERE id = $1")
        .bind(first)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "pending", "{:?}", statuses(&h.db.pool).await);
    assert!(
        h.kommo.contacts().is_empty(),
        "delivered beside the other delivery"
    );

    // The other worker hands its row back; both rows are then delivered, one after the other,
    // and the client has one Kommo contact.
    sqlx::query(
        "UPDATE integrations_outbox SET status = 'pending', lease_owner = NULL, \
           lease_expires_at = NULL WHERE id = $1",
    )
    .bind(later)
    .execute(&h.db.pool)
    .await
    .unwrap();
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(h.kommo.contacts().len(), 1);
    let rows = statuses(&h.db.pool).await;
    assert!(
        rows.iter()
            .filter(|r| r.0 == "kommo")
            .all(|r| r.2 == "processed"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_sales_order_waits_for_its_contact_and_updates_instead_of_duplicating() {
    let h = Harness::new().await;
    // The contact's first upsert fails a few times; the sales order must wait for it.
    h.zoho.inject(
        FaultRule::new(Fault::Status500)
            .times(2)
            .path("/crm/v6/Contacts"),
    );
    let client = h.client("Nadia Karim").await;
    let (booking, code) = h.confirmed_booking(client, 5).await;
    let worker = h.worker(paced(), 8);
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(h.zoho.sales_orders().len(), 1);
    // A change after confirmation updates the same sales order.
    h.bus
        .bookings
        .execute(
            booking,
            BookingCommand::Cancel {
                reason: "client cancelled".into(),
            },
            &meta(),
            None,
        )
        .await
        .unwrap();
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(h.zoho.sales_orders().len(), 1);
    let order = h.zoho.sales_order_by_external(&code).unwrap();
    assert_eq!(order["Status"], "Cancelled");
}

/// A sales order whose client's Zoho contact is not synced yet waits, without using an
/// attempt, until the contact's row is due (here in backoff for 30 s), then looks again shortly
/// after it, rather than every few seconds in between. A later contact row of the client (its
/// details changed), due at once but waiting behind the first, does not make it look sooner.
#[tokio::test]
async fn a_sales_order_waits_until_its_contacts_retry_is_due() {
    let h = Harness::new().await;
    let client = h.client("Nadia Karim").await;
    let (booking, _) = h.confirmed_booking(client, 5).await;
    h.derive().await;
    let contact_due: chrono::DateTime<Utc> = sqlx::query_scalar(
        "UPDATE integrations_outbox SET next_run_at = now() + interval '30 seconds', attempts = 1 \
         WHERE entity_id = $1 AND target_system = 'zoho' RETURNING next_run_at",
    )
    .bind(client)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    h.change_client(client, None, Some("+971501234999"), None)
        .await;
    h.derive().await;
    let contact_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM integrations_outbox WHERE entity_id = $1 AND target_system = 'zoho'",
    )
    .bind(client)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(contact_rows, 2, "{:?}", statuses(&h.db.pool).await);
    let worker = h.worker(paced(), 5);
    worker.try_execute_task().await.unwrap();
    let (status, attempts, due, why): (String, i32, chrono::DateTime<Utc>, Option<String>) =
        sqlx::query_as(
            "SELECT status, attempts, next_run_at, last_error FROM integrations_outbox \
             WHERE entity_id = $1 AND event_type = 'sales_order.upsert'",
        )
        .bind(booking)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "pending");
    assert_eq!(attempts, 0, "waiting uses no attempt");
    assert_eq!(
        why.as_deref(),
        Some("waiting for the client's Zoho contact")
    );
    assert!(
        due >= contact_due && due <= contact_due + chrono::Duration::seconds(2),
        "the sales order is due at {due}, its contact at {contact_due}"
    );
    assert!(h.zoho.sales_orders().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_drain_a_large_backlog_once_each_in_order_within_kommo_pacing() {
    let h = Harness::new().await;
    const CLIENTS: usize = 40;
    const ROWS_PER_CLIENT: usize = 250; // 10,000 rows
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(h.client(&format!("Backlog Client{i}")).await);
    }
    h.derive().await;
    // The derived rows (one Kommo and one Zoho upsert per client) plus a synthetic backlog of
    // Zoho contact upserts, in order per client.
    sqlx::query(
        "INSERT INTO integrations_outbox (id, entity_type, entity_id, target_system, event_type, payload, dedupe_key, source_position) \
         SELECT gen_random_uuid(), 'client', c.id, 'zoho', 'contact.upsert', jsonb_build_object('n', n), \
                'backlog:' || c.id || ':' || n, 1000000 + n * 1000 + c.i \
         FROM unnest($1::uuid[]) WITH ORDINALITY AS c(id, i), generate_series(1, $2) AS n",
    )
    .bind(&clients)
    .bind((ROWS_PER_CLIENT - 1) as i32)
    .execute(&h.db.pool)
    .await
    .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM integrations_outbox")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(total, (CLIENTS * (ROWS_PER_CLIENT + 1)) as i64);

    // Kommo pacing and Zoho's concurrency are shared through the database by the three workers.
    let workers: Vec<Arc<Worker>> = (0..3)
        .map(|_| {
            Arc::new(h.worker_with(
                Arc::new(PgPacer::new(h.db.pool.clone(), "kommo", 6)),
                5,
                Arc::new(PgCallSlots::new(
                    h.db.pool.clone(),
                    "zoho",
                    10,
                    Duration::from_secs(5),
                )),
                LEASE,
            ))
        })
        .collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = workers
        .iter()
        .map(|w| {
            let w = w.clone();
            let s = stopped.clone();
            tokio::spawn(async move { w.run(s).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while open_rows(&h.db.pool).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog not drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }

    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM integrations_outbox WHERE status = 'processed'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(
        processed,
        total,
        "{:?}",
        statuses(&h.db.pool)
            .await
            .iter()
            .filter(|s| s.2 != "processed")
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(h.zoho.contacts().len(), CLIENTS, "one record per client");
    assert_eq!(h.kommo.contacts().len(), CLIENTS);
    assert!(
        h.kommo.max_rps_observed() <= 7,
        "Kommo saw {} requests in one second",
        h.kommo.max_rps_observed()
    );
    assert_eq!(h.kommo.rate_limited(), 0, "never throttled by Kommo");
    assert!(
        h.zoho.max_concurrency_observed() <= 10,
        "Zoho saw {} calls at once",
        h.zoho.max_concurrency_observed()
    );
    // Per entity and target, rows were completed in log order.
    let rows: Vec<(Uuid, String, i64, chrono::DateTime<Utc>)> = sqlx::query_as(
        "SELECT entity_id, target_system, source_position, processed_at FROM integrations_outbox ORDER BY source_position",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    let mut last: HashMap<(Uuid, String), chrono::DateTime<Utc>> = HashMap::new();
    for (entity, target, pos, at) in rows {
        if let Some(prev) = last.insert((entity, target), at) {
            assert!(
                prev <= at,
                "row at {pos} completed before an earlier row of its entity"
            );
        }
    }
}

/// Three processes' worth of Zoho clients (each its own `PgCallSlots`, as each process has) share
/// one limit of 4 calls at once through the database: 24 calls racing never hold more than 4
/// slots, and do use them (at least 3 at once: the 200 ms calls overlap).
#[tokio::test]
async fn call_slots_bound_the_calls_in_flight_across_processes() {
    let db = TestDb::new().await;
    let processes: Vec<Arc<PgCallSlots>> = (0..3)
        .map(|_| {
            Arc::new(PgCallSlots::new(
                db.pool.clone(),
                "zoho",
                4,
                Duration::from_secs(30),
            ))
        })
        .collect();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let slots = processes[i % 3].clone();
            let (in_flight, most) = (in_flight.clone(), most.clone());
            tokio::spawn(async move {
                let _slot = crm::CallSlots::acquire(&*slots).await;
                let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!((3..=4).contains(&most), "{most} calls at once");
    // Released slots are free again (the releases run in tasks of their own).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let held = held_slots(&db.pool).await;
        if held == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{held} slots held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process that dies holding slots (its runtime stops: no release, no renewal) holds them only
/// until their leases end; then another process's calls get them.
#[tokio::test]
async fn call_slots_of_a_dead_process_come_back_when_their_leases_end() {
    let db = TestDb::new().await;
    let lease = Duration::from_secs(1);
    let url = db.url.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let pool = PgPool::connect(&url).await.unwrap();
            let dead = PgCallSlots::new(pool, "zoho", 2, lease);
            for _ in 0..2 {
                std::mem::forget(crm::CallSlots::acquire(&dead).await);
            }
        });
        // The process dies: its tasks (the lease renewals) stop.
        drop(runtime);
    })
    .join()
    .unwrap();
    let alive = PgCallSlots::new(db.pool.clone(), "zoho", 2, lease);
    acquire_within(
        &alive,
        Duration::from_secs(10),
        "a slot came back when its lease ended",
    )
    .await;
}

/// A live holder keeps its slot past the lease (its lease is renewed while the call runs), and
/// releases it when the call ends.
#[tokio::test]
async fn a_live_call_keeps_its_slot_beyond_the_lease() {
    let db = TestDb::new().await;
    let lease = Duration::from_secs(1);
    let one = PgCallSlots::new(db.pool.clone(), "zoho", 1, lease);
    let other = PgCallSlots::new(db.pool.clone(), "zoho", 1, lease);
    let held = crm::CallSlots::acquire(&one).await;
    assert!(
        tokio::time::timeout(lease * 3, crm::CallSlots::acquire(&other))
            .await
            .is_err(),
        "the slot was taken from a live call"
    );
    drop(held);
    acquire_within(&other, Duration::from_secs(5), "the released slot is free").await;
}

/// Takes a slot and gives it back, failing with `why` unless one is free within `wait`.
async fn acquire_within(slots: &PgCallSlots, wait: Duration, why: &str) {
    let slot = tokio::time::timeout(wait, crm::CallSlots::acquire(slots))
        .await
        .expect(why);
    drop(slot);
}

async fn held_slots(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM call_slots WHERE holder IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A graceful shutdown gives back, before it returns, the slots of this worker: those of calls
/// whose guards never get to release them, and those whose releases are still under way (guards
/// dropped just before), so that none is held on until its lease ends.
#[tokio::test]
async fn closing_call_slots_gives_back_the_slots_still_held() {
    let db = TestDb::new().await;
    let lease = Duration::from_secs(60);
    let stopping = PgCallSlots::new(db.pool.clone(), "zoho", 4, lease);
    for _ in 0..2 {
        std::mem::forget(crm::CallSlots::acquire(&stopping).await);
    }
    let dropped = [
        crm::CallSlots::acquire(&stopping).await,
        crm::CallSlots::acquire(&stopping).await,
    ];
    assert_eq!(held_slots(&db.pool).await, 4);
    drop(dropped);
    crm::CallSlots::close(&stopping).await;
    assert_eq!(
        held_slots(&db.pool).await,
        0,
        "closing gave every slot back"
    );
}

/// An acquisition cancelled while its attempt to take the slot is inside the database (here made
/// slow by a trigger) does not keep the slot that attempt goes on to take: it is free long before
/// its lease would end. (A release sent at once would find no row of its holder yet, and the take
/// would commit after it.)
#[tokio::test]
async fn a_cancelled_acquisition_does_not_keep_its_slot() {
    let db = TestDb::new().await;
    let lease = Duration::from_secs(60);
    let slots = Arc::new(PgCallSlots::new(db.pool.clone(), "zoho", 1, lease));
    // The slot row exists before (and is free again once the release, a task, has run).
    drop(crm::CallSlots::acquire(&*slots).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held_slots(&db.pool).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for statement in [
        "CREATE FUNCTION slow_take() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$",
        "CREATE TRIGGER slow_take BEFORE UPDATE ON call_slots FOR EACH ROW \
         WHEN (NEW.holder IS NOT NULL) EXECUTE FUNCTION slow_take()",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
    let acquiring = tokio::spawn({
        let slots = slots.clone();
        async move { crm::CallSlots::acquire(&*slots).await }
    });
    // The attempt is taking the slot; then the acquisition is cancelled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let taking: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
               AND wait_event = 'PgSleep' AND query ILIKE '%UPDATE call_slots%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if taking > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the take never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acquiring.abort();
    assert!(acquiring.await.unwrap_err().is_cancelled());
    sqlx::query("DROP TRIGGER slow_take ON call_slots")
        .execute(&db.pool)
        .await
        .unwrap();

    let other = PgCallSlots::new(db.pool.clone(), "zoho", 1, lease);
    acquire_within(
        &other,
        Duration::from_secs(10),
        "the slot is free again, not held until its lease ends",
    )
    .await;
}

/// Many deliveries of one process finding the token expired at once refresh it one at a time,
/// and wait for their turn inside the process: not each on a database connection of its own
/// (up to 64 per worker), which could exhaust the server's connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshers_of_one_token_wait_in_their_process_not_on_database_connections() {
    let db = TestDb::new().await;
    let store = Arc::new(PgTokenStore::new(db.pool.clone(), key()));
    let holding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most_holding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, holding, most_holding) =
                (store.clone(), holding.clone(), most_holding.clone());
            tokio::spawn(async move {
                let guard = store.lock_refresh(crm::KOMMO_SYSTEM).await.unwrap();
                let now = holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most_holding.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                drop(guard);
            })
        })
        .collect();
    let mut most_waiting = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event = 'advisory'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        most_waiting = most_waiting.max(waiting);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        most_holding.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one refresher at a time"
    );
    // One at most: the next refresher's connection, until the server has seen the previous
    // one close.
    assert!(
        most_waiting <= 1,
        "{most_waiting} connections waited on the refresh lock"
    );
}

/// A row whose deliveries never end (each one's worker dies during it) is not claimed for
/// ever: once its attempts are used up, the next claim makes it a dead letter without calling
/// the CRM.
#[tokio::test]
async fn a_row_whose_deliveries_never_end_becomes_a_dead_letter_after_its_attempts() {
    let h = Harness::new().await;
    h.client("Crash Loop").await;
    h.derive().await;
    // Three claims so far, the last one's worker gone (its lease ran out).
    sqlx::query(
        "UPDATE integrations_outbox SET status = 'processing', attempts = 3, \
           lease_owner = 'dead-worker', lease_expires_at = now() - interval '1 second' \
         WHERE target_system = 'kommo'",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    let worker = h.worker(paced(), 3);
    worker.try_execute_task().await.unwrap();
    let (status, error): (String, Option<String>) = sqlx::query_as(
        "SELECT status, last_error FROM integrations_outbox WHERE target_system = 'kommo'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(status, "failed", "{error:?}");
    assert!(error.unwrap_or_default().contains("3 attempts"));
    assert!(h.kommo.requests().is_empty(), "{:?}", h.kommo.requests());
    // Its Zoho row, on its first attempt, went through.
    assert_eq!(h.zoho.contacts().len(), 1);
}

/// A CRM down for maintenance (503 with `Retry-After`) is not asked again before it said: the
/// row's retry waits that long, not the few milliseconds of its backoff.
#[tokio::test]
async fn a_503_with_retry_after_is_retried_no_sooner_than_asked() {
    let h = Harness::new().await;
    h.zoho
        .inject(FaultRule::new(Fault::Unavailable { retry_after: 120 }).path("/crm/v6/Contacts"));
    h.client("Maintenance Window").await;
    h.derive().await;
    let worker = h.worker(paced(), 5);
    worker.try_execute_task().await.unwrap();
    let (status, attempts, due_in): (String, i32, f64) = sqlx::query_as(
        "SELECT status, attempts, extract(epoch FROM next_run_at - now())::float8 \
         FROM integrations_outbox WHERE target_system = 'zoho'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(due_in > 100.0, "retried in {due_in} s");
    assert_eq!(h.kommo.contacts().len(), 1, "the other CRM is not held up");
}

/// A 429 that asks for no wait (`Retry-After: 0`) still snoozes its row and pauses the account
/// for a second: asking again at once would only earn the next 429 (and, repeated, a block of
/// the IP).
#[tokio::test]
async fn a_429_asking_for_no_wait_still_pauses_for_a_second() {
    let h = Harness::new().await;
    h.kommo.inject(
        FaultRule::new(Fault::TooManyRequests {
            retry_after: Some(0),
            json_body: false,
        })
        .times(1),
    );
    h.client("Eager Retry").await;
    h.derive().await;
    let pacer = Arc::new(PgPacer::new(h.db.pool.clone(), "kommo", 6));
    let worker = h.worker(pacer.clone(), 5);
    worker.try_execute_task().await.unwrap();
    let (status, attempts, due_in): (String, i32, f64) = sqlx::query_as(
        "SELECT status, attempts, extract(epoch FROM next_run_at - now())::float8 \
         FROM integrations_outbox WHERE target_system = 'kommo'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 0),
        "a 429 uses no attempt"
    );
    assert!(due_in > 0.8, "asked again in {due_in} s");
    let held: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM next_slot - clock_timestamp())::float8 FROM rate_limits \
         WHERE name = 'kommo'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(held > 0.7, "the account is held for {held} s only");
}

/// Zoho answers 429 without Retry-After, for seconds (its concurrency limit) or for hours (its
/// 24-hour credits): each 429 in a row doubles the row's wait, until it is delivered.
#[tokio::test]
async fn repeated_429s_without_retry_after_wait_longer_each_time() {
    let h = Harness::new().await;
    h.zoho.inject(
        FaultRule::new(Fault::TooManyRequests {
            retry_after: None,
            json_body: true,
        })
        .times(3)
        .path("/crm/v6/Contacts"),
    );
    h.client("Credit Crunch").await;
    h.derive().await;
    let worker = h.worker(paced(), 5);
    let zoho_row = || async {
        sqlx::query_as::<_, (String, i32, i32, f64)>(
            "SELECT status, attempts, rate_limited, \
               extract(epoch FROM next_run_at - now())::float8 \
             FROM integrations_outbox WHERE target_system = 'zoho'",
        )
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
    };
    let mut waits = Vec::new();
    for n in 1..=3 {
        worker.try_execute_task().await.unwrap();
        let (status, attempts, rate_limited, due_in) = zoho_row().await;
        assert_eq!((status.as_str(), attempts, rate_limited), ("pending", 0, n));
        waits.push(due_in);
        sqlx::query(
            "UPDATE integrations_outbox SET next_run_at = now() WHERE target_system = 'zoho'",
        )
        .execute(&h.db.pool)
        .await
        .unwrap();
    }
    assert!(
        waits[0] >= 0.9 && waits[1] >= 1.9 && waits[2] >= 3.9,
        "{waits:?}"
    );
    h.drain(&worker, Duration::from_secs(20)).await;
    assert_eq!(zoho_row().await.0, "processed");
}

/// Without its database a shared pacer lets nothing through: pacing each process on its own
/// would let several together go over Kommo's limit.
#[tokio::test]
async fn a_shared_pacer_without_its_database_sends_nothing() {
    let gone = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy("postgres://postgres@127.0.0.1:9/none")
        .unwrap();
    let pacer = PgPacer::new(gone, "kommo", 6);
    let sent = tokio::time::timeout(Duration::from_secs(2), pacer.acquire()).await;
    assert!(
        sent.is_err(),
        "a request was let through without the shared pacing"
    );
}

/// A 429 seen by one process pauses the account for every process: the shared slot moves past
/// the wait, so another process's next request waits for it too.
#[tokio::test]
async fn a_hold_off_after_a_429_pauses_the_shared_pacing_for_every_process() {
    let db = TestDb::new().await;
    let one = PgPacer::new(db.pool.clone(), "kommo", 6);
    let other = PgPacer::new(db.pool.clone(), "kommo", 6);
    one.acquire().await;
    one.hold_off(Duration::from_secs(2)).await;
    let held_at = std::time::Instant::now();
    other.acquire().await;
    let waited = held_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1_900),
        "let through after {waited:?}"
    );
}

/// Waits (up to 20 s) for `task` to end without help; `stuck` says what it means if not.
async fn finishes_by_itself<T>(task: &tokio::task::JoinHandle<T>, stuck: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !task.is_finished() {
        assert!(tokio::time::Instant::now() < deadline, "{stuck}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kommo pacing that lets no request through until the test opens it.
struct Gate(tokio::sync::watch::Receiver<bool>);

#[async_trait::async_trait]
impl Pacer for Gate {
    async fn acquire(&self) {
        let mut open = self.0.clone();
        let _ = open.wait_for(|open| *open).await;
    }
}

/// A worker stalled past its lease, whose row another worker has taken over meanwhile, gives the
/// delivery up when it next renews: it never calls the CRM for a row that is not its own any
/// more (two workers creating one contact), and leaves the row to its new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_row_was_taken_over_gives_the_delivery_up_without_calling_the_crm() {
    let h = Harness::new().await;
    h.client("Lease Lapsed").await;
    h.derive().await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let worker = Arc::new(h.worker_with(
        Arc::new(Gate(gate)),
        5,
        Arc::new(crm::Unshared),
        Duration::from_secs(1),
    ));
    let round = tokio::spawn({
        let worker = worker.clone();
        async move { worker.try_execute_task().await }
    });
    // The Kommo delivery is claimed and waits for its turn; then another worker takes it over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let taken = sqlx::query(
            "UPDATE integrations_outbox SET lease_owner = 'another-worker', \
               lease_expires_at = now() + interval '1 hour' \
             WHERE target_system = 'kommo' AND status = 'processing'",
        )
        .execute(&h.db.pool)
        .await
        .unwrap()
        .rows_affected();
        if taken == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the row was never claimed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stalled worker gives the row up by itself, before its turn to call ever comes.
    finishes_by_itself(
        &round,
        "the worker still waits to deliver a row that is not its own",
    )
    .await;
    open.send_replace(true);
    round.await.unwrap().unwrap();
    assert!(h.kommo.requests().is_empty(), "{:?}", h.kommo.requests());
    let kommo: (String, Option<String>) = sqlx::query_as(
        "SELECT status, lease_owner FROM integrations_outbox WHERE target_system = 'kommo'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        kommo,
        ("processing".to_string(), Some("another-worker".to_string())),
        "left to its new holder"
    );
    // The Zoho row, still this worker's, was delivered.
    assert_eq!(h.zoho.contacts().len(), 1);
}

/// A worker whose lease renewals fail (its database connections are lost or exhausted) gives
/// the delivery up before the lease it last renewed may run out: another worker could take the
/// row over then, and two deliveries of one record would create it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_renew_its_lease_gives_the_delivery_up_before_it_runs_out() {
    let h = Harness::new().await;
    h.client("Renewal Refused").await;
    h.derive().await;
    sqlx::raw_sql(
        "CREATE FUNCTION test_refuse_renewal() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF OLD.status = 'processing' AND NEW.status = 'processing' \
           AND NEW.target_system = 'kommo' THEN RAISE EXCEPTION 'renewal refused by the test'; \
         END IF; RETURN NEW; END $$; \
         CREATE TRIGGER zz_test_refuse_renewal BEFORE UPDATE ON integrations_outbox \
           FOR EACH ROW EXECUTE FUNCTION test_refuse_renewal();",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    let (open, gate) = tokio::sync::watch::channel(false);
    let worker = Arc::new(h.worker_with(
        Arc::new(Gate(gate)),
        5,
        Arc::new(crm::Unshared),
        Duration::from_secs(1),
    ));
    let round = tokio::spawn({
        let worker = worker.clone();
        async move { worker.try_execute_task().await }
    });
    // The Kommo delivery waits for its turn to call, which does not come while its lease holds.
    finishes_by_itself(
        &round,
        "the worker still waits to deliver a row whose lease it could not renew",
    )
    .await;
    open.send_replace(true);
    round.await.unwrap().unwrap();
    assert!(h.kommo.requests().is_empty(), "{:?}", h.kommo.requests());
    let kommo: String =
        sqlx::query_scalar("SELECT status FROM integrations_outbox WHERE target_system = 'kommo'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(kommo, "processing", "left for its lease to run out");
    assert_eq!(h.zoho.contacts().len(), 1, "the Zoho row was delivered");
}

/// A worker that claims its own row again after the lease of its first claim ran out (that
/// claim's renewals could not get through) is two deliveries of one row under one owner: the
/// first notices at its next renewal that its claim is not the current one, and gives up; only
/// the current claim calls the CRM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_claimed_again_by_its_own_worker_is_delivered_by_the_newer_claim_only() {
    let h = Harness::new().await;
    h.client("Claimed Twice").await;
    h.derive().await;
    // Two rounds of one worker (one owner), renewing every 2 s.
    let (open, gate) = tokio::sync::watch::channel(false);
    let config = worker_config(5, Duration::from_secs(6));
    let worker = Arc::new(Worker::new(
        h.db.pool.clone(),
        h.bus.clone(),
        h.targets(Arc::new(Gate(gate)), Arc::new(crm::Unshared)),
        config,
    ));
    let round = |worker: &Arc<Worker>| {
        let worker = worker.clone();
        tokio::spawn(async move { worker.try_execute_task().await })
    };
    let kommo_attempts = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT attempts FROM integrations_outbox \
             WHERE target_system = 'kommo' AND status = 'processing'",
        )
        .fetch_optional(&h.db.pool)
        .await
        .unwrap()
    };
    let first = round(&worker);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while kommo_attempts().await != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the row was never claimed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first claim's lease runs out, and the same worker claims the row again (retried if a
    // renewal of the first claim slipped in between).
    let second = loop {
        sqlx::query(
            "UPDATE integrations_outbox SET lease_expires_at = now() - interval '1 second' \
             WHERE target_system = 'kommo'",
        )
        .execute(&h.db.pool)
        .await
        .unwrap();
        let second = round(&worker);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while kommo_attempts().await != Some(2) && !second.is_finished() {
            assert!(tokio::time::Instant::now() < deadline, "no second claim");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if kommo_attempts().await == Some(2) {
            break second;
        }
    };
    // The first round gives up by itself before any call is let through.
    finishes_by_itself(&first, "the older claim still waits to deliver").await;
    open.send_replace(true);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(h.kommo.contacts().len(), 1, "one Kommo contact");
    let creates = h
        .kommo
        .requests()
        .iter()
        .filter(|r| r.method == Method::POST && r.path == "/api/v4/contacts")
        .count();
    assert_eq!(creates, 1, "{:?}", h.kommo.requests());
    let status: String =
        sqlx::query_scalar("SELECT status FROM integrations_outbox WHERE target_system = 'kommo'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "processed");
}
