//! Connecting to PostgreSQL with errors that say what to do, and applying the migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::local_pg::{self, LocalPgConfig, LocalPgError};

/// The project's migrations (`migrations/` at the repository root), embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Why the database is not usable. Each message names the cause and the remedy; none carries a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    LocalCluster(#[from] LocalPgError),
    #[error(
        "DATABASE_URL is not a valid PostgreSQL URL ({reason}); expected \
         postgres://user[:password]@host[:port]/database"
    )]
    BadUrl { reason: String },
    #[error("cannot connect to PostgreSQL at {target}: {reason}. {hint}")]
    Connect {
        target: String,
        reason: String,
        hint: &'static str,
    },
    #[error("applying the database migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the local-cluster task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `DATABASE_URL`; `None` means: find or start a local server.
    pub url: Option<String>,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Shown in `pg_stat_activity`, so operators (and tests) see which process holds what.
    pub application_name: String,
}

impl DbConfig {
    /// `DATABASE_MAX_CONNECTIONS` (per process) overrides the pool size a role asks for.
    pub fn max_connections_override() -> Option<u32> {
        std::env::var("DATABASE_MAX_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
    }

    pub fn from_env() -> Self {
        Self {
            url: std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()),
            max_connections: Self::max_connections_override().unwrap_or(10),
            acquire_timeout: Duration::from_secs(10),
            application_name: format!("skyluxse-{}", std::process::id()),
        }
    }
}

/// The URL of the service's database: `DATABASE_URL`, or the `skyluxse` database on the
/// project-local cluster (started when needed).
pub async fn resolve_url(config: &DbConfig) -> Result<String, DbError> {
    if let Some(url) = &config.url {
        return Ok(url.clone());
    }
    let server = server_url().await?;
    Ok(format!("{server}/{}", local_pg::DEFAULT_DATABASE))
}

/// The URL (without a database) of the server used when `DATABASE_URL` is unset.
pub async fn server_url() -> Result<String, DbError> {
    let config = LocalPgConfig::from_env();
    Ok(tokio::task::spawn_blocking(move || local_pg::server_url(&config)).await??)
}

/// Opens a pool on `url`, creating the database when it does not exist yet.
pub async fn connect(url: &str, config: &DbConfig) -> Result<PgPool, DbError> {
    let options = parse_url(url)?.application_name(&config.application_name);
    let pool_options = || {
        PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            // Give connections back to the server when a burst is over.
            .idle_timeout(Duration::from_secs(60))
    };
    let mut first = pool_options().connect_with(options.clone()).await;
    // A server that is starting up (57P03) answers but refuses sessions for a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while is_starting_up(&first) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        first = pool_options().connect_with(options.clone()).await;
    }
    match first {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            create_database(&options).await?;
            pool_options()
                .connect_with(options.clone())
                .await
                .map_err(|e| connect_error(&options, e))
        }
        Err(e) => Err(connect_error(&options, e)),
    }
}

fn is_starting_up<T>(result: &Result<T, sqlx::Error>) -> bool {
    matches!(result, Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("57P03"))
}

/// One connection (not a pool), waiting while the server is still starting up.
pub async fn connect_one(options: &PgConnectOptions) -> Result<sqlx::PgConnection, sqlx::Error> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let result = options.connect().await;
        if is_starting_up(&result) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        return result;
    }
}

/// Resolves, connects and migrates: what every role does at start-up.
pub async fn open(config: &DbConfig) -> Result<PgPool, DbError> {
    let url = resolve_url(config).await?;
    let pool = connect(&url, config).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

pub fn parse_url(url: &str) -> Result<PgConnectOptions, DbError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(DbError::BadUrl {
            reason: "the scheme must be postgres:// or postgresql://".into(),
        });
    }
    PgConnectOptions::from_str(url)
        .map(|o| o.disable_statement_logging())
        .map_err(|e| DbError::BadUrl {
            reason: e.to_string(),
        })
}

async fn create_database(options: &PgConnectOptions) -> Result<(), DbError> {
    let name = options.get_database().unwrap_or("postgres").to_string();
    let admin = options.clone().database("postgres");
    let mut conn = connect_one(&admin)
        .await
        .map_err(|e| connect_error(&admin, e))?;
    let sql = format!("CREATE DATABASE {}", quote_ident(&name));
    match sqlx::query(&sql).execute(&mut conn).await {
        Ok(_) => {
            tracing::info!(database = %name, "created the database");
            Ok(())
        }
        // Another process created it first.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
        Err(e) => Err(connect_error(options, e)),
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn target(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    )
}

fn connect_error(options: &PgConnectOptions, error: sqlx::Error) -> DbError {
    let hint = match &error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => {
            "Is the server running and the host and port in DATABASE_URL right? Unset \
             DATABASE_URL to use (or start) the project-local cluster"
        }
        sqlx::Error::Database(e) if e.code().as_deref() == Some("28P01") => {
            "The password in DATABASE_URL was refused"
        }
        sqlx::Error::Database(e) if e.code().as_deref() == Some("28000") => {
            "The server refused this user or host (pg_hba.conf)"
        }
        sqlx::Error::Tls(_) => "TLS failed: check sslmode in DATABASE_URL",
        _ => "Check DATABASE_URL",
    };
    DbError::Connect {
        target: target(options),
        reason: error.to_string(),
        hint,
    }
}
