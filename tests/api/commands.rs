//! The command routes not walked by the story: leads, deals, blocks and the other booking
//! actions, each answering `{id, version, position}` and showing in its read model.

use serde_json::json;

use crate::helpers::{CHILD_SEAT, DRIVER_PROFILE, GHOST, SALES_ID, TestApp};

#[tokio::test]
async fn lead_actions_move_the_lead_through_the_pipeline() {
    let app = TestApp::spawn().await;
    let lead = app
        .ok(
            "sales",
            "/v1/leads",
            json!({ "stage_id": "qualified", "value_amount": "20000", "source": "Instagram",
                    "title": "Cullinan, weekend" }),
        )
        .await;
    let code = lead["code"].as_str().unwrap().to_string();
    assert!(code.starts_with("LD-"));
    let path = |a: &str| format!("/v1/leads/{code}/{a}");
    app.ok(
        "sales",
        &path("move-stage"),
        json!({ "stage_id": "offer_sent" }),
    )
    .await;
    app.post(
        "sales",
        &path("move-stage"),
        json!({ "stage_id": "nowhere" }),
    )
    .await
    .assert_problem(422, "validation");
    app.ok(
        "sales",
        &path("change-value"),
        json!({ "value_amount": "30000.00" }),
    )
    .await;
    app.ok(
        "sales",
        &path("assign-owner"),
        json!({ "owner_id": SALES_ID }),
    )
    .await;
    app.ok(
        "sales",
        &path("set-next-action"),
        json!({ "next_action": "Call back", "next_action_at": "2026-09-01T09:00:00Z" }),
    )
    .await;
    let lost = app
        .ok(
            "sales",
            &path("lose"),
            json!({ "reason": "Chose a competitor" }),
        )
        .await;
    app.post("sales", &path("win"), json!({ "price_daily": "1" }))
        .await
        .assert_problem(409, "invalid-transition");
    let row = app
        .eventually(
            "ceo",
            &format!("/v1/leads/{code}?min_position={}", lost["position"]),
            |_| true,
        )
        .await;
    assert_eq!(row["status"], "lost");
    assert_eq!(row["stage_id"], "offer_sent");
    assert_eq!(row["value_amount"], "30000.00");
    assert_eq!(row["next_action"], "Call back");
    assert_eq!(row["loss_reason"], "Chose a competitor");
}

async fn draft(app: &TestApp, client: &str) -> serde_json::Value {
    app.ok(
        "sales",
        "/v1/deals",
        json!({
            "client_id": client,
            "vehicle_id": GHOST,
            "principal_amount": "450000.00",
            "monthly_payment": "14500.00",
            "interest_rate": "4.5",
            "term_months": 36,
            "contract_start_date": "2026-01-01",
            "contract_end_date": "2028-12-31",
            "first_payment_date": "2026-02-01",
            "contract_terms": { "balloon": false },
        }),
    )
    .await
}

#[tokio::test]
async fn deal_actions_follow_the_contract_lifecycle() {
    let app = TestApp::spawn().await;
    let client = app.client("Deal Client").await;
    let deal = draft(&app, &client).await;
    let number = deal["code"].as_str().unwrap().to_string();
    assert!(number.starts_with("DL-"));
    let path = |a: &str| format!("/v1/deals/{number}/{a}");
    app.ok("sales", &path("activate"), json!({})).await;
    let paid = app
        .ok(
            "sales",
            &path("record-payment"),
            json!({ "amount": "14500.00" }),
        )
        .await;
    assert!(paid["payment_id"].is_string());
    app.ok(
        "sales",
        &path("record-missed-payment"),
        json!({ "due_date": "2026-03-01", "amount": "14500.00" }),
    )
    .await;
    let last = app
        .ok(
            "sales",
            &path("mark-defaulted"),
            json!({ "reason": "Three missed payments" }),
        )
        .await;
    app.post("sales", &path("complete"), json!({}))
        .await
        .assert_problem(409, "invalid-transition");
    let row = app
        .eventually(
            "ceo",
            &format!("/v1/deals/{number}?min_position={}", last["position"]),
            |_| true,
        )
        .await;
    assert_eq!(row["status"], "defaulted");
    assert_eq!(row["total_paid"], "14500.00");
    assert_eq!(row["missed_payments"], 1);
    let events = app.get("ceo", &format!("/v1/deals/{number}/events")).await;
    assert_eq!(events.body["items"].as_array().unwrap().len(), 5);

    let other = draft(&app, &client).await;
    let id = other["id"].as_str().unwrap();
    app.ok(
        "sales",
        &format!("/v1/deals/{id}/cancel"),
        json!({ "reason": "Withdrawn" }),
    )
    .await;
    let second = draft(&app, &client).await;
    let id = second["id"].as_str().unwrap();
    app.ok("sales", &format!("/v1/deals/{id}/activate"), json!({}))
        .await;
    app.ok("sales", &format!("/v1/deals/{id}/complete"), json!({}))
        .await;
}

#[tokio::test]
async fn booking_edits_blocks_and_cancellation() {
    let app = TestApp::spawn().await;
    let client = app.client("Edit Client").await;
    let created = app
        .ok(
            "sales",
            "/v1/bookings",
            json!({
                "client_id": client,
                "booking_type": "chauffeur",
                "priority": "high",
                "start_at": "2026-10-01T10:00:00Z",
                "end_at": "2026-10-03T10:00:00Z",
                "price_daily": "2800",
                "services": [{ "service_id": CHILD_SEAT, "quantity": 2 }],
            }),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let path = |a: &str| format!("/v1/bookings/{id}/{a}");
    app.ok(
        "operations",
        &path("assign-vehicle"),
        json!({ "vehicle_id": GHOST }),
    )
    .await;
    app.ok(
        "operations",
        &path("assign-driver"),
        json!({ "driver_id": DRIVER_PROFILE }),
    )
    .await;
    app.post(
        "operations",
        &path("assign-driver"),
        json!({ "driver_id": GHOST }),
    )
    .await
    .assert_problem(422, "validation");
    app.ok(
        "sales",
        &path("change-owner"),
        json!({ "owner_id": SALES_ID }),
    )
    .await;
    app.ok(
        "sales",
        &path("reschedule"),
        json!({ "start_at": "2026-10-02T10:00:00Z", "end_at": "2026-10-05T10:00:00Z" }),
    )
    .await;
    let added = app
        .ok(
            "sales",
            &path("add-service"),
            json!({ "service_id": CHILD_SEAT, "price": "100.00" }),
        )
        .await;
    let line = added["line_id"].as_str().unwrap();
    app.ok("sales", &path("remove-service"), json!({ "line_id": line }))
        .await;
    app.ok("sales", &path("confirm"), json!({})).await;

    // A block overlapping the confirmed booking is refused; one after it is fine, and removable.
    let block = |start: &str, end: &str| {
        json!({ "job_type": "maintenance", "scheduled_start": start, "scheduled_end": end,
                "description": "Annual service" })
    };
    app.post(
        "operations",
        &format!("/v1/vehicles/{GHOST}/blocks"),
        block("2026-10-04T00:00:00Z", "2026-10-06T00:00:00Z"),
    )
    .await
    .assert_problem(409, "vehicle-unavailable");
    let b = app
        .ok(
            "operations",
            &format!("/v1/vehicles/{GHOST}/blocks"),
            block("2026-10-06T00:00:00Z", "2026-10-07T00:00:00Z"),
        )
        .await;
    let block_id = b["id"].as_str().unwrap();
    let other_vehicle = "00000000-0000-4000-c000-000000000002";
    app.send(app.request(
        reqwest::Method::DELETE,
        "operations",
        &format!("/v1/vehicles/{other_vehicle}/blocks/{block_id}"),
    ))
    .await
    .assert_problem(404, "not-found");
    let removed = app
        .send(app.request(
            reqwest::Method::DELETE,
            "operations",
            &format!("/v1/vehicles/{GHOST}/blocks/{block_id}"),
        ))
        .await;
    assert_eq!(removed.status, 200, "{:#}", removed.body);
    assert_eq!(removed.body["version"], 2);

    let cancelled = app
        .ok(
            "sales",
            &path("cancel"),
            json!({ "reason": "Flight cancelled" }),
        )
        .await;
    let row = app
        .eventually(
            "operations",
            &format!("/v1/bookings/{id}?min_position={}", cancelled["position"]),
            |_| true,
        )
        .await;
    assert_eq!(row["status"], "cancelled");
    assert_eq!(row["booking_type"], "chauffeur");
    assert_eq!(row["driver_id"], DRIVER_PROFILE.to_string());
    assert_eq!(row["rental_duration_days"], 3);
    // 3 days x 2800 + 2 child seats x 150.
    assert_eq!(row["total_amount"], "8700.00");
    assert_eq!(row["services"].as_array().unwrap().len(), 1);
    assert_eq!(row["currency"], "AED");
}

/// A win that names a client attaches it in the same command: when the win is refused, the lead
/// keeps its client and its version (a retry with the same `If-Match` still fits); when it goes
/// through, the won lead has the client and the booking is the client's.
#[tokio::test]
async fn a_win_naming_a_client_attaches_it_only_if_the_win_goes_through() {
    let app = TestApp::spawn().await;
    let client = app.client("Attached On Win").await;
    let lead = app
        .ok(
            "sales",
            "/v1/leads",
            json!({ "stage_id": "qualified", "value_amount": "20000", "source": "Website" }),
        )
        .await;
    let code = lead["code"].as_str().unwrap().to_string();
    let version = lead["version"].as_i64().unwrap();
    let win = format!("/v1/leads/{code}/win");
    // No period on the lead nor in the request: refused.
    let r = app
        .send(
            app.request(reqwest::Method::POST, "sales", &win)
                .header("if-match", version.to_string())
                .json(&json!({ "client_id": client, "price_daily": "6500" })),
        )
        .await;
    r.assert_problem(422, "validation");
    let audit = app
        .get(
            "ceo",
            &format!("/v1/leads/{code}?min_position={}", lead["position"]),
        )
        .await;
    assert_eq!(audit.status, 200, "{:#}", audit.body);
    assert!(audit.body["client_id"].is_null(), "{:#}", audit.body);
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Lead' AND aggregate_id = $1",
    )
    .bind(lead["id"].as_str().unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(events, version, "the refused win wrote nothing");

    let won = app
        .send(
            app.request(reqwest::Method::POST, "sales", &win)
                .header("if-match", version.to_string())
                .json(&json!({ "client_id": client, "price_daily": "6500",
                               "start_at": "2026-06-01T10:00:00Z",
                               "end_at": "2026-06-03T10:00:00Z" })),
        )
        .await;
    assert_eq!(won.status, 200, "{:#}", won.body);
    assert_eq!(
        won.body["version"],
        version + 2,
        "attached and won in one command"
    );
    let booking = won.body["booking_id"].as_str().unwrap().to_string();
    let row = app
        .eventually("ceo", &format!("/v1/bookings/{booking}"), |_| true)
        .await;
    assert_eq!(row["client_id"].as_str(), Some(client.as_str()));
}

/// The calendar answers in pages: `next_offset` says there is more instead of cutting the list
/// silently.
#[tokio::test]
async fn the_calendar_pages_its_events() {
    let app = TestApp::spawn().await;
    let mut last = 0;
    for (start, end) in [
        ("2027-03-01T00:00:00Z", "2027-03-02T00:00:00Z"),
        ("2027-03-05T00:00:00Z", "2027-03-06T00:00:00Z"),
    ] {
        let b = app
            .ok(
                "operations",
                &format!("/v1/vehicles/{GHOST}/blocks"),
                json!({ "job_type": "maintenance", "scheduled_start": start,
                        "scheduled_end": end }),
            )
            .await;
        last = b["position"].as_i64().unwrap();
    }
    let range = format!(
        "/v1/calendar?vehicle_id={GHOST}&from=2027-02-28T00:00:00Z&to=2027-03-10T00:00:00Z\
         &min_position={last}"
    );
    let first = app.get("driver", &format!("{range}&limit=1")).await;
    assert_eq!(first.status, 200, "{:#}", first.body);
    let items = first.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["start_at"], "2027-03-01T00:00:00+00:00");
    assert_eq!(first.body["next_offset"], 1);
    let rest = app
        .get("driver", &format!("{range}&limit=1&offset=1"))
        .await;
    let items = rest.body["items"].as_array().unwrap();
    assert_eq!(items[0]["start_at"], "2027-03-05T00:00:00+00:00");
    assert!(rest.body["next_offset"].is_null(), "{:#}", rest.body);
    let whole = app.get("driver", &range).await;
    assert_eq!(whole.body["items"].as_array().unwrap().len(), 2);
    app.get("driver", &format!("{range}&limit=2001"))
        .await
        .assert_problem(422, "validation");
}
