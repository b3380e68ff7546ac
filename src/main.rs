//! `skyluxse`: one binary, one subcommand per role (`serve` runs them all in one process).
//!
//! Error policy: typed errors inside the crates; here, at the edge, `anyhow` with context, and a
//! failure prints one clear line and exits non-zero (never a panic or a hang).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use store::local_pg::{self, LocalPgConfig};
use store::{DbConfig, db};

/// mimalloc instead of the system allocator: the service allocates many small short-lived
/// buffers per request and per event, and glibc's malloc took about a tenth of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "skyluxse", version, about = "SkyLuxse operations backend")]
struct Cli {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process: migrations, then the API.
    Serve {
        /// Address the API listens on.
        #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
        bind_addr: SocketAddr,
    },
    /// Run the API alone (no projections, process managers or outbox): the stateless role that
    /// is replicated behind a load balancer, with `project` and `worker` running elsewhere.
    Api {
        /// Address the API listens on.
        #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
        bind_addr: SocketAddr,
    },
    /// Run the projections and the process managers (one active instance per projection;
    /// more processes stand by).
    Project,
    /// Run the outbox: derive rows from events (one active instance) and deliver them to Kommo
    /// and Zoho (as many workers as processes). With no CRM settings: the built-in sandbox.
    Worker,
    /// Rebuild read models from the whole log, compare them with the live ones, swap them in.
    Rebuild {
        /// A projection name (`bookings`, `clients`, `fleet`, `sales`, `kpis`) or `all`.
        projection: String,
        /// Only compare; keep the live tables.
        #[arg(long)]
        dry_run: bool,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Issue API keys for staff accounts.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Print a booking's audit trail from the event store (events with actors) and its state,
    /// now or as of a time or version, as JSON.
    Audit {
        /// The booking's id or code (`BK-1052`).
        booking: String,
        /// The state as of this time (RFC 3339).
        #[arg(long)]
        as_of: Option<String>,
        /// The state after this version.
        #[arg(long)]
        version: Option<i64>,
    },
    /// Manage the project-local PostgreSQL cluster (used when DATABASE_URL is unset).
    LocalDb {
        #[command(subcommand)]
        action: LocalDbAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a key for an existing staff account and print it once (only its digest is kept).
    Create {
        /// The account's role: operations, sales, ceo, driver or integration.
        #[arg(long)]
        role: String,
        /// The staff account's e-mail.
        #[arg(long)]
        staff: String,
    },
}

#[derive(Subcommand)]
enum LocalDbAction {
    /// Start the cluster (if needed) and print the database URL the service would use.
    Start,
    /// Stop the project-local cluster.
    Stop,
    /// Print the database URL the service would use.
    Url,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { bind_addr } => serve(bind_addr, true).await,
        Command::Api { bind_addr } => serve(bind_addr, false).await,
        Command::Project => project().await,
        Command::Worker => worker().await,
        Command::Rebuild {
            projection,
            dry_run,
        } => rebuild(&projection, dry_run).await,
        Command::Migrate => {
            let pool = db::open(&DbConfig::from_env()).await?;
            let applied = store::MIGRATOR.iter().count();
            pool.close().await;
            println!("migrations applied ({applied} known)");
            Ok(())
        }
        Command::LocalDb { action } => local_db(action).await,
        Command::Keys {
            action: KeysAction::Create { role, staff },
        } => {
            let role = api::auth::parse_role(&role)?;
            let pool = open_pool(2).await?;
            let key = api::auth::create_key(&pool, &staff, role).await?;
            pool.close().await;
            println!("{key}");
            eprintln!("the key is shown once: store it now (only its digest is kept)");
            Ok(())
        }
        Command::Audit {
            booking,
            as_of,
            version,
        } => {
            let pool = open_pool(2).await?;
            let state = api::AppState::new(pool.clone(), api::ApiConfig::default());
            let report = api::audit::report(&state, &booking, as_of.as_deref(), version).await?;
            pool.close().await;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// The API, with every other role in the same process when `all_roles`.
async fn serve(bind_addr: SocketAddr, all_roles: bool) -> anyhow::Result<()> {
    // A setting that cannot work stops the process before it serves.
    let outbox = all_roles.then(outbox_settings).transpose()?;
    let pool = open_pool(16).await?;
    // The CRM clients (or the sandbox) are ready before the API takes its first command.
    let outbox = match outbox {
        Some(settings) => Some(build_outbox(&pool, settings).await?),
        None => None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut background =
        all_roles.then(|| spawn_background_roles(pool.clone(), stopped.clone(), outbox));
    let state = api::AppState::new(pool.clone(), api::ApiConfig::from_env());
    let api_background = tokio::spawn(api::run_background(state.clone(), stopped));
    let app = api::router(state);
    let listener = tokio::net::TcpListener::bind(bind_addr)
        .await
        .with_context(|| format!("cannot listen on {bind_addr} (BIND_ADDR)"))?;
    tracing::info!(%bind_addr, "serving");
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
    // The other roles run until told to stop: one that ends first has failed, and a `serve`
    // without it would take commands that, say, never reach a CRM.
    let roles_ended = async {
        match background.as_mut() {
            Some(roles) => roles.await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        served = server => served.context("the HTTP server failed"),
        ended = roles_ended => {
            background = None;
            let why = match ended {
                Ok(Err(e)) => e,
                Ok(Ok(())) => anyhow::anyhow!("the background roles ended by themselves"),
                Err(e) => anyhow::anyhow!("the background roles failed: {e}"),
            };
            Err(why.context("a role of `serve` stopped; stopping the API with it"))
        }
    };
    let _ = stop.send(true);
    if let Some(roles) = background {
        let _ = roles.await;
    }
    let _ = api_background.await;
    pool.close().await;
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Opens the pool of a role: `max_connections` unless `DATABASE_MAX_CONNECTIONS` says otherwise.
/// Budget per process: this pool, plus while leading one connection per projection for its
/// leadership and one for its LISTEN.
async fn open_pool(max_connections: u32) -> anyhow::Result<sqlx::PgPool> {
    let mut config = DbConfig::from_env();
    config.max_connections = DbConfig::max_connections_override().unwrap_or(max_connections);
    Ok(db::open(&config).await?)
}

/// The projections and the process managers (and the outbox with its settings, when given),
/// until `stopped` turns true; an error only when a role failed.
fn spawn_background_roles(
    pool: sqlx::PgPool,
    stopped: tokio::sync::watch::Receiver<bool>,
    outbox: Option<Outbox>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let pool_for_outbox = pool.clone();
        let bus = commands::CommandBus::new(pool.clone());
        let mut config = projections::runner::RunnerConfig::default();
        // Tuning knob for operators and the crash tests (not part of the public settings).
        if let Some(n) = std::env::var("SKYLUXSE_PROJECTION_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.batch_size = n;
        }
        let runner = projections::runner::run(pool, projections::all(), config, stopped.clone());
        let process = commands::process::run(&bus, stopped.clone());
        let roles = async {
            tokio::join!(runner, process);
            Ok(())
        };
        let outbox = async move {
            match outbox {
                Some(outbox) => run_outbox(pool_for_outbox, stopped, outbox).await,
                None => Ok(()),
            }
        };
        tokio::try_join!(roles, outbox).map(|((), ())| ())
    })
}

/// The outbox projector (one active instance per database) and a delivery worker, until
/// `stopped` turns true.
async fn run_outbox(
    pool: sqlx::PgPool,
    stopped: tokio::sync::watch::Receiver<bool>,
    outbox: Outbox,
) -> anyhow::Result<()> {
    let Outbox {
        worker: config,
        crms,
    } = outbox;
    let bus = std::sync::Arc::new(commands::CommandBus::new(pool.clone()));
    let worker = outbox_worker::worker::Worker::new(pool.clone(), bus, crms.targets, config);
    let projector = projections::runner::run(
        pool,
        vec![std::sync::Arc::new(
            outbox_worker::projector::OutboxProjector,
        )],
        projections::runner::RunnerConfig::default(),
        stopped.clone(),
    );
    tokio::join!(projector, worker.run(stopped));
    // The calls the worker abandoned on its way out give their Zoho slots back now.
    crms.zoho_slots.close().await;
    // The sandbox servers, if any, live until here.
    drop(crms.sandbox);
    Ok(())
}

/// The outbox, ready to run: the worker's settings and the CRM clients it delivers to.
struct Outbox {
    worker: outbox_worker::worker::WorkerConfig,
    crms: outbox_worker::setup::Crms,
}

/// Builds the CRM clients (or starts the sandbox) of `settings`.
async fn build_outbox(pool: &sqlx::PgPool, settings: OutboxSettings) -> anyhow::Result<Outbox> {
    Ok(Outbox {
        worker: settings.worker,
        crms: outbox_worker::setup::build(pool, settings.crms)
            .await
            .context("configuring the CRM clients")?,
    })
}

/// What the outbox needs to start: the worker's settings and where it delivers.
struct OutboxSettings {
    worker: outbox_worker::worker::WorkerConfig,
    crms: outbox_worker::setup::CrmSettings,
}

/// The outbox's settings and the CRMs' (limits, connection, encryption key), checked before
/// anything starts.
fn outbox_settings() -> anyhow::Result<OutboxSettings> {
    Ok(OutboxSettings {
        worker: outbox_worker::worker::WorkerConfig::from_env()
            .context("configuring the outbox worker")?,
        crms: outbox_worker::setup::CrmSettings::from_env()
            .context("configuring the CRM clients")?,
    })
}

async fn worker() -> anyhow::Result<()> {
    let settings = outbox_settings()?;
    let pool = open_pool(8).await?;
    let built = build_outbox(&pool, settings).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut outbox = tokio::spawn(run_outbox(pool.clone(), stopped, built));
    tokio::select! {
        () = shutdown_signal() => {
            let _ = stop.send(true);
            outbox.await??;
        }
        // Before any signal only when it failed: said at once.
        ended = &mut outbox => ended??,
    }
    pool.close().await;
    Ok(())
}

async fn project() -> anyhow::Result<()> {
    let pool = open_pool(8).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let background = spawn_background_roles(pool.clone(), stopped, None);
    shutdown_signal().await;
    let _ = stop.send(true);
    let _ = background.await;
    pool.close().await;
    Ok(())
}

async fn rebuild(name: &str, dry_run: bool) -> anyhow::Result<()> {
    let selected = if name == "all" {
        projections::all()
    } else {
        vec![projections::by_name(name).with_context(|| {
            let names: Vec<_> = projections::all().iter().map(|p| p.name()).collect();
            format!("no projection called {name:?}; choose one of {names:?} or all")
        })?]
    };
    let pool = open_pool(selected.len() as u32 + 3).await?;
    let mut failed = false;
    let refs: Vec<&dyn projections::Projection> = selected.iter().map(|p| p.as_ref()).collect();
    let mut last_report = std::time::Instant::now();
    let reports = projections::rebuild::rebuild_many(&pool, &refs, !dry_run, |progress| {
        if last_report.elapsed().as_millis() >= 1000 {
            last_report = std::time::Instant::now();
            eprintln!(
                "{} events replayed (position {} of {})",
                progress.events, progress.position, progress.head
            );
        }
    })
    .await
    .with_context(|| format!("rebuilding {name}"))?;
    for report in reports {
        println!(
            "{}: {} events in {:.1}s ({:.0} events/s), position {}, {}",
            report.projection,
            report.events,
            report.seconds,
            report.events_per_second,
            report.position,
            if report.swapped {
                "swapped in"
            } else {
                "compared only"
            }
        );
        if report.differences.is_empty() {
            println!("  the rebuilt tables equal the live ones");
        } else {
            failed = true;
            for d in &report.differences {
                println!(
                    "  {}: {} rows only in the live table, {} only in the rebuilt one",
                    d.table, d.only_live, d.only_rebuilt
                );
                for s in &d.samples {
                    println!("    {s}");
                }
            }
        }
    }
    pool.close().await;
    if failed {
        anyhow::bail!("the live read models differed from the rebuild (see above)");
    }
    Ok(())
}

async fn local_db(action: LocalDbAction) -> anyhow::Result<()> {
    let config = LocalPgConfig::from_env();
    match action {
        LocalDbAction::Start => {
            tokio::task::spawn_blocking(move || local_pg::ensure_cluster(&config)).await??;
            let config = LocalPgConfig::from_env();
            println!(
                "postgres://postgres@127.0.0.1:{}/{}",
                config.port,
                local_pg::DEFAULT_DATABASE
            );
        }
        LocalDbAction::Stop => {
            tokio::task::spawn_blocking(move || local_pg::stop_cluster(&config)).await??;
            println!("stopped");
        }
        LocalDbAction::Url => {
            println!("{}", redact(&db::resolve_url(&DbConfig::from_env()).await?));
        }
    }
    Ok(())
}

/// Hides the password of a URL before printing it.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
