//! One LISTEN connection per process (per pool), shared by everything in the process that learns
//! from PostgreSQL's notifications:
//! - the followers of the global log (`Wakeups`): a counter of `skyluxse_events` notifications;
//! - commands ([`Notifications::expect_commit`]): each event's notification carries its global
//!   position, so a command learns the position of the event it wrote without querying for it;
//! - the API's key cache ([`Notifications::auth_epoch`]): a `skyluxse_auth` notification (a key
//!   or a staff account changed) ends every lookup cached before it.
//!
//! Notifications are trusted only while the connection is known to deliver: after `LISTEN`, the
//! hub sends itself a probe (a notification on a channel of its own, through the pool) and trusts
//! the connection once the probe comes back within 2 s of being sent; it probes again after 5 s
//! without any notification and whenever a command waited in vain, so a connection that silently
//! stopped delivering (a half-open TCP connection, a proxy in transaction mode) is found within
//! seconds; trust also lapses after 7 s without any sign of delivery (when the pool is too busy
//! to send a probe). The connection is a pool of its own (one connection, outside the shared pool). While
//! it is not trusted, followers poll, commands query, the key cache is bypassed, and waiting
//! commands are released at once; the connection is then opened again. The hub ends with its last
//! member.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{Notify, oneshot, watch};

/// The channel the events table notifies on: one notification per insert statement, one line per
/// event (see `commit_key`).
pub const EVENTS_CHANNEL: &str = "skyluxse_events";
/// The channel `api_keys` and `staff_accounts` notify on when a row changes.
pub const AUTH_CHANNEL: &str = "skyluxse_auth";

/// How often a trusted connection is probed again.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a probe may take to come back before the connection is given up.
const PROBE_WITHIN: Duration = Duration::from_secs(2);
/// Events whose type and id are longer than this are announced without their line (the
/// trigger's limit, which keeps a line well under a payload's 8000 bytes).
const MAX_KEY_BYTES: usize = 1000;

/// What a command waits for: the rest of its event's line after the position. The
/// `events_announce` trigger writes one line per event,
/// `<global_position> <sequence> <aggregate_type> <aggregate_id>`.
fn commit_key(aggregate_type: &str, aggregate_id: &str, sequence: i64) -> String {
    format!("{sequence} {aggregate_type} {aggregate_id}")
}

/// What this process learns from notifications on a pool's database. Cheap to keep; joins the
/// pool's hub on first use (inside a runtime) and again if that hub has ended.
pub struct Notifications {
    pool: PgPool,
    member: Mutex<Option<Member>>,
}

impl Notifications {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            member: Mutex::new(None),
        }
    }

    fn hub(&self) -> Arc<Hub> {
        let mut member = lock(&self.member);
        if let Some(hub) = member.as_ref().and_then(|m| m.hub.upgrade()) {
            return hub;
        }
        let (hub, seen) = join(&self.pool);
        *member = Some(Member {
            hub: Arc::downgrade(&hub),
            _seen: seen,
        });
        hub
    }

    /// Starts waiting for the notification of event `sequence` of the aggregate, to learn its
    /// global position once it is committed. Call it before committing. `None` when the
    /// connection is not trusted right now (then ask the database).
    pub fn expect_commit(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
    ) -> Option<ExpectedCommit> {
        if aggregate_type.len() + aggregate_id.len() > MAX_KEY_BYTES {
            return None;
        }
        let hub = self.hub();
        let key = commit_key(aggregate_type, aggregate_id, sequence);
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut commits = lock(&hub.commits);
            if !commits.listening {
                return None;
            }
            commits.waiting.insert(key.clone(), (token, tx));
        }
        Some(ExpectedCommit {
            hub,
            key,
            token,
            rx,
        })
    }

    /// A value that stays the same as long as no API key or staff account has changed and the
    /// connection has been trusted throughout; `None` while it is not trusted. A lookup made
    /// while the epoch was `e` may be reused as long as the epoch is still `e`.
    pub fn auth_epoch(&self) -> Option<u64> {
        match self.hub().auth_epoch.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }
}

/// A command's wait for its event's notification (see [`Notifications::expect_commit`]).
pub struct ExpectedCommit {
    hub: Arc<Hub>,
    key: String,
    token: u64,
    rx: oneshot::Receiver<i64>,
}

impl ExpectedCommit {
    /// The event's global position, once its notification arrives; `None` if it does not arrive
    /// `within` (or the connection dropped meanwhile): then ask the database.
    pub async fn position(mut self, within: Duration) -> Option<i64> {
        match tokio::time::timeout(within, &mut self.rx).await {
            Ok(received) => received.ok(),
            Err(_) => {
                // Committed, yet not announced: have the hub check its connection now.
                self.hub.doubt.notify_one();
                None
            }
        }
    }
}

impl Drop for ExpectedCommit {
    fn drop(&mut self) {
        let mut commits = lock(&self.hub.commits);
        // Another command of this process may wait for the same event now (a race on the
        // aggregate that this one lost): leave its wait alone.
        if commits
            .waiting
            .get(&self.key)
            .is_some_and(|(t, _)| *t == self.token)
        {
            commits.waiting.remove(&self.key);
        }
    }
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

/// A follower's view of the hub: a counter of event notifications, and whether the connection
/// is trusted now (it listens and its probe came back).
pub(crate) struct Wakeups {
    pub(crate) seen: watch::Receiver<u64>,
    pub(crate) listening: watch::Receiver<bool>,
}

impl Wakeups {
    pub(crate) fn join(pool: &PgPool) -> Self {
        let (hub, seen) = join(pool);
        Self {
            seen,
            listening: hub.listening.subscribe(),
        }
    }
}

/// Keeps a hub running without keeping it from ending when its task has ended: the hub's task
/// runs while anyone holds a receiver of its counter (the member's is only held, never read).
struct Member {
    hub: Weak<Hub>,
    _seen: watch::Receiver<u64>,
}

/// A pool (its clones share one set of connect options, kept alive by the hub's own clone):
/// a hub holds a connection of its members' pool, never of another one, so closing one pool
/// never waits for another pool's members.
type HubKey = usize;

struct Hub {
    /// Counts event notifications; every member holds a receiver, so the hub knows when the
    /// last one is gone.
    seen: watch::Sender<u64>,
    /// Whether the connection is trusted (it listens and its probe came back).
    listening: watch::Sender<bool>,
    /// 0 while not trusted; a new value on every auth notification and every trusted connection.
    auth_epoch: AtomicU64,
    commits: Mutex<Commits>,
    /// Wakes the hub to probe its connection at once.
    doubt: Notify,
    /// The channel of this hub's probes, which nobody else listens on.
    probe_channel: String,
    /// Keeps the key's address taken while the hub is registered.
    _options: Arc<sqlx::postgres::PgConnectOptions>,
}

#[derive(Default)]
struct Commits {
    /// Under the same lock as the waits, so that no wait starts after the connection dropped.
    listening: bool,
    waiting: HashMap<String, (u64, oneshot::Sender<i64>)>,
}

impl Hub {
    fn set_listening(&self, listening: bool) {
        {
            let mut commits = lock(&self.commits);
            commits.listening = listening;
            if !listening {
                // Their notifications may be lost: let them ask the database now.
                commits.waiting.clear();
            }
        }
        let epoch = if listening {
            NEXT_EPOCH.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        self.auth_epoch.store(epoch, Ordering::Release);
        self.listening.send_replace(listening);
    }

    fn received(&self, channel: &str, payload: &str) {
        if channel == AUTH_CHANNEL {
            // Stays 0 while the connection is not trusted yet.
            if self.auth_epoch.load(Ordering::Acquire) != 0 {
                self.auth_epoch.store(
                    NEXT_EPOCH.fetch_add(1, Ordering::Relaxed),
                    Ordering::Release,
                );
            }
            return;
        }
        {
            let mut commits = lock(&self.commits);
            if !commits.waiting.is_empty() {
                for line in payload.lines() {
                    if let Some((position, key)) = line.split_once(' ')
                        && let Ok(position) = position.parse::<i64>()
                        && let Some((_, tx)) = commits.waiting.remove(key)
                    {
                        let _ = tx.send(position);
                    }
                }
            }
        }
        self.seen.send_modify(|n| *n += 1);
    }
}

type Hubs = HashMap<HubKey, Arc<Hub>>;

/// Locks, also after a panic elsewhere while the lock was held (the data stays usable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The process's hubs.
fn registry() -> MutexGuard<'static, Hubs> {
    static HUBS: std::sync::OnceLock<Mutex<Hubs>> = std::sync::OnceLock::new();
    lock(HUBS.get_or_init(Default::default))
}

/// Joins the pool's hub, starting it if there is none.
fn join(pool: &PgPool) -> (Arc<Hub>, watch::Receiver<u64>) {
    let options = pool.connect_options();
    let key: HubKey = Arc::as_ptr(&options) as usize;
    let leave = {
        let mut hubs = registry();
        if let Some(hub) = hubs.get(&key) {
            return (hub.clone(), hub.seen.subscribe());
        }
        let hub = Arc::new(Hub {
            seen: watch::Sender::new(0),
            listening: watch::Sender::new(false),
            auth_epoch: AtomicU64::new(0),
            commits: Mutex::new(Commits::default()),
            doubt: Notify::new(),
            // Unique also across containers (where every process may be pid 1).
            probe_channel: format!(
                "skyluxse_probe_{}_{}_{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
                NEXT_TOKEN.fetch_add(1, Ordering::Relaxed)
            ),
            _options: options,
        });
        hubs.insert(key, hub.clone());
        Leave { key, hub }
    };
    let joined = (leave.hub.clone(), leave.hub.seen.subscribe());
    // Spawned with the registry unlocked: if the task never runs (a runtime shutting down),
    // dropping it drops `leave`, which takes the lock to unregister the hub.
    tokio::spawn(listen(pool.clone(), leave));
    joined
}

/// Takes a hub out of the registry when its task ends, however it ends (also when its runtime
/// shuts down and drops it): its members then see it gone and join a new one.
struct Leave {
    key: HubKey,
    hub: Arc<Hub>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.hub.set_listening(false);
        let mut hubs = registry();
        if hubs
            .get(&self.key)
            .is_some_and(|h| Arc::ptr_eq(h, &self.hub))
        {
            hubs.remove(&self.key);
        }
    }
}

/// A probe sent and not back yet.
struct Probe {
    token: String,
    /// When it is given up: set once the probe has been sent (committed), so that waiting for
    /// a connection of a busy pool does not count against the listening connection.
    by: Option<tokio::time::Instant>,
    task: tokio::task::JoinHandle<()>,
}

/// The hub's task: listens, dispatches notifications, reconnects; ends with its last member.
async fn listen(pool: PgPool, leave: Leave) {
    let hub = leave.hub.clone();
    // Connections in a row that never became trusted (a proxy in transaction mode never
    // delivers): each waits longer before the next.
    let mut failures: u32 = 0;
    // Probes report here once sent: Ok(token), or Err(token) when they could not be.
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Result<String, String>>();
    loop {
        // The last member is gone, or the pool is closed: leave (under the registry's lock, so
        // that nobody joins a hub that is leaving).
        {
            let mut hubs = registry();
            if hub.seen.receiver_count() == 0 || pool.is_closed() {
                hubs.remove(&leave.key);
                return;
            }
        }
        let Some(mut listener) = open(&pool, &hub).await else {
            pause(&pool, &hub, Duration::from_secs(1)).await;
            continue;
        };
        let closed = pool.close_event();
        tokio::pin!(closed);
        // Not trusted until the first probe is back; no longer trusted once nothing has shown
        // that it delivers for longer than a probe cycle (a probe that cannot even be sent
        // proves nothing either way).
        let mut trusted = false;
        let mut ever_trusted = false;
        let mut confirmed = tokio::time::Instant::now();
        let mut probe_due = tokio::time::Instant::now();
        let mut probe: Option<Probe> = None;
        loop {
            let now = tokio::time::Instant::now();
            if trusted && now >= confirmed + PROBE_EVERY + PROBE_WITHIN {
                trusted = false;
                hub.set_listening(false);
            }
            if probe.is_none() && now >= probe_due {
                probe = Some(send_probe(&pool, &hub.probe_channel, sent_tx.clone()));
            }
            let mut wake_at = match &probe {
                Some(p) => p.by,
                None => Some(probe_due),
            };
            if trusted {
                let lapse = confirmed + PROBE_EVERY + PROBE_WITHIN;
                wake_at = Some(wake_at.map_or(lapse, |w| w.min(lapse)));
            }
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(n)) if n.channel() == hub.probe_channel => {
                        if probe.as_ref().is_some_and(|p| p.token == n.payload()) {
                            probe = None;
                            confirmed = tokio::time::Instant::now();
                            probe_due = confirmed + PROBE_EVERY;
                            if !trusted {
                                trusted = true;
                                ever_trusted = true;
                                failures = 0;
                                hub.set_listening(true);
                                // What was committed while nobody listened is found by the
                                // followers' next read.
                                hub.seen.send_modify(|n| *n += 1);
                            }
                        }
                    }
                    Ok(Some(n)) => {
                        hub.received(n.channel(), n.payload());
                        // Delivering, so no need to ask.
                        confirmed = tokio::time::Instant::now();
                        if probe.is_none() {
                            probe_due = confirmed + PROBE_EVERY;
                        }
                    }
                    // The connection dropped or failed: stop trusting it, open a new one.
                    Ok(None) | Err(_) => break,
                },
                sent = sent_rx.recv() => match (sent, &mut probe) {
                    (Some(Ok(token)), Some(p)) if p.token == token => {
                        p.by = Some(tokio::time::Instant::now() + PROBE_WITHIN);
                    }
                    // The pool could not send it (busy or failing): that says nothing about
                    // this connection; try again soon.
                    (Some(Err(token)), Some(p)) if p.token == token => {
                        probe = None;
                        probe_due = tokio::time::Instant::now() + PROBE_WITHIN;
                    }
                    _ => {}
                },
                () = sleep_until(wake_at) => {
                    if probe.as_ref().is_some_and(|p| p.by.is_some_and(|by| by <= tokio::time::Instant::now())) {
                        if failures == 0 {
                            tracing::warn!("the LISTEN connection did not deliver its probe; reconnecting");
                        }
                        break;
                    }
                }
                () = hub.doubt.notified() => {
                    if probe.is_none() {
                        probe_due = tokio::time::Instant::now();
                    }
                }
                () = &mut closed => break,
                () = hub.seen.closed() => break,
            }
        }
        hub.set_listening(false);
        if let Some(p) = probe.take() {
            p.task.abort();
        }
        drop(listener);
        if !ever_trusted {
            failures += 1;
            let backoff = Duration::from_secs(1 << (failures - 1).min(6));
            pause(&pool, &hub, backoff.min(Duration::from_secs(60))).await;
        }
    }
}

/// Opens the hub's connection and listens: on a pool of its own, so that a connection given up
/// as silent (whose closing may hang until TCP gives up) never holds one of the shared pool's
/// connections. Gives up after 10 s, or when the shared pool closes or the last member leaves.
async fn open(pool: &PgPool, hub: &Hub) -> Option<PgListener> {
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with((*pool.connect_options()).clone());
    let attempt = async {
        let mut l = PgListener::connect_with(&own).await?;
        // A lost connection is reported at once (`Ok(None)`), not after the listener has found
        // a new one: nothing is trusted in between.
        l.eager_reconnect(false);
        l.listen_all([EVENTS_CHANNEL, AUTH_CHANNEL, hub.probe_channel.as_str()])
            .await?;
        Ok::<_, sqlx::Error>(l)
    };
    tokio::select! {
        opened = tokio::time::timeout(Duration::from_secs(10), attempt) => match opened {
            Ok(Ok(l)) => Some(l),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot LISTEN; followers poll, commands query");
                None
            }
            Err(_) => {
                tracing::warn!("LISTEN took over 10 s; followers poll, commands query");
                None
            }
        },
        () = pool.close_event() => None,
        () = hub.seen.closed() => None,
    }
}

/// Waits `how_long`, or less if the shared pool closes or the last member leaves.
async fn pause(pool: &PgPool, hub: &Hub, how_long: Duration) {
    tokio::select! {
        () = tokio::time::sleep(how_long) => {}
        () = pool.close_event() => {}
        () = hub.seen.closed() => {}
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends a probe on `channel` through the pool, in a task of its own (the hub keeps receiving
/// meanwhile), which reports on `sent` whether it could.
fn send_probe(
    pool: &PgPool,
    channel: &str,
    sent: tokio::sync::mpsc::UnboundedSender<Result<String, String>>,
) -> Probe {
    let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed).to_string();
    let pool = pool.clone();
    let (channel, payload) = (channel.to_string(), token.clone());
    let task = tokio::spawn(async move {
        let result = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(&payload)
            .execute(&pool)
            .await;
        let _ = sent.send(match result {
            Ok(_) => Ok(payload),
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a LISTEN probe");
                Err(payload)
            }
        });
    });
    Probe {
        token,
        by: None,
        task,
    }
}
