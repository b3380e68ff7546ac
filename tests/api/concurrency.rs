//! Optimistic concurrency (`If-Match`) and `Idempotency-Key`.

use reqwest::Method;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn if_match_with_a_stale_version_is_412_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let id = app.client("Version Case").await;
    let path = format!("/v1/clients/{id}");
    let patch = |version: &str, name: &str| {
        app.request(Method::PATCH, "sales", &path)
            .header("if-match", version)
            .json(&json!({ "name": name }))
    };

    let before = app.event_count().await;
    let r = app.send(patch("0", "Stale Name")).await;
    r.assert_problem(412, "version-mismatch");
    assert_eq!(r.body["expected_version"], 0);
    assert_eq!(r.body["current_version"], 1);
    assert_eq!(app.event_count().await, before);

    let r = app.send(patch("\"1\"", "Fresh Name")).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.header("etag"), Some("\"2\""));

    let r = app.send(patch("1", "Late Name")).await;
    r.assert_problem(412, "version-mismatch");

    // Any current version (RFC 9110); none at all for a client that does not exist.
    let r = app.send(patch("*", "Any Name")).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["version"], 3);
    let missing = format!("/v1/clients/{}", uuid::Uuid::now_v7());
    let r = app
        .send(
            app.request(Method::PATCH, "sales", &missing)
                .header("if-match", "*")
                .json(&json!({ "name": "Nobody" })),
        )
        .await;
    assert_eq!(r.status, 404, "{:#}", r.body);

    let r = app.send(patch("soon", "Bad")).await;
    r.assert_problem(422, "validation");
}

#[tokio::test]
async fn a_retried_command_with_the_same_key_returns_the_first_answer_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let client = app.client("Retry Case").await;
    let body = json!({
        "client_id": client,
        "start_at": "2026-07-01T10:00:00Z",
        "end_at": "2026-07-03T10:00:00Z",
        "price_daily": "4500.00",
        "services": [{ "service_id": crate::helpers::CHILD_SEAT }],
    });
    let send = |key: &str, body: &serde_json::Value| {
        app.request(Method::POST, "sales", "/v1/bookings")
            .header("idempotency-key", key)
            .json(body)
    };

    let first = app.send(send("create-1", &body)).await;
    assert_eq!(first.status, 201, "{:#}", first.body);
    let after_first = app.event_count().await;

    // The same body with its keys in another order is the same request.
    let reordered = format!(
        r#"{{ "price_daily": "4500.00",
             "services": [ {{ "service_id": "{}" }} ],
             "end_at": "2026-07-03T10:00:00Z", "start_at": "2026-07-01T10:00:00Z",
             "client_id": "{client}" }}"#,
        crate::helpers::CHILD_SEAT
    );
    for _ in 0..3 {
        let again = app
            .send(
                app.request(Method::POST, "sales", "/v1/bookings")
                    .header("idempotency-key", "create-1")
                    .header("content-type", "application/json")
                    .body(reordered.clone()),
            )
            .await;
        assert_eq!(again.status, 201);
        assert_eq!(again.body, first.body);
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        // With the headers a client acts on: the version to send back, the new resource.
        for name in ["etag", "location"] {
            assert!(first.header(name).is_some(), "{name}");
            assert_eq!(again.header(name), first.header(name), "{name}");
        }
    }
    assert_eq!(app.event_count().await, after_first);

    // The same key with another body is refused.
    let mut other = body.clone();
    other["price_daily"] = json!("9999.00");
    let r = app.send(send("create-1", &other)).await;
    r.assert_problem(422, "validation");
    assert_eq!(r.body["code"], "idempotency.key_reused");
    assert_eq!(app.event_count().await, after_first);

    // Keys belong to the caller: another account's same key is another request.
    let ops = app
        .send(
            app.request(Method::POST, "operations", "/v1/bookings")
                .header("idempotency-key", "create-1")
                .json(&body),
        )
        .await;
    assert_eq!(ops.status, 201);
    assert_ne!(ops.body["id"], first.body["id"]);

    // A refusal is an answer too: replayed as it was.
    let id = first.body["id"].as_str().unwrap();
    let confirm = |key: &str| {
        app.request(Method::POST, "sales", &format!("/v1/bookings/{id}/confirm"))
            .header("idempotency-key", key)
    };
    let refused = app.send(confirm("confirm-1")).await;
    refused.assert_problem(409, "invalid-transition");
    let replayed = app.send(confirm("confirm-1")).await;
    replayed.assert_problem(409, "invalid-transition");
    assert_eq!(replayed.body, refused.body);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_run_the_command_once() {
    let app = TestApp::spawn().await;
    let client = app.client("Concurrent Case").await;
    let body = json!({
        "client_id": client,
        "start_at": "2026-08-01T10:00:00Z",
        "end_at": "2026-08-02T10:00:00Z",
        "price_daily": "3000.00",
    });
    let before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'BookingCreated'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let requests = (0..8).map(|_| {
        app.send(
            app.request(Method::POST, "sales", "/v1/bookings")
                .header("idempotency-key", "burst")
                .json(&body),
        )
    });
    let answers = futures::future::join_all(requests).await;
    let created: Vec<_> = answers.iter().filter(|r| r.status == 201).collect();
    assert!(!created.is_empty());
    for r in &answers {
        match r.status {
            201 => assert_eq!(r.body, created[0].body),
            409 => assert_eq!(r.body["code"], "idempotency.in_progress"),
            s => panic!("unexpected {s}: {:#}", r.body),
        }
    }
    let after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'BookingCreated'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(after, before + 1);
}

/// The claim row of one key: its id and the answer stored for it.
async fn stored_answer(
    app: &TestApp,
    key: &str,
) -> (uuid::Uuid, String, Option<i16>, Option<Vec<u8>>) {
    sqlx::query_as(
        "SELECT claim_id, status, response_status, response_body FROM idempotency_keys \
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// The events written under a claim, in log order.
async fn claimed_events(app: &TestApp, claim: uuid::Uuid) -> Vec<api::write::WrittenEvent> {
    sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, global_position, payload::text AS payload \
         FROM events WHERE metadata ->> 'idempotency_claim' = $1 ORDER BY global_position",
    )
    .bind(claim.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// Makes the key's claim look abandoned: its answer never stored, claimed a minute ago (as when
/// the process died after the command and before storing the answer).
async fn abandon(app: &TestApp, key: &str) {
    sqlx::query(
        "UPDATE idempotency_keys SET status = 'in_progress', response_status = NULL, \
         response_body = NULL, completed_at = NULL, claimed_at = now() - interval '1 minute' \
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn booking_created_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'BookingCreated'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Every command route's answer can be rebuilt from the events its command wrote: that is what a
/// retry answers when the first attempt committed and its process died before storing the answer.
#[tokio::test]
async fn every_command_answer_equals_the_one_rebuilt_from_its_events() {
    use crate::helpers::{CHILD_SEAT, DRIVER_PROFILE, GHOST};
    let app = TestApp::spawn().await;
    let mut n = 0;
    let mut keys = Vec::new();
    let mut send = async |method: Method, role: &str, path: String, body: serde_json::Value| {
        n += 1;
        let key = format!("tour-{n}");
        let r = app
            .send(
                app.request(method, role, &path)
                    .header("idempotency-key", &key)
                    .json(&body),
            )
            .await;
        assert!(
            (200..300).contains(&r.status),
            "{path}: {} {:#}",
            r.status,
            r.body
        );
        keys.push((key, path));
        r.body
    };
    let client = send(
        Method::POST,
        "sales",
        "/v1/clients".into(),
        json!({ "name": "Tour Client", "phone": "+971 50 765 4321",
                "email": "tour@example.com", "residency_country": "AE" }),
    )
    .await;
    let client = client["id"].as_str().unwrap().to_string();
    send(
        Method::PATCH,
        "sales",
        format!("/v1/clients/{client}"),
        json!({ "name": "Tour Client Renamed" }),
    )
    .await;
    let booking = send(
        Method::POST,
        "sales",
        "/v1/bookings".into(),
        json!({ "client_id": client, "start_at": "2026-10-01T10:00:00Z",
                "end_at": "2026-10-03T10:00:00Z", "price_daily": "2800",
                "services": [{ "service_id": CHILD_SEAT }] }),
    )
    .await;
    let b = |action: &str| format!("/v1/bookings/{}/{action}", booking["id"].as_str().unwrap());
    send(
        Method::POST,
        "operations",
        b("assign-vehicle"),
        json!({ "vehicle_id": GHOST }),
    )
    .await;
    send(
        Method::POST,
        "operations",
        b("assign-driver"),
        json!({ "driver_id": DRIVER_PROFILE }),
    )
    .await;
    let added = send(
        Method::POST,
        "sales",
        b("add-service"),
        json!({ "service_id": CHILD_SEAT, "price": "100.00" }),
    )
    .await;
    send(
        Method::POST,
        "sales",
        b("remove-service"),
        json!({ "line_id": added["line_id"] }),
    )
    .await;
    send(Method::POST, "sales", b("confirm"), json!({})).await;
    send(
        Method::POST,
        "operations",
        b("issue-invoice"),
        json!({ "amount": "5600.00" }),
    )
    .await;
    send(
        Method::POST,
        "operations",
        b("record-payment"),
        json!({ "amount": 5600, "method": "card" }),
    )
    .await;
    send(
        Method::POST,
        "operations",
        format!("/v1/vehicles/{GHOST}/blocks"),
        json!({ "job_type": "maintenance", "scheduled_start": "2026-11-06T00:00:00Z",
                "scheduled_end": "2026-11-07T00:00:00Z", "description": "Annual service" }),
    )
    .await;
    let lead = send(
        Method::POST,
        "sales",
        "/v1/leads".into(),
        json!({ "stage_id": "qualified", "value_amount": "20000", "title": "Cullinan" }),
    )
    .await;
    send(
        Method::POST,
        "sales",
        format!("/v1/leads/{}/win", lead["id"].as_str().unwrap()),
        json!({ "client_id": client, "start_at": "2026-12-01T10:00:00Z",
                "end_at": "2026-12-04T10:00:00Z", "price_daily": "10000.00" }),
    )
    .await;
    let deal = send(
        Method::POST,
        "sales",
        "/v1/deals".into(),
        json!({ "client_id": client, "principal_amount": "450000.00",
                "monthly_payment": "14500.00", "interest_rate": "4.5", "term_months": 36,
                "contract_start_date": "2026-01-01", "contract_end_date": "2028-12-31",
                "first_payment_date": "2026-02-01" }),
    )
    .await;
    let d = |action: &str| format!("/v1/deals/{}/{action}", deal["id"].as_str().unwrap());
    send(Method::POST, "sales", d("activate"), json!({})).await;
    send(
        Method::POST,
        "sales",
        d("record-payment"),
        json!({ "amount": "14500.00" }),
    )
    .await;

    assert_eq!(keys.len(), 16);
    for (key, path) in keys {
        let (claim, status, response_status, response_body) = stored_answer(&app, &key).await;
        assert_eq!(status, "completed");
        let events = claimed_events(&app, claim).await;
        assert!(!events.is_empty(), "{path} wrote no events under its claim");
        let rebuilt = api::write::answer_from_events(&path, &events)
            .unwrap()
            .unwrap_or_else(|| panic!("{path}: no answer from its events"));
        let rebuilt = axum::response::IntoResponse::into_response(rebuilt);
        assert_eq!(
            Some(rebuilt.status().as_u16() as i16),
            response_status,
            "{path}"
        );
        let bytes = axum::body::to_bytes(rebuilt.into_body(), 1 << 20)
            .await
            .unwrap();
        let rebuilt: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&response_body.unwrap()).unwrap();
        assert_eq!(rebuilt, stored, "{path}");
    }
}

fn booking_body(client: &str) -> serde_json::Value {
    json!({
        "client_id": client,
        "start_at": "2026-09-01T10:00:00Z",
        "end_at": "2026-09-02T10:00:00Z",
        "price_daily": "3000.00",
    })
}

#[tokio::test]
async fn a_retry_answers_from_the_events_of_a_first_attempt_that_died_before_storing_its_answer() {
    let app = TestApp::spawn().await;
    let client = app.client("Died Case").await;
    let create = || {
        app.request(Method::POST, "sales", "/v1/bookings")
            .header("idempotency-key", "died-1")
            .json(&booking_body(&client))
    };
    let first = app.send(create()).await;
    assert_eq!(first.status, 201, "{:#}", first.body);
    let (first_claim, ..) = stored_answer(&app, "died-1").await;
    let events = app.event_count().await;

    // Still within the claim's time: the first attempt may be running, so the retry waits.
    sqlx::query(
        "UPDATE idempotency_keys SET status = 'in_progress', response_status = NULL, \
         response_body = NULL WHERE idempotency_key = 'died-1'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let early = app.send(create()).await;
    early.assert_problem(409, "conflict");
    assert_eq!(early.body["code"], "idempotency.in_progress");
    let wait: u64 = early.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&wait), "Retry-After {wait}");

    // Past it, the retry takes the claim over, finds the committed events and answers from them.
    abandon(&app, "died-1").await;
    let retried = app.send(create()).await;
    assert_eq!(retried.status, 201, "{:#}", retried.body);
    assert_eq!(retried.body, first.body);
    assert_eq!(retried.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.event_count().await, events);
    let (claim, status, ..) = stored_answer(&app, "died-1").await;
    assert_eq!(status, "completed");
    assert_eq!(
        claim, first_claim,
        "answered under the claim its events carry"
    );
    // And that answer is now stored like any other.
    let again = app.send(create()).await;
    assert_eq!(again.body, first.body);
    assert_eq!(app.event_count().await, events);
}

/// A first attempt that is slow, not dead, and has not reached its commit is fenced out by the
/// retry that took its claim over: the booking is created once, by the retry.
#[tokio::test]
async fn a_slow_first_attempt_is_fenced_out_by_the_retry_that_took_its_claim_over() {
    let app = TestApp::spawn_with(without_claim_renewals).await;
    let client = app.client("Fence Case").await;
    let create = || {
        app.request(Method::POST, "sales", "/v1/bookings")
            .header("idempotency-key", "fence-1")
            .json(&booking_body(&client))
    };
    let before = booking_created_count(&app).await;

    // Writers of events queue behind this lock (readers do not).
    let lock = lock_event_writes(&app).await;
    let (first, second) = tokio::join!(app.send(create()), async {
        wait_for_lock_waits(&app, "relation", "INSERT INTO events", 1).await;
        backdate_claim(&app, "fence-1").await;
        let release = async {
            wait_for_lock_waits(&app, "relation", "INSERT INTO events", 2).await;
            lock.rollback().await.unwrap();
        };
        tokio::join!(app.send(create()), release).0
    });

    first.assert_problem(409, "conflict");
    assert_eq!(first.body["code"], "idempotency.superseded");
    assert_eq!(second.status, 201, "{:#}", second.body);
    assert_eq!(booking_created_count(&app).await, before + 1);
    let replayed = app.send(create()).await;
    assert_eq!(replayed.body, second.body);
    assert_eq!(booking_created_count(&app).await, before + 1);
}

/// A first attempt that is slow but alive (its event insert waits for a lock past the takeover
/// age) keeps renewing its claim: a retry meanwhile is told to wait, not given the command; the
/// first attempt then answers, and the retry gets that answer.
#[tokio::test]
async fn a_slow_first_attempt_that_is_alive_keeps_its_claim_past_the_takeover_age() {
    let app = TestApp::spawn().await;
    let client = app.client("Alive Case").await;
    let create = || {
        app.request(Method::POST, "sales", "/v1/bookings")
            .header("idempotency-key", "alive-1")
            .json(&booking_body(&client))
    };
    let before = booking_created_count(&app).await;

    let lock = lock_event_writes(&app).await;
    let (first, (waited, age)) = tokio::join!(app.send(create()), async {
        wait_for_lock_waits(&app, "relation", "INSERT INTO events", 1).await;
        // Past the age at which a claim that is not renewed is taken over.
        tokio::time::sleep(std::time::Duration::from_secs_f64(
            api::idempotency::ABANDONED_AFTER_SECONDS + 1.0,
        ))
        .await;
        let age: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM clock_timestamp() - claimed_at)::float8 \
             FROM idempotency_keys WHERE idempotency_key = 'alive-1'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let waited = app.send(create()).await;
        lock.rollback().await.unwrap();
        (waited, age)
    });

    assert!(
        age < api::idempotency::ABANDONED_AFTER_SECONDS,
        "the running command renews its claim (last {age:.1} s ago)"
    );
    waited.assert_problem(409, "conflict");
    assert_eq!(waited.body["code"], "idempotency.in_progress");
    assert_eq!(first.status, 201, "{:#}", first.body);
    let replayed = app.send(create()).await;
    assert_eq!(replayed.status, 201);
    assert_eq!(replayed.body, first.body);
    assert_eq!(booking_created_count(&app).await, before + 1);
}

/// For tests that make a live attempt's claim look abandoned (as when its process stopped
/// renewing it): the attempt does not renew it behind the test's back.
fn without_claim_renewals(config: api::ApiConfig) -> api::ApiConfig {
    api::ApiConfig {
        claim_heartbeat: std::time::Duration::from_secs(3600),
        ..config
    }
}

/// Holds a lock that makes every writer of events wait (readers do not), until the transaction
/// ends.
async fn lock_event_writes(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

/// Makes the key's claim look abandoned (not renewed for a minute) while its attempt still runs.
async fn backdate_claim(app: &TestApp, key: &str) {
    sqlx::query(
        "UPDATE idempotency_keys SET claimed_at = now() - interval '1 minute' \
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .execute(&app.pool)
    .await
    .unwrap();
}

/// Waits until `n` statements containing `query_part` wait for a lock of kind `wait_event`
/// (`relation`: a table lock; `transactionid`: another transaction's row or constraint), in this
/// test's database (other tests run at the same time on the same server).
async fn wait_for_lock_waits(app: &TestApp, wait_event: &str, query_part: &str, n: i64) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() \
               AND wait_event_type = 'Lock' AND wait_event = $2 AND query ILIKE '%' || $1 || '%'",
        )
        .bind(query_part)
        .bind(wait_event)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{n} `{query_part}` never waited for a lock");
}

/// A retry that comes while the first attempt is inside its commit (past the fence, waiting for
/// the vehicle schedule) waits for it, then answers from its events: confirmed once, one answer.
#[tokio::test]
async fn a_takeover_waits_for_a_committing_first_attempt_and_answers_from_its_events() {
    use crate::helpers::GHOST;
    let app = TestApp::spawn_with(without_claim_renewals).await;
    let client = app.client("Commit Case").await;
    let created = app
        .ok(
            "sales",
            "/v1/bookings",
            json!({ "client_id": client, "vehicle_id": GHOST,
                    "start_at": "2026-11-01T10:00:00Z", "end_at": "2026-11-03T10:00:00Z",
                    "price_daily": "2800" }),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let confirm = || {
        app.request(
            Method::POST,
            "operations",
            &format!("/v1/bookings/{id}/confirm"),
        )
        .header("idempotency-key", "commit-1")
        .json(&json!({}))
    };
    // An uncommitted overlapping hold on the vehicle: the confirmation's schedule claim waits for
    // it inside the event insert, after the fence trigger took its share of the claim.
    let mut hold = app.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO vehicle_schedule (source_type, source_id, vehicle_id, period) \
         VALUES ('block', 'test-hold', $1, \
                 tstzrange('2026-11-01T00:00:00Z', '2026-11-02T00:00:00Z'))",
    )
    .bind(GHOST)
    .execute(&mut *hold)
    .await
    .unwrap();
    // And the first attempt waits before its insert until its claim looks abandoned.
    let events_lock = lock_event_writes(&app).await;
    let (first, second) = tokio::join!(app.send(confirm()), async {
        wait_for_lock_waits(&app, "relation", "INSERT INTO events", 1).await;
        backdate_claim(&app, "commit-1").await;
        events_lock.rollback().await.unwrap();
        // Past the fence, waiting for the vehicle hold.
        wait_for_lock_waits(&app, "transactionid", "INSERT INTO events", 1).await;
        let release = async {
            // The retry's resolution waits for the first attempt's transaction.
            wait_for_lock_waits(
                &app,
                "transactionid",
                "FROM idempotency_keys WHERE claim_id",
                1,
            )
            .await;
            hold.rollback().await.unwrap();
        };
        tokio::join!(app.send(confirm()), release).0
    });
    assert_eq!(first.status, 200, "{:#}", first.body);
    assert_eq!(second.status, 200, "{:#}", second.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(second.body, first.body);
    let confirmed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'BookingConfirmed' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(confirmed, 1);
}

/// `win` used to attach the client in a command of its own before winning (claims of that
/// version may still be resolved): a first attempt that got only that far did not win, so its
/// answer is not built from the attachment.
#[test]
fn a_win_that_only_attached_the_client_is_not_an_answer() {
    let lead = uuid::Uuid::now_v7();
    let attached = api::write::WrittenEvent {
        aggregate_type: "Lead".into(),
        aggregate_id: lead.to_string(),
        sequence: 2,
        global_position: 10,
        payload: json!({ "LeadClientAttached": { "client_id": uuid::Uuid::now_v7() } }).to_string(),
    };
    let path = format!("/v1/leads/{lead}/win");
    assert!(
        api::write::answer_from_events(&path, std::slice::from_ref(&attached))
            .unwrap()
            .is_none()
    );
    // Elsewhere the same event is a whole command's answer.
    let attach = format!("/v1/leads/{lead}/attach-client");
    let answer = api::write::answer_from_events(&attach, &[attached])
        .unwrap()
        .unwrap();
    assert_eq!(answer.body.version, 2);
    assert_eq!(answer.body.position, 10);
}

/// A command that lost too many races is told to try again (409 `concurrency`, `Retry-After`);
/// that is not its answer: a retry with the same `Idempotency-Key` runs the command.
#[tokio::test]
async fn a_try_again_answer_is_not_kept_for_the_idempotency_key() {
    let app = TestApp::spawn().await;
    let client = app.client("Contended Case").await;
    let created = app
        .ok(
            "sales",
            "/v1/bookings",
            json!({ "client_id": client, "start_at": "2026-08-01T10:00:00Z",
                    "end_at": "2026-08-03T10:00:00Z", "price_daily": "4500.00" }),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    // Every write to this booking loses the optimistic race, as if others always came first.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION test_always_lose() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.aggregate_id = '{id}' THEN \
           RAISE unique_violation USING CONSTRAINT = 'events_pkey'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER zz_test_always_lose BEFORE INSERT ON events \
           FOR EACH ROW EXECUTE FUNCTION test_always_lose();"
    ))
    .execute(&app.pool)
    .await
    .unwrap();
    let path = format!("/v1/bookings/{id}/assign-vehicle");
    let send = || {
        app.request(Method::POST, "operations", &path)
            .header("idempotency-key", "contended-1")
            .json(&json!({ "vehicle_id": crate::helpers::GHOST }))
    };
    let first = app.send(send()).await;
    first.assert_problem(409, "conflict");
    assert_eq!(first.body["code"], "concurrency", "{:#}", first.body);
    assert!(first.headers.contains_key("retry-after"));

    sqlx::raw_sql("DROP TRIGGER zz_test_always_lose ON events")
        .execute(&app.pool)
        .await
        .unwrap();
    let retry = app.send(send()).await;
    assert_eq!(retry.status, 200, "{:#}", retry.body);
    assert!(!retry.headers.contains_key("idempotent-replayed"));
    assert_eq!(retry.body["version"], 2);
    // And that answer is the one kept.
    let again = app.send(send()).await;
    assert_eq!((again.status, &again.body), (200, &retry.body));
    assert!(again.headers.contains_key("idempotent-replayed"));
}
