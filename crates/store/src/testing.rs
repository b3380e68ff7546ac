//! Per-test databases: each test gets a fresh, migrated database copied from a template, so tests
//! run in parallel (nextest runs each in its own process) and leave nothing behind.
//!
//! The server is found the way the service finds it (`DATABASE_URL`, the default local server,
//! or the project-local cluster). The template's name carries a digest of the migrations, so a
//! changed migration gets a new template. Databases of test processes that died without cleaning
//! up are dropped by the next test run.

use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::db::{self, MIGRATOR, quote_ident};

const PREFIX: &str = "skx_test";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh migrated database, dropped when the value is dropped.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
    server: PgConnectOptions,
}

impl TestDb {
    /// Creates a new database from the migrated template. Panics with a clear message when no
    /// server can be found (this is test support).
    pub async fn new() -> Self {
        match Self::try_new().await {
            Ok(db) => db,
            Err(e) => panic!("cannot create a test database: {e}"),
        }
    }

    pub async fn try_new() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let base = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            Some(url) => url,
            None => db::server_url().await?,
        };
        let server = db::parse_url(&base)?.database("postgres");
        let mut admin = db::connect_one(&server).await?;
        let template = ensure_template(&mut admin, &server).await?;
        sweep_dead(&mut admin).await;

        let name = format!(
            "{PREFIX}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let sql = format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote_ident(&name),
            quote_ident(&template)
        );
        // Creating from a template fails while anything else is connected to the template; the
        // template is only touched under the advisory lock, so a short retry covers the race.
        let mut attempt = 0;
        loop {
            match sqlx::query(&sql).execute(&mut admin).await {
                Ok(_) => break,
                Err(e) if attempt < 50 && is_template_busy(&e) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        admin.close().await?;

        let options = server.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(options.clone())
            .await?;
        let url = with_database(&base, &name);
        Ok(Self {
            pool,
            url,
            name,
            server,
        })
    }

    /// Options for more connections to this database (e.g. a second pool).
    pub fn connect_options(&self) -> PgConnectOptions {
        self.server.clone().database(&self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; do the async clean-up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            // The pool's connections belong to the test's runtime, which is blocked here:
            // do not wait for them; FORCE ends them.
            rt.block_on(async move {
                if let Ok(mut admin) = server.connect().await {
                    let _ = sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        quote_ident(&name)
                    ))
                    .execute(&mut admin)
                    .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Creates the migrated template once per migration set, under an advisory lock so concurrent
/// test processes wait for the first one instead of racing.
async fn ensure_template(
    admin: &mut PgConnection,
    server: &PgConnectOptions,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let mut digest = Sha256::new();
    for m in MIGRATOR.iter() {
        digest.update(m.version.to_le_bytes());
        digest.update(&*m.checksum);
    }
    let hash: String = digest
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let template = format!("skx_template_{hash}");

    if template_exists(admin, &template).await? {
        return Ok(template);
    }
    sqlx::query("SELECT pg_advisory_lock(7263001)")
        .execute(&mut *admin)
        .await?;
    let result = async {
        if template_exists(admin, &template).await? {
            return Ok(());
        }
        let q = quote_ident(&template);
        sqlx::query(&format!("DROP DATABASE IF EXISTS {q}"))
            .execute(&mut *admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {q}"))
            .execute(&mut *admin)
            .await?;
        {
            let mut conn = db::connect_one(&server.clone().database(&template)).await?;
            MIGRATOR.run(&mut conn).await?;
            conn.close().await?;
        }
        sqlx::query(&format!("ALTER DATABASE {q} WITH IS_TEMPLATE true"))
            .execute(&mut *admin)
            .await?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(7263001)")
        .execute(&mut *admin)
        .await?;
    result.map(|()| template)
}

async fn template_exists(admin: &mut PgConnection, template: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1 AND datistemplate)",
    )
    .bind(template)
    .fetch_one(admin)
    .await
}

/// Drops test databases whose creating process no longer exists.
async fn sweep_dead(admin: &mut PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT datname FROM pg_database WHERE datname LIKE 'skx\\_test\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    else {
        return;
    };
    for name in names {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&name)
            ))
            .execute(&mut *admin)
            .await;
        }
    }
}

fn is_template_busy(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("55006"))
}

fn with_database(base: &str, name: &str) -> String {
    // base is `postgres://user@host:port[/db][?params]`; replace or add the database.
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (base, None),
    };
    let authority_end = head
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| head[start..].find('/').map(|j| start + j))
        .unwrap_or(head.len());
    let mut url = format!("{}/{}", &head[..authority_end], name);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_or_adds_the_database_name() {
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
    }
}
