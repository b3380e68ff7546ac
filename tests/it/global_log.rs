//! The global-log reader: the classic gap, and a stress run of concurrent writers.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use sqlx::{Postgres, Transaction};
use store::global_log::{self, LogFollower, LogPosition, RecordedEvent};
use store::testing::TestDb;

async fn append(
    tx: &mut Transaction<'_, Postgres>,
    stream: &str,
    sequence: i64,
    payload: serde_json::Value,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Test', $1, $2, 'Tested', '1.0', $3, '{}') RETURNING global_position",
    )
    .bind(stream)
    .bind(sequence)
    .bind(payload)
    .fetch_one(&mut **tx)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_later_commit_with_a_higher_position_waits_for_the_earlier_one() {
    let db = TestDb::new().await;

    let mut a = db.pool.begin().await.unwrap();
    let pos_a = append(&mut a, "a", 1, json!({"who": "A"})).await;
    let mut b = db.pool.begin().await.unwrap();
    let pos_b = append(&mut b, "b", 1, json!({"who": "B"})).await;
    assert!(pos_a < pos_b, "A took the lower position");
    b.commit().await.unwrap();

    // B is committed, A is not: B must not be handed out before A.
    let seen = global_log::read_after(&db.pool, LogPosition::START, 100)
        .await
        .unwrap();
    assert!(
        seen.is_empty(),
        "the reader returned {seen:?} while A was still open"
    );
    // A follower already waiting (its slow poll is 30 s) must not hand out B while A is open.
    let mut follower = LogFollower::new(db.pool.clone(), LogPosition::START)
        .with_poll_interval(Duration::from_secs(30));
    let waiting = tokio::spawn(async move {
        let mut all = Vec::new();
        while all.len() < 2 {
            all.extend(follower.next_batch().await.unwrap());
        }
        (all, follower)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the follower returned B before A");

    a.commit().await.unwrap();
    let (batch, mut follower) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the follower delivered both soon after A committed")
        .unwrap();
    let order: Vec<i64> = batch.iter().map(|e| e.position.global_position).collect();
    assert_eq!(order, vec![pos_a, pos_b]);
    assert_eq!(batch[0].payload, json!({"who": "A"}));
    assert_eq!(follower.position(), batch[1].position);
    // Nothing more, and nothing twice.
    assert!(follower.poll().await.unwrap().is_empty());
}

#[tokio::test]
async fn rolled_back_events_are_never_read() {
    let db = TestDb::new().await;
    let mut a = db.pool.begin().await.unwrap();
    append(&mut a, "gone", 1, json!({})).await;
    a.rollback().await.unwrap();
    let mut b = db.pool.begin().await.unwrap();
    let kept = append(&mut b, "kept", 1, json!({})).await;
    b.commit().await.unwrap();

    let events = crate::read_log(&db.pool, 1).await;
    let positions: Vec<i64> = events.iter().map(|e| e.position.global_position).collect();
    assert_eq!(positions, vec![kept]);
}

/// A tiny deterministic generator (no need for a crate).
struct XorShift(u64);
impl XorShift {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_a_follower_see_every_committed_event_once_in_order() {
    const WRITERS: u64 = 8;
    const TRANSACTIONS: u64 = 60;
    const STREAMS_PER_WRITER: u64 = 5;
    let db = TestDb::new().await;

    let follower_pool = db.pool.clone();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(None::<usize>);
    let reader = tokio::spawn(async move {
        let mut follower = LogFollower::new(follower_pool, LogPosition::START)
            .with_batch_size(37)
            .with_poll_interval(Duration::from_millis(200));
        let mut seen: Vec<RecordedEvent> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let expected = *done_rx.borrow_and_update();
            if let Some(expected) = expected
                && seen.len() >= expected
            {
                // Everything expected arrived; make sure nothing extra follows.
                tokio::time::sleep(Duration::from_millis(300)).await;
                seen.extend(follower.poll().await.unwrap());
                return seen;
            }
            if tokio::time::Instant::now() > deadline {
                return seen;
            }
            tokio::select! {
                batch = follower.next_batch() => seen.extend(batch.unwrap()),
                _ = done_rx.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = db.pool.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
            let mut next_seq = vec![1_i64; STREAMS_PER_WRITER as usize];
            let mut committed = Vec::new();
            for t in 0..TRANSACTIONS {
                let mut tx = pool.begin().await.unwrap();
                let mut written = Vec::new();
                let mut seqs = next_seq.clone();
                for i in 0..=rng.next(3) {
                    let s = rng.next(STREAMS_PER_WRITER) as usize;
                    let stream = format!("w{w}-s{s}");
                    let pos =
                        append(&mut tx, &stream, seqs[s], json!({"w": w, "t": t, "i": i})).await;
                    seqs[s] += 1;
                    written.push(pos);
                }
                // Hold some transactions open so commit order differs from position order.
                tokio::time::sleep(Duration::from_millis(rng.next(4))).await;
                if rng.next(5) == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    next_seq = seqs;
                    committed.extend(written);
                }
            }
            committed
        }));
    }
    let mut committed = HashSet::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    done_tx.send(Some(committed.len())).unwrap();
    let seen = reader.await.unwrap();

    let positions: Vec<i64> = seen.iter().map(|e| e.position.global_position).collect();
    let unique: HashSet<i64> = positions.iter().copied().collect();
    assert_eq!(
        unique.len(),
        positions.len(),
        "an event was delivered twice"
    );
    assert_eq!(
        unique, committed,
        "the follower saw exactly the committed events"
    );
    assert!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "events arrive in (transaction_id, global_position) order"
    );
    // Most transactions committed (a fifth roll back), so the run really exercised the log.
    assert!(committed.len() > (WRITERS * TRANSACTIONS / 2) as usize);
}
