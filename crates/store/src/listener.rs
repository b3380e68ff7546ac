//! One LISTEN connection per process (per pool), shared by everything in the process that learns
//! from PostgreSQL's notifications:
//! - the followers of the global log (`Wakeups`): a counter of `skyluxse_events` notifications;
//! - commands ([`Notifications::expect_commit`]): each event's notification carries its global
//!   position, so a command learns the position of the event it wrote without querying for it;
//! - the API's key cache ([`Notifications::auth_epoch`]): a `skyluxse_auth` notification (a key
//!   or a staff account changed) ends every lookup cached before it.
//!
//! Notifications are trusted only while the connection listens. When it drops, followers poll,
//! commands query, the key cache is bypassed, and waiting commands are released at once; the
//! connection is then opened again. The hub ends with its last member.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{oneshot, watch};

/// The channel the events table notifies on, once per event (see `commit_key`).
pub const EVENTS_CHANNEL: &str = "skyluxse_events";
/// The channel `api_keys` and `staff_accounts` notify on when a row changes.
pub const AUTH_CHANNEL: &str = "skyluxse_auth";

/// What a command waits for: the rest of its event's notification after the position. The
/// `events_announce` trigger writes `<global_position> <sequence> <aggregate_type> <aggregate_id>`.
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
    /// global position once it is committed. Call it before committing. `None` when the process
    /// is not listening right now (then ask the database).
    pub fn expect_commit(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
    ) -> Option<ExpectedCommit> {
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
    /// connection has listened throughout; `None` while it does not listen. A lookup made
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
        tokio::time::timeout(within, &mut self.rx).await.ok()?.ok()
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
/// listens now.
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

/// Keeps a hub running without keeping it from ending when its task has ended.
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
    listening: watch::Sender<bool>,
    /// 0 while not listening; a new value on every auth notification and every connection.
    auth_epoch: AtomicU64,
    commits: Mutex<Commits>,
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
            self.auth_epoch.store(
                NEXT_EPOCH.fetch_add(1, Ordering::Relaxed),
                Ordering::Release,
            );
            return;
        }
        if let Some((position, key)) = payload.split_once(' ')
            && let Ok(position) = position.parse::<i64>()
        {
            let waiting = lock(&self.commits).waiting.remove(key);
            if let Some((_, tx)) = waiting {
                let _ = tx.send(position);
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

/// The hub's task: listens, dispatches notifications, reconnects; ends with its last member.
async fn listen(pool: PgPool, leave: Leave) {
    let hub = leave.hub.clone();
    loop {
        // The last member is gone: leave (under the registry's lock, so that nobody joins a
        // hub that is leaving).
        {
            let mut hubs = registry();
            if hub.seen.receiver_count() == 0 {
                hubs.remove(&leave.key);
                return;
            }
        }
        let listener = match PgListener::connect_with(&pool).await {
            Ok(mut l) => match l.listen_all([EVENTS_CHANNEL, AUTH_CHANNEL]).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; followers poll, commands query");
                    None
                }
            },
            // The pool is closed: nobody can read any more; leave.
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a LISTEN connection; followers poll");
                None
            }
        };
        let Some(mut listener) = listener else {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = hub.seen.closed() => {}
            }
            continue;
        };
        hub.set_listening(true);
        // Whatever was committed while nobody listened is found by the followers' next read.
        hub.seen.send_modify(|n| *n += 1);
        let opened = tokio::time::Instant::now();
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => hub.received(n.channel(), n.payload()),
                    // The connection dropped (`Ok(None)`; the listener would reconnect on its
                    // own, but what was sent meanwhile is lost) or failed: stop trusting it
                    // now, and open a new one.
                    Ok(None) | Err(_) => break,
                },
                () = hub.seen.closed() => break,
            }
        }
        hub.set_listening(false);
        drop(listener);
        if opened.elapsed() < Duration::from_secs(1) {
            // A connection that fails at once is not retried in a loop.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = hub.seen.closed() => {}
            }
        }
    }
}
