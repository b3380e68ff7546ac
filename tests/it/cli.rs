//! The binary's start-up paths: the project-local cluster, and clear failures.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

fn skyluxse() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skyluxse"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("SKYLUXSE_PG_BINDIR")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    cmd
}

async fn run(cmd: &mut Command, limit: Duration) -> Output {
    tokio::time::timeout(limit, cmd.output())
        .await
        .expect("the command finished in time (no hang)")
        .expect("the command ran")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("skx-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn without_database_url_the_local_cluster_is_initialised_started_migrated_and_stopped() {
    let dir = TempDir::new("localpg");
    let port = free_port().to_string();
    let with_env = |cmd: &mut Command| {
        cmd.env("SKYLUXSE_DATA_DIR", &dir.0)
            .env("SKYLUXSE_LOCAL_PG_PORT", &port);
    };

    let mut migrate = skyluxse();
    migrate.arg("migrate");
    with_env(&mut migrate);
    let out = run(&mut migrate, Duration::from_secs(120)).await;
    assert!(out.status.success(), "migrate failed: {}", stderr(&out));
    assert!(dir.0.join("pg/data/PG_VERSION").exists());

    // A second run finds the running cluster and the migrated database.
    let mut url = skyluxse();
    url.args(["local-db", "url"]);
    with_env(&mut url);
    let out = run(&mut url, Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("postgres://postgres@127.0.0.1:{port}/skyluxse")
    );
    let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:{port}/skyluxse"))
        .await
        .unwrap();
    let vehicles: i64 = sqlx::query_scalar("SELECT count(*) FROM vehicles")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(vehicles > 0, "the seed is there");
    pool.close().await;

    let mut stop = skyluxse();
    stop.args(["local-db", "stop"]);
    with_env(&mut stop);
    let out = run(&mut stop, Duration::from_secs(60)).await;
    assert!(out.status.success(), "stop failed: {}", stderr(&out));
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err());
}

#[tokio::test]
async fn missing_postgres_binaries_say_what_to_install() {
    let dir = TempDir::new("nobin");
    let out = run(
        skyluxse()
            .arg("migrate")
            .env("SKYLUXSE_DATA_DIR", &dir.0)
            .env("SKYLUXSE_LOCAL_PG_PORT", free_port().to_string())
            .env("SKYLUXSE_PG_BINDIR", "/nonexistent/bin"),
        Duration::from_secs(30),
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("apt-get install postgresql"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_with_a_hint() {
    let port = free_port();
    let out = run(
        skyluxse().arg("migrate").env(
            "DATABASE_URL",
            format!("postgres://app:s3cret@127.0.0.1:{port}/skyluxse"),
        ),
        Duration::from_secs(30),
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to PostgreSQL at 127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("Is the server running"), "{err}");
    assert!(
        !err.contains("s3cret"),
        "the password never reaches the output: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn a_malformed_database_url_is_named_as_such() {
    let out = run(
        skyluxse()
            .arg("migrate")
            .env("DATABASE_URL", "mysql://nope"),
        Duration::from_secs(30),
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("DATABASE_URL is not a valid PostgreSQL URL"),
        "{err}"
    );
}
