//! The write side against a real PostgreSQL: the vehicle schedule under concurrency, human
//! codes, optimistic concurrency, and the won-lead process manager.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use commands::codes::{self, CodeKind};
use commands::{CommandBus, CommandError};
use domain::booking::{BookingCommand, BookingType, CreateBooking, Priority};
use domain::lead::{LeadCommand, StageRef};
use domain::vehicle_block::{BlockKind, VehicleBlockCommand};
use domain::{Actor, CommandMetadata, Role};
use rust_decimal::Decimal;
use store::testing::TestDb;
use uuid::Uuid;

/// Seeded reference data (migrations/…_seed_reference_data.sql).
const GHOST: Uuid = Uuid::from_u128(0x00000000_0000_4000_c000_000000000001);
const URUS: Uuid = Uuid::from_u128(0x00000000_0000_4000_c000_000000000003);
const SALES: Uuid = Uuid::from_u128(0x00000000_0000_4000_a000_000000000003);

fn day(d: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap() + Duration::days(d)
}

fn meta() -> CommandMetadata {
    CommandMetadata::new(Actor::staff(SALES, Role::Sales), "test")
}

fn create_cmd(code: String, vehicle: Option<Uuid>, from: i64, to: i64) -> CreateBooking {
    CreateBooking {
        external_code: code,
        client_id: Uuid::now_v7(),
        owner_id: SALES,
        booking_type: BookingType::Rental,
        priority: Priority::Medium,
        channel: "Website".into(),
        start_at: day(from),
        end_at: day(to),
        vehicle_id: vehicle,
        driver_id: None,
        price_daily: Decimal::new(650_000, 2),
        deposit_amount: Decimal::ZERO,
        advance_payment: Decimal::ZERO,
        full_insurance_fee: Decimal::ZERO,
        currency: None,
        pickup_location: None,
        dropoff_location: None,
        services: vec![],
        lead_id: None,
    }
}

/// Creates a booking the way the API will: allocate a code, then run the command.
async fn create(bus: &CommandBus, vehicle: Option<Uuid>, from: i64, to: i64) -> Uuid {
    let code = codes::allocate(&bus.pool, CodeKind::Booking).await.unwrap();
    let id = Uuid::now_v7();
    bus.bookings
        .create(
            id,
            BookingCommand::Create(Box::new(create_cmd(code, vehicle, from, to))),
            &meta(),
            None,
        )
        .await
        .unwrap();
    id
}

/// Makes staff `n` (as a u128 id) booking `id`'s owner.
async fn make_owner(bus: &CommandBus, id: Uuid, n: u128) -> commands::Outcome {
    let command = BookingCommand::ChangeOwner {
        owner_id: Uuid::from_u128(n),
    };
    bus.bookings
        .execute(id, command, &meta(), None)
        .await
        .unwrap()
}

async fn confirm(bus: &CommandBus, id: Uuid) -> Result<commands::Outcome, CommandError> {
    bus.bookings
        .execute(id, BookingCommand::Confirm, &meta(), None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_confirms_of_overlapping_bookings_let_exactly_one_through() {
    let db = TestDb::new().await;
    let bus = Arc::new(CommandBus::new(db.pool.clone()));
    let mut ids = Vec::new();
    for i in 0..50 {
        // Every booking overlaps every other (all contain day 10 to 11).
        ids.push(create(&bus, Some(GHOST), 10 - (i % 5), 11 + (i % 3)).await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(ids.len()));
    let tasks: Vec<_> = ids
        .iter()
        .map(|&id| {
            let bus = bus.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                confirm(&bus, id).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut clashes = Vec::new();
    for (t, &id) in tasks.into_iter().zip(&ids) {
        match t.await.unwrap() {
            Ok(_) => winners.push(id),
            // Never a deadlock or a store error: the claims on one vehicle take turns.
            Err(CommandError::VehicleUnavailable { detail, .. }) => clashes.push(detail),
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one confirm wins");
    // Every loser is told which booking holds the vehicle, even one that raced the winner.
    let winner = winners[0].to_string();
    for detail in &clashes {
        let holder = detail
            .as_ref()
            .and_then(|d| d.get("source_id"))
            .and_then(|s| s.as_str());
        assert_eq!(holder, Some(winner.as_str()), "clash detail: {detail:?}");
    }
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vehicle_schedule WHERE vehicle_id = $1")
            .bind(GHOST)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(held, 1);
    let confirmed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'BookingConfirmed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(confirmed, 1, "the losers wrote no event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_confirms_of_back_to_back_bookings_all_succeed() {
    let db = TestDb::new().await;
    let bus = Arc::new(CommandBus::new(db.pool.clone()));
    let mut ids = Vec::new();
    for i in 0..20 {
        // [i, i+1) days: they touch but never overlap.
        ids.push(create(&bus, Some(URUS), i, i + 1).await);
    }
    let tasks: Vec<_> = ids
        .iter()
        .map(|&id| {
            let bus = bus.clone();
            tokio::spawn(async move { confirm(&bus, id).await })
        })
        .collect();
    for t in tasks {
        t.await
            .unwrap()
            .expect("non-overlapping bookings all confirm");
    }
}

#[tokio::test]
async fn reschedule_extend_cancel_complete_and_blocks_keep_the_schedule_true() {
    let db = TestDb::new().await;
    let bus = CommandBus::new(db.pool.clone());
    let a = create(&bus, Some(GHOST), 0, 3).await;
    let b = create(&bus, Some(GHOST), 3, 5).await;
    confirm(&bus, a).await.unwrap();
    confirm(&bus, b).await.unwrap();

    // Moving `b` onto `a` is refused and changes nothing.
    let err = bus
        .bookings
        .execute(
            b,
            BookingCommand::Reschedule {
                start_at: day(2),
                end_at: day(4),
            },
            &meta(),
            None,
        )
        .await
        .unwrap_err();
    let CommandError::VehicleUnavailable { detail, .. } = err else {
        panic!("expected VehicleUnavailable, got {err:?}");
    };
    assert_eq!(
        detail.unwrap()["source_id"],
        serde_json::json!(a.to_string())
    );

    // A maintenance block over `b` is refused; after cancelling `b` it fits.
    let block = Uuid::now_v7();
    let block_cmd = VehicleBlockCommand::Create {
        vehicle_id: GHOST,
        kind: BlockKind::Maintenance,
        start_at: day(4),
        end_at: day(6),
        description: Some("annual service".into()),
    };
    assert!(matches!(
        bus.vehicle_blocks
            .execute(block, block_cmd.clone(), &meta(), None)
            .await,
        Err(CommandError::VehicleUnavailable { .. })
    ));
    bus.bookings
        .execute(
            b,
            BookingCommand::Cancel {
                reason: "client cancelled".into(),
            },
            &meta(),
            None,
        )
        .await
        .unwrap();
    bus.vehicle_blocks
        .execute(block, block_cmd, &meta(), None)
        .await
        .unwrap();

    // A booking over the block cannot be confirmed until the block is removed.
    let c = create(&bus, Some(GHOST), 5, 7).await;
    assert!(matches!(
        confirm(&bus, c).await,
        Err(CommandError::VehicleUnavailable { .. })
    ));
    bus.vehicle_blocks
        .execute(block, VehicleBlockCommand::Remove, &meta(), None)
        .await
        .unwrap();
    confirm(&bus, c).await.unwrap();

    // `a` is delivered and started; extending it into `c` is refused, up to `c` is fine.
    for cmd in crate::on_the_road(day(0)) {
        bus.bookings.execute(a, cmd, &meta(), None).await.unwrap();
    }
    let extend = |to| BookingCommand::Extend {
        new_end_at: day(to),
        price_daily: None,
    };
    assert!(matches!(
        bus.bookings.execute(a, extend(6), &meta(), None).await,
        Err(CommandError::VehicleUnavailable { .. })
    ));
    bus.bookings
        .execute(a, extend(5), &meta(), None)
        .await
        .unwrap();

    // An early return frees the rest of the period.
    bus.bookings
        .execute(
            a,
            BookingCommand::Complete {
                returned_at: day(1),
                return_mileage_km: 400,
                fuel_level_pct: 90,
            },
            &meta(),
            None,
        )
        .await
        .unwrap();
    let d = create(&bus, Some(GHOST), 1, 5).await;
    confirm(&bus, d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_creations_get_two_hundred_distinct_increasing_codes() {
    let db = TestDb::new().await;
    let bus = Arc::new(CommandBus::new(db.pool.clone()));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let id = create(&bus, None, 0, 1).await;
                let (booking, _) = bus.bookings.replay(id, None).await.unwrap();
                booking.external_code
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    let mut numbers: Vec<i64> = codes
        .iter()
        .map(|c| c.strip_prefix("BK-").unwrap().parse().unwrap())
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), 200, "codes are distinct");
    // A code can never be claimed twice, even by a buggy caller.
    let taken = codes[0].clone();
    let err = bus
        .bookings
        .execute(
            Uuid::now_v7(),
            BookingCommand::Create(Box::new(create_cmd(taken.clone(), None, 0, 1))),
            &meta(),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CommandError::CodeTaken(code) if *code == taken),
        "{err:?}"
    );
    // Later allocations continue above every code handed out.
    let next = codes::allocate(&db.pool, CodeKind::Booking).await.unwrap();
    let next: i64 = next.strip_prefix("BK-").unwrap().parse().unwrap();
    assert!(next > *numbers.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creations_of_one_booking_with_different_codes_leave_one_and_refuse_the_other_as_existing()
 {
    let db = TestDb::new().await;
    let bus = Arc::new(CommandBus::new(db.pool.clone()));
    let first = codes::allocate(&db.pool, CodeKind::Booking).await.unwrap();
    let second = codes::allocate(&db.pool, CodeKind::Booking).await.unwrap();
    // The first creation holds its transaction open after claiming its code (a trigger that
    // fires after the write guards waits for a lock the test holds), so the second meets it
    // uncommitted.
    let mut gate = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *gate)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION test_pause() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.payload::jsonb -> 'BookingCreated' ->> 'external_code' = '{first}' THEN \
           PERFORM pg_advisory_xact_lock_shared(4242); END IF; RETURN NEW; END $$; \
         CREATE TRIGGER zz_test_pause BEFORE INSERT ON events \
           FOR EACH ROW EXECUTE FUNCTION test_pause();"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let id = Uuid::now_v7();
    let run = |code: String| {
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.bookings
                .create(
                    id,
                    BookingCommand::Create(Box::new(create_cmd(code, None, 0, 1))),
                    &meta(),
                    None,
                )
                .await
        })
    };
    let waiting_on = |event: &'static str| {
        let pool = db.pool.clone();
        async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock' \
                       AND wait_event = $1",
                )
                .bind(event)
                .fetch_one(&pool)
                .await
                .unwrap();
                if waiting > 0 {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "nobody waits on {event}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    let winner = run(first.clone());
    waiting_on("advisory").await;
    let loser = run(second.clone());
    // The second waits for the first's transaction in the code claim.
    waiting_on("transactionid").await;
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut *gate)
        .await
        .unwrap();
    let loser = loser.await.unwrap();
    winner
        .await
        .unwrap()
        .expect("the first creation is written");
    // Not "the code is already taken": the loser decided again and found the booking there.
    assert!(
        matches!(&loser, Err(CommandError::Domain { code, .. }) if *code == "booking.already_exists"),
        "{loser:?}"
    );
    let (booking, version) = bus.bookings.replay(id, None).await.unwrap();
    assert_eq!((booking.external_code, version), (first, 1));
    let unclaimed = codes::resolve(&db.pool, &second).await.unwrap();
    assert_eq!(unclaimed, None, "the loser's code stays free");
}

#[tokio::test]
async fn a_commit_rolled_back_by_a_deadlock_or_serialization_failure_is_decided_again() {
    let db = TestDb::new().await;
    let bus = CommandBus::new(db.pool.clone());
    // The database rolls back the first `fail_first` attempts to write an event with the given
    // error, as it does with a deadlock's victim or a serialization failure. The attempts are
    // counted by a sequence, which the rollbacks do not undo.
    sqlx::raw_sql(
        "CREATE TABLE test_faults (code text, fail_first int); \
         CREATE SEQUENCE test_attempts; \
         CREATE FUNCTION test_fault() RETURNS trigger LANGUAGE plpgsql AS $$ \
         DECLARE f record; n bigint := nextval('test_attempts'); BEGIN \
           SELECT * INTO f FROM test_faults; \
           IF FOUND AND n <= f.fail_first THEN \
             RAISE EXCEPTION 'injected' USING ERRCODE = f.code; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER zz_test_fault BEFORE INSERT ON events \
           FOR EACH ROW EXECUTE FUNCTION test_fault();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let set_fault = |code: &'static str, fail_first: i32| {
        let pool = db.pool.clone();
        async move {
            sqlx::raw_sql(&format!(
                "DELETE FROM test_faults; INSERT INTO test_faults VALUES ('{code}', {fail_first}); \
                 SELECT setval('test_attempts', 1, false);"
            ))
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let written = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE aggregate_id = $1")
                .bind(id.to_string())
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for code in ["40P01", "40001"] {
        set_fault(code, 2).await;
        let id = create(&bus, None, 0, 1).await;
        assert_eq!(
            written(id).await,
            1,
            "{code}: written once, on the third attempt"
        );
    }
    // A failure that does not go away is reported after a bounded number of attempts.
    set_fault("40P01", 1_000).await;
    let id = Uuid::now_v7();
    let err = bus
        .bookings
        .execute(
            id,
            BookingCommand::Create(Box::new(create_cmd("BK-1".into(), None, 0, 1))),
            &meta(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::Store(_)), "{err:?}");
    assert_eq!(written(id).await, 0);
    let attempts: i64 = sqlx::query_scalar("SELECT last_value FROM test_attempts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!((2..=10).contains(&attempts), "{attempts} attempts");
}

#[tokio::test]
async fn if_match_refuses_a_stale_version_and_no_ops_write_nothing() {
    let db = TestDb::new().await;
    let bus = CommandBus::new(db.pool.clone());
    let id = create(&bus, Some(URUS), 0, 2).await;
    let err = bus
        .bookings
        .execute(id, BookingCommand::Confirm, &meta(), Some(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CommandError::VersionMismatch {
                expected: 0,
                actual: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let confirmed = bus
        .bookings
        .execute(id, BookingCommand::Confirm, &meta(), Some(1))
        .await
        .unwrap();
    assert_eq!(confirmed.version, 2);
    assert!(confirmed.position > 0);
    // Assigning the same vehicle again changes nothing and reports the same version.
    let same = bus
        .bookings
        .execute(
            id,
            BookingCommand::AssignVehicle { vehicle_id: URUS },
            &meta(),
            None,
        )
        .await
        .unwrap();
    assert_eq!((same.version, same.events), (2, 0));
    assert_eq!(same.position, confirmed.position);
}

#[tokio::test]
async fn command_metadata_is_recorded_on_every_event() {
    let db = TestDb::new().await;
    let bus = CommandBus::new(db.pool.clone());
    let id = create(&bus, Some(URUS), 0, 2).await;
    let events = crate::read_log(&db.pool, 1).await;
    let m = &events[0].metadata;
    assert_eq!(m["actor_type"], "staff");
    assert_eq!(m["actor_role"], "sales");
    assert_eq!(m["actor_id"], SALES.to_string());
    assert_eq!(m["request_id"], "test");
    assert!(m["correlation_id"].as_str().is_some());
    assert_eq!(events[0].aggregate_id, id.to_string());
}

#[tokio::test]
async fn a_long_stream_loads_from_a_snapshot_to_the_same_state() {
    let db = TestDb::new().await;
    let with = CommandBus::new(db.pool.clone());
    let without = CommandBus::with_snapshots(db.pool.clone(), None);
    let id = create(&with, None, 0, 1).await;
    for i in 0..120 {
        let owner = if i % 2 == 0 {
            Uuid::from_u128(i)
        } else {
            SALES
        };
        with.bookings
            .execute(
                id,
                BookingCommand::ChangeOwner { owner_id: owner },
                &meta(),
                None,
            )
            .await
            .unwrap();
    }
    let snapshots: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshots")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(snapshots, 1);
    let (a, va) = with.bookings.replay(id, None).await.unwrap();
    let (b, vb) = without.bookings.replay(id, None).await.unwrap();
    assert_eq!((a, va), (b, vb));
    assert_eq!(va, 121);
    // Commands still see the right version through the snapshot.
    let out = with
        .bookings
        .execute(
            id,
            BookingCommand::ChangeOwner {
                owner_id: Uuid::from_u128(999),
            },
            &meta(),
            Some(121),
        )
        .await
        .unwrap();
    assert_eq!(out.version, 122);
}

/// Loading many aggregates in one query (the outbox worker's deliveries of a claim) gives each
/// the state and version one replay of its own gives: a long stream past its snapshot, a stream
/// stored in an older shape (upcast), a short one, and an id with no events (not created).
#[tokio::test]
async fn replaying_many_aggregates_at_once_gives_each_the_state_of_its_own_replay() {
    let db = TestDb::new().await;
    let bus = CommandBus::new(db.pool.clone());
    let long = create(&bus, None, 0, 1).await;
    for i in 0..60 {
        make_owner(&bus, long, 500 + i).await;
    }
    let short = create(&bus, Some(GHOST), 3, 5).await;
    confirm(&bus, short).await.unwrap();
    let old = Uuid::now_v7();
    crate::store_v1_booking_created(&db.pool, old, "BK-7001", Uuid::now_v7(), SALES).await;
    let unknown = Uuid::now_v7();

    let ids = [long, short, old, unknown];
    let many = bus.bookings.replay_many(&ids).await.unwrap();
    assert_eq!(many.len(), ids.len());
    for id in ids {
        let own = bus.bookings.replay(id, None).await.unwrap();
        assert_eq!(many[&id], own, "booking {id}");
    }
    assert_eq!(many[&long].1, 61);
    assert_eq!(many[&long].0.owner_id, Uuid::from_u128(559));
    assert_eq!(many[&short].0.status.as_str(), "confirmed");
    assert_eq!(many[&old].0.currency, "AED", "the 1.0 shape is upcast");
    assert!(!many[&unknown].0.created);
    assert_eq!(many[&unknown].1, 0);
    assert!(bus.bookings.replay_many(&[]).await.unwrap().is_empty());
}

/// Two processes on one booking, snapshots every 4 events: one still remembers the stream as
/// short (loads it whole, commits without a snapshot) after the other lengthened it and took
/// snapshots. Both decide on the whole history, and neither's commit trips over the other's
/// snapshot.
#[tokio::test]
async fn a_stream_remembered_short_but_lengthened_elsewhere_is_decided_on_its_whole_history() {
    let db = TestDb::new().await;
    let first = CommandBus::with_snapshots(db.pool.clone(), Some(4));
    let second = CommandBus::with_snapshots(db.pool.clone(), Some(4));
    let id = create(&first, None, 0, 1).await;
    // Makes owner `1000 + i` the booking's owner through `bus`.
    let owner = async |bus: &CommandBus, i: u128, expected: Option<i64>| {
        let command = BookingCommand::ChangeOwner {
            owner_id: Uuid::from_u128(1000 + i),
        };
        bus.bookings
            .execute(id, command, &meta(), expected)
            .await
            .unwrap()
    };
    for i in 0..22 {
        owner(&second, i, None).await;
    }
    // `first` saw version 1; the stream is at 23 with a snapshot at 20. Its command makes 24,
    // where a snapshot store would take a snapshot.
    let out = owner(&first, 100, Some(23)).await;
    assert_eq!(out.version, 24);
    for i in 200..205 {
        owner(&second, i, None).await;
    }
    let whole = CommandBus::with_snapshots(db.pool.clone(), None);
    let (expected, version) = whole.bookings.replay(id, None).await.unwrap();
    assert_eq!(version, 29);
    assert_eq!(expected.owner_id, Uuid::from_u128(1204));
    // Every way of loading it agrees: through the snapshot and whole.
    let out = owner(&second, 300, Some(29)).await;
    assert_eq!(out.version, 30);
    let out = owner(&first, 301, Some(30)).await;
    assert_eq!(out.version, 31);
    let (state, _) = whole.bookings.replay(id, None).await.unwrap();
    assert_eq!(state.owner_id, Uuid::from_u128(1301));
    // Each way of loading sees that owner: giving it again is a no-op through each of them
    // (`whole` loads all events, `first` and `second` the snapshot at 28 and the events after).
    for bus in [&whole, &first, &second] {
        let again = owner(bus, 301, Some(31)).await;
        assert_eq!((again.version, again.events), (31, 0));
    }
    let snapshot: i64 = sqlx::query_scalar(
        "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'Booking' AND aggregate_id = $1",
    )
    .bind(id.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(snapshot >= 28, "the snapshot went on: {snapshot}");
}

/// A creation loads its stream as a short one, but an id that already has a long stream with
/// snapshots is still refused as existing, and writes nothing; a created stream takes its
/// snapshots as it grows.
#[tokio::test]
async fn a_creation_on_an_id_with_a_long_stream_is_refused_and_a_new_stream_takes_snapshots() {
    let db = TestDb::new().await;
    let bus = CommandBus::with_snapshots(db.pool.clone(), Some(4));
    let id = create(&bus, None, 0, 1).await;
    for i in 0..12 {
        make_owner(&bus, id, 1000 + i).await;
    }
    let snapshot = || {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT max(last_sequence) FROM snapshots \
             WHERE aggregate_type = 'Booking' AND aggregate_id = $1",
        )
        .bind(id.to_string())
        .fetch_one(&db.pool)
    };
    assert!(
        snapshot().await.unwrap().is_some_and(|s| s >= 8),
        "the created stream took snapshots as it grew"
    );
    // Another process, which has never seen the stream, creates on the same id.
    let other = CommandBus::with_snapshots(db.pool.clone(), Some(4));
    let code = codes::allocate(&db.pool, CodeKind::Booking).await.unwrap();
    let again = other
        .bookings
        .create(
            id,
            BookingCommand::Create(Box::new(create_cmd(code.clone(), None, 5, 6))),
            &meta(),
            None,
        )
        .await;
    assert!(
        matches!(&again, Err(CommandError::Domain { code, .. }) if *code == "booking.already_exists"),
        "{again:?}"
    );
    let (state, version) = other.bookings.replay(id, None).await.unwrap();
    assert_eq!((version, state.owner_id), (13, Uuid::from_u128(1011)));
    assert_eq!(codes::resolve(&db.pool, &code).await.unwrap(), None);
}

fn stage(id: &str, booking_status: Option<domain::booking::BookingStatus>) -> StageRef {
    StageRef {
        id: id.into(),
        probability: Decimal::new(50, 2),
        sla_days: 3,
        booking_status,
    }
}

/// A lead created and won: the process manager's input.
struct WonLead {
    lead: Uuid,
    client: Uuid,
    /// The booking's id and code, fixed by `LeadWon`.
    booking_id: Uuid,
    booking_code: String,
}

/// Creates a lead and wins it (the Ghost, from day 20 to 23).
async fn won_lead(bus: &CommandBus, kommo_lead_id: i64) -> WonLead {
    let lead = Uuid::now_v7();
    let client = Uuid::now_v7();
    let lead_code = codes::allocate(&bus.pool, CodeKind::Lead).await.unwrap();
    bus.leads
        .execute(
            lead,
            LeadCommand::Create {
                lead_code,
                client_id: Some(client),
                owner_id: SALES,
                stage: stage(
                    "negotiation",
                    Some(domain::booking::BookingStatus::Confirmed),
                ),
                value_amount: Decimal::new(1_950_000, 2),
                source: "Kommo".into(),
                title: Some("Ghost for a wedding".into()),
                requested_start_at: Some(day(20)),
                requested_end_at: Some(day(23)),
                fleet_size: 1,
                expected_close_at: None,
                kommo_lead_id: Some(kommo_lead_id),
            },
            &meta(),
            None,
        )
        .await
        .unwrap();
    let booking_id = Uuid::now_v7();
    let booking_code = codes::allocate(&bus.pool, CodeKind::Booking).await.unwrap();
    bus.leads
        .execute(
            lead,
            LeadCommand::Win {
                booking_id,
                booking_code: booking_code.clone(),
                booking_type: BookingType::Rental,
                start_at: None,
                end_at: None,
                price_daily: Decimal::new(650_000, 2),
                vehicle_id: Some(GHOST),
                client_id: None,
            },
            &meta(),
            None,
        )
        .await
        .unwrap();
    WonLead {
        lead,
        client,
        booking_id,
        booking_code,
    }
}

/// The process manager moves its checkpoint past the events it handled. Stopped by a `LeadWon`
/// it cannot read, it has created the booking of the lead won before it, its checkpoint rests
/// on that lead's `LeadWon` with the error recorded at the bad event, and it goes no further.
#[tokio::test]
async fn the_process_manager_stops_at_an_unreadable_event_with_the_events_before_it_handled() {
    let db = TestDb::new().await;
    let bus = Arc::new(CommandBus::new(db.pool.clone()));
    let first = won_lead(&bus, 1).await;
    let bad = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Lead', $1, 1, 'LeadWon', '1.0', '{\"LeadWon\": {\"booking_id\": 7}}', '{}')",
    )
    .bind(bad.to_string())
    .execute(&db.pool)
    .await
    .unwrap();
    let after = won_lead(&bus, 2).await;
    let position_of = async |lead: Uuid| -> i64 {
        sqlx::query_scalar(
            "SELECT global_position FROM events WHERE aggregate_id = $1 AND event_type = 'LeadWon'",
        )
        .bind(lead.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let (won_at, bad_at) = (position_of(first.lead).await, position_of(bad).await);

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let manager = tokio::spawn({
        let bus = bus.clone();
        async move { commands::process::run(&bus, stopped).await }
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let checkpoint = loop {
        let row: Option<(i64, Option<i64>)> = sqlx::query_as(
            "SELECT global_position, error_position FROM consumer_checkpoints WHERE name = $1",
        )
        .bind(commands::process::NAME)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some((at, Some(error))) = row {
            break (at, error);
        }
        assert!(tokio::time::Instant::now() < deadline, "no error recorded");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    stop.send(true).unwrap();
    manager.await.unwrap();
    assert_eq!(checkpoint, (won_at, bad_at));
    let created = async |id| bus.bookings.replay(id, None).await.unwrap().0.created;
    assert!(created(first.booking_id).await);
    assert!(!created(after.booking_id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_won_lead_yields_exactly_one_booking_even_when_the_process_manager_runs_twice() {
    let db = TestDb::new().await;
    let bus = Arc::new(CommandBus::new(db.pool.clone()));
    let WonLead {
        lead,
        client,
        booking_id,
        booking_code,
    } = won_lead(&bus, 23_802_129).await;

    let log = crate::read_log(&db.pool, 2).await;
    let won = log
        .iter()
        .find(|e| e.event_type == "LeadWon")
        .unwrap()
        .clone();
    // Twice at once, then once more.
    let (a, b) = tokio::join!(
        commands::process::handle(&bus, &won),
        commands::process::handle(&bus, &won)
    );
    let mut outcomes = vec![a.unwrap(), b.unwrap()];
    outcomes.push(commands::process::handle(&bus, &won).await.unwrap());
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == commands::process::Handled::BookingCreated)
            .count(),
        1
    );

    let bookings: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'BookingCreated'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(bookings, 1, "exactly one booking");
    let (booking, _) = bus.bookings.replay(booking_id, None).await.unwrap();
    assert_eq!(booking.external_code, booking_code);
    assert_eq!(booking.lead_id, Some(lead));
    assert_eq!(booking.client_id, client);
    assert_eq!(booking.status, domain::booking::BookingStatus::Confirmed);
    assert_eq!(booking.start_at, Some(day(20)));
    let (lead_state, _) = bus.leads.replay(lead, None).await.unwrap();
    assert_eq!(lead_state.booking_id, Some(booking_id));
    let links: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'LeadBookingLinked'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(links, 1, "linked once");
}

/// Each command reports the global position of its own last event (what a client passes as
/// `min_position` to read its write): learned from the commit's notification while the process
/// listens, and from the database when it does not (the listening connection is killed before
/// the second round). Many commands commit at once, on different aggregates; each gets its own
/// event's position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_command_reports_the_global_position_of_its_own_last_event() {
    let db = TestDb::new().await;
    let bus = Arc::new(CommandBus::new(db.pool.clone()));
    let listeners = |kill: bool| {
        let pool = db.pool.clone();
        async move {
            let select = if kill {
                "pg_terminate_backend(pid)"
            } else {
                "pid"
            };
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM (SELECT {select} FROM pg_stat_activity \
                 WHERE datname = current_database() AND query ILIKE 'LISTEN%') t"
            ))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    create(&bus, None, 0, 1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while listeners(false).await == 0 {
        assert!(std::time::Instant::now() < deadline, "nobody listens");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for round in 0..2 {
        if round == 1 {
            assert!(listeners(true).await > 0);
        }
        let mut tasks = Vec::new();
        for i in 0..24 {
            let bus = bus.clone();
            tasks.push(tokio::spawn(async move {
                let code = codes::allocate(&bus.pool, CodeKind::Booking).await.unwrap();
                let from = 300 * round + 10 * i;
                let command = create_cmd(code, Some(GHOST), from, from + 1);
                let id = Uuid::now_v7();
                let created = bus
                    .bookings
                    .execute(id, BookingCommand::Create(Box::new(command)), &meta(), None)
                    .await
                    .unwrap();
                let confirmed = confirm(&bus, id).await.unwrap();
                [(id, created), (id, confirmed)]
            }));
        }
        let mut positions = std::collections::BTreeSet::new();
        for (id, outcome) in futures::future::join_all(tasks)
            .await
            .into_iter()
            .flat_map(|t| t.unwrap())
        {
            assert_eq!(outcome.events, 1);
            assert!(positions.insert(outcome.position));
            let stored: i64 = sqlx::query_scalar(
                "SELECT global_position FROM events \
                 WHERE aggregate_type = 'Booking' AND aggregate_id = $1 AND sequence = $2",
            )
            .bind(id.to_string())
            .bind(outcome.version)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            assert_eq!(outcome.position, stored, "round {round}");
        }
    }
}
