//! postgres-es's `PostgresEventRepository` against the project's migrations.

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, DomainEvent, EventStore};
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use store::testing::TestDb;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    value: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CounterEvent {
    Added { by: i64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        "CounterAdded".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CounterError(String);

impl Aggregate for Counter {
    const TYPE: &'static str = "Counter";
    type Command = i64;
    type Event = CounterEvent;
    type Error = CounterError;
    type Services = ();

    async fn handle(
        &mut self,
        by: i64,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CounterError> {
        if by <= 0 {
            return Err(CounterError("must add a positive amount".into()));
        }
        sink.write(CounterEvent::Added { by }, self).await;
        Ok(())
    }

    fn apply(&mut self, event: CounterEvent) {
        let CounterEvent::Added { by } = event;
        self.value += by;
    }
}

fn store(db: &TestDb) -> PersistedEventStore<PostgresEventRepository, Counter> {
    PersistedEventStore::new_event_store(PostgresEventRepository::new(db.pool.clone()))
}

#[tokio::test]
async fn persists_and_loads_an_aggregate_and_the_events_join_the_global_log() {
    let db = TestDb::new().await;
    let cqrs = cqrs_es::CqrsFramework::new(store(&db), vec![], ());
    let meta = HashMap::from([("actor".to_string(), "system".to_string())]);
    cqrs.execute_with_metadata("c-1", 2, meta.clone())
        .await
        .unwrap();
    cqrs.execute_with_metadata("c-1", 5, meta).await.unwrap();
    let err = cqrs.execute("c-1", -1).await.unwrap_err();
    assert!(matches!(err, AggregateError::UserError(_)));

    let mut loaded = store(&db).load_aggregate("c-1").await.unwrap();
    assert_eq!(cqrs_es::AggregateContext::aggregate(&mut loaded).value, 7);

    let log = crate::read_log(&db.pool, 2).await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].aggregate_type, "Counter");
    assert_eq!(log[0].sequence, 1);
    assert_eq!(log[1].sequence, 2);
    assert_eq!(log[0].metadata["actor"], "system");
    assert!(log[0].position < log[1].position);
}

#[tokio::test]
async fn a_stale_writer_gets_an_optimistic_concurrency_conflict() {
    let db = TestDb::new().await;
    let store = store(&db);
    let first = store.load_aggregate("c-2").await.unwrap();
    let second = store.load_aggregate("c-2").await.unwrap();
    store
        .commit(vec![CounterEvent::Added { by: 1 }], first, HashMap::new())
        .await
        .unwrap();
    let err = store
        .commit(vec![CounterEvent::Added { by: 10 }], second, HashMap::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, AggregateError::AggregateConflict),
        "got {err:?}"
    );
    let events = store.load_events("c-2").await.unwrap();
    assert_eq!(events.len(), 1, "the stale write left nothing behind");
}

#[tokio::test]
async fn events_are_append_only() {
    let db = TestDb::new().await;
    let cqrs = cqrs_es::CqrsFramework::new(store(&db), vec![], ());
    cqrs.execute("c-3", 1).await.unwrap();
    let err = sqlx::query("UPDATE events SET payload = '{}'")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = sqlx::query("DELETE FROM events")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
}
