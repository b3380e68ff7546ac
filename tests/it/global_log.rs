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
    assert_eq!(*batch[0].payload, json!({"who": "A"}));
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

/// The LISTEN connections of the database: (pid) of every backend whose last statement was LISTEN.
async fn listeners(pool: &sqlx::PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' ORDER BY pid",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (5 s at most) until each of `followers` has reported the event at `position`.
async fn every_follower_sees(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, i64)>,
    followers: usize,
    position: i64,
) {
    let mut got = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < followers {
        let (f, p) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("every follower was woken by the commit")
            .unwrap();
        if p == position {
            got.insert(f);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_followers_of_a_process_share_one_listen_connection_that_comes_back_after_a_drop() {
    const FOLLOWERS: usize = 4;
    let db = TestDb::new().await;
    // A poll every 30 s: within this test only a notification can wake a follower.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, i64)>();
    for f in 0..FOLLOWERS {
        let pool = db.pool.clone();
        let seen = seen_tx.clone();
        tokio::spawn(async move {
            let mut follower = LogFollower::new(pool, LogPosition::START)
                .with_poll_interval(Duration::from_secs(30));
            while let Ok(batch) = follower.next_batch().await {
                for e in batch {
                    let _ = seen.send((f, e.position.global_position));
                }
            }
        });
    }
    let pool = db.pool.clone();
    until("one LISTEN connection for all followers", || {
        let pool = pool.clone();
        async move { listeners(&pool).await.len() == 1 }
    })
    .await;
    // Give every follower time to read the empty log and wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        listeners(&db.pool).await.len(),
        1,
        "one LISTEN, not one per follower"
    );

    let mut tx = db.pool.begin().await.unwrap();
    let first = append(&mut tx, "s", 1, json!({})).await;
    tx.commit().await.unwrap();
    every_follower_sees(&mut seen_rx, FOLLOWERS, first).await;

    // The listening connection is killed: a new one replaces it, and commits wake again.
    let old = listeners(&db.pool).await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(old[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = db.pool.clone();
    until("a new LISTEN connection", || {
        let pool = pool.clone();
        let old = old.clone();
        async move {
            let now = listeners(&pool).await;
            now.len() == 1 && now != old
        }
    })
    .await;
    let mut tx = db.pool.begin().await.unwrap();
    let second = append(&mut tx, "s", 2, json!({})).await;
    tx.commit().await.unwrap();
    every_follower_sees(&mut seen_rx, FOLLOWERS, second).await;
}

/// This process's notifications on `pool`, once its listening connection is trusted.
async fn trusted_notifications(pool: &sqlx::PgPool) -> store::listener::Notifications {
    let notifications = store::listener::Notifications::new(pool.clone());
    notifications.auth_epoch();
    until("the listening connection is trusted", || async {
        notifications.auth_epoch().is_some()
    })
    .await;
    notifications
}

/// A TCP proxy in front of PostgreSQL that can stop delivering to the connections that have
/// sent `LISTEN` (as a half-open connection or a proxy in transaction mode would), while
/// everything else goes on.
struct StallingProxy {
    port: u16,
    stalled: tokio::sync::watch::Sender<bool>,
}

impl StallingProxy {
    /// A proxy in front of the test's database, and a pool of `size` connections through it.
    async fn in_front_of(db: &TestDb, size: u32) -> (Self, sqlx::PgPool) {
        let options = db.connect_options();
        // The first address PostgreSQL answers on (a host name may resolve to ::1 first).
        let mut upstream = None;
        for address in tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .unwrap()
        {
            if tokio::net::TcpStream::connect(address).await.is_ok() {
                upstream = Some(address);
                break;
            }
        }
        let upstream = upstream.expect("PostgreSQL answers on some address of its host");
        let proxy = Self::start(upstream).await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(size)
            .connect_with(
                options
                    .port(proxy.port)
                    .ssl_mode(sqlx::postgres::PgSslMode::Disable),
            )
            .await
            .unwrap();
        (proxy, pool)
    }

    async fn start(upstream: std::net::SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, _) = tokio::sync::watch::channel(false);
        let stalled_rx = stalled.subscribe();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let listens = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let marks = listens.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n].windows(8).any(|w| w == b"LISTEN \"") {
                            marks.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut stalled = stalled_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = server_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if listens.load(std::sync::atomic::Ordering::SeqCst) {
                            // Hold what the server sent for as long as the stall lasts.
                            let _ = stalled.wait_for(|s| !*s).await;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { port, stalled }
    }
}

/// A listening connection that silently stops delivering is found out by the hub's probes: it
/// stops being trusted (a command that waited for its notification in vain asks the database, and
/// API key lookups are no longer reused) within seconds; a connection that delivers again is
/// trusted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_connection_that_stops_delivering_stops_being_trusted() {
    use store::listener::Notifications;
    let db = TestDb::new().await;
    let (proxy, proxied) = StallingProxy::in_front_of(&db, 4).await;
    let notifications = trusted_notifications(&proxied).await;
    let trusted = |n: &Notifications| n.auth_epoch().is_some();

    // Trusted: an event's position comes with its notification.
    let expected = notifications.expect_commit("Test", "p", 1).unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let position = append(&mut tx, "p", 1, json!({})).await;
    tx.commit().await.unwrap();
    assert_eq!(
        expected.position(Duration::from_secs(5)).await,
        Some(position)
    );

    // The connection stalls: the next event's notification never comes. The command that waited
    // for it in vain has the connection probed at once (1 s of waiting and 2 s for the probe),
    // well before the next probe of a connection that was delivering (5 s of silence, then 2 s).
    proxy.stalled.send_replace(true);
    let stalled_at = std::time::Instant::now();
    let expected = notifications.expect_commit("Test", "p", 2);
    let mut tx = db.pool.begin().await.unwrap();
    append(&mut tx, "p", 2, json!({})).await;
    tx.commit().await.unwrap();
    if let Some(e) = expected {
        assert_eq!(e.position(Duration::from_secs(1)).await, None);
    }
    let deadline = Duration::from_secs(5);
    while trusted(&notifications) {
        assert!(
            stalled_at.elapsed() < deadline,
            "still trusted {:?} after the stall",
            stalled_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(notifications.expect_commit("Test", "p", 3).is_none());

    // Delivering again: a new connection is opened and trusted.
    proxy.stalled.send_replace(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !trusted(&notifications) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never trusted again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxied.close().await;
}

/// One statement that inserts many events (a bulk load) announces them in as few notifications
/// as fit the payload limit, and each event's writer still learns its event's position.
#[tokio::test]
async fn every_event_of_a_bulk_insert_is_announced_with_its_position() {
    let db = TestDb::new().await;
    let notifications = trusted_notifications(&db.pool).await;
    // 400 lines of about 60 bytes: several notifications of at most 8,000 bytes.
    let ids: Vec<String> = (0..400).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let waits: Vec<_> = ids
        .iter()
        .map(|id| notifications.expect_commit("Test", id, 1).unwrap())
        .collect();
    let positions: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'Test', id, 1, 'Tested', '1.0', '{}', '{}' FROM unnest($1::text[]) AS u(id) \
         RETURNING aggregate_id, global_position",
    )
    .bind(&ids)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let stored: std::collections::HashMap<String, i64> = positions.into_iter().collect();
    for (id, wait) in ids.iter().zip(waits) {
        assert_eq!(
            wait.position(Duration::from_secs(5)).await,
            Some(stored[id]),
            "{id}"
        );
    }
}

/// A connection that stops delivering while the pool is too busy to even send a probe is not
/// trusted for long: trust lapses once nothing has confirmed delivery for a probe cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_lapses_when_no_probe_can_be_sent() {
    let db = TestDb::new().await;
    let (proxy, proxied) = StallingProxy::in_front_of(&db, 2).await;
    let notifications = trusted_notifications(&proxied).await;
    // Every connection of the pool is taken (probes wait for one), and the listener stalls.
    let held = [
        proxied.acquire().await.unwrap(),
        proxied.acquire().await.unwrap(),
    ];
    proxy.stalled.send_replace(true);
    let stalled_at = std::time::Instant::now();
    // 5 s without confirmation plus 2 s, then slack for a busy machine; a pool wait lasts 30 s.
    while notifications.auth_epoch().is_some() {
        assert!(
            stalled_at.elapsed() < Duration::from_secs(15),
            "still trusted {:?} after the stall",
            stalled_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
}
