//! Scale-out under load (issue 8): two API processes, two projectors and three outbox workers on
//! one database take a burst of commands while one of each is killed with SIGKILL and restarted;
//! afterwards no vehicle is double-booked, no outbox row was delivered twice in effect, and every
//! read model equals a rebuild.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use crm_fakes::{FakeKommo, FakeZoho};
use serde_json::{Value, json};
use sqlx::PgPool;
use store::testing::TestDb;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use uuid::Uuid;

const CLIENTS: usize = 30;
const BOOKINGS: usize = 120;
const TASKS: usize = 8;
/// Bookings finished by the load when one `api`, one `project` and one `worker` are killed.
const KILL_AT: [usize; 3] = [20, 50, 80];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Api,
    Project,
    Worker,
}

impl Role {
    fn subcommand(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Project => "project",
            Role::Worker => "worker",
        }
    }
}

/// One spawned `skyluxse` process.
struct Proc {
    role: Role,
    child: Child,
    pid: u32,
    /// The API's base URL (`api` only).
    base: Option<String>,
}

/// Everything the processes share: the database and the fake CRMs' settings.
struct Cluster {
    env: Vec<(String, String)>,
    procs: Vec<Proc>,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Cluster {
    fn new(db: &TestDb, kommo: &FakeKommo, zoho: &FakeZoho) -> Self {
        let env = [
            ("DATABASE_URL", db.url.clone()),
            ("RUST_LOG", "warn".into()),
            ("KOMMO_BASE_URL", kommo.base_url()),
            ("KOMMO_ACCESS_TOKEN", kommo.long_lived_token().into()),
            (
                "KOMMO_EXTERNAL_ID_FIELD_ID",
                kommo.config().external_id_field_id.to_string(),
            ),
            ("ZOHO_ACCOUNTS_URL", zoho.base_url()),
            ("ZOHO_API_DOMAIN", zoho.base_url()),
            ("ZOHO_CLIENT_ID", zoho.config().client_id.clone()),
            ("ZOHO_CLIENT_SECRET", zoho.config().client_secret.clone()),
            ("ZOHO_REFRESH_TOKEN", zoho.refresh_token().into()),
            // Zoho's limit, shared by the three workers through the database.
            ("ZOHO_MAX_CONCURRENCY", "4".into()),
            ("SKYLUXSE_ENCRYPTION_KEY", "5e".repeat(32)),
            ("OUTBOX_LEASE_SECONDS", "8".into()),
            // Seven processes share a server that other tests use too: a small pool each.
            ("DATABASE_MAX_CONNECTIONS", "10".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            env,
            procs: Vec::new(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skyluxse"));
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .kill_on_drop(true);
        cmd
    }

    /// Starts a process of `role` (an API on a new free port) and, for an API, waits until it
    /// answers `/healthz`.
    async fn start(&mut self, role: Role) -> usize {
        let mut cmd = self.command();
        cmd.arg(role.subcommand());
        let base = (role == Role::Api).then(|| {
            let addr = format!("127.0.0.1:{}", free_port());
            cmd.env("BIND_ADDR", &addr);
            format!("http://{addr}")
        });
        let child = cmd.spawn().expect("the skyluxse binary starts");
        let pid = child.id().expect("a running child has a pid");
        self.procs.push(Proc {
            role,
            child,
            pid,
            base,
        });
        let index = self.procs.len() - 1;
        if role == Role::Api {
            self.wait_healthy(index).await;
        }
        index
    }

    async fn wait_healthy(&mut self, index: usize) {
        let http = http_client();
        let base = self.procs[index].base.clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.procs[index].child.try_wait().unwrap() {
                panic!("the API process on {base} exited while starting: {status}");
            }
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the API on {base} did not answer /healthz within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs process `index` and starts a replacement with the same role and settings
    /// (an API on a new port, waited for). Returns the replacement's index.
    async fn kill_and_restart(&mut self, index: usize, pause: Duration) -> usize {
        let role = self.procs[index].role;
        let proc = &mut self.procs[index];
        proc.child.start_kill().unwrap();
        let status = proc.child.wait().await.unwrap();
        assert!(!status.success(), "{role:?} {} was killed", proc.pid);
        self.procs.remove(index);
        tokio::time::sleep(pause).await;
        self.start(role).await
    }

    fn of(&self, role: Role) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| self.procs[i].role == role)
            .collect()
    }

    /// Every process is still running (none crashed on its own).
    fn assert_all_running(&mut self) {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("{:?} process {} exited by itself: {status}", p.role, p.pid);
            }
        }
    }

    async fn kill_all(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
}

async fn create_key(cluster: &Cluster, role: &str, staff: &str) -> String {
    let out = cluster
        .command()
        .args(["keys", "create", "--role", role, "--staff", staff])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "keys create --role {role}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!key.is_empty(), "keys create printed a key");
    key
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// How a command ended, as far as the caller can tell.
enum Reply {
    Done(Value),
    Refused(u16, Value),
}

#[derive(Debug, Default)]
struct Stats {
    requests: usize,
    connection_errors: usize,
    replayed: usize,
    /// 409 `idempotency.in_progress`: the key's claim was held by a process that was killed,
    /// until the retry could take it over.
    in_progress: usize,
    clients: usize,
    bookings_created: usize,
    confirmed: usize,
    refused_unavailable: usize,
    cancelled: usize,
    completed: usize,
}

/// The load: API callers round-robin over the two API slots; a slot's URL changes when its
/// process is replaced.
struct Load {
    http: reqwest::Client,
    /// The test's own pool, for diagnostics.
    pool: PgPool,
    apis: [Mutex<String>; 2],
    next: AtomicUsize,
    sales: String,
    ops: String,
    driver: String,
    stats: Mutex<Stats>,
    /// Bookings driven to the end of their script.
    finished: AtomicUsize,
    work: AtomicUsize,
}

impl Load {
    fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap());
    }

    /// POSTs a command with an Idempotency-Key; on a connection error (its API process was
    /// killed) retries with the same key on the other API, after `Retry-After` while the killed
    /// process's claim is held. A 5xx fails the test; every command ends with an answer.
    async fn post(&self, key: &str, path: &str, body: &Value) -> Reply {
        let idempotency_key = Uuid::now_v7().to_string();
        let mut slot = self.next.fetch_add(1, Ordering::Relaxed) % 2;
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut last_error = String::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "POST {path} got no answer from either API in 45 s; last error: {last_error}"
            );
            let base = self.apis[slot].lock().unwrap().clone();
            self.stat(|s| s.requests += 1);
            let sent = self
                .http
                .post(format!("{base}{path}"))
                .bearer_auth(key)
                .header("idempotency-key", &idempotency_key)
                .json(body)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    last_error = format!("{base}: {e}");
                    self.stat(|s| s.connection_errors += 1);
                    slot ^= 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let bytes = match response.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    // The process died while answering.
                    last_error = format!("{base}: reading the answer: {e}");
                    self.stat(|s| s.connection_errors += 1);
                    slot ^= 1;
                    continue;
                }
            };
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if status >= 500 {
                panic!(
                    "POST {path} on {base}: server error {status}: {answer:#}\n\
                     (database connections: {}; the processes' logs above say more)",
                    connection_budget(&self.pool).await
                );
            }
            if replayed {
                self.stat(|s| s.replayed += 1);
            }
            if status == 409 && answer["code"] == "idempotency.in_progress" {
                self.stat(|s| s.in_progress += 1);
                let wait = retry_after.expect("an in-progress key says when to retry");
                assert!(
                    wait <= 10,
                    "Retry-After {wait}: a dead claim is taken over in 10 s"
                );
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            return if (200..300).contains(&status) {
                Reply::Done(answer)
            } else {
                Reply::Refused(status, answer)
            };
        }
    }

    /// Runs a step that must succeed.
    async fn step(&self, key: &str, path: &str, body: Value) -> Value {
        match self.post(key, path, &body).await {
            Reply::Done(v) => v,
            Reply::Refused(status, v) => panic!("POST {path} refused: {status} {v:#}"),
        }
    }
}

/// The seeded vehicles.
fn vehicle(n: usize) -> Uuid {
    Uuid::from_u128(0x00000000_0000_4000_c000_000000000001 + n as u128)
}

/// Booking `i`'s script: 20 bookings per vehicle whose periods overlap their neighbours.
async fn drive_booking(load: &Load, i: usize, clients: &[String], base: DateTime<Utc>) {
    let v = i % 6;
    let j = i / 6;
    let start = base + chrono::Duration::hours((20 * j + (i * 7) % 5) as i64);
    let end = start + chrono::Duration::days(1 + ((j + v) % 3) as i64);
    let create = json!({
        "client_id": clients[i % clients.len()],
        "start_at": ts(start),
        "end_at": ts(end),
        "vehicle_id": vehicle(v),
        "price_daily": format!("{}.00", 4000 + 100 * v),
    });
    let created = load.step(&load.sales, "/v1/bookings", create).await;
    load.stat(|s| s.bookings_created += 1);
    let id = created["id"].as_str().unwrap().to_string();
    let path = |action: &str| format!("/v1/bookings/{id}/{action}");
    let fate = (j + v) % 4;
    match load.post(&load.ops, &path("confirm"), &json!({})).await {
        Reply::Done(_) => load.stat(|s| s.confirmed += 1),
        Reply::Refused(409, p)
            if p["type"] == "https://skyluxse.ae/problems/vehicle-unavailable" =>
        {
            load.stat(|s| s.refused_unavailable += 1);
            // Half of the refused leads are dropped, half stay leads.
            let cancel = json!({ "reason": "vehicle unavailable" });
            if fate.is_multiple_of(2) {
                load.step(&load.sales, &path("cancel"), cancel).await;
                load.stat(|s| s.cancelled += 1);
            }
            return;
        }
        Reply::Refused(status, p) => panic!("confirm refused: {status} {p:#}"),
    }
    let cancel = json!({ "reason": "client changed plans" });
    let delivery_path = path("start-delivery");
    let delivery = || load.step(&load.driver, &delivery_path, json!({}));
    match fate {
        // Confirmed, then cancelled.
        0 => {
            load.step(&load.ops, &path("cancel"), cancel).await;
            load.stat(|s| s.cancelled += 1);
        }
        // Out for delivery, then cancelled.
        1 => {
            delivery().await;
            load.step(&load.ops, &path("cancel"), cancel).await;
            load.stat(|s| s.cancelled += 1);
        }
        // Delivered, rented and returned on time.
        2 => {
            let rental = json!({
                "started_at": ts(start),
                "pickup_mileage_km": 10_000 + i,
                "fuel_level_pct": 100,
            });
            let back = json!({
                "returned_at": ts(end),
                "return_mileage_km": 10_400 + i,
                "fuel_level_pct": 80,
            });
            delivery().await;
            load.step(&load.driver, &path("start-rental"), rental).await;
            load.step(&load.driver, &path("complete"), back).await;
            load.stat(|s| s.completed += 1);
        }
        // Stays confirmed.
        _ => {}
    }
}

async fn run_load(load: Arc<Load>) {
    // Clients first (bookings need them), then the bookings.
    let registered = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let load = load.clone();
            let registered = registered.clone();
            tokio::spawn(async move {
                loop {
                    let n = load.work.fetch_add(1, Ordering::Relaxed);
                    if n >= CLIENTS {
                        return;
                    }
                    let body = json!({
                        "name": format!("Scale Client {n}"),
                        "email": format!("scale.client.{n}@example.com"),
                        "phone": format!("+9715012340{n:02}"),
                        "residency_country": "AE",
                    });
                    let v = load.step(&load.sales, "/v1/clients", body).await;
                    registered
                        .lock()
                        .unwrap()
                        .push(v["id"].as_str().unwrap().to_string());
                    load.stat(|s| s.clients += 1);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let clients: Arc<Vec<String>> = Arc::new(registered.lock().unwrap().clone());
    assert!(
        clients.len() >= CLIENTS - 2,
        "clients registered: {}",
        clients.len()
    );

    load.work.store(0, Ordering::Relaxed);
    let base = Utc::now()
        .duration_trunc(chrono::Duration::days(1))
        .unwrap()
        + chrono::Duration::days(30);
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let load = load.clone();
            let clients = clients.clone();
            tokio::spawn(async move {
                loop {
                    let i = load.work.fetch_add(1, Ordering::Relaxed);
                    if i >= BOOKINGS {
                        return;
                    }
                    drive_booking(&load, i, &clients, base).await;
                    load.finished.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// The server's `max_connections` and the connections open now, per process of this test.
async fn connection_budget(pool: &PgPool) -> String {
    let max: Result<String, _> = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(pool)
        .await;
    let open: Result<Vec<(String, i64)>, _> = sqlx::query_as(
        "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity \
         WHERE datname = current_database() GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await;
    let total: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity")
        .fetch_one(pool)
        .await;
    match (max, open, total) {
        (Ok(max), Ok(open), Ok(total)) => {
            format!(
                "server max_connections {max}, {total} open on the server; this test's: {open:?}"
            )
        }
        (max, open, total) => format!("unknown: {max:?} {open:?} {total:?}"),
    }
}

/// The pids (from `application_name` `skyluxse-<pid>`) holding advisory locks, once per lock.
async fn lock_holders(pool: &PgPool) -> Vec<u32> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    names
        .iter()
        .filter_map(|n| n.strip_prefix("skyluxse-")?.parse().ok())
        .collect()
}

/// The pids (from `worker-<pid>-<uuid>`) holding leases on outbox rows.
async fn lease_holders(pool: &PgPool) -> Vec<u32> {
    let owners: Vec<String> = sqlx::query_scalar(
        "SELECT lease_owner FROM integrations_outbox \
         WHERE status = 'processing' AND lease_owner IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    owners
        .iter()
        .filter_map(|o| o.strip_prefix("worker-")?.split('-').next()?.parse().ok())
        .collect()
}

/// Among the processes of `role`, the one that holds the most of `held` (else the first).
fn busiest(cluster: &Cluster, role: Role, held: &[u32]) -> usize {
    let candidates = cluster.of(role);
    candidates
        .iter()
        .copied()
        .max_by_key(|&i| held.iter().filter(|&&p| p == cluster.procs[i].pid).count())
        .unwrap()
}

async fn wait_finished(load: &Load, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while load.finished.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "the load did not reach {n} bookings within 60 s ({} done)",
            load.finished.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills one `api`, one `project` and one `worker` at different points of the load and
/// restarts each; returns what was killed.
async fn chaos(cluster: &mut Cluster, load: &Load, pool: &PgPool) -> Vec<String> {
    let mut killed = Vec::new();

    wait_finished(load, KILL_AT[0]).await;
    let api = cluster.of(Role::Api)[0];
    let slot = load
        .apis
        .iter()
        .position(|s| Some(&*s.lock().unwrap()) == cluster.procs[api].base.as_ref())
        .unwrap();
    killed.push(format!(
        "api {} ({}) after {} bookings",
        cluster.procs[api].pid,
        cluster.procs[api].base.as_deref().unwrap_or_default(),
        load.finished.load(Ordering::Relaxed)
    ));
    // The load keeps sending to the dead address (connection refused, retried on the other
    // API) until the replacement answers.
    let replacement = cluster
        .kill_and_restart(api, Duration::from_millis(500))
        .await;
    *load.apis[slot].lock().unwrap() = cluster.procs[replacement].base.clone().unwrap();

    wait_finished(load, KILL_AT[1]).await;
    let project = busiest(cluster, Role::Project, &lock_holders(pool).await);
    killed.push(format!(
        "project {} (holding {} leaderships) after {} bookings",
        cluster.procs[project].pid,
        lock_holders(pool)
            .await
            .iter()
            .filter(|&&p| p == cluster.procs[project].pid)
            .count(),
        load.finished.load(Ordering::Relaxed)
    ));
    cluster
        .kill_and_restart(project, Duration::from_millis(500))
        .await;

    wait_finished(load, KILL_AT[2]).await;
    let mut held = lease_holders(pool).await;
    held.extend(lock_holders(pool).await);
    let worker = busiest(cluster, Role::Worker, &held);
    killed.push(format!(
        "worker {} (holding {} leases/locks) after {} bookings",
        cluster.procs[worker].pid,
        held.iter()
            .filter(|&&p| p == cluster.procs[worker].pid)
            .count(),
        load.finished.load(Ordering::Relaxed)
    ));
    cluster
        .kill_and_restart(worker, Duration::from_millis(500))
        .await;
    killed
}

/// Waits until the outbox is derived and delivered and every projection has caught up.
async fn wait_quiet(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let outbox = projections::status::one(pool, "projection:outbox", "outbox")
            .await
            .unwrap();
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM integrations_outbox WHERE status IN ('pending', 'processing')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        let statuses = projections::status::all(pool).await.unwrap_or_else(|e| {
            panic!(
                "reading the projections' status: {e} (test pool: {} open, {} idle)",
                pool.size(),
                pool.num_idle()
            )
        });
        let behind: Vec<_> = statuses
            .iter()
            .filter(|s| s.events_behind > 0 || s.last_error.is_some())
            .collect();
        // "Behind" counts only final events. Events committed behind a transaction still open
        // anywhere on the server (another test's, the horizon is cluster-wide) are not final
        // yet, so also wait until no consumer has any event at all after its checkpoint.
        let mut pending = false;
        for s in statuses
            .iter()
            .map(|s| &s.name)
            .chain(["outbox".to_string()].iter())
        {
            let at = store::checkpoints::load(pool, &format!("projection:{s}"))
                .await
                .unwrap();
            pending |= store::global_log::has_pending_after(pool, at)
                .await
                .unwrap();
        }
        if outbox.events_behind == 0
            && outbox.last_error.is_none()
            && open == 0
            && behind.is_empty()
            && !pending
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not quiet after 90 s: outbox projector {} behind ({:?}), {open} outbox rows open, \
             projections behind: {behind:#?}",
            outbox.events_behind,
            outbox.last_error
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A booking holding a vehicle: booking id, vehicle, start, end.
type Held = (Uuid, Uuid, DateTime<Utc>, DateTime<Utc>);
/// A `vehicle_schedule` entry: vehicle and period bounds (none for an empty period).
type Slot = (Uuid, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// A booking as the event log says: its vehicle and period, whether it holds the vehicle.
#[derive(Debug, Clone, Default)]
struct Folded {
    code: String,
    vehicle: Option<Uuid>,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    holds: bool,
    confirmed_ever: bool,
}

fn time(body: &Value, field: &str) -> DateTime<Utc> {
    serde_json::from_value(body[field].clone()).unwrap_or_else(|e| panic!("{field} in {body}: {e}"))
}

fn uuid(body: &Value, field: &str) -> Uuid {
    serde_json::from_value(body[field].clone()).unwrap_or_else(|e| panic!("{field} in {body}: {e}"))
}

/// Folds every booking's events the way the write-side guard keeps `vehicle_schedule`.
async fn fold_bookings(pool: &PgPool) -> BTreeMap<Uuid, Folded> {
    let rows: Vec<(String, i64, String, Value)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_type, payload::jsonb FROM events \
         WHERE aggregate_type = 'Booking' ORDER BY aggregate_id, sequence",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out: BTreeMap<Uuid, Folded> = BTreeMap::new();
    for (id, _, event_type, payload) in rows {
        let b = out.entry(Uuid::parse_str(&id).unwrap()).or_default();
        let body = &payload[event_type.as_str()];
        match event_type.as_str() {
            "BookingCreated" => {
                b.code = body["external_code"].as_str().unwrap().to_string();
                b.vehicle = serde_json::from_value(body["vehicle_id"].clone()).unwrap();
                b.start = Some(time(body, "start_at"));
                b.end = Some(time(body, "end_at"));
            }
            "BookingVehicleAssigned" => b.vehicle = Some(uuid(body, "vehicle_id")),
            "BookingRescheduled" => {
                b.start = Some(time(body, "start_at"));
                b.end = Some(time(body, "end_at"));
            }
            "BookingExtended" => b.end = Some(time(body, "new_end_at")),
            "BookingConfirmed" => {
                b.vehicle = Some(uuid(body, "vehicle_id"));
                b.start = Some(time(body, "start_at"));
                b.end = Some(time(body, "end_at"));
                b.holds = true;
                b.confirmed_ever = true;
            }
            "BookingCompleted" if b.holds => {
                let (start, end) = (b.start.unwrap(), b.end.unwrap());
                b.end = Some(start.max(end.min(time(body, "returned_at"))));
            }
            "BookingCancelled" => b.holds = false,
            _ => {}
        }
    }
    out
}

/// Pairs of overlapping periods on one vehicle.
fn overlaps(held: &[Held]) -> Vec<String> {
    let mut out = Vec::new();
    for (n, a) in held.iter().enumerate() {
        for b in &held[n + 1..] {
            if a.1 == b.1 && a.2 < a.3 && b.2 < b.3 && a.2 < b.3 && b.2 < a.3 {
                out.push(format!(
                    "vehicle {}: booking {} [{}, {}) overlaps booking {} [{}, {})",
                    a.1, a.0, a.2, a.3, b.0, b.2, b.3
                ));
            }
        }
    }
    out
}

fn kommo_external_key(contact: &Value, field_id: i64) -> Option<String> {
    contact["custom_fields_values"]
        .as_array()?
        .iter()
        .find(|f| f["field_id"].as_i64() == Some(field_id))?["values"][0]["value"]
        .as_str()
        .map(str::to_string)
}

/// Counts of each key; asserts every key of `expected` appears exactly once and nothing else.
fn assert_once_each(what: &str, keys: Vec<Option<String>>, expected: &BTreeSet<String>) {
    let mut counts: BTreeMap<Option<String>, usize> = BTreeMap::new();
    for k in keys {
        *counts.entry(k).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|&(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "{what}: duplicated records {twice:?}");
    let got: BTreeSet<String> = counts.keys().flatten().cloned().collect();
    assert!(
        !counts.contains_key(&None),
        "{what}: a record without its external key"
    );
    assert_eq!(
        &got,
        expected,
        "{what}: missing {:?}, unexpected {:?}",
        expected.difference(&got).collect::<Vec<_>>(),
        got.difference(expected).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apis_two_projectors_three_workers_survive_kills_under_load_without_double_booking_or_double_delivery()
 {
    let started = Instant::now();
    let db = TestDb::new().await;
    // Open the test's own connections now: the seven processes may fill the server's
    // `max_connections`, and the checks (and the diagnostics) must still reach the database.
    let reserved = futures::future::join_all((0..5).map(|_| db.pool.acquire())).await;
    drop(reserved);
    let kommo = FakeKommo::start().await.unwrap();
    let zoho = FakeZoho::start().await.unwrap();
    let mut cluster = Cluster::new(&db, &kommo, &zoho);

    let sales = create_key(&cluster, "sales", "sales@skyluxse.ae").await;
    let ops = create_key(&cluster, "operations", "ops@skyluxse.ae").await;
    let driver = create_key(&cluster, "driver", "driver1@skyluxse.ae").await;

    // Projectors and workers first: they hold the leaderships and leases from the start (the
    // APIs run no consumer of their own).
    for role in [
        Role::Project,
        Role::Project,
        Role::Worker,
        Role::Worker,
        Role::Worker,
    ] {
        cluster.start(role).await;
    }
    let a = cluster.start(Role::Api).await;
    let b = cluster.start(Role::Api).await;
    let load = Arc::new(Load {
        http: http_client(),
        pool: db.pool.clone(),
        apis: [
            Mutex::new(cluster.procs[a].base.clone().unwrap()),
            Mutex::new(cluster.procs[b].base.clone().unwrap()),
        ],
        next: AtomicUsize::new(0),
        sales,
        ops,
        driver,
        stats: Mutex::new(Stats::default()),
        finished: AtomicUsize::new(0),
        work: AtomicUsize::new(0),
    });
    let up = started.elapsed();

    let (killed, ()) = tokio::join!(chaos(&mut cluster, &load, &db.pool), run_load(load.clone()));
    let loaded = started.elapsed();
    cluster.assert_all_running();
    assert_eq!(cluster.of(Role::Api).len(), 2);
    assert_eq!(cluster.of(Role::Project).len(), 2);
    assert_eq!(cluster.of(Role::Worker).len(), 3);

    wait_quiet(&db.pool).await;
    let quiet = started.elapsed();
    let budget = connection_budget(&db.pool).await;
    cluster.assert_all_running();
    // The roles stayed apart: the API processes led no projection nor the outbox projector.
    let apis: BTreeSet<u32> = cluster
        .of(Role::Api)
        .into_iter()
        .map(|i| cluster.procs[i].pid)
        .collect();
    let consumers: BTreeSet<u32> = lock_holders(&db.pool).await.into_iter().collect();
    assert!(
        consumers.is_disjoint(&apis) && !consumers.is_empty(),
        "leaderships held by {consumers:?}; the API processes are {apis:?}"
    );
    cluster.kill_all().await;

    let stats = std::mem::take(&mut *load.stats.lock().unwrap());
    eprintln!(
        "scale-out: up {up:?}, load done {loaded:?}, quiet {quiet:?}; killed: {killed:#?}; \
         {stats:#?}; at the end of the load: {budget}"
    );
    assert!(stats.confirmed > 0, "{stats:?}");
    assert!(
        stats.refused_unavailable > 0,
        "overlapping confirmations are refused: {stats:?}"
    );

    // 1. No vehicle is double-booked: by the event log, by the guard's table, by the read model.
    let folded = fold_bookings(&db.pool).await;
    // Every command got its answer, killed processes or not, and none ran twice: each booking
    // the load was told of exists once, and no other.
    assert_eq!(folded.len(), stats.bookings_created, "{stats:?}");
    assert_eq!(stats.bookings_created, BOOKINGS, "{stats:?}");
    let holders: Vec<Held> = folded
        .iter()
        .filter(|(_, b)| b.holds)
        .map(|(id, b)| (*id, b.vehicle.unwrap(), b.start.unwrap(), b.end.unwrap()))
        .collect();
    let clashes = overlaps(&holders);
    assert!(clashes.is_empty(), "double-booked by the log: {clashes:#?}");
    #[allow(clippy::type_complexity)]
    let schedule: Vec<(String, Uuid, Option<DateTime<Utc>>, Option<DateTime<Utc>>)> =
        sqlx::query_as(
            "SELECT source_id, vehicle_id, lower(period), upper(period) FROM vehicle_schedule \
             WHERE source_type = 'booking' ORDER BY source_id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let schedule: BTreeMap<Uuid, Slot> = schedule
        .into_iter()
        .map(|(id, v, s, e)| (Uuid::parse_str(&id).unwrap(), (v, s, e)))
        .collect();
    let expected_schedule: BTreeMap<Uuid, Slot> = holders
        .iter()
        .map(|&(id, v, s, e)| {
            let period = if s < e {
                (Some(s), Some(e))
            } else {
                (None, None)
            };
            (id, (v, period.0, period.1))
        })
        .collect();
    assert_eq!(
        schedule, expected_schedule,
        "vehicle_schedule equals the log"
    );

    type ReadRow = (
        Uuid,
        Option<Uuid>,
        DateTime<Utc>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        String,
    );
    let read: Vec<ReadRow> = sqlx::query_as(
        "SELECT id, vehicle_id, start_at, end_at, returned_at, status::text FROM bookings \
         WHERE status IN ('confirmed', 'delivery', 'in_progress', 'completed')",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let read_holders: Vec<Held> = read
        .iter()
        .map(|(id, v, s, e, returned, status)| {
            let end = match (status.as_str(), returned) {
                ("completed", Some(r)) => (*s).max((*e).min(*r)),
                _ => *e,
            };
            (*id, v.expect("a holding booking has a vehicle"), *s, end)
        })
        .collect();
    let clashes = overlaps(&read_holders);
    assert!(
        clashes.is_empty(),
        "double-booked by the bookings read model: {clashes:#?}"
    );
    let mut sorted = read_holders.clone();
    sorted.sort();
    assert_eq!(
        sorted, holders,
        "the bookings read model agrees with the log"
    );

    // 2. No outbox row was delivered twice in effect.
    #[allow(clippy::type_complexity)]
    let open: Vec<(Uuid, String, String, Uuid, String, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, target_system, event_type, entity_id, status, attempts, last_error \
         FROM integrations_outbox WHERE status <> 'processed' ORDER BY source_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(open.is_empty(), "outbox rows not processed: {open:#?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM integrations_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let clients: BTreeSet<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events \
         WHERE aggregate_type = 'Client' AND event_type = 'ClientRegistered'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(clients.len(), CLIENTS, "each client registered once");
    let confirmed_codes: BTreeSet<String> = folded
        .values()
        .filter(|b| b.confirmed_ever)
        .map(|b| b.code.clone())
        .collect();

    let contact_field = zoho.config().contact_external_field.clone();
    let order_field = zoho.config().sales_order_external_field.clone();
    let zoho_contacts = zoho.contacts();
    let zoho_orders = zoho.sales_orders();
    assert_once_each(
        "Zoho contacts",
        zoho_contacts
            .iter()
            .map(|c| c[&contact_field].as_str().map(str::to_string))
            .collect(),
        &clients,
    );
    assert_once_each(
        "Zoho sales orders",
        zoho_orders
            .iter()
            .map(|o| o[&order_field].as_str().map(str::to_string))
            .collect(),
        &confirmed_codes,
    );
    let field_id = kommo.config().external_id_field_id;
    let kommo_contacts = kommo.contacts();
    assert_once_each(
        "Kommo contacts",
        kommo_contacts
            .iter()
            .map(|c| kommo_external_key(c, field_id))
            .collect(),
        &clients,
    );
    assert_eq!(
        zoho.creates(),
        clients.len() + confirmed_codes.len(),
        "Zoho inserted each contact and sales order once ({} updates)",
        zoho.updates()
    );
    assert_eq!(
        kommo.creates(),
        clients.len(),
        "Kommo created each contact once"
    );
    // Zoho's limit held across the three worker processes (and their replacements).
    assert!(
        zoho.max_concurrency_observed() <= 4,
        "Zoho saw {} calls at once",
        zoho.max_concurrency_observed()
    );
    // The ids written back are the CRMs' records.
    let linked: Vec<(Uuid, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, kommo_contact_id, zoho_contact_id FROM clients")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(linked.len(), clients.len());
    for (id, kommo_id, zoho_id) in &linked {
        let z = zoho.contact_by_external(&id.to_string()).unwrap();
        assert_eq!(zoho_id.as_deref(), z["id"].as_str(), "client {id}");
        let k = kommo_contacts
            .iter()
            .find(|c| kommo_external_key(c, field_id) == Some(id.to_string()))
            .unwrap();
        assert_eq!(
            kommo_id.as_deref(),
            Some(k["id"].to_string().as_str()),
            "client {id}"
        );
    }
    let orders: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT external_code, zoho_sales_order_id FROM bookings \
         WHERE external_code = ANY($1) ORDER BY external_code",
    )
    .bind(confirmed_codes.iter().cloned().collect::<Vec<_>>())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(orders.len(), confirmed_codes.len());
    for (code, order_id) in &orders {
        let o = zoho.sales_order_by_external(code).unwrap();
        assert_eq!(order_id.as_deref(), o["id"].as_str(), "booking {code}");
    }

    // 3. Every read model equals a rebuild.
    crate::read_models::assert_every_read_model_equals_its_rebuild(&db.pool, false).await;
    eprintln!(
        "scale-out: {} clients, {} bookings ({} held, {} ever confirmed), {rows} outbox rows, \
         all checks in {:?}",
        clients.len(),
        folded.len(),
        holders.len(),
        confirmed_codes.len(),
        started.elapsed()
    );
}

/// Waits until a statement containing `query_part` (any case) waits for a lock.
async fn wait_lock_wait(pool: &PgPool, query_part: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() \
               AND wait_event_type = 'Lock' AND query ILIKE '%' || $1 || '%'",
        )
        .bind(query_part)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no `{query_part}` waited for a lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An API process killed in the middle of a command (SIGKILL, once before the command's commit
/// and once after it but before its answer was stored): the caller's retry on the other API, with
/// the same Idempotency-Key, is told to wait a few seconds, then gets the command's answer; the
/// command ran exactly once either way.
#[tokio::test]
async fn a_retry_after_its_api_process_was_killed_mid_command_gets_the_one_answer() {
    let db = TestDb::new().await;
    let kommo = FakeKommo::start().await.unwrap();
    let zoho = FakeZoho::start().await.unwrap();
    let mut cluster = Cluster::new(&db, &kommo, &zoho);
    let sales = create_key(&cluster, "sales", "sales@skyluxse.ae").await;
    let mut victim = cluster.start(Role::Api).await;
    let survivor = cluster.start(Role::Api).await;
    let survivor = cluster.procs[survivor].base.clone().unwrap();
    let http = http_client();
    let client = http
        .post(format!("{survivor}/v1/clients"))
        .bearer_auth(&sales)
        .json(
            &json!({ "name": "Crash Client", "email": "crash@example.com",
                       "phone": "+971501234999", "residency_country": "AE" }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(client.status(), 201);
    let client: Value = client.json().await.unwrap();
    let bookings_of_client = || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE event_type = 'BookingCreated' \
             AND payload -> 'BookingCreated' ->> 'client_id' = $1",
        )
        .bind(client["id"].as_str().unwrap())
        .fetch_one(&db.pool)
    };

    for (case, committed) in [("before-commit", false), ("after-commit", true)] {
        let key = format!("killed-{case}");
        let body = json!({
            "client_id": client["id"],
            "start_at": if committed { "2026-09-10T10:00:00Z" } else { "2026-09-01T10:00:00Z" },
            "end_at": if committed { "2026-09-11T10:00:00Z" } else { "2026-09-02T10:00:00Z" },
            "price_daily": "3000.00",
        });
        let before = bookings_of_client().await.unwrap();
        let base = cluster.procs[victim].base.clone().unwrap();
        // Writers of events queue behind this lock; the victim's command waits in its INSERT.
        let mut events_lock = db.pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *events_lock)
            .await
            .unwrap();
        let first = tokio::spawn(
            http.post(format!("{base}/v1/bookings"))
                .bearer_auth(&sales)
                .header("idempotency-key", &key)
                .json(&body)
                .send(),
        );
        wait_lock_wait(&db.pool, "INSERT INTO events").await;
        if committed {
            // Hold off every write to idempotency_keys but not the command's fence (which only
            // reads its claim FOR SHARE): the command commits, then waits to store its answer.
            let mut answers_lock = db.pool.begin().await.unwrap();
            sqlx::query("LOCK TABLE idempotency_keys IN SHARE MODE")
                .execute(&mut *answers_lock)
                .await
                .unwrap();
            events_lock.rollback().await.unwrap();
            wait_lock_wait(&db.pool, "SET status = 'completed'").await;
            cluster.procs[victim].child.start_kill().unwrap();
            cluster.procs[victim].child.wait().await.unwrap();
            answers_lock.rollback().await.unwrap();
            assert_eq!(bookings_of_client().await.unwrap(), before + 1, "committed");
        } else {
            cluster.procs[victim].child.start_kill().unwrap();
            cluster.procs[victim].child.wait().await.unwrap();
            events_lock.rollback().await.unwrap();
        }
        assert!(
            first.await.unwrap().is_err(),
            "the killed API never answered"
        );

        let retry = || {
            http.post(format!("{survivor}/v1/bookings"))
                .bearer_auth(&sales)
                .header("idempotency-key", &key)
                .json(&body)
                .send()
        };
        // The caller retries on the other API with the same key until it gets an answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut waited = 0;
        let answer = loop {
            let r = retry().await.unwrap();
            let status = r.status().as_u16();
            let replayed = r.headers().contains_key("idempotent-replayed");
            let retry_after = r.headers().get("retry-after").cloned();
            let answer: Value = r.json().await.unwrap();
            if status == 409 && answer["code"] == "idempotency.in_progress" {
                let wait: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
                assert!((1..=10).contains(&wait), "Retry-After {wait}");
                waited += 1;
                assert!(Instant::now() < deadline, "{case}: the key stayed claimed");
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            assert_eq!(status, 201, "{case}: {answer:#}");
            // Answered from the committed events, or by running the command that never was.
            assert_eq!(replayed, committed, "{case}");
            break answer;
        };
        assert!(
            waited > 0,
            "{case}: the first retry came while the claim was fresh"
        );
        assert_eq!(
            bookings_of_client().await.unwrap(),
            before + 1,
            "{case}: created once"
        );
        let created: Vec<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM events WHERE event_type = 'BookingCreated' \
             AND payload -> 'BookingCreated' ->> 'client_id' = $1 \
             AND (payload -> 'BookingCreated' ->> 'start_at')::timestamptz = $2::timestamptz",
        )
        .bind(client["id"].as_str().unwrap())
        .bind(body["start_at"].as_str().unwrap())
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(created.len(), 1, "{case}");
        let stored = &created[0];
        assert_eq!(answer["id"], stored.as_str(), "{case}");
        // Later retries replay that answer.
        let again: Value = retry().await.unwrap().json().await.unwrap();
        assert_eq!(again, answer, "{case}");

        cluster.procs.remove(victim);
        victim = cluster.start(Role::Api).await;
    }
    cluster.kill_all().await;
}
