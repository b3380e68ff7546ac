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
