//! Kommo webhook intake: stored once, processed in the background, idempotent.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestApp, WEBHOOK_SECRET};

/// Waits until every stored delivery is processed; returns their `fetched_data`.
async fn processed(app: &TestApp, n: i64) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let rows: Vec<(String, Option<Value>)> = sqlx::query_as(
            "SELECT status, fetched_data FROM kommo_webhook_events ORDER BY created_at",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        if rows.len() as i64 == n && rows.iter().all(|(s, _)| s == "processed") {
            return rows.into_iter().filter_map(|(_, d)| d).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not processed: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_kommo_lead_delivered_twice_in_different_bodies_becomes_one_lead() {
    let app = TestApp::spawn().await;
    let first = "leads[add][0][id]=777&leads[add][0][name]=Urus&leads[add][0][status_id]=999";
    let second =
        "leads[add][0][id]=777&leads[add][0][name]=Urus&leads[add][0][status_id]=999&account[id]=1";
    assert_eq!(app.webhook(WEBHOOK_SECRET, first, None).await.status, 200);
    assert_eq!(app.webhook(WEBHOOK_SECRET, second, None).await.status, 200);
    let results = processed(&app, 2).await;
    let outcomes: Vec<&str> = results
        .iter()
        .map(|r| r[0]["result"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["ok", "already_created"]);
    let leads: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT e.aggregate_id, e.event_type, (e.payload->'LeadCreated'->>'kommo_lead_id')::bigint \
         FROM events e WHERE e.aggregate_type = 'Lead'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(leads.len(), 1, "{leads:?}");
    assert_eq!(leads[0].2, Some(777));
    // An unknown Kommo status puts the lead in `new`; the actor is Kommo.
    let (stage, actor): (String, String) = sqlx::query_as(
        "SELECT payload->'LeadCreated'->>'stage_id', metadata->>'actor_type' FROM events \
         WHERE aggregate_type = 'Lead'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((stage.as_str(), actor.as_str()), ("new", "kommo"));
    // The repeated delivery took no code number: the next lead's follows.
    let code: String = sqlx::query_scalar(
        "SELECT payload->'LeadCreated'->>'lead_code' FROM events WHERE aggregate_type = 'Lead'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let next = app
        .ok(
            "sales",
            "/v1/leads",
            serde_json::json!({"title": "Next lead"}),
        )
        .await;
    let number = |c: &str| {
        c.rsplit('-')
            .next()
            .unwrap_or_default()
            .parse::<i64>()
            .unwrap()
    };
    assert_eq!(number(next["code"].as_str().unwrap()), number(&code) + 1);
}

#[tokio::test]
async fn a_status_change_for_an_unknown_lead_is_recorded_and_skipped() {
    let app = TestApp::spawn().await;
    let body = "leads[status][0][id]=31337&leads[status][0][status_id]=142&leads[status][0][pipeline_id]=5389528";
    let r = app.webhook(WEBHOOK_SECRET, body, None).await;
    assert_eq!(r.status, 200);
    let results = processed(&app, 1).await;
    assert_eq!(results[0][0]["result"], "skipped");
    let label: Option<String> =
        sqlx::query_scalar("SELECT kommo_status_label FROM kommo_webhook_events")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(label.as_deref(), Some("Closed - won"));
    assert_eq!(app.event_count().await, 0);
}

/// A NUL character in a delivery (`%00`), which no PostgreSQL text holds, is dropped: the
/// delivery is stored and its lead created, rather than failing with a 500 that Kommo retries.
#[tokio::test]
async fn a_nul_character_in_a_delivery_is_dropped() {
    let app = TestApp::spawn().await;
    let body = "leads[add][0][id]=778&leads[add][0][name]=Cul%00linan&leads[add][0][status_id]=999";
    assert_eq!(app.webhook(WEBHOOK_SECRET, body, None).await.status, 200);
    let results = processed(&app, 1).await;
    assert_eq!(results[0][0]["result"], "ok", "{results:?}");
    let title: Option<String> = sqlx::query_scalar(
        "SELECT payload->'LeadCreated'->>'title' FROM events WHERE aggregate_type = 'Lead'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(title.as_deref(), Some("Cullinan"));
}

/// Kommo's "Closed - lost" loses the lead; moved out of it again in Kommo, the lead is active
/// again at the stage it was moved to.
#[tokio::test]
async fn a_lead_closed_as_lost_in_kommo_is_lost_here_until_kommo_reopens_it() {
    let app = TestApp::spawn().await;
    let deliveries = [
        "leads[add][0][id]=880&leads[add][0][name]=Huracan&leads[add][0][status_id]=47873539",
        "leads[status][0][id]=880&leads[status][0][status_id]=143&leads[status][0][old_status_id]=47873539",
        "leads[status][0][id]=880&leads[status][0][status_id]=47873536&leads[status][0][old_status_id]=143",
    ];
    let events = || async {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT event_type FROM events WHERE aggregate_type = 'Lead' ORDER BY sequence",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        rows.into_iter().map(|(t,)| t).collect::<Vec<_>>()
    };
    for (n, body) in deliveries.iter().enumerate() {
        assert_eq!(app.webhook(WEBHOOK_SECRET, body, None).await.status, 200);
        processed(&app, n as i64 + 1).await;
    }
    assert_eq!(
        events().await,
        [
            "LeadCreated",
            "LeadKommoStatusApplied",
            "LeadLost",
            "LeadReopened",
            "LeadKommoStatusApplied"
        ]
    );
    let state: Value = sqlx::query_scalar(
        "SELECT payload::jsonb FROM events WHERE aggregate_type = 'Lead' ORDER BY sequence DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(state["LeadKommoStatusApplied"]["stage_id"], "offer_sent");
}

/// A lead moved forth, back and forth again in Kommo sends the same body twice with another
/// delivery between them: the second is news, not a repeat, and the lead ends where Kommo has
/// it. Kommo sending that delivery again right away is a repeat.
#[tokio::test]
async fn a_lead_moved_back_and_forth_follows_kommo_while_a_repeat_is_kept_once() {
    let app = TestApp::spawn().await;
    let forth = "leads[status][0][id]=881&leads[status][0][status_id]=47873536&leads[status][0][old_status_id]=47873539";
    let back = "leads[status][0][id]=881&leads[status][0][status_id]=47873539&leads[status][0][old_status_id]=47873536";
    let deliveries = [
        "leads[add][0][id]=881&leads[add][0][name]=Cullinan&leads[add][0][status_id]=47873539",
        forth,
        back,
        forth,
    ];
    for (n, body) in deliveries.iter().enumerate() {
        let r = app.webhook(WEBHOOK_SECRET, body, None).await;
        assert_eq!((r.status, &r.body["duplicate"]), (200, &Value::Bool(false)));
        processed(&app, n as i64 + 1).await;
    }
    let again = app.webhook(WEBHOOK_SECRET, forth, None).await;
    assert_eq!(again.body["duplicate"], true);
    processed(&app, 4).await;
    let stages: Vec<(String,)> = sqlx::query_as(
        "SELECT payload->'LeadKommoStatusApplied'->>'stage_id' FROM events \
         WHERE aggregate_type = 'Lead' AND event_type = 'LeadKommoStatusApplied' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let stages: Vec<&str> = stages.iter().map(|(s,)| s.as_str()).collect();
    assert_eq!(stages.len(), 3, "{stages:?}");
    assert_eq!(stages[2], "offer_sent", "{stages:?}");
    assert_eq!(stages[0], stages[2]);

    // Two copies of one delivery arriving together are stored once.
    let (a, b) = tokio::join!(
        app.webhook(WEBHOOK_SECRET, back, None),
        app.webhook(WEBHOOK_SECRET, back, None)
    );
    let mut duplicates = [&a.body["duplicate"], &b.body["duplicate"]];
    duplicates.sort_by_key(|d| d.as_bool());
    assert_eq!(duplicates, [&Value::Bool(false), &Value::Bool(true)]);
    processed(&app, 5).await;
}

/// Kommo repeating a delivery after the lead moved on (our answer was slow, the lead was moved
/// again meanwhile, other deliveries came between): the late repeat changes nothing, the lead
/// stays where Kommo has it.
#[tokio::test]
async fn a_late_repeat_of_an_older_move_leaves_the_lead_where_kommo_has_it() {
    let app = TestApp::spawn().await;
    let first = "leads[status][0][id]=882&leads[status][0][status_id]=47873536&leads[status][0][old_status_id]=47873539";
    let deliveries = [
        "leads[add][0][id]=882&leads[add][0][name]=Spectre&leads[add][0][status_id]=47873539",
        first,
        "leads[status][0][id]=882&leads[status][0][status_id]=47873533&leads[status][0][old_status_id]=47873536",
        "leads[add][0][id]=883&leads[add][0][name]=Ghost&leads[add][0][status_id]=47873539",
        first,
    ];
    for (n, body) in deliveries.iter().enumerate() {
        let r = app.webhook(WEBHOOK_SECRET, body, None).await;
        assert_eq!(r.status, 200);
        processed(&app, n as i64 + 1).await;
    }
    let results = processed(&app, 5).await;
    assert_eq!(results[4][0]["result"], "stale_repeat", "{results:?}");
    let status: i64 = sqlx::query_scalar(
        "SELECT (payload->'LeadKommoStatusApplied'->>'kommo_status_id')::bigint FROM events \
         WHERE event_type = 'LeadKommoStatusApplied' ORDER BY global_position DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, 47873533);
}

/// A delivery received earlier but processed later (it was retried, or another process was
/// slow) is older news: the lead Kommo reopened stays open.
#[tokio::test]
async fn a_closing_delivery_processed_after_a_later_reopening_changes_nothing() {
    let app = TestApp::spawn().await;
    let add = "leads[add][0][id]=881&leads[add][0][name]=Chiron&leads[add][0][status_id]=47873539";
    let reopened = "leads[status][0][id]=881&leads[status][0][status_id]=47873536&leads[status][0][old_status_id]=143";
    for (n, body) in [add, reopened].iter().enumerate() {
        assert_eq!(app.webhook(WEBHOOK_SECRET, body, None).await.status, 200);
        processed(&app, n as i64 + 1).await;
    }
    // The closing, received a minute before the reopening, reaches processing only now.
    sqlx::query(
        "INSERT INTO kommo_webhook_events (source_payload_id, payload, raw_body, created_at) \
         VALUES ('late-closing', $1, '\\x00', now() - interval '1 minute')",
    )
    .bind(serde_json::json!({
        "leads[status][0][id]": "881",
        "leads[status][0][status_id]": "143",
        "leads[status][0][old_status_id]": "47873539",
    }))
    .execute(&app.pool)
    .await
    .unwrap();
    let results = processed(&app, 3).await;
    assert!(
        results.iter().all(|r| r[0]["result"] == "ok"),
        "{results:?}"
    );
    let types: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'Lead' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(types, ["LeadCreated", "LeadKommoStatusApplied"]);
}
