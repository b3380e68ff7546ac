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
    /// Apply the database migrations and exit.
    Migrate,
    /// Manage the project-local PostgreSQL cluster (used when DATABASE_URL is unset).
    LocalDb {
        #[command(subcommand)]
        action: LocalDbAction,
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
        Command::Serve { bind_addr } => serve(bind_addr).await,
        Command::Migrate => {
            let pool = db::open(&DbConfig::from_env()).await?;
            let applied = store::MIGRATOR.iter().count();
            pool.close().await;
            println!("migrations applied ({applied} known)");
            Ok(())
        }
        Command::LocalDb { action } => local_db(action).await,
    }
}

async fn serve(bind_addr: SocketAddr) -> anyhow::Result<()> {
    let pool = db::open(&DbConfig::from_env()).await?;
    let app = api::router(api::AppState { pool: pool.clone() });
    let listener = tokio::net::TcpListener::bind(bind_addr)
        .await
        .with_context(|| format!("cannot listen on {bind_addr} (BIND_ADDR)"))?;
    tracing::info!(%bind_addr, "serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server failed")?;
    pool.close().await;
    tracing::info!("stopped");
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
