//! `bench`: measures and prints figures (a table on stdout, JSON in `target/bench/`); it asserts
//! nothing. Each run uses a database of its own on the server the service would use, dropped at
//! the end (kept, and named on stderr, when `BENCH_KEEP_DB` is set). Run it in release mode:
//! `cargo run --release -p bench -- all`.
//!
//! Sections: `rebuild` (all read models from N events generated through the domain), `outbox`
//! (draining a backlog against fake CRMs with latency, 1 and 3 workers, and Kommo's 7 rps limit),
//! `streams` (command latency on a long stream with and without snapshots).

/// The service's allocator (see `src/main.rs`): the rebuild, outbox and stream sections run the
/// service's code in this process and are measured as they run in production. (The SQL baseline's
/// client runs on it too, which makes that yardstick faster than with glibc's malloc.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use commands::CommandBus;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use domain::booking::{
    Booking, BookingCommand, BookingType, CreateBooking, Priority, ServiceInput,
};
use domain::client::{Client, ClientCommand};
use domain::{Actor, CommandMetadata};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::{ConnectOptions, Connection, PgPool};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "bench", about = "SkyLuxse benchmarks (figures only)")]
struct Cli {
    #[command(subcommand)]
    section: Section,
}

#[derive(Subcommand, Clone)]
enum Section {
    /// Rebuild every read model from `events` generated through the domain.
    Rebuild {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// Drain `rows` outbox rows against fake CRMs answering after `latency_ms`.
    Outbox {
        #[arg(long, default_value_t = 10_000)]
        rows: usize,
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
    },
    /// Command latency on a stream of `events` events, with and without snapshots.
    Streams {
        #[arg(long, default_value_t = 5_000)]
        events: usize,
    },
    /// The HTTP command workload against `skyluxse serve` or `skyluxse api` (release binary,
    /// built first), with a minimal-SQL baseline of the same size and concurrency in the same run.
    Commands {
        #[arg(long, default_value_t = 2_000)]
        bookings: usize,
        /// Concurrent clients; one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        clients: Vec<usize>,
        /// Where the consumers run: `all-in-one` (`skyluxse serve`: API, projections, process
        /// managers and outbox in one process, measured together), `api-alone` (`skyluxse api`
        /// during the run, as with the consumers on other machines; `skyluxse project` is
        /// started after it and its catch-up of the run's events timed).
        #[arg(long, value_delimiter = ',', default_value = "all-in-one")]
        topology: Vec<Topology>,
    },
    /// Every section with its defaults.
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Topology {
    AllInOne,
    ApiAlone,
}

/// A database of the bench's own, dropped when done.
struct BenchDb {
    pool: PgPool,
    name: String,
    server: sqlx::postgres::PgConnectOptions,
}

impl BenchDb {
    async fn create() -> anyhow::Result<Self> {
        let base = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            Some(u) => u,
            None => store::db::server_url().await?,
        };
        let server = store::db::parse_url(&base)?.database("postgres");
        let name = format!("skx_bench_{}", std::process::id());
        let mut admin = store::db::connect_one(&server).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(40)
            .connect_with(server.clone().database(&name))
            .await?;
        store::MIGRATOR.run(&pool).await?;
        Ok(Self { pool, name, server })
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.close().await;
        if std::env::var_os("BENCH_KEEP_DB").is_some() {
            // For looking into a result (or iterating on the rebuild with `skyluxse rebuild`).
            eprintln!("BENCH_KEEP_DB: kept database {}", self.name);
            return Ok(());
        }
        let mut admin = self.server.connect().await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// One figure of the report.
#[derive(serde::Serialize)]
struct Figure {
    section: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
}

struct Report(Vec<Figure>);

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) {
        let name = name.into();
        println!("{section:<8} {name:<58} {value:>14.2} {unit}");
        self.0.push(Figure {
            section,
            name,
            value,
            unit,
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let cli = Cli::parse();
    let sections = match cli.section {
        Section::All => vec![
            Section::Commands {
                bookings: 2_000,
                clients: vec![1, 16],
                topology: vec![Topology::AllInOne, Topology::ApiAlone],
            },
            Section::Streams { events: 5_000 },
            Section::Outbox {
                rows: 10_000,
                latency_ms: 20,
            },
            Section::Rebuild { events: 1_000_000 },
        ],
        s => vec![s],
    };
    let mut report = Report(Vec::new());
    println!("{:<8} {:<58} {:>14} unit", "section", "figure", "value");
    for s in sections {
        if let Section::Commands {
            bookings,
            clients,
            topology,
        } = &s
        {
            for t in topology {
                for c in clients {
                    let db = BenchDb::create().await?;
                    let result = http_commands(&db, *bookings, *c, *t, &mut report).await;
                    db.drop_db().await?;
                    result?;
                }
            }
            continue;
        }
        let db = BenchDb::create().await?;
        let result = match s {
            Section::Rebuild { events } => rebuild(&db.pool, events, &mut report).await,
            Section::Outbox { rows, latency_ms } => {
                outbox(&db.pool, rows, latency_ms, &mut report).await
            }
            Section::Streams { events } => streams(&db.pool, events, &mut report).await,
            Section::All | Section::Commands { .. } => Ok(()),
        };
        db.drop_db().await?;
        result?;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!(
        "results-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    ));
    std::fs::write(&path, serde_json::to_vec_pretty(&report.0)?)?;
    println!("figures written to {}", path.display());
    Ok(())
}

fn meta_json(request: &str) -> Value {
    json!({"actor_type": "system", "correlation_id": request, "causation_id": request, "request_id": request})
}

/// Decides `commands` on a fresh aggregate in memory and returns its events (the domain's rules
/// apply; nothing is stored).
async fn decide<A: Aggregate<Services = ()>>(
    commands: Vec<A::Command>,
) -> anyhow::Result<Vec<A::Event>>
where
    A::Error: std::fmt::Debug,
{
    let mut aggregate = A::default();
    let mut events = Vec::new();
    for c in commands {
        let sink = EventSink::default();
        aggregate
            .handle(c, &(), &sink)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        events.extend(sink.collect().await);
    }
    Ok(events)
}

/// Generates bookings (and their clients) through the domain and stores their events in bulk.
async fn generate(pool: &PgPool, target_events: usize) -> anyhow::Result<usize> {
    let mut rows: Vec<(String, String, i64, String, String, Value)> = Vec::new();
    let mut total = 0;
    let start = chrono::Utc::now() - chrono::Duration::days(400);
    let mut i = 0u64;
    while total < target_events {
        let client = Uuid::now_v7();
        let client_events = decide::<Client>(vec![ClientCommand::Register {
            name: format!("Bench Client {i}"),
            phone: Some("+971501234567".into()),
            email: Some(format!("c{i}@example.com")),
            residency_country: Some("AE".into()),
            preferred_language: None,
            preferred_channels: vec![],
            timezone: None,
            gender: None,
            date_of_birth: None,
            passport_number: None,
            emirates_id: None,
            kommo_contact_id: None,
        }])
        .await?;
        for (n, e) in client_events.iter().enumerate() {
            rows.push((
                "Client".into(),
                client.to_string(),
                n as i64 + 1,
                e.event_type(),
                e.event_version(),
                serde_json::to_value(e)?,
            ));
        }
        for b in 0..4 {
            let id = Uuid::now_v7();
            let from = start + chrono::Duration::hours(((i * 4 + b) % 9000) as i64);
            let events = decide::<Booking>(vec![
                BookingCommand::Create(Box::new(CreateBooking {
                    external_code: format!("BK-B{i}-{b}"),
                    client_id: client,
                    owner_id: Uuid::from_u128(2),
                    booking_type: BookingType::Rental,
                    priority: Priority::Medium,
                    channel: "Website".into(),
                    start_at: from,
                    end_at: from + chrono::Duration::days(2),
                    vehicle_id: None,
                    driver_id: None,
                    price_daily: Decimal::from(2500),
                    deposit_amount: Decimal::from(1000),
                    advance_payment: Decimal::ZERO,
                    full_insurance_fee: Decimal::from(300),
                    currency: None,
                    pickup_location: None,
                    dropoff_location: None,
                    services: vec![],
                    lead_id: None,
                })),
                BookingCommand::AssignDriver {
                    driver_id: Uuid::from_u128(4),
                },
                BookingCommand::AddService(ServiceInput {
                    line_id: Uuid::now_v7(),
                    service_id: Uuid::from_u128(5),
                    price: Decimal::from(150),
                    quantity: 1,
                    description: None,
                }),
                BookingCommand::RecordPayment {
                    payment_id: Uuid::now_v7(),
                    amount: Decimal::from(1000),
                    method: "card".into(),
                    paid_at: from,
                },
                if b == 3 {
                    BookingCommand::Cancel {
                        reason: "bench".into(),
                    }
                } else {
                    BookingCommand::ChangeOwner {
                        owner_id: Uuid::from_u128(3),
                    }
                },
            ])
            .await?;
            for (n, e) in events.iter().enumerate() {
                rows.push((
                    "Booking".into(),
                    id.to_string(),
                    n as i64 + 1,
                    e.event_type(),
                    e.event_version(),
                    serde_json::to_value(e)?,
                ));
            }
        }
        total = rows.len();
        i += 1;
    }
    for chunk in rows.chunks(5_000) {
        let (types, ids, seqs, names, versions, payloads): (
            Vec<_>,
            Vec<_>,
            Vec<_>,
            Vec<_>,
            Vec<_>,
            Vec<_>,
        ) = chunk
            .iter()
            .cloned()
            .fold(Default::default(), |mut acc, r| {
                acc.0.push(r.0);
                acc.1.push(r.1);
                acc.2.push(r.2);
                acc.3.push(r.3);
                acc.4.push(r.4);
                acc.5.push(r.5);
                acc
            });
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT t, i, s, n, v, p::json, $7::json FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[]) AS u(t, i, s, n, v, p)",
        )
        .bind(types)
        .bind(ids)
        .bind(seqs)
        .bind(names)
        .bind(versions)
        .bind(payloads)
        .bind(meta_json("bench"))
        .execute(pool)
        .await?;
    }
    Ok(total)
}

async fn rebuild(pool: &PgPool, events: usize, report: &mut Report) -> anyhow::Result<()> {
    let started = Instant::now();
    let n = generate(pool, events).await.context("generating events")?;
    report.add(
        "rebuild",
        format!("events generated through the domain and stored ({n})"),
        started.elapsed().as_secs_f64(),
        "s",
    );
    // The live read models are current when an operator rebuilds: catch them up first (timed
    // on its own: the incremental path, batch by batch, as the runner applies them).
    let every = projections::all();
    let live = Instant::now();
    for p in &every {
        projections::runner::catch_up(pool, p.as_ref(), 500).await?;
    }
    report.add(
        "rebuild",
        "incremental catch-up of every read model from zero (runner batches of 500)",
        n as f64 / live.elapsed().as_secs_f64(),
        "events/s",
    );
    let all = Instant::now();
    let refs: Vec<&dyn projections::Projection> = every.iter().map(|p| p.as_ref()).collect();
    for r in projections::rebuild::rebuild_many(pool, &refs, true, |_| {}).await? {
        anyhow::ensure!(
            r.differences.is_empty(),
            "the rebuild of {} differed from the live tables",
            r.projection
        );
        report.add(
            "rebuild",
            format!("{} done after (s)", r.projection),
            r.seconds,
            "s",
        );
    }
    let secs = all.elapsed().as_secs_f64();
    report.add(
        "rebuild",
        "all read models: log events per second of total rebuild time",
        n as f64 / secs,
        "events/s",
    );
    Ok(())
}

async fn register_clients(pool: &PgPool, bus: &CommandBus, n: usize) -> anyhow::Result<()> {
    let meta = CommandMetadata::new(Actor::system(), "bench");
    for i in 0..n {
        bus.clients
            .execute(
                Uuid::now_v7(),
                ClientCommand::Register {
                    name: format!("Outbox Client{i}"),
                    phone: None,
                    email: Some(format!("o{i}@example.com")),
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
                &meta,
                None,
            )
            .await?;
    }
    let projector = outbox_worker::projector::OutboxProjector;
    loop {
        projections::runner::catch_up(pool, &projector, 1000).await?;
        let at = store::checkpoints::load(pool, "projection:outbox").await?;
        if !store::global_log::has_pending_after(pool, at).await? {
            return Ok(());
        }
    }
}

async fn drain(
    pool: &PgPool,
    bus: &Arc<CommandBus>,
    kommo: &crm_fakes::FakeKommo,
    zoho: &crm_fakes::FakeZoho,
    workers: usize,
    pacer: impl Fn() -> Arc<dyn crm::Pacer>,
) -> anyhow::Result<(usize, f64)> {
    let key = outbox_worker::pg::EncryptionKey::from_hex(&"ef".repeat(32))?;
    let store: Arc<dyn crm::TokenStore> =
        Arc::new(outbox_worker::pg::PgTokenStore::new(pool.clone(), key));
    let open = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM integrations_outbox WHERE status IN ('pending', 'processing')",
        )
        .fetch_one(pool)
        .await
    };
    let todo = open().await? as usize;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..workers {
        // As in production: the workers share Zoho's 10 calls at once through the database.
        let targets = outbox_worker::setup::for_fakes(
            kommo,
            zoho,
            store.clone(),
            pacer(),
            Duration::from_secs(10),
            10,
            Arc::new(outbox_worker::pg::PgCallSlots::new(
                pool.clone(),
                "zoho",
                10,
                Duration::from_secs(30),
            )),
        )?;
        let mut config = outbox_worker::worker::WorkerConfig::from_env()?;
        config.batch = 32;
        let w = outbox_worker::worker::Worker::new(pool.clone(), bus.clone(), targets, config);
        let s = stopped.clone();
        tasks.push(tokio::spawn(async move { w.run(s).await }));
    }
    // Polled cheaply (an index probe, not a count of the open rows), so that watching does
    // not weigh on what is measured.
    while sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM integrations_outbox WHERE status IN ('pending', 'processing'))",
    )
    .fetch_one(pool)
    .await?
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.send(true)?;
    for t in tasks {
        t.await?;
    }
    Ok((todo, secs))
}

async fn outbox(
    pool: &PgPool,
    rows: usize,
    latency_ms: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let bus = Arc::new(CommandBus::new(pool.clone()));
    let latency = Some(Duration::from_millis(latency_ms));
    let kommo = crm_fakes::FakeKommo::start_with(crm_fakes::FakeKommoConfig {
        latency,
        rate_limit: None,
        ..Default::default()
    })
    .await?;
    let zoho = crm_fakes::FakeZoho::start_with(crm_fakes::FakeZohoConfig {
        latency,
        max_concurrency: None,
        ..Default::default()
    })
    .await?;
    // Each client derives a Kommo and a Zoho row.
    register_clients(pool, &bus, rows / 2).await?;
    for workers in [1, 3] {
        sqlx::query("UPDATE integrations_outbox SET status = 'pending', attempts = 0, next_run_at = now(), lease_owner = NULL")
            .execute(pool)
            .await?;
        // Each run starts from a table as autovacuum keeps it, not from the dead versions the
        // reset above just left (they would make every claim walk them).
        sqlx::query("VACUUM ANALYZE integrations_outbox")
            .execute(pool)
            .await?;
        let (n, secs) = drain(pool, &bus, &kommo, &zoho, workers, || {
            Arc::new(crm::Unpaced)
        })
        .await?;
        report.add(
            "outbox",
            format!("{n} rows, {latency_ms} ms CRM latency, no rate limit, {workers} worker(s)"),
            n as f64 / secs,
            "deliveries/s",
        );
    }

    // Against Kommo's limit of 7 requests in any second, paced through the database at 7/s.
    let limited = crm_fakes::FakeKommo::start_with(crm_fakes::FakeKommoConfig {
        latency,
        rate_limit: Some(7),
        ..Default::default()
    })
    .await?;
    sqlx::query("DELETE FROM integrations_outbox")
        .execute(pool)
        .await?;
    register_clients(pool, &bus, 60).await?;
    sqlx::query("UPDATE integrations_outbox SET status = 'processed' WHERE target_system = 'zoho'")
        .execute(pool)
        .await?;
    let started = Instant::now();
    let (_, _) = drain(pool, &bus, &limited, &zoho, 3, || {
        Arc::new(outbox_worker::pg::PgPacer::new(
            pool.clone(),
            "kommo-bench",
            7,
        ))
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let requests = limited.requests().len();
    report.add(
        "outbox",
        "Kommo at its 7 rps limit: achieved request rate",
        requests as f64 / secs,
        "requests/s",
    );
    report.add(
        "outbox",
        "Kommo at its 7 rps limit: most requests seen in any 1 s window",
        limited.max_rps_observed() as f64,
        "requests",
    );
    report.add(
        "outbox",
        "Kommo at its 7 rps limit: 429 answers",
        limited.rate_limited() as f64,
        "answers",
    );
    Ok(())
}

async fn streams(pool: &PgPool, events: usize, report: &mut Report) -> anyhow::Result<()> {
    let meta = CommandMetadata::new(Actor::system(), "bench");
    let with = CommandBus::new(pool.clone());
    let without = CommandBus::with_snapshots(pool.clone(), None);
    let create = |code: String| {
        BookingCommand::Create(Box::new(CreateBooking {
            external_code: code,
            client_id: Uuid::now_v7(),
            owner_id: Uuid::from_u128(2),
            booking_type: BookingType::Rental,
            priority: Priority::Medium,
            channel: "Website".into(),
            start_at: chrono::Utc::now(),
            end_at: chrono::Utc::now() + chrono::Duration::days(3),
            vehicle_id: None,
            driver_id: None,
            price_daily: Decimal::from(2500),
            deposit_amount: Decimal::ZERO,
            advance_payment: Decimal::ZERO,
            full_insurance_fee: Decimal::ZERO,
            currency: None,
            pickup_location: None,
            dropoff_location: None,
            services: vec![],
            lead_id: None,
        }))
    };
    let long = Uuid::now_v7();
    with.bookings
        .execute(long, create("BK-LONG".into()), &meta, None)
        .await?;
    for i in 0..events {
        let owner = Uuid::from_u128(10 + (i % 2) as u128);
        with.bookings
            .execute(
                long,
                BookingCommand::ChangeOwner { owner_id: owner },
                &meta,
                None,
            )
            .await?;
    }
    let fresh = Uuid::now_v7();
    with.bookings
        .execute(fresh, create("BK-FRESH".into()), &meta, None)
        .await?;
    for (label, bus, id) in [
        ("fresh stream", &with, fresh),
        ("long stream with snapshots", &with, long),
        ("long stream without snapshots", &without, long),
    ] {
        let mut times = Vec::new();
        for i in 0..50 {
            let owner = Uuid::from_u128(100 + (i % 2) as u128);
            let t = Instant::now();
            bus.bookings
                .execute(
                    id,
                    BookingCommand::ChangeOwner { owner_id: owner },
                    &meta,
                    None,
                )
                .await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        report.add(
            "streams",
            format!("{label}: p50 command latency ({events} events)"),
            times[times.len() / 2],
            "ms",
        );
        report.add(
            "streams",
            format!("{label}: p99 command latency"),
            times[times.len() * 99 / 100],
            "ms",
        );
    }
    Ok(())
}

/// A running `skyluxse` role, killed on drop.
struct Served {
    child: tokio::process::Child,
    base: String,
}

fn skyluxse_binary() -> anyhow::Result<std::path::PathBuf> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/skyluxse");
    anyhow::ensure!(
        path.exists(),
        "build the service first: cargo build --release (looked for {})",
        path.display()
    );
    Ok(path)
}

/// Starts `skyluxse <role>` on the bench database (sandbox CRMs, a fixed encryption key).
fn start_role(role: &str, db_url: &str, port: u16) -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(skyluxse_binary()?)
        .arg(role)
        .env("DATABASE_URL", db_url)
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "error")
        .env("SKYLUXSE_ENCRYPTION_KEY", "ab".repeat(32))
        .kill_on_drop(true)
        .spawn()?)
}

/// Starts `skyluxse serve` or `skyluxse api` and waits until it answers.
async fn serve(role: &str, db_url: &str) -> anyhow::Result<Served> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = start_role(role, db_url, port)?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest_client();
    for _ in 0..300 {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(Served { child, base });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("skyluxse {role} did not become ready")
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap_or_default()
}

async fn api_key(db_url: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(skyluxse_binary()?)
        .args([
            "keys",
            "create",
            "--role",
            "operations",
            "--staff",
            "ops@skyluxse.ae",
        ])
        .env("DATABASE_URL", db_url)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The checkpoints of the log's consumers that run with the API's load: every projection and the
/// process manager, and the outbox projector where it runs too (not in `skyluxse project`).
fn consumers(with_outbox: bool) -> Vec<String> {
    let mut names: Vec<String> = projections::all()
        .iter()
        .map(|p| projections::runner::checkpoint_name(p.as_ref()))
        .collect();
    names.push(commands::process::NAME.to_string());
    if with_outbox {
        names.push(projections::runner::checkpoint_name(
            &outbox_worker::projector::OutboxProjector,
        ));
    }
    names
}

/// Outbox rows of events recorded since `since` not yet delivered (nor dead).
async fn open_outbox_rows(
    pool: &PgPool,
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM integrations_outbox o \
         JOIN events e ON e.global_position = o.source_position \
         WHERE o.status IN ('pending', 'processing') AND e.recorded_at >= $1",
    )
    .bind(since)
    .fetch_one(pool)
    .await?)
}

/// The worst lag over `consumers`: how old the oldest event one of them has not handled is, in
/// ms (0 = all caught up).
async fn worst_lag_ms(pool: &PgPool, consumers: &[String]) -> anyhow::Result<f64> {
    let mut worst = 0.0f64;
    for name in consumers {
        let at = store::checkpoints::load(pool, name).await?;
        let next = store::global_log::read_after(pool, at, 1).await?;
        if let Some(e) = next.first() {
            worst = worst.max(
                (chrono::Utc::now() - e.recorded_at)
                    .num_milliseconds()
                    .max(0) as f64,
            );
        } else if store::global_log::has_pending_after(pool, at).await? {
            worst = worst.max(1.0);
        }
    }
    Ok(worst)
}

async fn http_commands(
    db: &BenchDb,
    bookings: usize,
    clients: usize,
    topology: Topology,
    report: &mut Report,
) -> anyhow::Result<()> {
    let api_alone = topology == Topology::ApiAlone;
    let url = format!(
        "postgres://{}@{}:{}/{}",
        db.server.get_username(),
        db.server.get_host(),
        db.server.get_port(),
        db.name
    );
    let mut served = serve(if api_alone { "api" } else { "serve" }, &url).await?;
    let key = api_key(&url).await?;
    let http = reqwest_client();
    let auth = format!("Bearer {key}");
    // The bookings' clients.
    let mut client_ids = Vec::new();
    for i in 0..20 {
        let r: Value = http
            .post(format!("{}/v1/clients", served.base))
            .header("authorization", &auth)
            .json(
                &json!({"name": format!("Bench Guest {i}"), "email": format!("g{i}@example.com")}),
            )
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        client_ids.push(r["id"].as_str().unwrap_or_default().to_string());
    }
    let vehicles: Vec<String> = (1..=6)
        .map(|v| format!("00000000-0000-4000-c000-00000000000{v}"))
        .collect();
    let base_day = chrono::Utc::now() + chrono::Duration::days(30);

    // Lag sampler.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler_pool = db.pool.clone();
    let lagging = consumers(!api_alone);
    let sampled = lagging.clone();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while !*stopped.borrow() {
            if let Ok(l) = worst_lag_ms(&sampler_pool, &sampled).await {
                samples.push(l);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        samples
    });

    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let http = http.clone();
        let base = served.base.clone();
        let auth = auth.clone();
        let next = next.clone();
        let client_ids = client_ids.clone();
        let vehicles = vehicles.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= bookings {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let start = base_day + chrono::Duration::days(2 * (i / 6) as i64);
                let create = json!({
                    "client_id": client_ids[i % client_ids.len()],
                    "vehicle_id": vehicles[i % 6],
                    "start_at": start, "end_at": start + chrono::Duration::days(1),
                    "price_daily": "2500.00",
                });
                let t = Instant::now();
                let r: Value = http.post(format!("{base}/v1/bookings")).header("authorization", &auth).json(&create)
                    .send().await?.error_for_status()?.json().await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                let id = r["id"].as_str().unwrap_or_default().to_string();
                for (action, body) in [
                    ("confirm", json!({})),
                    ("start-delivery", json!({"promised_at": start})),
                    ("start-rental", json!({"started_at": start, "pickup_mileage_km": 100, "fuel_level_pct": 100})),
                    ("complete", json!({"returned_at": start + chrono::Duration::days(1), "return_mileage_km": 200, "fuel_level_pct": 90})),
                ] {
                    let t = Instant::now();
                    http.post(format!("{base}/v1/bookings/{id}/{action}")).header("authorization", &auth).json(&body)
                        .send().await?.error_for_status()?;
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // With the API alone, the projections start now, in a process of their own, on the backlog
    // (the outbox's drain is measured on its own in the outbox section).
    let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    let mut consumers = Vec::new();
    if api_alone {
        consumers.push(start_role("project", &url, 0)?);
    }
    let done = Instant::now();
    while worst_lag_ms(&db.pool, &lagging).await? > 0.0 {
        anyhow::ensure!(
            done.elapsed() < Duration::from_secs(300),
            "the log's consumers never caught up"
        );
        for c in &mut consumers {
            if let Some(status) = c.try_wait()? {
                anyhow::bail!("skyluxse project exited before catching up: {status}");
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let catch_up = done.elapsed().as_secs_f64();
    // All in one, the worker delivers the run's outbox rows (its bookings' Zoho sales orders) to
    // the sandbox CRMs meanwhile: how long after its event each reached its CRM, and when the
    // last did. The clients' contacts, registered before the run, are not counted: they wait
    // for Kommo's pacing (6 requests/s, two requests per new contact).
    let mut crm_sync = None;
    if !api_alone {
        while open_outbox_rows(&db.pool, started_at).await? > 0 {
            anyhow::ensure!(
                done.elapsed() < Duration::from_secs(300),
                "the outbox never drained"
            );
            if let Some(status) = served.child.try_wait()? {
                anyhow::bail!("skyluxse serve exited before the outbox drained: {status}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drained = done.elapsed().as_secs_f64();
        let (p50, p99, rows, failed): (Option<f64>, Option<f64>, i64, i64) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE delivered), \
               percentile_cont(0.99) WITHIN GROUP (ORDER BY d) FILTER (WHERE delivered), \
               count(*) FILTER (WHERE delivered), count(*) FILTER (WHERE NOT delivered) \
             FROM (SELECT extract(epoch FROM o.processed_at - e.recorded_at)::float8 * 1000 AS d, \
                     o.status = 'processed' AS delivered \
                   FROM integrations_outbox o JOIN events e ON e.global_position = o.source_position \
                   WHERE e.recorded_at >= $1) AS t",
        )
        .bind(started_at)
        .fetch_one(&db.pool)
        .await?;
        crm_sync = Some((
            p50.unwrap_or(0.0),
            p99.unwrap_or(0.0),
            rows,
            failed,
            drained,
        ));
    }
    stop.send(true)?;
    let mut lags = sampler.await?;
    lags.sort_by(f64::total_cmp);
    let rss_kb =
        std::fs::read_to_string(format!("/proc/{}/status", served.child.id().unwrap_or(0)))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
    served.child.start_kill()?;
    let _ = served.child.wait().await;
    for mut c in consumers {
        c.start_kill()?;
        let _ = c.wait().await;
    }

    latencies.sort_by(f64::total_cmp);
    let commands = latencies.len();
    let rate = commands as f64 / elapsed;
    let tag = match topology {
        Topology::AllInOne => format!("{clients} client(s), {bookings} bookings"),
        Topology::ApiAlone => format!("{clients} client(s), {bookings} bookings, API alone"),
    };
    let mut add = |name: String, value: f64, unit: &'static str| {
        report.add("commands", format!("{tag}: {name}"), value, unit);
    };
    add("commands/s over HTTP".into(), rate, "commands/s");
    add("p50 latency".into(), percentile(&latencies, 0.5), "ms");
    add("p99 latency".into(), percentile(&latencies, 0.99), "ms");
    let max = latencies.last().copied().unwrap_or(0.0);
    add("max latency".into(), max, "ms");
    if api_alone {
        add(
            format!("consumers' catch-up of the run's {backlog} events after it"),
            catch_up * 1000.0,
            "ms",
        );
        add(
            "consumers' catch-up rate (`skyluxse project` started after the run)".into(),
            backlog as f64 / catch_up.max(1e-9),
            "events/s",
        );
    } else {
        let lag = |p| percentile(&lags, p);
        add("consumer lag p50 during the run".into(), lag(0.5), "ms");
        add("consumer lag p99 during the run".into(), lag(0.99), "ms");
        add("catch-up after the run".into(), catch_up * 1000.0, "ms");
        if let Some((p50, p99, rows, failed, drained)) = crm_sync {
            add(
                format!("CRM sync of the run's {rows} outbox rows: event to delivered p50"),
                p50,
                "ms",
            );
            add("CRM sync: event to delivered p99".into(), p99, "ms");
            add(
                "outbox drained after the run".into(),
                drained * 1000.0,
                "ms",
            );
            add(
                "outbox rows of the run that failed (dead letters)".into(),
                failed as f64,
                "rows",
            );
        }
    }
    add("peak RSS of the API process".into(), rss_kb / 1024.0, "MB");

    // The ceiling: the same number of transactions at the same concurrency doing only the
    // minimal SQL of a command (read the stream, append one event, upsert one read-model row).
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_baseline (id text PRIMARY KEY, n bigint NOT NULL)",
    )
    .execute(&db.pool)
    .await?;
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let pool = db.pool.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= commands {
                    return Ok::<_, anyhow::Error>(());
                }
                let stream = format!("b{i}");
                let mut tx = pool.begin().await?;
                let seq: i64 = sqlx::query_scalar("SELECT coalesce(max(sequence), 0) FROM events WHERE aggregate_type = 'Baseline' AND aggregate_id = $1")
                    .bind(&stream).fetch_one(&mut *tx).await?;
                sqlx::query("INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) VALUES ('Baseline', $1, $2, 'Noted', '1.0', '{\"Noted\":{}}', '{}')")
                    .bind(&stream).bind(seq + 1).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO bench_baseline (id, n) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n")
                    .bind(&stream).bind(seq + 1).execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let baseline = commands as f64 / started.elapsed().as_secs_f64();
    add("SQL baseline transactions/s".into(), baseline, "tx/s");
    add(
        "commands/s as a share of the baseline".into(),
        100.0 * rate / baseline,
        "%",
    );
    Ok(())
}
