//! Finding a PostgreSQL server: `DATABASE_URL` when set, else (SPEC §6: "unset = the
//! project-local cluster") a project-local cluster started from the installed PostgreSQL
//! binaries, whatever other server the machine may run.
//!
//! The local cluster lives in the data folder (`SKYLUXSE_DATA_DIR`, default `<repo>/.local`),
//! listens on 127.0.0.1:`SKYLUXSE_LOCAL_PG_PORT` (default 55432) and keeps running after the
//! process that started it exits, like any development server (`skyluxse local-db stop` stops it).
//! PostgreSQL refuses to run as root, so when we are root the cluster belongs to the `postgres`
//! OS user and its tools run through `runuser`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The database the service uses on a server it found by itself.
pub const DEFAULT_DATABASE: &str = "skyluxse";
const DEFAULT_LOCAL_PORT: u16 = 55432;

/// Why no database could be found or started. Every variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "DATABASE_URL is unset and no PostgreSQL server binaries (initdb, pg_ctl) were found to \
         start the project-local cluster. Install them \
         (Debian/Ubuntu: `apt-get install postgresql`), or point SKYLUXSE_PG_BINDIR at their \
         folder, or set DATABASE_URL to a running server"
    )]
    BinariesMissing,
    #[error(
        "the local PostgreSQL cluster must run as the `postgres` OS user because this process \
         runs as root, but that user does not exist: install Debian's `postgresql` package \
         (it creates the user) or run as an ordinary user"
    )]
    NoPostgresUser,
    #[error("cannot prepare the local data folder {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}. The server log is {log}")]
    Command {
        command: String,
        detail: String,
        log: PathBuf,
    },
}

/// Settings of the local-cluster path, read from the environment.
#[derive(Debug, Clone)]
pub struct LocalPgConfig {
    pub data_dir: PathBuf,
    pub port: u16,
    pub bin_dir: Option<PathBuf>,
}

impl LocalPgConfig {
    pub fn from_env() -> Self {
        let data_dir = std::env::var_os("SKYLUXSE_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(default_data_dir);
        let port = std::env::var("SKYLUXSE_LOCAL_PG_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_LOCAL_PORT);
        let bin_dir = std::env::var_os("SKYLUXSE_PG_BINDIR").map(PathBuf::from);
        Self {
            data_dir,
            port,
            bin_dir,
        }
    }

    fn cluster_dir(&self) -> PathBuf {
        self.data_dir.join("pg")
    }
}

/// The repository's `.local` folder (known at build time), the default data folder.
pub fn default_data_dir() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    repo.canonicalize().unwrap_or(repo).join(".local")
}

/// The server URL (without a database name) to use when `DATABASE_URL` is unset: the
/// project-local cluster, started if needed. Blocking: call it from `spawn_blocking`.
pub fn server_url(config: &LocalPgConfig) -> Result<String, LocalPgError> {
    ensure_cluster(config)?;
    Ok(format!("postgres://postgres@127.0.0.1:{}", config.port))
}

fn answers(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok())
        .is_some()
}

/// Starts the project-local cluster unless it already runs. Safe to call from many processes at
/// once: they serialise on a lock file.
pub fn ensure_cluster(config: &LocalPgConfig) -> Result<(), LocalPgError> {
    // No shortcut on an open port: a server that is still starting accepts connections but
    // refuses sessions. The process that starts it holds the lock until `pg_ctl -w` says ready.
    let dir = config.cluster_dir();
    let dir_err = |source| LocalPgError::DataDir {
        path: dir.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(dir_err)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(config.data_dir.join("pg.lock"))
        .map_err(dir_err)?;
    lock.lock().map_err(dir_err)?;
    let result = start_locked(config, &dir);
    let _ = lock.unlock();
    result
}

fn start_locked(config: &LocalPgConfig, dir: &Path) -> Result<(), LocalPgError> {
    if answers(&format!("127.0.0.1:{}", config.port)) {
        return Ok(());
    }
    let bin = find_bin_dir(config).ok_or(LocalPgError::BinariesMissing)?;
    let runner = Runner::for_current_user()?;
    let data = dir.join("data");
    let log = dir.join("server.log");
    let dir_err = |source| LocalPgError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    runner.give_away(dir).map_err(dir_err)?;

    if !data.join("PG_VERSION").exists() {
        tracing::info!(data = %data.display(), "initialising the project-local PostgreSQL cluster");
        let out = runner.run(
            &bin.join("initdb"),
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ],
        );
        check(out, "initdb", &log)?;
        append_settings(&data.join("postgresql.conf"), config.port, dir).map_err(dir_err)?;
        runner.give_away(&data).map_err(dir_err)?;
    }

    tracing::info!(
        port = config.port,
        "starting the project-local PostgreSQL cluster"
    );
    let out = runner.run(
        &bin.join("pg_ctl"),
        &[
            "-D",
            path_str(&data),
            "-l",
            path_str(&log),
            "-w",
            "-t",
            "60",
            "start",
        ],
    );
    check(out, "pg_ctl start", &log)
}

/// Stops the project-local cluster if it runs.
pub fn stop_cluster(config: &LocalPgConfig) -> Result<(), LocalPgError> {
    let data = config.cluster_dir().join("data");
    if !data.join("postmaster.pid").exists() {
        return Ok(());
    }
    let bin = find_bin_dir(config).ok_or(LocalPgError::BinariesMissing)?;
    let runner = Runner::for_current_user()?;
    let log = config.cluster_dir().join("server.log");
    let out = runner.run(
        &bin.join("pg_ctl"),
        &["-D", path_str(&data), "-m", "fast", "-w", "stop"],
    );
    check(out, "pg_ctl stop", &log)
}

fn append_settings(conf: &Path, port: u16, socket_dir: &Path) -> std::io::Result<()> {
    let mut f = OpenOptions::new().append(true).open(conf)?;
    writeln!(f, "\n# skyluxse project-local cluster")?;
    writeln!(f, "port = {port}")?;
    writeln!(f, "listen_addresses = '127.0.0.1'")?;
    writeln!(f, "unix_socket_directories = '{}'", socket_dir.display())?;
    // Tests run in parallel, each with its own database and pool.
    writeln!(f, "max_connections = 300")?;
    writeln!(f, "shared_buffers = 128MB")?;
    Ok(())
}

/// The folder holding initdb and pg_ctl: SKYLUXSE_PG_BINDIR, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/*/bin`, or PATH.
pub fn find_bin_dir(config: &LocalPgConfig) -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = &config.bin_dir {
        return has_tools(d).then(|| d.clone());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        candidates.extend(versions.into_iter().map(|(_, p)| p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.into_iter().find(|d| has_tools(d))
}

/// Runs the PostgreSQL tools as the current user, or as `postgres` when we are root.
enum Runner {
    Current,
    AsPostgres { uid: u32, gid: u32 },
}

impl Runner {
    fn for_current_user() -> Result<Self, LocalPgError> {
        let is_root = fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        if !is_root {
            return Ok(Self::Current);
        }
        let (uid, gid) = postgres_user_ids().ok_or(LocalPgError::NoPostgresUser)?;
        Ok(Self::AsPostgres { uid, gid })
    }

    fn give_away(&self, path: &Path) -> std::io::Result<()> {
        if let Self::AsPostgres { uid, gid } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))?;
            // The postgres user must be able to reach the folder through its parents.
            let mut parent = path.parent();
            while let Some(p) = parent {
                if let Ok(meta) = fs::metadata(p) {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = meta.permissions().mode();
                    if mode & 0o001 == 0 {
                        fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o001))?;
                    }
                }
                parent = p.parent();
            }
        }
        Ok(())
    }

    fn run(&self, program: &Path, args: &[&str]) -> std::io::Result<Output> {
        match self {
            Self::Current => Command::new(program).args(args).output(),
            Self::AsPostgres { .. } => Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args)
                .current_dir("/")
                .output(),
        }
    }
}

fn postgres_user_ids() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != "postgres" {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

fn check(out: std::io::Result<Output>, command: &str, log: &Path) -> Result<(), LocalPgError> {
    let fail = |detail: String| LocalPgError::Command {
        command: command.to_string(),
        detail,
        log: log.to_path_buf(),
    };
    let out = out.map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if detail.is_empty() {
        detail = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(fail(format!("{} ({})", detail, out.status)))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}
