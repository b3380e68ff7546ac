//! Running one command: load the aggregate (snapshot + newer events, or all events of a stream
//! known to be short), check the caller's expected version, let the aggregate decide, commit its
//! events with the command's metadata, and report the new version and the global position of
//! the last event.
//!
//! A concurrent writer on the same aggregate makes the commit fail on the events' primary key
//! (optimistic concurrency). Without `If-Match` the command is simply decided again on the new
//! state (a few times); with it, the caller learns that its version is stale. A commit that
//! PostgreSQL rolled back as a deadlock's victim or for a serialization failure is decided again
//! too (after a short pause), whether or not the caller sent `If-Match`: nothing of it was
//! written.

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventUpcaster, PersistedEventStore, SerializedEvent};
use cqrs_es::{Aggregate, AggregateError, EventStore};
use domain::{CommandMetadata, DomainError, ErrorKind};
use postgres_es::PostgresEventRepository;
use serde::Serialize;
use sqlx::PgPool;
use std::time::Duration;
use store::listener::Notifications;
use uuid::Uuid;

/// The event store of one aggregate type.
pub type Store<A> = PersistedEventStore<PostgresEventRepository, A>;

/// How often a command is decided again after losing a race (without `If-Match`) or after its
/// commit was rolled back (deadlock, serialization failure).
const CONFLICT_RETRIES: usize = 5;

/// How long a command waits for its event's notification (which carries the event's global
/// position) before asking the database instead.
const NOTIFICATION_WAIT: Duration = Duration::from_secs(1);

/// What a successful command reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub id: Uuid,
    /// The aggregate's version (its last event's sequence) after the command.
    pub version: i64,
    /// The global position of the command's last event; for a command that changed nothing,
    /// that of the aggregate's last event.
    pub position: i64,
    /// How many events the command wrote (0 for an idempotent no-op).
    pub events: usize,
}

/// Why a command was not carried out. Nothing was written in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The aggregate refused the command.
    #[error("{message}")]
    Domain {
        kind: ErrorKind,
        code: &'static str,
        message: String,
    },
    /// `If-Match` named another version than the current one.
    #[error("the {aggregate} is at version {actual}, not {expected}")]
    VersionMismatch {
        aggregate: &'static str,
        expected: i64,
        actual: i64,
    },
    /// Lost the race against concurrent writers too many times.
    #[error("the {0} was changed concurrently; try again")]
    Concurrency(&'static str),
    /// The vehicle schedule refused the change (overlap with a booking or a block).
    #[error("{message}")]
    VehicleUnavailable {
        message: String,
        /// The clash as JSON (vehicle_id, source_type, source_id, start_at, end_at), when known.
        detail: Option<serde_json::Value>,
    },
    /// A human code is taken already.
    #[error("the code {0} is already taken")]
    CodeTaken(String),
    /// A retry of the same request (same `Idempotency-Key`) took this command's claim over
    /// while it ran, so it was not written; the retry answers for the request.
    #[error("a retry of this request took it over; its answer is the request's answer")]
    Superseded,
    /// The database failed; logged, never shown in detail.
    #[error("the event store failed: {0}")]
    Store(String),
}

impl CommandError {
    fn from_domain<E: DomainError>(e: E) -> Self {
        Self::Domain {
            kind: e.kind(),
            code: e.code(),
            message: e.to_string(),
        }
    }

    /// Whether the store's transaction was rolled back whole for a reason that deciding again
    /// may not meet: a deadlock or a serialization failure (PostgreSQL asks to retry both).
    fn is_transient<E: std::error::Error>(e: &AggregateError<E>) -> bool {
        let (AggregateError::UnexpectedError(b) | AggregateError::DatabaseConnectionError(b)) = e
        else {
            return false;
        };
        match b.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }

    /// Classifies a failure of the store: a rule kept by the database, or a real failure.
    fn from_store<E: std::error::Error>(e: AggregateError<E>) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync> = match e {
            AggregateError::UnexpectedError(b) | AggregateError::DatabaseConnectionError(b) => b,
            // serde's message can quote the stored payload (personal data); it is logged.
            AggregateError::DeserializationError(b) => {
                return Self::Store(format!(
                    "a stored event cannot be decoded: {}",
                    store::redact::serde_message(&b.to_string())
                ));
            }
            other => return Self::Store(other.to_string()),
        };
        if let Some(sqlx::Error::Database(db)) = boxed.downcast_ref::<sqlx::Error>() {
            let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            match db.code().as_deref() {
                Some("SX002") => {
                    return Self::VehicleUnavailable {
                        message: db.message().to_string(),
                        detail: pg
                            .and_then(|p| p.detail())
                            .and_then(|d| serde_json::from_str(d).ok()),
                    };
                }
                Some("23P01") => {
                    return Self::VehicleUnavailable {
                        message: "the vehicle was booked for an overlapping period at the same \
                                  moment by another request"
                            .into(),
                        detail: None,
                    };
                }
                Some("SX003") => return Self::Superseded,
                Some("SX001") => {
                    return Self::CodeTaken(
                        pg.and_then(|p| p.detail()).unwrap_or_default().to_string(),
                    );
                }
                _ => {}
            }
        }
        Self::Store(boxed.to_string())
    }
}

/// Runs commands of aggregate `A`.
pub struct Executor<A: Aggregate<Services = ()>> {
    store: Store<A>,
    /// With snapshots: the same repository without them, for streams known to be short.
    short: Option<ShortStreams<A>>,
    pool: PgPool,
    /// Where the commit's notification tells the position of the written event.
    notifications: Notifications,
    /// The stores' upcasters, for [`Self::replay_many`], which reads the events itself.
    upcasters: Vec<Box<dyn EventUpcaster>>,
}

/// How many streams [`ShortStreams`] remembers before it starts afresh.
const SHORT_STREAMS_REMEMBERED: usize = 100_000;

/// Streams this process has seen shorter than half the snapshot interval, by last seen version.
/// Such a stream has no snapshot worth reading, so it is loaded in one query (all its events)
/// instead of two (the snapshot, then the newer events), and committed without a snapshot.
///
/// What is remembered only chooses the way of loading: both ways give the same state, and each
/// commits through the store it loaded with (a snapshot store's commit trusts the snapshot it
/// loaded). A stream that another process has lengthened meanwhile is just loaded whole once;
/// a snapshot such a commit skips is taken by a later commit on the snapshot path.
struct ShortStreams<A: Aggregate> {
    store: Store<A>,
    /// Versions below this count as short.
    below: usize,
    versions: std::sync::Mutex<std::collections::HashMap<Uuid, u32>>,
}

impl<A: Aggregate> ShortStreams<A> {
    fn is_short(&self, id: Uuid) -> bool {
        self.lock()
            .get(&id)
            .is_some_and(|&version| (version as usize) < self.below)
    }

    /// Version 0 (no such stream yet) is not remembered: ids that never become streams (refused
    /// creations, lookups of unknown ids) take no room.
    fn remember(&self, id: Uuid, version: usize) {
        let mut versions = self.lock();
        let Some(version) = u32::try_from(version)
            .ok()
            .filter(|&v| v > 0 && (v as usize) < self.below)
        else {
            versions.remove(&id);
            return;
        };
        if versions.len() >= SHORT_STREAMS_REMEMBERED && !versions.contains_key(&id) {
            versions.clear();
        }
        versions.insert(id, version);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, u32>> {
        // The map holds only hints: one left behind by a panic is still usable.
        self.versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<A> Executor<A>
where
    A: Aggregate<Services = ()> + 'static,
    A::Command: Clone,
    A::Error: DomainError,
{
    /// `snapshot_every`: take a snapshot each N events (None: replay the whole stream).
    pub fn new(pool: PgPool, snapshot_every: Option<usize>) -> Self {
        let event_store = || {
            PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()))
                .with_upcasters(domain::upcasting::upcasters())
        };
        let (store, short) = match snapshot_every {
            Some(n) => (
                PersistedEventStore::new_snapshot_store(
                    PostgresEventRepository::new(pool.clone()),
                    n,
                )
                .with_upcasters(domain::upcasting::upcasters()),
                Some(ShortStreams {
                    store: event_store(),
                    below: n / 2,
                    versions: Default::default(),
                }),
            ),
            None => (event_store(), None),
        };
        Self {
            store,
            short,
            notifications: Notifications::new(pool.clone()),
            upcasters: domain::upcasting::upcasters(),
            pool,
        }
    }

    /// Decides and commits `command` on aggregate `id`.
    pub async fn execute(
        &self,
        id: Uuid,
        command: A::Command,
        metadata: &CommandMetadata,
        expected_version: Option<i64>,
    ) -> Result<Outcome, CommandError> {
        self.run(id, command, metadata, expected_version, false)
            .await
    }

    /// [`Self::execute`] for a creation on an id the caller has just made up (or one fixed in an
    /// event, whose stream is at most a few events long): the stream is loaded in one query, as a
    /// short one, instead of asking first for a snapshot it cannot have. Only the way of loading
    /// differs: an id that does have a stream gets the same state, and the same refusal.
    pub async fn create(
        &self,
        id: Uuid,
        command: A::Command,
        metadata: &CommandMetadata,
        expected_version: Option<i64>,
    ) -> Result<Outcome, CommandError> {
        self.run(id, command, metadata, expected_version, true)
            .await
    }

    async fn run(
        &self,
        id: Uuid,
        command: A::Command,
        metadata: &CommandMetadata,
        expected_version: Option<i64>,
        new_stream: bool,
    ) -> Result<Outcome, CommandError> {
        let aggregate_id = id.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let store = match &self.short {
                Some(short) if new_stream && attempt == 1 => &short.store,
                _ => self.store_for(id),
            };
            let mut context = store
                .load_aggregate(&aggregate_id)
                .await
                .map_err(CommandError::from_store)?;
            self.remember(id, context.current_sequence);
            let current = context.current_sequence as i64;
            if let Some(expected) = expected_version
                && expected != current
            {
                return Err(CommandError::VersionMismatch {
                    aggregate: A::TYPE,
                    expected,
                    actual: current,
                });
            }
            let sink = EventSink::default();
            context
                .aggregate
                .handle(command.clone(), &(), &sink)
                .await
                .map_err(CommandError::from_domain)?;
            let events = sink.collect().await;
            if events.is_empty() {
                return Ok(Outcome {
                    id,
                    version: current,
                    position: self.position_of(&aggregate_id, current).await?,
                    events: 0,
                });
            }
            let written = events.len();
            let last = current + written as i64;
            // Before committing, so that a notification arriving before `commit` returns is
            // not missed.
            let expected = self
                .notifications
                .expect_commit(A::TYPE, &aggregate_id, last);
            match store.commit(events, context, metadata.to_map()).await {
                Ok(envelopes) => {
                    let version = envelopes.last().map_or(current, |e| e.sequence as i64);
                    self.remember(id, version as usize);
                    let notified = match expected {
                        Some(e) if version == last => e.position(NOTIFICATION_WAIT).await,
                        _ => None,
                    };
                    let position = match notified {
                        Some(p) => p,
                        None => self.position_of(&aggregate_id, version).await?,
                    };
                    return Ok(Outcome {
                        id,
                        version,
                        position,
                        events: written,
                    });
                }
                Err(AggregateError::AggregateConflict) => {
                    if expected_version.is_some() {
                        let actual = self.version_of(&aggregate_id).await?;
                        return Err(CommandError::VersionMismatch {
                            aggregate: A::TYPE,
                            expected: current,
                            actual,
                        });
                    }
                    if attempt > CONFLICT_RETRIES {
                        return Err(CommandError::Concurrency(A::TYPE));
                    }
                    tracing::debug!(aggregate = A::TYPE, %id, attempt, "lost a race; deciding again");
                }
                Err(e) if CommandError::is_transient(&e) && attempt <= CONFLICT_RETRIES => {
                    tracing::warn!(
                        aggregate = A::TYPE,
                        %id,
                        attempt,
                        error = %e,
                        "the commit was rolled back (deadlock or serialization failure); \
                         deciding again"
                    );
                    // Apart, so that the writers that met do not meet again at once.
                    tokio::time::sleep(Duration::from_millis(10 * attempt as u64)).await;
                }
                Err(e) => return Err(CommandError::from_store(e)),
            }
        }
    }

    /// Whether the aggregate (`id`'s current state, or a new one for a creation) would accept
    /// `command`, storing nothing: the domain's refusal, before a caller spends something on
    /// the command (a code number, which is never given back). `execute` decides again on the
    /// state it loads.
    pub async fn would_accept(
        &self,
        id: Option<Uuid>,
        command: A::Command,
    ) -> Result<(), CommandError> {
        let mut aggregate = match id {
            Some(id) => self.replay(id, None).await?.0,
            None => A::default(),
        };
        let sink = EventSink::default();
        aggregate
            .handle(command, &(), &sink)
            .await
            .map_err(CommandError::from_domain)
    }

    /// The aggregate's state by replaying its events, up to a version if given.
    pub async fn replay(
        &self,
        id: Uuid,
        up_to_version: Option<i64>,
    ) -> Result<(A, i64), CommandError> {
        let envelopes = self
            .store
            .load_events(&id.to_string())
            .await
            .map_err(CommandError::from_store)?;
        let mut aggregate = A::default();
        let mut version = 0;
        for e in envelopes {
            if up_to_version.is_some_and(|v| e.sequence as i64 > v) {
                break;
            }
            version = e.sequence as i64;
            aggregate.apply(e.payload);
        }
        if up_to_version.is_none() {
            self.remember(id, version as usize);
        }
        Ok((aggregate, version))
    }

    /// The current states of several aggregates, by replaying their events, in one query: what
    /// [`Self::replay`] gives for each id (an id with no events is the default, not created),
    /// with the same upcasting. For readers of many aggregates at once, such as the outbox
    /// worker's deliveries of one claim.
    pub async fn replay_many(
        &self,
        ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, (A, i64)>, CommandError> {
        let mut states: std::collections::HashMap<Uuid, (A, i64)> =
            ids.iter().map(|&id| (id, (A::default(), 0))).collect();
        if states.is_empty() {
            return Ok(states);
        }
        let keys: Vec<String> = states.keys().map(Uuid::to_string).collect();
        let rows: Vec<(String, i64, String, String, String)> = sqlx::query_as(
            "SELECT aggregate_id, sequence, event_type, event_version, payload::text \
             FROM events WHERE aggregate_type = $1 AND aggregate_id = ANY($2) \
             ORDER BY aggregate_id, sequence",
        )
        .bind(A::TYPE)
        .bind(&keys)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| CommandError::Store(e.to_string()))?;
        for (aggregate_id, sequence, event_type, event_version, payload) in rows {
            // serde's message can quote the payload (personal data): only where it failed.
            let undecodable = |e: serde_json::Error| {
                CommandError::Store(format!(
                    "cannot decode {event_type} {event_version} of {} {aggregate_id}: {:?} error \
                     at line {} column {}",
                    A::TYPE,
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            };
            // The stores' own upcasting (cqrs-es folds the upcasters over each stored event);
            // a payload no upcaster touches is decoded straight from its text.
            let event: A::Event = if self
                .upcasters
                .iter()
                .any(|u| u.can_upcast(&event_type, &event_version))
            {
                let stored = SerializedEvent::new(
                    aggregate_id.clone(),
                    sequence as usize,
                    A::TYPE.to_string(),
                    event_type.clone(),
                    event_version.clone(),
                    serde_json::from_str(&payload).map_err(undecodable)?,
                    serde_json::Value::Null,
                );
                let upcast = self.upcasters.iter().fold(stored, |e, u| {
                    if u.can_upcast(&e.event_type, &e.event_version) {
                        u.upcast(e)
                    } else {
                        e
                    }
                });
                serde_json::from_value(upcast.payload).map_err(undecodable)?
            } else {
                serde_json::from_str(&payload).map_err(undecodable)?
            };
            let id = Uuid::parse_str(&aggregate_id)
                .map_err(|e| CommandError::Store(format!("aggregate id {aggregate_id}: {e}")))?;
            if let Some((aggregate, version)) = states.get_mut(&id) {
                aggregate.apply(event);
                *version = sequence;
            }
        }
        for (&id, (_, version)) in &states {
            self.remember(id, *version as usize);
        }
        Ok(states)
    }

    /// The store to load (and then commit) `aggregate_id` with: without the snapshot lookup if
    /// the stream is known to be short.
    fn store_for(&self, id: Uuid) -> &Store<A> {
        match &self.short {
            Some(short) if short.is_short(id) => &short.store,
            _ => &self.store,
        }
    }

    fn remember(&self, id: Uuid, version: usize) {
        if let Some(short) = &self.short {
            short.remember(id, version);
        }
    }

    async fn position_of(&self, aggregate_id: &str, sequence: i64) -> Result<i64, CommandError> {
        if sequence == 0 {
            return Ok(0);
        }
        sqlx::query_scalar(
            "SELECT global_position FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(sequence)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| CommandError::Store(e.to_string()))
    }

    async fn version_of(&self, aggregate_id: &str) -> Result<i64, CommandError> {
        sqlx::query_scalar(
            "SELECT coalesce(max(sequence), 0) FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| CommandError::Store(e.to_string()))
    }
}
