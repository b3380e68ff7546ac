//! Every refusal is problem+json with a stable type, and changes nothing.

use serde_json::json;

use crate::helpers::{GHOST, TestApp, WEBHOOK_SECRET, booking_body};

/// A body that does not fit is refused naming the field, never quoting what was sent: an
/// Emirates ID sent as a number must not come back in the answer, nor be kept with the
/// idempotent answer.
#[tokio::test]
async fn a_refused_body_names_the_field_but_never_echoes_the_value() {
    let app = TestApp::spawn().await;
    let id = "784199012345671";
    let r = app
        .send(
            app.request(reqwest::Method::POST, "sales", "/v1/clients")
                .header("idempotency-key", "pii-in-a-wrong-type")
                .json(&json!({"name": "Amal Saeed", "emirates_id": 784199012345671_u64})),
        )
        .await;
    r.assert_problem(422, "validation");
    assert_eq!(r.body["code"], "request.invalid_body");
    let detail = r.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("`emirates_id`"), "{detail}");
    assert!(detail.contains("expected a string"), "{detail}");
    assert!(!r.body.to_string().contains(id), "{}", r.body);
    let (kept, quoting): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE convert_from(response_body, 'UTF8') LIKE '%' || $1 || '%') \
         FROM idempotency_keys WHERE idempotency_key = 'pii-in-a-wrong-type' AND response_status = 422",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (kept, quoting),
        (1, 0),
        "the refusal is kept, without the number"
    );

    // An unknown value of an enumeration is not quoted either.
    let mut unknown_type = booking_body("00000000-0000-4000-a000-000000000001");
    unknown_type["booking_type"] = json!("P99887766");
    let r = app.post("sales", "/v1/bookings", unknown_type).await;
    r.assert_problem(422, "validation");
    let detail = r.body["detail"].as_str().unwrap_or_default();
    assert!(!detail.contains("P99887766"), "{detail}");
    assert!(detail.contains("`booking_type`"), "{detail}");
}

#[tokio::test]
async fn malformed_wrong_unknown_and_huge_bodies_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let client = app.client("Malformed Case").await;
    let before = app.event_count().await;
    let raw = |body: &str| {
        app.request(reqwest::Method::POST, "sales", "/v1/bookings")
            .header("content-type", "application/json")
            .body(body.to_string())
    };

    let r = app.send(raw("{\"client_id\": ")).await;
    r.assert_problem(422, "validation");
    assert_eq!(r.body["code"], "request.malformed_json");

    let mut wrong = booking_body(&client);
    wrong["price_daily"] = json!(true);
    let r = app.post("sales", "/v1/bookings", wrong).await;
    r.assert_problem(422, "validation");
    assert_eq!(r.body["code"], "request.invalid_body");

    let mut unknown = booking_body(&client);
    unknown["tier"] = json!("vip");
    let r = app.post("sales", "/v1/bookings", unknown).await;
    r.assert_problem(422, "validation");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("unknown field `tier`")
    );

    let r = app
        .post("sales", "/v1/bookings", json!({ "client_id": client }))
        .await;
    r.assert_problem(422, "validation");
    assert!(r.body["detail"].as_str().unwrap().contains("start_at"));

    let r = app
        .send(
            app.request(reqwest::Method::POST, "sales", "/v1/bookings")
                .header("content-type", "text/plain")
                .body("hello"),
        )
        .await;
    r.assert_problem(415, "unsupported-media-type");

    let huge = format!(
        "{{\"client_id\": \"{client}\", \"pickup_location\": \"{}\"}}",
        "x".repeat(100 * 1024)
    );
    let r = app.send(raw(&huge)).await;
    r.assert_problem(413, "payload-too-large");

    // A domain rule broken: the period ends before it starts.
    let mut backwards = booking_body(&client);
    backwards["end_at"] = json!("2026-05-01T10:00:00Z");
    let r = app.post("sales", "/v1/bookings", backwards).await;
    r.assert_problem(422, "validation");
    assert_eq!(r.body["code"], "booking.validation");

    // A reference that does not exist.
    let r = app
        .post(
            "sales",
            "/v1/bookings",
            booking_body("0196a1b2-0000-7000-8000-0000000000ff"),
        )
        .await;
    r.assert_problem(422, "validation");
    assert_eq!(r.body["code"], "request.unknown_reference");
    assert_eq!(r.body["field"], "client_id");
    // Several references are checked together; the first unknown one is named.
    for (field, value) in [
        ("vehicle_id", "0196a1b2-0000-7000-8000-0000000000fe"),
        ("driver_id", "0196a1b2-0000-7000-8000-0000000000fd"),
        ("owner_id", "0196a1b2-0000-7000-8000-0000000000fc"),
        ("lead_id", "0196a1b2-0000-7000-8000-0000000000fb"),
    ] {
        let mut body = booking_body(&client);
        body[field] = json!(value);
        let r = app.post("sales", "/v1/bookings", body).await;
        r.assert_problem(422, "validation");
        assert_eq!(r.body["code"], "request.unknown_reference", "{field}");
        assert_eq!(r.body["field"], field);
    }

    assert_eq!(
        app.event_count().await,
        before,
        "a refused request wrote events"
    );

    // A request refused for its references takes no booking number: codes stay consecutive.
    let number = |answer: &serde_json::Value| {
        answer["code"]
            .as_str()
            .and_then(|c| c.strip_prefix("BK-"))
            .and_then(|n| n.parse::<u64>().ok())
            .expect("a BK- code")
    };
    let first = app.ok("sales", "/v1/bookings", booking_body(&client)).await;
    for field in ["client_id", "owner_id"] {
        let mut body = booking_body(&client);
        body[field] = json!("0196a1b2-0000-7000-8000-0000000000fa");
        app.post("sales", "/v1/bookings", body)
            .await
            .assert_problem(422, "validation");
    }
    let second = app.ok("sales", "/v1/bookings", booking_body(&client)).await;
    assert_eq!(number(&second), number(&first) + 1);
}

#[tokio::test]
async fn domain_refusals_map_to_404_409_and_vehicle_unavailable() {
    let app = TestApp::spawn().await;
    let client = app.client("Refusal Case").await;

    let r = app
        .post("operations", "/v1/bookings/BK-999999/confirm", json!({}))
        .await;
    r.assert_problem(404, "not-found");
    let r = app
        .post(
            "operations",
            "/v1/bookings/0196a1b2-0000-7000-8000-000000000001/confirm",
            json!({}),
        )
        .await;
    r.assert_problem(404, "not-found");
    assert_eq!(r.body["code"], "booking.not_found");

    // Confirming without a vehicle is an invalid transition.
    let first = app.ok("sales", "/v1/bookings", booking_body(&client)).await;
    let code = first["code"].as_str().unwrap();
    assert!(code.starts_with("BK-"));
    let r = app
        .post("sales", &format!("/v1/bookings/{code}/confirm"), json!({}))
        .await;
    r.assert_problem(409, "invalid-transition");
    assert_eq!(r.body["code"], "booking.vehicle_required");
    let r = app
        .post(
            "operations",
            &format!("/v1/bookings/{code}/start-rental"),
            json!({"pickup_mileage_km": 1, "fuel_level_pct": 100}),
        )
        .await;
    r.assert_problem(409, "invalid-transition");
    assert_eq!(r.body["code"], "booking.invalid_transition");

    // Two confirmed bookings of one vehicle may not overlap.
    let mut with_vehicle = booking_body(&client);
    with_vehicle["vehicle_id"] = json!(GHOST);
    let a = app.ok("sales", "/v1/bookings", with_vehicle.clone()).await;
    let b = app.ok("sales", "/v1/bookings", with_vehicle).await;
    app.ok(
        "sales",
        &format!("/v1/bookings/{}/confirm", a["id"].as_str().unwrap()),
        json!({}),
    )
    .await;
    let before = app.event_count().await;
    let r = app
        .post(
            "sales",
            &format!("/v1/bookings/{}/confirm", b["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    r.assert_problem(409, "vehicle-unavailable");
    assert_eq!(app.event_count().await, before);

    // And a block over a confirmed booking is refused too.
    let r = app
        .post(
            "operations",
            &format!("/v1/vehicles/{GHOST}/blocks"),
            json!({
                "job_type": "repair",
                "scheduled_start": "2026-06-02T00:00:00Z",
                "scheduled_end": "2026-06-03T00:00:00Z",
            }),
        )
        .await;
    r.assert_problem(409, "vehicle-unavailable");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_too() {
    let app = TestApp::spawn().await;
    let r = app.get("ceo", "/v1/nothing-here").await;
    r.assert_problem(404, "not-found");
    assert_eq!(r.body["code"], "route.not_found");
    let r = app
        .send(app.request(reqwest::Method::PUT, "sales", "/v1/clients"))
        .await;
    r.assert_problem(405, "method-not-allowed");
    let r = app.get("ceo", "/v1/bookings?status=flying").await;
    r.assert_problem(422, "validation");
    let r = app.get("ceo", "/v1/bookings?colour=red").await;
    r.assert_problem(422, "validation");
    // A tier or segment that does not exist is an error, not an empty list.
    for q in ["tier=platinum", "segment=sleepy"] {
        let r = app.get("ceo", &format!("/v1/clients?{q}")).await;
        r.assert_problem(422, "validation");
    }
    let r = app
        .get("ceo", "/v1/clients?tier=vip&segment=premier_loyalist")
        .await;
    assert_eq!(r.status, 200, "{:#}", r.body);
}

#[tokio::test]
async fn a_bad_webhook_secret_or_signature_is_refused_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let before = app.event_count().await;
    let body = "leads[add][0][id]=4242&leads[add][0][name]=Nope&leads[add][0][status_id]=47873530";
    let r = app.webhook("wrong-secret", body, None).await;
    r.assert_problem(401, "unauthorized");
    assert_eq!(r.body["code"], "webhook.bad_secret");
    let r = app.webhook(WEBHOOK_SECRET, body, Some("00ff")).await;
    r.assert_problem(401, "unauthorized");
    assert_eq!(r.body["code"], "webhook.bad_signature");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM kommo_webhook_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.event_count().await, before);
}

/// Times out of the business's range (which PostgreSQL could not even hold, or the read models
/// could not write) and NUL characters (which no text in PostgreSQL holds) are refused as invalid
/// before anything is written, and the read models go on.
#[tokio::test]
async fn times_out_of_range_and_nul_characters_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let client = app.client("Range Case").await;
    let before = app.event_count().await;
    let out_of_range = |r: &crate::helpers::Resp| {
        r.assert_problem(422, "validation");
        let detail = r.body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("out of range") && detail.contains("1900-01-01 and 2199-12-31"),
            "{:#}",
            r.body
        );
    };
    for start in [
        "-10000-01-01T00:00:00Z",
        "0000-06-01T00:00:00Z",
        "2200-01-01T00:00:00Z",
    ] {
        let mut body = booking_body(&client);
        body["start_at"] = json!(start);
        out_of_range(&app.post("sales", "/v1/bookings", body).await);
    }
    let dob = json!({ "name": "Old Timer", "date_of_birth": "-10000-01-01" });
    out_of_range(&app.post("sales", "/v1/clients", dob).await);
    out_of_range(
        &app.get("ceo", "/v1/bookings?from=-10000-01-01T00:00:00Z")
            .await,
    );
    // Once a panic in the default range's arithmetic.
    out_of_range(&app.get("ceo", "/v1/kpis?to=-262143-01-15").await);

    let nul = |r: &crate::helpers::Resp| {
        r.assert_problem(422, "validation");
        assert_eq!(r.body["code"], "request.nul_character", "{:#}", r.body);
    };
    nul(&app
        .post("sales", "/v1/clients", json!({ "name": "A\u{0}B" }))
        .await);
    nul(&app.get("ceo", "/v1/clients?tier=%00").await);
    nul(&app
        .post("operations", "/v1/bookings/BK-%00/confirm", json!({}))
        .await);
    assert_eq!(app.event_count().await, before, "a refusal wrote events");

    // The edges of the range are taken, and the read models are still running.
    let mut body = booking_body(&client);
    body["start_at"] = json!("1900-01-01T00:00:00Z");
    body["end_at"] = json!("1900-01-03T00:00:00Z");
    let created = app.post("sales", "/v1/bookings", body).await;
    assert_eq!(created.status, 201, "{:#}", created.body);
    let id = created.body["id"].as_str().unwrap().to_string();
    let read = app
        .get(
            "ceo",
            &format!(
                "/v1/bookings/{id}?min_position={}",
                created.body["position"]
            ),
        )
        .await;
    assert_eq!(read.status, 200, "{:#}", read.body);
    assert_eq!(
        read.body["start_at"], "1900-01-01T00:00:00+00:00",
        "{:#}",
        read.body
    );
}

/// Codes are numbered without the gaps of refused requests: a booking, deal or lead win the
/// domain refuses (or whose lead does not exist) takes no number, so the next accepted one
/// gets the number after the last.
#[tokio::test]
async fn a_refused_creation_takes_no_code_number() {
    let app = TestApp::spawn().await;
    let client = app.client("Numbering Case").await;
    let number = |r: &serde_json::Value| -> i64 {
        let code = r["code"].as_str().unwrap_or_default();
        code.rsplit('-').next().unwrap_or_default().parse().unwrap()
    };
    let first = number(&app.ok("sales", "/v1/bookings", booking_body(&client)).await);
    let mut backwards = booking_body(&client);
    backwards["end_at"] = json!("2026-05-01T10:00:00Z");
    app.post("sales", "/v1/bookings", backwards)
        .await
        .assert_problem(422, "validation");
    let win = json!({"start_at": "2026-06-01T10:00:00Z", "end_at": "2026-06-04T10:00:00Z",
                     "price_daily": "6500.00"});
    app.post(
        "sales",
        "/v1/leads/00000000-0000-4000-a000-00000000ffff/win",
        win,
    )
    .await
    .assert_problem(404, "not-found");
    let second = number(&app.ok("sales", "/v1/bookings", booking_body(&client)).await);
    assert_eq!(second, first + 1);

    let deal = |months: i64| {
        json!({"client_id": client, "principal_amount": "450000.00",
               "monthly_payment": "14500.00", "interest_rate": "4.5", "term_months": months,
               "contract_start_date": "2026-01-01", "contract_end_date": "2028-12-31",
               "first_payment_date": "2026-02-01"})
    };
    let first = number(&app.ok("sales", "/v1/deals", deal(36)).await);
    app.post("sales", "/v1/deals", deal(0))
        .await
        .assert_problem(422, "validation");
    let second = number(&app.ok("sales", "/v1/deals", deal(36)).await);
    assert_eq!(second, first + 1);
}
