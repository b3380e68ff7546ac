//! Operations and audit: projection status and rebuild, outbox dead letters, the global feed,
//! and reading one's own writes with `min_position`.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, booking_body};

/// The log's other consumers are reported beside the projections, with their lag and the error
/// one is stopped on (also as metrics): the outbox projector (it runs in the worker role; here
/// once, by hand) and the won-lead process manager, stopped here by a `LeadWon` it cannot read.
#[tokio::test]
async fn the_outbox_projector_and_the_process_manager_report_their_lag_and_errors() {
    let app = TestApp::spawn().await;
    app.client("Consumer Case").await;
    // Until the client's registration is final in the log and applied.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        projections::runner::catch_up(&app.pool, &outbox_worker::projector::OutboxProjector, 500)
            .await
            .unwrap();
        let status = app.get("integration", "/v1/projections").await;
        assert_eq!(status.status, 200);
        // (Nothing is behind also while the registration is not final in the log yet.)
        let outbox = &status.body["consumers"][0];
        if outbox["events_behind"] == 0 && outbox["global_position"].as_i64() > Some(0) {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "{:#}", status.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let consumers = status.body["consumers"].as_array().unwrap();
    let names: Vec<&str> = consumers
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["outbox", "lead_to_booking"]);
    let outbox = &consumers[0];
    assert_eq!(outbox["events_behind"], 0, "{outbox:#}");
    assert!(
        outbox["global_position"].as_i64().unwrap() > 0,
        "{outbox:#}"
    );

    let bad: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Lead', $1, 1, 'LeadWon', '1.0', '{\"LeadWon\": {\"booking_id\": 7}}', '{}') \
         RETURNING global_position",
    )
    .bind(Uuid::now_v7().to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let status = app
        .eventually("operations", "/v1/projections", |b| {
            b["consumers"][1]["error_position"] == bad
        })
        .await;
    let manager = &status["consumers"][1];
    assert!(manager["last_error"].as_str().is_some(), "{manager:#}");
    assert!(manager["global_position"].as_i64().unwrap() < bad);
    assert!(manager["events_behind"].as_i64().unwrap() >= 1);
    assert!(status["consumers"][0]["events_behind"].as_i64().unwrap() >= 1);
    // Gauges are set at each scrape (from this test's database; scraped again if another test
    // in the same process scraped its own in between).
    let expected = [
        "consumer_stopped{consumer=\"lead_to_booking\"} 1",
        "consumer_stopped{consumer=\"outbox\"} 0",
        "projection_stopped{projection=\"bookings\"} 0",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = app.metrics_text().await;
        if expected.iter().all(|line| text.contains(line)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn projections_show_their_lag_and_rebuild_in_the_background() {
    let app = TestApp::spawn().await;
    let client = app.client("Rebuild Case").await;
    let created = app
        .ok("sales", "/v1/clients", json!({ "name": "Second Client" }))
        .await;
    let position = created["position"].as_i64().unwrap();
    app.eventually(
        "operations",
        &format!("/v1/clients/{client}?min_position={position}"),
        |_| true,
    )
    .await;

    let status = app.get("integration", "/v1/projections").await;
    assert_eq!(status.status, 200);
    let names: Vec<&str> = status.body["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bookings", "clients", "fleet", "sales", "kpis"]);

    let r = app
        .post("operations", "/v1/projections/clients/rebuild", json!({}))
        .await;
    assert_eq!(r.status, 202, "{:#}", r.body);
    app.post("operations", "/v1/projections/nope/rebuild", json!({}))
        .await
        .assert_problem(404, "not-found");
    // The rebuild finishes and the read model still answers the same.
    app.eventually("operations", "/v1/projections", |b| {
        b["rebuilding"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let row = app
        .get("operations", &format!("/v1/clients/{client}"))
        .await;
    assert_eq!(row.status, 200);
    assert_eq!(row.body["name"], "Rebuild Case");
    assert!(
        row.body.get("passport_number").is_none(),
        "no PII in read models"
    );

    // Another process (here: a guard held on another connection) rebuilding the projection:
    // this replica refuses to start a second rebuild of it, and starts once it is done.
    let clients = projections::by_name("clients").unwrap();
    let elsewhere = projections::rebuild::RebuildGuard::acquire(&app.pool, &[clients.as_ref()])
        .await
        .unwrap();
    let refused = app
        .post("operations", "/v1/projections/clients/rebuild", json!({}))
        .await;
    refused.assert_problem(409, "conflict");
    assert_eq!(refused.body["code"], "projection.rebuilding");
    let status = app.get("operations", "/v1/projections").await;
    assert_eq!(status.body["rebuilding"], json!([]), "nothing was started");
    elsewhere.release().await;
    let r = app
        .post("operations", "/v1/projections/clients/rebuild", json!({}))
        .await;
    assert_eq!(r.status, 202, "{:#}", r.body);
    app.eventually("operations", "/v1/projections", |b| {
        b["rebuilding"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
}

#[tokio::test]
async fn dead_letters_are_listed_and_requeued_once() {
    let app = TestApp::spawn().await;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO integrations_outbox \
           (id, entity_type, entity_id, target_system, event_type, payload, status, attempts, \
            last_error, dedupe_key, source_position) \
         VALUES ($1, 'client', $2, 'zoho', 'ClientRegistered', '{}', 'failed', 12, \
                 'INVALID_DATA', $3, 1)",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .bind(format!("test:{id}"))
    .execute(&app.pool)
    .await
    .unwrap();

    let failed = app.get("integration", "/v1/outbox?status=failed").await;
    assert_eq!(failed.status, 200);
    assert_eq!(failed.body["items"][0]["id"], id.to_string());
    app.get("integration", "/v1/outbox?status=lost")
        .await
        .assert_problem(422, "validation");

    let r = app
        .post(
            "integration",
            &format!("/v1/outbox/{id}/requeue"),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["status"], "pending");
    assert_eq!(r.body["attempts"], 0);
    app.post("operations", &format!("/v1/outbox/{id}/requeue"), json!({}))
        .await
        .assert_problem(409, "invalid-transition");
    app.post(
        "operations",
        &format!("/v1/outbox/{}/requeue", Uuid::now_v7()),
        json!({}),
    )
    .await
    .assert_problem(404, "not-found");
}

#[tokio::test]
async fn the_global_feed_pages_in_log_order_and_hides_personal_data() {
    let app = TestApp::spawn().await;
    for n in 0..3 {
        app.client(&format!("Feed Client {n}")).await;
    }
    let mut after = 0;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < 3 {
        let r = app
            .get("integration", &format!("/v1/events?after={after}&limit=2"))
            .await;
        assert_eq!(r.status, 200, "{:#}", r.body);
        for e in r.body["events"].as_array().unwrap() {
            let text = e.to_string();
            assert!(
                !text.contains("P7654321"),
                "the passport number leaked: {text}"
            );
            seen.push(e["global_position"].as_i64().unwrap());
        }
        after = r.body["next_after"].as_i64().unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the feed did not deliver"
        );
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(seen, sorted);
    app.get("integration", "/v1/events?after=999999")
        .await
        .assert_problem(422, "validation");
}

#[tokio::test]
async fn min_position_waits_for_the_read_model_or_says_it_is_not_there_yet() {
    // A database where no projection runs: the write is there, the read model is not.
    let db = store::testing::TestDb::new().await;
    let bus = commands::CommandBus::new(db.pool.clone());
    let outcome = bus
        .clients
        .execute(
            Uuid::now_v7(),
            domain::client::ClientCommand::Register {
                name: "Lagging".into(),
                phone: None,
                email: None,
                residency_country: None,
                preferred_language: None,
                preferred_channels: vec![],
                timezone: None,
                gender: None,
                date_of_birth: None,
                passport_number: None,
                emirates_id: None,
                kommo_contact_id: None,
            },
            &domain::CommandMetadata::new(domain::Actor::system(), "test"),
            None,
        )
        .await
        .unwrap();
    let wait =
        |max| api::consistency::wait_for(&db.pool, &["clients"], Some(outcome.position), max);
    let err = wait(Duration::from_millis(200)).await.unwrap_err();
    assert_eq!(err.kind, api::error::ProblemKind::NotYetProjected);
    assert_eq!(err.kind.status().as_u16(), 503);
    assert!(err.to_string().contains("not there yet"), "{err}");

    let clients = projections::by_name("clients").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        projections::runner::catch_up(&db.pool, clients.as_ref(), 100)
            .await
            .unwrap();
        if wait(Duration::from_millis(50)).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Queries take SPEC §4's parameters as written (an empty one is no filter), say when a range
/// or a version cannot be, and the outbox honours `min_position` like the read models.
#[tokio::test]
async fn queries_take_empty_filters_refuse_impossible_ranges_and_wait_for_the_outbox() {
    let mut app = TestApp::spawn().await;
    app.start_outbox().await;
    let created = app
        .ok(
            "sales",
            "/v1/clients",
            json!({"name": "Query Case", "email": "query.case@example.com"}),
        )
        .await;
    let client = created["id"].as_str().unwrap().to_string();
    let position = created["position"].as_i64().unwrap();

    // The outbox rows the registration derives are there once asked with its position.
    let r = app
        .get(
            "integration",
            &format!("/v1/outbox?min_position={position}"),
        )
        .await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    let rows: Vec<&Value> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["entity_id"] == client.as_str())
        .collect();
    assert_eq!(rows.len(), 2, "{:#}", r.body);

    let r = app
        .get(
            "sales",
            &format!(
                "/v1/bookings?status=&client_id=&vehicle_id=&from=&to=&min_position={position}"
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    app.get(
        "sales",
        "/v1/bookings?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
    )
    .await
    .assert_problem(422, "validation");

    // A calendar asked from a day well ahead spans 67 days from it.
    let r = app
        .get("sales", "/v1/calendar?from=2027-06-01T00:00:00Z")
        .await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["to"], "2027-08-07T00:00:00Z");

    // A version the booking has not reached.
    let booking = app.ok("sales", "/v1/bookings", booking_body(&client)).await;
    let id = booking["id"].as_str().unwrap();
    let r = app
        .get("sales", &format!("/v1/bookings/{id}/state?version=999"))
        .await;
    r.assert_problem(404, "not-found");
    assert_eq!(r.body["code"], "booking.no_such_version");
    let r = app
        .get("sales", &format!("/v1/bookings/{id}/state?version=1"))
        .await;
    assert_eq!((r.status, r.body["version"].as_i64()), (200, Some(1)));
}
