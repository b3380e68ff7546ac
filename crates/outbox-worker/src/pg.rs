//! What the workers share, kept in PostgreSQL: CRM tokens encrypted at rest (AES-256-GCM, key
//! from `SKYLUXSE_ENCRYPTION_KEY`), a refresh lock so one worker refreshes at a time, Kommo's
//! request pacing and Zoho's concurrency limit across every worker process.

use std::path::Path;
use std::time::Duration;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use crm::{Pacer, RefreshGuard, SecretString, StoredToken, TokenStore, TokenStoreError};
use secrecy::ExposeSecret;
use sqlx::{Connection, PgConnection, PgPool};

/// The version of the key that encrypted a stored token (for key rotation).
const KEY_VERSION: i32 = 1;

/// How much longer than `1/rps` a [`PgPacer`] slot is.
const SLOT_MARGIN: f64 = 1.02;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("SKYLUXSE_ENCRYPTION_KEY must be 64 hex characters (32 bytes)")]
    Malformed,
    #[error("cannot read or create the development key at {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The key that encrypts secrets at rest.
#[derive(Clone)]
pub struct EncryptionKey(Aes256Gcm);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey(..)")
    }
}

impl EncryptionKey {
    pub fn from_hex(hex_key: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| KeyError::Malformed)?;
        Aes256Gcm::new_from_slice(&bytes)
            .map(Self)
            .map_err(|_| KeyError::Malformed)
    }

    /// `SKYLUXSE_ENCRYPTION_KEY`, or a development key generated once into the data folder.
    pub fn from_env_or_dev(data_dir: &Path) -> Result<Self, KeyError> {
        if let Ok(k) = std::env::var("SKYLUXSE_ENCRYPTION_KEY")
            && !k.is_empty()
        {
            return Self::from_hex(&k);
        }
        let path = data_dir.join("dev-encryption.key");
        let file_err = |source| KeyError::File {
            path: path.display().to_string(),
            source,
        };
        if let Ok(existing) = std::fs::read_to_string(&path) {
            return Self::from_hex(&existing);
        }
        std::fs::create_dir_all(data_dir).map_err(file_err)?;
        let key = Aes256Gcm::generate_key(OsRng);
        let text = hex::encode(key);
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(file_err)?;
            f.write_all(text.as_bytes()).map_err(file_err)?;
        }
        tracing::warn!(path = %path.display(), "SKYLUXSE_ENCRYPTION_KEY is unset: generated a development key");
        Self::from_hex(&text)
    }

    pub fn encrypt(&self, plaintext: &str) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = nonce.to_vec();
        // Encryption with a valid key and nonce cannot fail for in-memory data.
        if let Ok(ct) = self.0.encrypt(&nonce, plaintext.as_bytes()) {
            out.extend(ct);
        }
        out
    }

    pub fn decrypt(&self, data: &[u8]) -> Option<String> {
        if data.len() < 12 {
            return None;
        }
        let (nonce, ct) = data.split_at(12);
        let plain = self.0.decrypt(Nonce::from_slice(nonce), ct).ok()?;
        String::from_utf8(plain).ok()
    }
}

/// Tokens in `crm_tokens`, encrypted.
pub struct PgTokenStore {
    pool: PgPool,
    key: EncryptionKey,
    /// Within the process, refreshers of one system queue here, so that an expired token seen
    /// by many deliveries at once opens one connection for the database lock, not one each.
    refreshing: crm::RefreshTurns,
}

impl PgTokenStore {
    pub fn new(pool: PgPool, key: EncryptionKey) -> Self {
        Self {
            pool,
            key,
            refreshing: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StoreError(String);

fn store_err(e: sqlx::Error) -> TokenStoreError {
    TokenStoreError::new(StoreError(format!("database: {e}")))
}

#[async_trait]
impl TokenStore for PgTokenStore {
    async fn load(&self, system: &str) -> Result<Option<StoredToken>, TokenStoreError> {
        #[allow(clippy::type_complexity)]
        let row: Option<(
            i32,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<String>,
            Option<DateTime<Utc>>,
        )> = sqlx::query_as(
            "SELECT key_version, access_token_enc, refresh_token_enc, api_domain, expires_at \
                 FROM crm_tokens WHERE system = $1",
        )
        .bind(system)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_err)?;
        let Some((version, access, refresh, api_domain, expires_at)) = row else {
            return Ok(None);
        };
        if version != KEY_VERSION {
            return Err(TokenStoreError::new(StoreError(format!(
                "stored token uses key version {version}, this process has {KEY_VERSION}"
            ))));
        }
        let decrypt = |d: Option<Vec<u8>>| -> Result<Option<SecretString>, TokenStoreError> {
            match d {
                None => Ok(None),
                Some(bytes) => self
                    .key
                    .decrypt(&bytes)
                    .map(|s| Some(SecretString::from(s)))
                    .ok_or_else(|| {
                        TokenStoreError::new(StoreError(
                            "a stored token cannot be decrypted with SKYLUXSE_ENCRYPTION_KEY"
                                .into(),
                        ))
                    }),
            }
        };
        let Some(access_token) = decrypt(access)? else {
            return Ok(None);
        };
        Ok(Some(StoredToken {
            access_token,
            refresh_token: decrypt(refresh)?,
            expires_at: expires_at.unwrap_or_else(Utc::now),
            api_domain,
        }))
    }

    async fn save(&self, system: &str, token: &StoredToken) -> Result<(), TokenStoreError> {
        let access = self.key.encrypt(token.access_token.expose_secret());
        let refresh = token
            .refresh_token
            .as_ref()
            .map(|r| self.key.encrypt(r.expose_secret()));
        sqlx::query(
            "INSERT INTO crm_tokens (system, key_version, access_token_enc, refresh_token_enc, api_domain, expires_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, now()) \
             ON CONFLICT (system) DO UPDATE SET key_version = EXCLUDED.key_version, \
               access_token_enc = EXCLUDED.access_token_enc, \
               refresh_token_enc = coalesce(EXCLUDED.refresh_token_enc, crm_tokens.refresh_token_enc), \
               api_domain = EXCLUDED.api_domain, expires_at = EXCLUDED.expires_at, updated_at = now()",
        )
        .bind(system)
        .bind(KEY_VERSION)
        .bind(access)
        .bind(refresh)
        .bind(&token.api_domain)
        .bind(token.expires_at)
        .execute(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(())
    }

    async fn lock_refresh(&self, system: &str) -> Result<RefreshGuard, TokenStoreError> {
        let turn = self.refreshing.turn(system).await;
        // Then, across processes, a connection of its own holding a session lock: dropping it
        // closes the connection, which releases the lock even if the worker dies.
        let mut conn = PgConnection::connect_with(&self.pool.connect_options())
            .await
            .map_err(store_err)?;
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("crm-refresh:{system}"))
            .execute(&mut conn)
            .await
            .map_err(store_err)?;
        // The connection is closed before the turn is given to the next refresher here.
        Ok(RefreshGuard::new((conn, turn)))
    }
}

/// Spaces requests at least `1/rps` apart across every process sharing the database. A request
/// takes the single slot of a `rate_limits` row only when that slot is due, moving it one
/// interval ahead; otherwise it sleeps until the slot is due and competes again. Nothing is
/// reserved in advance, so waiting callers never build a queue of future slots, and late
/// wake-ups (a busy machine) cannot turn into a burst. Within a process the callers take turns
/// (first come, first served), so however many deliveries wait, one per process polls the row.
///
/// Slots are 2 % longer than `1/rps`: the CRM counts arrivals, and a request sent on time can
/// arrive a little late while the next one arrives on time; 2 % leaves 20 ms of such slack in
/// every second for 2 % of the rate.
pub struct PgPacer {
    pool: PgPool,
    name: String,
    interval: Duration,
    turn: tokio::sync::Mutex<()>,
}

impl PgPacer {
    pub fn new(pool: PgPool, name: impl Into<String>, rps: u32) -> Self {
        Self {
            pool,
            name: name.into(),
            interval: Duration::from_secs_f64(SLOT_MARGIN / f64::from(rps.max(1))),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Takes the slot if it is due: `Ok(None)`; else how long until it is due.
    async fn try_take(&self) -> Result<Option<Duration>, sqlx::Error> {
        let secs = self.interval.as_secs_f64();
        // One statement: take the slot if it is due, else say how long until it is. Its commit
        // does not wait for the disk (losing a slot in a crash is harmless), so the request
        // leaves right after the slot is taken, not a variable flush later.
        let (taken, wait_us): (bool, Option<i64>) = sqlx::query_as(
            "WITH taken AS ( \
               UPDATE rate_limits SET next_slot = clock_timestamp() + make_interval(secs => $2) \
               FROM (SELECT set_config('synchronous_commit', 'off', true)) AS local \
               WHERE name = $1 AND next_slot <= clock_timestamp() RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM taken), \
               (SELECT greatest(0, (extract(epoch FROM (greatest(next_slot, clock_timestamp()) - clock_timestamp())) * 1e6)::bigint) \
                FROM rate_limits WHERE name = $1)",
        )
        .bind(&self.name)
        .bind(secs)
        .fetch_one(&self.pool)
        .await?;
        if taken {
            return Ok(None);
        }
        let Some(wait_us) = wait_us else {
            // The first request of this name anywhere: create its slot, due at once.
            sqlx::query("INSERT INTO rate_limits (name, next_slot) VALUES ($1, '-infinity') ON CONFLICT DO NOTHING")
                .bind(&self.name)
                .execute(&self.pool)
                .await?;
            return Ok(Some(Duration::ZERO));
        };
        Ok(Some(Duration::from_micros(wait_us.max(1000) as u64)))
    }
}

#[async_trait]
impl Pacer for PgPacer {
    /// Moves the shared slot past `wait`: every process's next request waits for it.
    async fn hold_off(&self, wait: Duration) {
        let held = sqlx::query(
            "UPDATE rate_limits \
             SET next_slot = greatest(next_slot, clock_timestamp() + make_interval(secs => $2)) \
             WHERE name = $1",
        )
        .bind(&self.name)
        .bind(wait.as_secs_f64())
        .execute(&self.pool)
        .await;
        if let Err(e) = held {
            tracing::warn!(error = %e, "could not pause the shared pacing after a 429");
        }
    }

    async fn acquire(&self) {
        let _turn = self.turn.lock().await;
        let mut failures = 0u32;
        loop {
            match self.try_take().await {
                Ok(None) => return,
                // Wake a little after the slot, with a little jitter so that the processes
                // (one waiter each) do not always arrive in the same order. Every moment slept
                // past the slot is lost to the rate, so the jitter is small.
                Ok(Some(wait)) => {
                    let jitter = Duration::from_micros(fastrand::u64(
                        0..=self.interval.as_micros() as u64 / 100,
                    ));
                    tokio::time::sleep(wait + jitter).await;
                }
                // Without the database there is no shared pacing, and pacing each process on
                // its own would let several together go over the account's limit (429s, then a
                // block of the IP): wait for the database. (The delivery cannot be settled
                // without it either; it is given up when its lease can no longer be renewed.)
                Err(e) => {
                    // Said once, then every half minute or so, louder: Kommo deliveries wait.
                    if failures == 0 {
                        tracing::warn!(error = %e, "the shared pacing cannot be read; waiting for the database");
                    } else if failures.is_multiple_of(60) {
                        tracing::error!(error = %e, failures, "the shared pacing still cannot be read; Kommo deliveries are waiting");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(self.interval.max(Duration::from_millis(500))).await;
                }
            }
        }
    }
}

/// A concurrency limit shared by every process on the database (Zoho's calls in flight): `n`
/// slot rows in `call_slots`, each call holding one under a lease that a task of the holder
/// renews every third of the lease while the call runs. A process that dies holding slots loses
/// them when their leases end; a live holder never does, however long its call (token refresh
/// and retry included). Each acquisition is its own holder, so a late release can only free its
/// own slot. Within a process the waiters take turns (first come, first served): one of them
/// polls the table, and a slot released by this process wakes it at once.
pub struct PgCallSlots {
    inner: std::sync::Arc<SlotsInner>,
}

struct SlotsInner {
    pool: PgPool,
    name: String,
    slots: i32,
    lease: Duration,
    turn: tokio::sync::Mutex<()>,
    released: tokio::sync::Notify,
    rows_ensured: std::sync::atomic::AtomicBool,
    /// The holders of this instance that may hold a slot: from the start of their acquisition
    /// until their release has committed.
    holders: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Set by `close`: a slot taken after it is given back at once.
    closed: std::sync::atomic::AtomicBool,
    /// Attempts to take a slot and releases under way (in tasks of their own); `close` waits
    /// for them.
    busy: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One attempt or release under way (see [`SlotsInner::busy`]).
struct Busy(std::sync::Arc<SlotsInner>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self
            .0
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl SlotsInner {
    fn busy(self: &std::sync::Arc<Self>) -> Busy {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(self.clone())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// One attempt of `holder` to take a slot; a slot taken after `close` is given back.
    async fn attempt(
        self: std::sync::Arc<Self>,
        holder: uuid::Uuid,
    ) -> Result<Option<i32>, sqlx::Error> {
        let _busy = self.busy();
        let taken = self.try_take(holder).await?;
        if taken.is_some() && self.is_closed() {
            self.release(vec![holder]).await?;
            return Ok(None);
        }
        Ok(taken)
    }

    /// Takes a free slot (never held, released, or with its lease over) for `holder`, if any.
    async fn try_take(&self, holder: uuid::Uuid) -> Result<Option<i32>, sqlx::Error> {
        // Its commit does not wait for the disk: after a crash of the server the slot is free
        // again once its lease ends (the holder's renewals find it gone and stop).
        sqlx::query_scalar(
            "WITH free AS ( \
               SELECT slot FROM call_slots \
               WHERE name = $1 AND slot < $3 \
                 AND (holder IS NULL OR lease_until < clock_timestamp()) \
               ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED) \
             UPDATE call_slots c \
             SET holder = $2, lease_until = clock_timestamp() + make_interval(secs => $4) \
             FROM free, (SELECT set_config('synchronous_commit', 'off', true)) AS local \
             WHERE c.name = $1 AND c.slot = free.slot \
             RETURNING c.slot",
        )
        .bind(&self.name)
        .bind(holder)
        .bind(self.slots)
        .bind(self.lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
    }

    fn forget(&self, holder: uuid::Uuid) {
        if let Ok(mut holders) = self.holders.lock() {
            holders.remove(&holder);
        }
    }

    /// Frees the slots of `holders` (none: a no-op) and wakes this process's waiters.
    async fn release(&self, holders: Vec<uuid::Uuid>) -> Result<(), sqlx::Error> {
        if holders.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE call_slots SET holder = NULL, lease_until = NULL \
             FROM (SELECT set_config('synchronous_commit', 'off', true)) AS local \
             WHERE name = $1 AND holder = ANY($2)",
        )
        .bind(&self.name)
        .bind(holders)
        .execute(&self.pool)
        .await?;
        self.released.notify_waiters();
        Ok(())
    }

    /// [`Self::release`] in a task of its own (from a `Drop`), after `attempt` (one under way
    /// when an acquisition was cancelled), if a runtime is still there; otherwise the lease frees
    /// the slot.
    fn release_later(
        self: &std::sync::Arc<Self>,
        holder: uuid::Uuid,
        attempt: Option<tokio::task::JoinHandle<Result<Option<i32>, sqlx::Error>>>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.forget(holder);
            return;
        };
        let busy = self.busy();
        runtime.spawn(async move {
            if let Some(attempt) = attempt {
                let _ = attempt.await;
            }
            if let Err(e) = busy.0.release(vec![holder]).await {
                tracing::warn!(error = %e, "cannot release a call slot; its lease will");
            }
            busy.0.forget(holder);
            drop(busy);
        });
    }
}

/// An acquisition under way: if it is dropped before it hands out its guard (cancelled), the
/// slot it may have taken is released once its attempt to take one has ended (each attempt runs
/// in a task of its own, so a cancellation cannot leave a statement in flight that takes a slot
/// after the release).
struct Acquiring {
    inner: std::sync::Arc<SlotsInner>,
    holder: uuid::Uuid,
    done: bool,
    attempt: Option<tokio::task::JoinHandle<Result<Option<i32>, sqlx::Error>>>,
}

impl Acquiring {
    async fn try_take(&mut self) -> Result<Option<i32>, sqlx::Error> {
        let attempt = self
            .attempt
            .insert(tokio::spawn(self.inner.clone().attempt(self.holder)));
        let taken = attempt.await;
        self.attempt = None;
        taken.unwrap_or_else(|e| Err(sqlx::Error::Protocol(format!("taking a call slot: {e}"))))
    }
}

impl Drop for Acquiring {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.inner.release_later(self.holder, self.attempt.take());
    }
}

/// How often a process waiting for a slot held elsewhere looks again.
const SLOT_POLL: Duration = Duration::from_millis(10);
/// How long `acquire` retries a failing database before calling without a shared slot.
const SLOT_DB_PATIENCE: Duration = Duration::from_secs(5);

impl PgCallSlots {
    /// `slots` calls at once across every process using `name`; a dead holder's slot is free
    /// again after `lease`.
    pub fn new(pool: PgPool, name: impl Into<String>, slots: usize, lease: Duration) -> Self {
        Self {
            inner: std::sync::Arc::new(SlotsInner {
                pool,
                name: name.into(),
                slots: i32::try_from(slots.max(1)).unwrap_or(i32::MAX),
                lease: lease.max(Duration::from_millis(300)),
                turn: tokio::sync::Mutex::new(()),
                released: tokio::sync::Notify::new(),
                rows_ensured: std::sync::atomic::AtomicBool::new(false),
                holders: std::sync::Mutex::new(std::collections::HashSet::new()),
                closed: std::sync::atomic::AtomicBool::new(false),
                busy: std::sync::atomic::AtomicUsize::new(0),
                idle: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Creates this process's slot rows the first time (another process may use fewer).
    async fn ensure_rows(&self) -> Result<(), sqlx::Error> {
        let s = &self.inner;
        sqlx::query(
            "INSERT INTO call_slots (name, slot) \
             SELECT $1, g FROM generate_series(0, $2 - 1) AS g ON CONFLICT DO NOTHING",
        )
        .bind(&s.name)
        .bind(s.slots)
        .execute(&s.pool)
        .await?;
        s.rows_ensured
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The guard of slot `slot` held by `holder`: renews the lease while held, releases on drop.
    fn guard(&self, slot: i32, holder: uuid::Uuid) -> crm::SlotGuard {
        let inner = self.inner.clone();
        let renewing = {
            let inner = inner.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(inner.lease / 3).await;
                    let renewed = sqlx::query(
                        "UPDATE call_slots SET lease_until = clock_timestamp() + make_interval(secs => $4) \
                         FROM (SELECT set_config('synchronous_commit', 'off', true)) AS local \
                         WHERE name = $1 AND slot = $2 AND holder = $3",
                    )
                    .bind(&inner.name)
                    .bind(slot)
                    .bind(holder)
                    .bind(inner.lease.as_secs_f64())
                    .execute(&inner.pool)
                    .await;
                    match renewed {
                        Ok(r) if r.rows_affected() == 0 => return,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, slot, "cannot renew a call slot's lease")
                        }
                    }
                }
            })
        };
        crm::SlotGuard::new(move || {
            renewing.abort();
            inner.release_later(holder, None);
        })
    }
}

#[async_trait]
impl crm::CallSlots for PgCallSlots {
    async fn acquire(&self) -> crm::SlotGuard {
        let _turn = self.inner.turn.lock().await;
        if self.inner.is_closed() {
            // (Stopping: nothing is shared any more.)
            return crm::SlotGuard::none();
        }
        let holder = uuid::Uuid::new_v4();
        if let Ok(mut holders) = self.inner.holders.lock() {
            holders.insert(holder);
        }
        let mut acquiring = Acquiring {
            inner: self.inner.clone(),
            holder,
            done: false,
            attempt: None,
        };
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            // Registered before looking, so a release in between is not missed.
            let released = self.inner.released.notified();
            let pause = match acquiring.try_take().await {
                Ok(Some(slot)) => {
                    acquiring.done = true;
                    return self.guard(slot, holder);
                }
                Ok(None)
                    if !self
                        .inner
                        .rows_ensured
                        .load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    match self.ensure_rows().await {
                        Ok(()) => continue,
                        Err(e) => Err(e),
                    }
                }
                Ok(None) if self.inner.is_closed() => return crm::SlotGuard::none(),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match pause {
                Ok(()) => {
                    failing_since = None;
                    let jitter = Duration::from_micros(fastrand::u64(0..=5_000));
                    tokio::select! {
                        () = released => {}
                        () = tokio::time::sleep(SLOT_POLL + jitter) => {}
                    }
                }
                // The database is failing: retry a while, then call without a shared slot (the
                // client's own bound still holds; deliveries need the database anyway).
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= SLOT_DB_PATIENCE {
                        tracing::warn!(error = %e, "cannot take a call slot; calling unshared");
                        // (`acquiring` releases whatever a failed attempt may have taken.)
                        return crm::SlotGuard::none();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn close(&self) {
        let inner = &self.inner;
        inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        // Attempts and releases under way end first (a take that commits now gives its slot
        // back itself); a stuck database is not waited for long.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let idle = inner.idle.notified();
                if inner.busy.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
        let holders: Vec<uuid::Uuid> = match inner.holders.lock() {
            Ok(mut holders) => holders.drain().collect(),
            Err(_) => return,
        };
        let count = holders.len();
        if let Err(e) = self.inner.release(holders).await {
            tracing::warn!(error = %e, count, "cannot give back call slots; their leases will");
        }
    }
}
