//! One booking's life over HTTP, from a Kommo webhook to a paid, rated rental, and what every
//! read model and the audit trail then say about it.

use chrono::{DateTime, Duration, DurationRound, Utc};
use reqwest::Method;
use serde_json::json;

use crate::helpers::{DRIVER_PROFILE, GHOST, SALES_ID, TestApp, WEBHOOK_SECRET};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn a_kommo_lead_becomes_a_paid_rental_that_every_read_model_and_the_audit_show() {
    let mut app = TestApp::spawn().await;
    let client = app.client("Layla Al Mansouri").await;

    // Kommo announces a new lead in "Offer sent", then moves it to "Negotiation".
    let add = "leads[add][0][id]=9001&leads[add][0][name]=Ghost+for+a+week&leads[add][0][price]=50000\
               &leads[add][0][status_id]=47873536&leads[add][0][pipeline_id]=5389528\
               &leads[add][0][responsible_user_id]=10450001&account[id]=29013640&account[subdomain]=skyluxse";
    let r = app.webhook(WEBHOOK_SECRET, add, None).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["duplicate"], false);
    // Kommo repeats deliveries: stored once.
    let again = app.webhook(WEBHOOK_SECRET, add, None).await;
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["id"], r.body["id"]);

    let lead_id = wait_for_link(&app, 9001).await;
    let lead = app
        .eventually("sales", &format!("/v1/leads/{lead_id}"), |_| true)
        .await;
    assert_eq!(lead["stage_id"], "offer_sent");
    assert_eq!(
        lead["owner_id"],
        SALES_ID.to_string(),
        "owner from responsible_user_id"
    );
    assert_eq!(lead["value_amount"], "50000.00");
    assert_eq!(lead["kommo_lead_id"], 9001);

    let status = "leads[status][0][id]=9001&leads[status][0][status_id]=47873539\
                  &leads[status][0][pipeline_id]=5389528&leads[status][0][old_status_id]=47873536";
    let signature = api::kommo::signature(WEBHOOK_SECRET, status.as_bytes());
    let r = app.webhook(WEBHOOK_SECRET, status, Some(&signature)).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    app.eventually("sales", &format!("/v1/leads/{lead_id}"), |l| {
        l["stage_id"] == "negotiation" && l["kommo_status_id"] == 47873539
    })
    .await;
    let validated: bool = sqlx::query_scalar(
        "SELECT hmac_validated FROM kommo_webhook_events WHERE kommo_status_id = '47873539'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(validated);

    // Sales wins it: the process manager creates the booking.
    let start = Utc::now().duration_trunc(Duration::hours(1)).unwrap() - Duration::days(5);
    let won = app
        .ok(
            "sales",
            &format!("/v1/leads/{lead_id}/win"),
            json!({
                "client_id": client,
                "start_at": ts(start),
                "end_at": ts(start + Duration::days(4)),
                "price_daily": "10000.00",
                "vehicle_id": GHOST,
            }),
        )
        .await;
    let booking_id = won["booking_id"].as_str().unwrap().to_string();
    let code = won["booking_code"].as_str().unwrap().to_string();
    let booking = app
        .eventually("operations", &format!("/v1/bookings/{code}"), |_| true)
        .await;
    assert_eq!(booking["id"], booking_id);
    assert_eq!(booking["status"], "lead");
    assert_eq!(booking["lead_id"], lead_id);
    assert_eq!(booking["channel"], "Kommo");

    // Confirmed, delivered, extended, completed, invoiced, paid, rated.
    let path = |action: &str| format!("/v1/bookings/{code}/{action}");
    let r = app
        .send(
            app.request(Method::POST, "sales", &path("confirm"))
                .header("x-request-id", "story-confirm")
                .header("if-match", "1")
                .json(&json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.header("x-request-id"), Some("story-confirm"));
    app.ok(
        "driver",
        &path("start-delivery"),
        json!({ "driver_id": DRIVER_PROFILE, "promised_at": ts(start + Duration::hours(1)) }),
    )
    .await;
    app.ok(
        "driver",
        &path("start-rental"),
        json!({ "started_at": ts(start), "pickup_mileage_km": 12400, "fuel_level_pct": 100 }),
    )
    .await;
    app.ok(
        "operations",
        &path("extend"),
        json!({ "new_end_at": ts(start + Duration::days(5)) }),
    )
    .await;
    app.ok(
        "driver",
        &path("complete"),
        json!({ "return_mileage_km": 12950, "fuel_level_pct": 90 }),
    )
    .await;
    let invoice = app
        .ok(
            "operations",
            &path("issue-invoice"),
            json!({ "amount": "50000.00" }),
        )
        .await;
    assert!(invoice["invoice_id"].is_string());
    let paid = app
        .ok(
            "operations",
            &path("record-payment"),
            json!({ "amount": 50000, "method": "card" }),
        )
        .await;
    let rated = app
        .ok(
            "ceo",
            &path("rate"),
            json!({ "sales_service_rating": 9, "sales_service_feedback": "Flawless" }),
        )
        .await;
    assert_eq!(rated["version"], 9);
    let last = rated["position"].as_i64().unwrap();
    assert!(last > paid["position"].as_i64().unwrap());

    // The booking read model.
    let booking = app
        .eventually(
            "ceo",
            &format!("/v1/bookings/{booking_id}?min_position={last}"),
            |_| true,
        )
        .await;
    assert_eq!(booking["status"], "completed");
    assert_eq!(booking["total_amount"], "50000.00");
    assert_eq!(booking["paid_amount"], "50000.00");
    assert_eq!(booking["outstanding_amount"], "0.00");
    assert_eq!(booking["sales_service_rating"], 9);
    assert_eq!(booking["delivered_on_time"], true);
    let number = code.trim_start_matches("BK-");
    assert_eq!(booking["invoices"][0]["label"], format!("INV-{number}-1"));

    // The client: LTV 50,000 makes a VIP; a booking 5 days ago makes a premier loyalist.
    let c = app
        .eventually(
            "ceo",
            &format!("/v1/clients/{client}?min_position={last}"),
            |c| c["tier"] == "vip",
        )
        .await;
    assert_eq!(c["segment"], "premier_loyalist");
    assert_eq!(c["lifetime_value"], "50000.00");
    assert_eq!(c["outstanding_amount"], "0.00");
    let vips = app.get("ceo", "/v1/clients?tier=vip").await;
    assert_eq!(vips.body["items"][0]["id"], client);

    // The lead is won and linked to its booking.
    app.eventually("sales", &format!("/v1/leads/{lead_id}"), |l| {
        l["status"] == "won" && l["booking_id"] == booking_id.as_str()
    })
    .await;

    // The calendar shows the rental as done.
    let cal = app
        .get(
            "driver",
            &format!(
                "/v1/calendar?vehicle_id={GHOST}&from={}&to={}&min_position={last}",
                ts(start - Duration::days(1)),
                ts(start + Duration::days(7))
            ),
        )
        .await;
    assert_eq!(cal.status, 200, "{:#}", cal.body);
    let items = cal.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{items:#?}");
    assert_eq!(items[0]["booking_id"], booking_id);
    assert_eq!(items[0]["status"], "done");

    // The bookings list finds it by client and status.
    let list = app
        .get(
            "ceo",
            &format!("/v1/bookings?client_id={client}&status=completed"),
        )
        .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);

    // KPIs of today (Asia/Dubai) count the revenue of the completion.
    let today = (Utc::now() + Duration::hours(4)).date_naive();
    let kpis = app
        .eventually(
            "ceo",
            &format!(
                "/v1/kpis?from={}&to={today}&min_position={last}",
                today - Duration::days(1)
            ),
            |k| k["items"].as_array().is_some_and(|i| !i.is_empty()),
        )
        .await;
    let day = kpis["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["snapshot_date"] == today.to_string())
        .unwrap();
    let revenue: f64 = day["metrics"]["revenue"].as_str().map_or_else(
        || day["metrics"]["revenue"].as_f64().unwrap(),
        |s| s.parse().unwrap(),
    );
    assert_eq!(revenue, 50000.0, "{day:#}");

    // The pipeline no longer counts the won lead.
    let pipeline = app.get("ceo", "/v1/pipeline").await;
    assert_eq!(pipeline.status, 200);
    assert_eq!(pipeline.body["stages"].as_array().unwrap().len(), 7);

    // The timeline replays it with its actors.
    let timeline = app
        .get("operations", &format!("/v1/bookings/{code}/timeline"))
        .await;
    assert_eq!(timeline.status, 200, "{:#}", timeline.body);
    let events = timeline.body["events"].as_array().unwrap();
    let steps: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            let actor = &e["actor"];
            (
                e["event_type"].as_str().unwrap(),
                actor["role"].as_str().or(actor["type"].as_str()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("BookingCreated", "system"),
            ("BookingConfirmed", "sales"),
            ("BookingDeliveryStarted", "driver"),
            ("BookingRentalStarted", "driver"),
            ("BookingExtended", "operations"),
            ("BookingCompleted", "driver"),
            ("BookingInvoiceIssued", "operations"),
            ("BookingPaymentRecorded", "operations"),
            ("BookingSalesServiceRated", "ceo"),
        ]
    );
    assert!(
        events[0]["metadata"]["causation_id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("Lead/{lead_id}/"))
    );
    assert_eq!(events[1]["metadata"]["request_id"], "story-confirm");
    assert_eq!(events[1]["sequence"], 2);

    // The state as of a version, and as of the time of that version, are the same.
    let v3 = app
        .get("ceo", &format!("/v1/bookings/{booking_id}/state?version=3"))
        .await;
    assert_eq!(v3.status, 200, "{:#}", v3.body);
    assert_eq!(v3.body["version"], 3);
    assert_eq!(v3.body["state"]["status"], "delivery");
    let at: DateTime<Utc> = events[2]["recorded_at"].as_str().unwrap().parse().unwrap();
    let as_of = app
        .send(
            app.request(Method::GET, "ceo", &format!("/v1/bookings/{code}/state"))
                .query(&[("as_of", ts_precise(at))]),
        )
        .await;
    assert_eq!(as_of.status, 200, "{:#}", as_of.body);
    assert_eq!(as_of.body["version"], 3);
    assert_eq!(as_of.body["state"], v3.body["state"]);
    let v1 = app
        .get("ceo", &format!("/v1/bookings/{booking_id}/state?version=1"))
        .await;
    assert_eq!(v1.body["state"]["status"], "lead");
    let now = app
        .get("ceo", &format!("/v1/bookings/{booking_id}/state"))
        .await;
    assert_eq!(now.body["state"]["status"], "completed");
    assert_eq!(now.body["state"]["total_amount"], "50000.00");
    let before = app
        .send(
            app.request(Method::GET, "ceo", &format!("/v1/bookings/{code}/state"))
                .query(&[("as_of", ts(start - Duration::days(30)))]),
        )
        .await;
    before.assert_problem(404, "not-found");

    // The outbox delivers the client and the sales order to the CRMs, once each, and the ids
    // come back through commands.
    app.start_outbox().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    // Each delivery is its own outbox row and each id comes back through its own projection:
    // wait for all of them.
    loop {
        let b = app.get("ceo", &format!("/v1/bookings/{booking_id}")).await;
        let c = app.get("ceo", &format!("/v1/clients/{client}")).await;
        if b.body["zoho_sync_status"] == "synced"
            && c.body["zoho_contact_id"].is_string()
            && !app.kommo.contacts().is_empty()
        {
            assert!(b.body["zoho_sales_order_id"].is_string(), "{:#}", b.body);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CRMs never got everything: booking {:#}, client {:#}, {} Kommo contacts",
            b.body,
            c.body,
            app.kommo.contacts().len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(app.zoho.contacts().len(), 1, "one Zoho contact");
    assert_eq!(app.zoho.sales_orders().len(), 1, "one Zoho sales order");
    assert!(app.zoho.sales_order_by_external(&code).is_some());
    assert_eq!(app.kommo.contacts().len(), 1, "one Kommo contact");
}

fn ts_precise(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The lead a Kommo lead became, once the intake has processed the delivery.
async fn wait_for_link(app: &TestApp, kommo_lead_id: i64) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let id: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT lead_id FROM kommo_lead_links WHERE kommo_lead_id = $1")
                .bind(kommo_lead_id)
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        if let Some(id) = id {
            return id.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the webhook was not processed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
