//! Real processes: a projector killed with SIGKILL in the middle of its work applies every event
//! exactly once after a restart; two projectors share one database with one active instance per
//! projection and fail over when the active one is killed.

use std::time::Duration;

use commands::CommandBus;
use commands::codes::{self, CodeKind};
use domain::booking::{BookingCommand, BookingType, CreateBooking, Priority};
use domain::{Actor, CommandMetadata};
use rust_decimal::Decimal;
use sqlx::PgPool;
use store::testing::TestDb;
use tokio::process::{Child, Command};
use uuid::Uuid;

fn projector(db: &TestDb, batch: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_skyluxse"))
        .arg("project")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .env("SKYLUXSE_PROJECTION_BATCH", batch.to_string())
        .kill_on_drop(true)
        .spawn()
        .expect("the projector starts")
}

/// Creates `n` bookings, each created, confirmed and cancelled or started: about 3-4 events each.
async fn backlog(pool: &PgPool, n: usize, offset_days: i64) -> i64 {
    let bus = CommandBus::new(pool.clone());
    let meta = CommandMetadata::new(Actor::system(), "backlog");
    let start = chrono::Utc::now() + chrono::Duration::days(offset_days);
    for i in 0..n {
        let id = Uuid::now_v7();
        let vehicle = Uuid::from_u128(0x00000000_0000_4000_c000_000000000001 + (i % 6) as u128);
        let from = start + chrono::Duration::days(2 * (i / 6) as i64);
        let create = CreateBooking {
            external_code: codes::allocate(pool, CodeKind::Booking).await.unwrap(),
            client_id: Uuid::from_u128(1 + (i % 7) as u128),
            owner_id: Uuid::from_u128(99),
            booking_type: BookingType::Rental,
            priority: Priority::Low,
            channel: "Website".into(),
            start_at: from,
            end_at: from + chrono::Duration::days(1),
            vehicle_id: Some(vehicle),
            driver_id: None,
            price_daily: Decimal::from(1000 + i as i64),
            deposit_amount: Decimal::ZERO,
            advance_payment: Decimal::ZERO,
            full_insurance_fee: Decimal::ZERO,
            currency: None,
            pickup_location: None,
            dropoff_location: None,
            services: vec![],
            lead_id: None,
        };
        bus.bookings
            .execute(id, BookingCommand::Create(Box::new(create)), &meta, None)
            .await
            .unwrap();
        bus.bookings
            .execute(id, BookingCommand::Confirm, &meta, None)
            .await
            .unwrap();
        if i % 3 == 0 {
            bus.bookings
                .execute(
                    id,
                    BookingCommand::Cancel {
                        reason: "test".into(),
                    },
                    &meta,
                    None,
                )
                .await
                .unwrap();
        }
    }
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn applied(pool: &PgPool, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(max(events_applied), 0) FROM consumer_checkpoints WHERE name = $1",
    )
    .bind(format!("projection:{name}"))
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_applies_every_event_exactly_once_after_restart() {
    let db = TestDb::new().await;
    let total = backlog(&db.pool, 240, 0).await;

    let mut first = projector(&db, 7);
    // Kill it with SIGKILL once it is part-way through.
    wait_until(Duration::from_secs(60), || async {
        applied(&db.pool, "bookings").await > total / 4
    })
    .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let at_kill = applied(&db.pool, "bookings").await;
    assert!(
        at_kill < total,
        "killed before the end ({at_kill} of {total})"
    );

    let mut second = projector(&db, 7);
    wait_until(Duration::from_secs(60), || async {
        let mut done = true;
        for p in ["bookings", "clients", "fleet", "sales", "kpis"] {
            done &= applied(&db.pool, p).await == total;
        }
        done
    })
    .await;
    second.start_kill().unwrap();
    second.wait().await.unwrap();

    // Every event exactly once: counters that double on a replay are right.
    let timeline: i64 = sqlx::query_scalar("SELECT count(*) FROM booking_timeline_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(timeline, total);
    let created: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(bookings_created), 0) FROM kpi_daily_counts")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(created, 240);
    let cancelled: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(bookings_cancelled), 0) FROM kpi_daily_counts")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(cancelled, 80);
    crate::read_models::assert_every_read_model_equals_its_rebuild(&db.pool, false).await;
}

/// Which process (by its application name) holds each consumer's leadership lock.
async fn lock_holders(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_keep_one_active_per_projection_and_fail_over_on_kill() {
    let db = TestDb::new().await;
    let first_batch = backlog(&db.pool, 12, 0).await;
    let mut a = projector(&db, 100);
    let mut b = projector(&db, 100);
    let names = [
        format!("skyluxse-{}", a.id().unwrap()),
        format!("skyluxse-{}", b.id().unwrap()),
    ];
    // Five projections and one process manager: six leaderships, each held once.
    wait_until(Duration::from_secs(30), || async {
        lock_holders(&db.pool).await.len() == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let holders = lock_holders(&db.pool).await;
    assert_eq!(holders.len(), 6, "no leadership is held twice: {holders:?}");
    assert!(holders.iter().all(|h| names.contains(h)), "{holders:?}");
    wait_until(Duration::from_secs(30), || async {
        applied(&db.pool, "bookings").await == first_batch
    })
    .await;

    // Kill whichever process leads the bookings projection; the other takes over.
    let victim = holders[0].clone();
    let (dead, survivor) = if victim == names[0] {
        (&mut a, &names[1])
    } else {
        (&mut b, &names[0])
    };
    dead.start_kill().unwrap();
    dead.wait().await.unwrap();
    wait_until(Duration::from_secs(30), || async {
        let h = lock_holders(&db.pool).await;
        h.len() == 6 && h.iter().all(|x| x == survivor)
    })
    .await;
    let total = backlog(&db.pool, 6, 365).await;
    wait_until(Duration::from_secs(30), || async {
        applied(&db.pool, "bookings").await == total
    })
    .await;
    a.start_kill().ok();
    b.start_kill().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_the_crm_call_and_its_commit_neither_loses_nor_duplicates() {
    use crm_fakes::{FakeKommo, FakeZoho, Fault, FaultRule};
    let db = TestDb::new().await;
    let kommo = FakeKommo::start().await.unwrap();
    let zoho = FakeZoho::start().await.unwrap();
    // Zoho applies the first contact upsert, then takes its time answering.
    zoho.inject(
        FaultRule::new(Fault::Delay(Duration::from_secs(60)))
            .times(1)
            .path("/crm/v6/Contacts"),
    );
    let worker = || {
        Command::new(env!("CARGO_BIN_EXE_skyluxse"))
            .arg("worker")
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .env("KOMMO_BASE_URL", kommo.base_url())
            .env("KOMMO_ACCESS_TOKEN", kommo.long_lived_token())
            .env(
                "KOMMO_EXTERNAL_ID_FIELD_ID",
                kommo.config().external_id_field_id.to_string(),
            )
            .env("ZOHO_ACCOUNTS_URL", zoho.base_url())
            .env("ZOHO_API_DOMAIN", zoho.base_url())
            .env("ZOHO_CLIENT_ID", &zoho.config().client_id)
            .env("ZOHO_CLIENT_SECRET", &zoho.config().client_secret)
            .env("ZOHO_REFRESH_TOKEN", zoho.refresh_token())
            .env("SKYLUXSE_ENCRYPTION_KEY", "cd".repeat(32))
            .env("OUTBOX_LEASE_SECONDS", "2")
            .kill_on_drop(true)
            .spawn()
            .expect("the worker starts")
    };
    let bus = CommandBus::new(db.pool.clone());
    let client = Uuid::now_v7();
    bus.clients
        .execute(
            client,
            domain::client::ClientCommand::Register {
                name: "Sara Lind".into(),
                phone: None,
                email: Some("sara@example.com".into()),
                residency_country: Some("SE".into()),
                preferred_language: None,
                preferred_channels: vec![],
                timezone: None,
                gender: None,
                date_of_birth: None,
                passport_number: None,
                emirates_id: None,
                kommo_contact_id: None,
            },
            &CommandMetadata::new(Actor::system(), "kill-test"),
            None,
        )
        .await
        .unwrap();

    let mut first = worker();
    wait_until(Duration::from_secs(30), || async {
        !zoho.contacts().is_empty()
    })
    .await;
    // The CRM did the work; the worker has not committed its result. Kill it now.
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let status: String =
        sqlx::query_scalar("SELECT status FROM integrations_outbox WHERE target_system = 'zoho'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "processing", "killed before its commit");

    let mut second = worker();
    wait_until(Duration::from_secs(30), || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM integrations_outbox WHERE status <> 'processed'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM integrations_outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        rows == 2 && open == 0
    })
    .await;
    second.start_kill().unwrap();
    second.wait().await.unwrap();

    assert_eq!(zoho.contacts().len(), 1, "no duplicate record");
    assert_eq!(zoho.creates(), 1);
    assert_eq!(kommo.contacts().len(), 1);
    let (state, _) = bus.clients.replay(client, None).await.unwrap();
    assert!(state.zoho_contact_id.is_some(), "the id was written back");
}

/// A worker (or `serve`) configured with settings that cannot work stops at once, naming the
/// setting and its range, instead of running on a default (or panicking at its first delivery,
/// or serving with its outbox stopped, or syncing to the sandbox CRMs), and never shows a
/// secret it was given.
#[tokio::test]
async fn a_worker_with_an_unusable_setting_refuses_to_start_and_names_it() {
    let db = TestDb::new().await;
    for (role, name, value, says) in [
        (
            "worker",
            "OUTBOX_LEASE_SECONDS",
            "0",
            "OUTBOX_LEASE_SECONDS must be from 1 to 86400",
        ),
        (
            "worker",
            "OUTBOX_MAX_ATTEMPTS",
            "twelve",
            "OUTBOX_MAX_ATTEMPTS is not a valid number",
        ),
        ("worker", "KOMMO_RPS", "8", "KOMMO_RPS must be from 1 to 7"),
        // One connection setting turns the sandbox off: the rest must be there, or the outbox
        // would sync to fakes (and write their ids back for good).
        (
            "serve",
            "KOMMO_ACCESS_TOKEN",
            "a-long-lived-token",
            "KOMMO_BASE_URL is not set",
        ),
        (
            "serve",
            "SKYLUXSE_ENCRYPTION_KEY",
            "not-a-key",
            "encryption key",
        ),
        (
            "worker",
            "ZOHO_CLIENT_SECRET",
            "a-zoho-secret",
            "the built-in sandbox CRMs run only when no Kommo or Zoho connection setting is set",
        ),
        (
            "serve",
            "ZOHO_MAX_CONCURRENCY",
            "0",
            "ZOHO_MAX_CONCURRENCY must be from 1 to 1000",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_skyluxse"))
            .arg(role)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .env("SKYLUXSE_ENCRYPTION_KEY", "cd".repeat(32))
            .env(name, value)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("the worker stops by itself")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role} {name}={value}: {stderr}");
        assert!(stderr.contains(says), "{role} {name}={value}: {stderr}");
        assert!(!stderr.contains("a-long-lived-token") && !stderr.contains("a-zoho-secret"));
    }
}
