//! `TestApp`: the real router on 127.0.0.1:0 over a fresh database, with the projections, the
//! lead-to-booking process manager and the API's background work running, and a key per role.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use store::testing::TestDb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const WEBHOOK_SECRET: &str = "kommo-hook-5ecret";

/// Seeded reference data (migrations/…_seed_reference_data.sql).
pub const GHOST: Uuid = Uuid::from_u128(0x00000000_0000_4000_c000_000000000001);
pub const OPS_ID: Uuid = Uuid::from_u128(0x00000000_0000_4000_a000_000000000002);
pub const SALES_ID: Uuid = Uuid::from_u128(0x00000000_0000_4000_a000_000000000003);
pub const DRIVER_PROFILE: Uuid = Uuid::from_u128(0x00000000_0000_4000_b000_000000000004);
pub const CHILD_SEAT: Uuid = Uuid::from_u128(0x00000000_0000_4000_d000_000000000001);

pub const ROLES: [&str; 5] = ["operations", "sales", "ceo", "driver", "integration"];

fn email(role: &str) -> &'static str {
    match role {
        "operations" => "ops@skyluxse.ae",
        "sales" => "sales@skyluxse.ae",
        "ceo" => "ceo@skyluxse.ae",
        "driver" => "driver1@skyluxse.ae",
        _ => "integration@skyluxse.ae",
    }
}

/// An answer: status, headers and the body as JSON (`Null` when it is not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem+json answer of `status` and type slug `slug`.
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(self.status, status, "{:#}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{:#}",
            self.body
        );
        assert_eq!(
            self.body["type"],
            format!("https://skyluxse.ae/problems/{slug}"),
            "{:#}",
            self.body
        );
        assert_eq!(self.body["status"], status);
        assert!(self.body["title"].is_string());
    }
}

pub struct TestApp {
    pub base: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub keys: HashMap<&'static str, String>,
    /// The fake CRMs the outbox worker delivers to.
    pub kommo: crm_fakes::FakeKommo,
    pub zoho: crm_fakes::FakeZoho,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _db: TestDb,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|config| config).await
    }

    /// With the API's configuration changed by `configure`.
    pub async fn spawn_with(configure: impl FnOnce(api::ApiConfig) -> api::ApiConfig) -> Self {
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber_init();
        }
        let db = TestDb::new().await;
        let pool = db.pool.clone();
        let config = configure(
            api::ApiConfig {
                read_wait: Duration::from_secs(5),
                ..api::ApiConfig::default()
            }
            .with_kommo_webhook_secret(WEBHOOK_SECRET),
        );
        let state = api::AppState::new(pool.clone(), config);
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();

        let runner_config = projections::runner::RunnerConfig {
            batch_size: 500,
            tick_every: Duration::from_secs(3600),
            retry_after: Duration::from_millis(200),
        };
        tasks.push(tokio::spawn(projections::runner::run(
            pool.clone(),
            projections::all(),
            runner_config,
            stopped.clone(),
        )));
        let bus = commands::CommandBus::new(pool.clone());
        let process_stop = stopped.clone();
        tasks.push(tokio::spawn(async move {
            commands::process::run(&bus, process_stop).await;
        }));
        tasks.push(tokio::spawn(api::run_background(
            state.clone(),
            stopped.clone(),
        )));

        let kommo = crm_fakes::FakeKommo::start().await.unwrap();
        let zoho = crm_fakes::FakeZoho::start().await.unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = api::router(state);
        let mut server_stop = stopped;
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = server_stop.changed().await;
                })
                .await;
        }));

        let mut keys = HashMap::new();
        for role in ROLES {
            let key =
                api::auth::create_key(&pool, email(role), api::auth::parse_role(role).unwrap())
                    .await
                    .unwrap();
            keys.insert(role, key);
        }
        Self {
            base,
            pool,
            client: reqwest::Client::new(),
            keys,
            kommo,
            zoho,
            stop,
            tasks,
            _db: db,
        }
    }

    /// Starts the outbox (its projector and one worker) delivering to the fake Kommo and Zoho.
    /// Separate from `spawn` so that tests asserting exact stream versions are not interleaved
    /// with the worker's write-backs.
    pub async fn start_outbox(&mut self) {
        let pool = self.pool.clone();
        let stopped = self.stop.subscribe();
        let key = outbox_worker::pg::EncryptionKey::from_hex(&"ab".repeat(32)).unwrap();
        let tokens: std::sync::Arc<dyn crm::TokenStore> =
            std::sync::Arc::new(outbox_worker::pg::PgTokenStore::new(pool.clone(), key));
        let targets = outbox_worker::setup::for_fakes(
            &self.kommo,
            &self.zoho,
            tokens,
            std::sync::Arc::new(crm::LocalPacer::from_rps(6)),
            Duration::from_secs(5),
            10,
            std::sync::Arc::new(crm::Unshared),
        )
        .unwrap();
        let mut worker_config = outbox_worker::worker::WorkerConfig::from_env().unwrap();
        worker_config.idle = Duration::from_millis(50);
        let worker = outbox_worker::worker::Worker::new(
            pool.clone(),
            std::sync::Arc::new(commands::CommandBus::new(pool.clone())),
            targets,
            worker_config,
        );
        let worker_stop = stopped.clone();
        self.tasks
            .push(tokio::spawn(async move { worker.run(worker_stop).await }));
        self.tasks.push(tokio::spawn(projections::runner::run(
            pool,
            vec![std::sync::Arc::new(
                outbox_worker::projector::OutboxProjector,
            )],
            projections::runner::RunnerConfig {
                batch_size: 500,
                tick_every: Duration::from_secs(3600),
                retry_after: Duration::from_millis(200),
            },
            stopped,
        )));
    }

    /// The Prometheus text at `/metrics` (no key needed).
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn key(&self, role: &str) -> &str {
        self.keys.get(role).map(String::as_str).unwrap()
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Resp {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
        }
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        role: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(self.key(role))
    }

    pub async fn get(&self, role: &str, path: &str) -> Resp {
        self.send(self.request(reqwest::Method::GET, role, path))
            .await
    }

    pub async fn post(&self, role: &str, path: &str, body: Value) -> Resp {
        self.send(self.request(reqwest::Method::POST, role, path).json(&body))
            .await
    }

    /// POSTs and asserts a 2xx answer; returns its body.
    pub async fn ok(&self, role: &str, path: &str, body: Value) -> Value {
        let r = self.post(role, path, body).await;
        assert!(
            (200..300).contains(&r.status),
            "POST {path} as {role}: {} {:#}",
            r.status,
            r.body
        );
        r.body
    }

    /// GETs until the answer is 200 and `ready` holds (read models catch up), up to 15 s.
    pub async fn eventually(
        &self,
        role: &str,
        path: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.get(role, path).await;
            if r.status == 200 && ready(&r.body) {
                return r.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "GET {path} never got ready: {} {:#}",
                r.status,
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Posts a form-encoded Kommo webhook.
    pub async fn webhook(&self, secret: &str, body: &str, signature: Option<&str>) -> Resp {
        let mut request = self
            .client
            .post(self.url(&format!("/webhooks/kommo/{secret}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string());
        if let Some(sig) = signature {
            request = request.header("x-signature", sig);
        }
        self.send(request).await
    }

    /// Registers a client as sales; returns its id.
    pub async fn client(&self, name: &str) -> String {
        let body = self
            .ok(
                "sales",
                "/v1/clients",
                serde_json::json!({
                    "name": name,
                    "phone": "+971 50 123 4567",
                    "email": format!("{}@example.com", name.to_lowercase().replace(' ', ".")),
                    "residency_country": "AE",
                    "preferred_channels": ["whatsapp"],
                    "passport_number": "P7654321",
                }),
            )
            .await;
        body["id"].as_str().unwrap().to_string()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Logs only when TEST_LOG is set.
fn tracing_subscriber_init() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,sqlx=warn"))
        .with_test_writer()
        .try_init()
}

/// A three-day booking of `client` at 6,500 a day (June 2026), without a vehicle.
pub fn booking_body(client: &str) -> Value {
    serde_json::json!({
        "client_id": client,
        "start_at": "2026-06-01T10:00:00Z",
        "end_at": "2026-06-04T10:00:00Z",
        "price_daily": "6500.00",
    })
}
