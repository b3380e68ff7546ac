//! Authentication and the role matrix: every `/v1` route called by every role.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{ROLES, TestApp};

/// A concrete path for a route template (ids that name nothing).
pub fn concrete(template: &str) -> String {
    template
        .replace("{id}", "0196a1b2-0000-7000-8000-000000000001")
        .replace("{block_id}", "0196a1b2-0000-7000-8000-000000000002")
        .replace("{name}", "nope")
        .replace("{secret}", "nope")
}

/// The policy in plain words, independent of the matrix in the code: who may and may not.
const EXPECTED: &[(&str, &str, &str, bool)] = &[
    // Drivers move bookings through delivery, rental and return, and read bookings/calendar.
    ("driver", "POST", "/v1/bookings/{id}/start-delivery", true),
    ("driver", "POST", "/v1/bookings/{id}/start-rental", true),
    ("driver", "POST", "/v1/bookings/{id}/complete", true),
    ("driver", "GET", "/v1/bookings/{id}", true),
    ("driver", "GET", "/v1/calendar", true),
    ("driver", "POST", "/v1/bookings/{id}/confirm", false),
    ("driver", "POST", "/v1/bookings/{id}/cancel", false),
    ("driver", "POST", "/v1/bookings", false),
    ("driver", "GET", "/v1/clients", false),
    ("driver", "GET", "/v1/kpis", false),
    // Only the ceo rates the sales service.
    ("ceo", "POST", "/v1/bookings/{id}/rate", true),
    ("operations", "POST", "/v1/bookings/{id}/rate", false),
    ("sales", "POST", "/v1/bookings/{id}/rate", false),
    ("driver", "POST", "/v1/bookings/{id}/rate", false),
    // The ceo reads, but issues no other command.
    ("ceo", "GET", "/v1/kpis", true),
    ("ceo", "GET", "/v1/pipeline", true),
    ("ceo", "GET", "/v1/events", true),
    ("ceo", "POST", "/v1/bookings", false),
    ("ceo", "POST", "/v1/leads", false),
    // Sales own leads, clients, deals and booking creation.
    ("sales", "POST", "/v1/leads", true),
    ("sales", "POST", "/v1/leads/{id}/win", true),
    ("sales", "POST", "/v1/clients", true),
    ("sales", "POST", "/v1/bookings", true),
    ("sales", "POST", "/v1/deals", true),
    ("sales", "POST", "/v1/bookings/{id}/record-payment", false),
    ("sales", "POST", "/v1/vehicles/{id}/blocks", false),
    ("sales", "POST", "/v1/projections/{name}/rebuild", false),
    // Operations run bookings, the fleet, the outbox and projections.
    ("operations", "POST", "/v1/bookings/{id}/confirm", true),
    (
        "operations",
        "POST",
        "/v1/bookings/{id}/record-payment",
        true,
    ),
    ("operations", "POST", "/v1/vehicles/{id}/blocks", true),
    (
        "operations",
        "DELETE",
        "/v1/vehicles/{id}/blocks/{block_id}",
        true,
    ),
    ("operations", "POST", "/v1/outbox/{id}/requeue", true),
    ("operations", "POST", "/v1/projections/{name}/rebuild", true),
    ("operations", "POST", "/v1/leads", false),
    // Integration: outbox operations and the feed, nothing else.
    ("integration", "GET", "/v1/outbox", true),
    ("integration", "POST", "/v1/outbox/{id}/requeue", true),
    ("integration", "GET", "/v1/events", true),
    ("integration", "POST", "/v1/bookings", false),
    ("integration", "GET", "/v1/bookings", false),
    (
        "integration",
        "POST",
        "/v1/projections/{name}/rebuild",
        false,
    ),
];

#[test]
fn the_matrix_in_the_code_says_what_the_policy_says() {
    for (role, method, path, allowed) in EXPECTED {
        let rule = api::auth::ROLE_MATRIX
            .iter()
            .find(|r| r.method == *method && r.path == *path)
            .unwrap_or_else(|| panic!("no rule for {method} {path}"));
        let has = rule.roles.iter().any(|r| r.as_str() == *role);
        assert_eq!(has, *allowed, "{role} {method} {path}");
    }
}

#[tokio::test]
async fn every_role_is_allowed_or_refused_on_every_route_as_the_matrix_says() {
    let app = TestApp::spawn().await;
    for rule in api::auth::ROLE_MATRIX {
        let method = Method::from_bytes(rule.method.as_bytes()).unwrap();
        let path = concrete(rule.path);
        for role in ROLES {
            let allowed = rule.roles.iter().any(|r| r.as_str() == role);
            let before = app.event_count().await;
            let mut request = app.request(method.clone(), role, &path);
            if method != Method::GET {
                // Refusals must not depend on the body; allowed calls may be refused as invalid.
                request = request.json(&json!({ "reason": "" }));
            }
            let r = app.send(request).await;
            if allowed {
                assert!(
                    r.status != 401 && r.status != 403,
                    "{role} should be allowed {} {path}: {} {:#}",
                    rule.method,
                    r.status,
                    r.body
                );
            } else {
                r.assert_problem(403, "forbidden");
                assert_eq!(r.body["code"], "auth.role_not_allowed");
                assert_eq!(
                    app.event_count().await,
                    before,
                    "a refused call wrote events"
                );
            }
            if method == Method::GET {
                // axum runs the GET handler for HEAD: the same rule must apply.
                let head = app.send(app.request(Method::HEAD, role, &path)).await;
                assert_eq!(
                    head.status == 403,
                    !allowed,
                    "{role} HEAD {path}: {}",
                    head.status
                );
            }
        }
    }
}

#[tokio::test]
async fn calls_without_a_valid_key_are_refused_with_401() {
    let app = TestApp::spawn().await;
    let before = app.event_count().await;
    let body = json!({ "name": "Nobody" });
    let cases = [
        app.client.post(app.url("/v1/clients")).json(&body),
        app.client
            .post(app.url("/v1/clients"))
            .bearer_auth("slx_0000000000000000000000000000000000000000000000")
            .json(&body),
        app.client
            .post(app.url("/v1/clients"))
            .header("authorization", format!("Basic {}", app.key("sales")))
            .json(&body),
        app.client.get(app.url("/v1/kpis")).bearer_auth("not-a-key"),
    ];
    for request in cases {
        let r = app.send(request).await;
        r.assert_problem(401, "unauthorized");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(app.event_count().await, before);

    // A revoked key stops working as soon as the API hears of the revocation, although its
    // lookup was cached a moment ago.
    assert_eq!(app.get("sales", "/v1/clients").await.status, 200);
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE staff_id = $1")
        .bind(crate::helpers::SALES_ID)
        .execute(&app.pool)
        .await
        .unwrap();
    refused_soon(&app, "sales").await;
    app.post("sales", "/v1/clients", body)
        .await
        .assert_problem(401, "unauthorized");
}

/// Waits until the role's key is refused, for far less than a cached lookup may live
/// ([`api::auth::KeyCache::REUSE_FOR`]): the change must have ended it, not its age.
async fn refused_soon(app: &TestApp, role: &str) {
    let started = std::time::Instant::now();
    loop {
        let r = app.get(role, "/v1/bookings").await;
        if r.status == 401 {
            r.assert_problem(401, "unauthorized");
            return;
        }
        assert_eq!(r.status, 200, "{:#}", r.body);
        assert!(
            // Well before the cache's own expiry would refuse it.
            started.elapsed() < api::auth::KeyCache::REUSE_FOR / 2,
            "the {role} key still works {:?} after the change",
            started.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Deactivating a staff account refuses its keys, and so does a change made while the API's
/// listening connection is down (it then looks every key up until it listens again).
#[tokio::test]
async fn a_deactivated_account_is_refused_even_while_the_api_is_not_listening() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("operations", "/v1/bookings").await.status, 200);
    sqlx::query("UPDATE staff_accounts SET is_active = false WHERE id = $1")
        .bind(crate::helpers::OPS_ID)
        .execute(&app.pool)
        .await
        .unwrap();
    refused_soon(&app, "operations").await;

    // Cached while listening...
    assert_eq!(app.get("sales", "/v1/bookings").await.status, 200);
    let listening = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    assert!(listening().await > 0, "the API listens for key changes");
    // ...then the listening connection dies, and the account is deactivated before the API
    // can listen again: its notification is never delivered.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%') t",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(killed > 0);
    sqlx::query("UPDATE staff_accounts SET is_active = false WHERE id = $1")
        .bind(crate::helpers::SALES_ID)
        .execute(&app.pool)
        .await
        .unwrap();
    refused_soon(&app, "sales").await;
}

#[tokio::test]
async fn keys_are_issued_only_for_existing_accounts_of_that_role_and_stored_hashed() {
    let app = TestApp::spawn().await;
    let role = api::auth::parse_role("ceo").unwrap();
    let err = api::auth::create_key(&app.pool, "nobody@skyluxse.ae", role)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no staff account"), "{err}");
    let err = api::auth::create_key(&app.pool, "ops@skyluxse.ae", role)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("operations, not ceo"), "{err}");
    assert!(api::auth::parse_role("admin").is_err());

    let key = app.key("ceo");
    assert!(key.starts_with("slx_") && key.len() == 52);
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE key_digest = $1 AND key_prefix = $2",
    )
    .bind(api::auth::key_digest(key))
    .bind(&key[..12])
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);
}
