//! The OpenAPI document lists exactly the routes the router serves, and the routes of SPEC §4.

use std::collections::BTreeSet;

use reqwest::Method;

use crate::auth::concrete;
use crate::helpers::TestApp;

/// SPEC §4's route table, as written there.
const SPEC_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/clients"),
    ("PATCH", "/v1/clients/{id}"),
    ("GET", "/v1/clients/{id}"),
    ("GET", "/v1/clients"),
    ("POST", "/v1/bookings"),
    ("POST", "/v1/bookings/{id}/assign-vehicle"),
    ("POST", "/v1/bookings/{id}/assign-driver"),
    ("POST", "/v1/bookings/{id}/change-owner"),
    ("POST", "/v1/bookings/{id}/reschedule"),
    ("POST", "/v1/bookings/{id}/add-service"),
    ("POST", "/v1/bookings/{id}/remove-service"),
    ("POST", "/v1/bookings/{id}/confirm"),
    ("POST", "/v1/bookings/{id}/start-delivery"),
    ("POST", "/v1/bookings/{id}/start-rental"),
    ("POST", "/v1/bookings/{id}/extend"),
    ("POST", "/v1/bookings/{id}/complete"),
    ("POST", "/v1/bookings/{id}/cancel"),
    ("POST", "/v1/bookings/{id}/issue-invoice"),
    ("POST", "/v1/bookings/{id}/record-payment"),
    ("POST", "/v1/bookings/{id}/rate"),
    ("GET", "/v1/bookings/{id}"),
    ("GET", "/v1/bookings"),
    ("GET", "/v1/bookings/{id}/timeline"),
    ("GET", "/v1/bookings/{id}/state"),
    ("POST", "/v1/vehicles/{id}/blocks"),
    ("DELETE", "/v1/vehicles/{id}/blocks/{block_id}"),
    ("GET", "/v1/calendar"),
    ("POST", "/v1/leads"),
    ("POST", "/v1/leads/{id}/move-stage"),
    ("POST", "/v1/leads/{id}/change-value"),
    ("POST", "/v1/leads/{id}/assign-owner"),
    ("POST", "/v1/leads/{id}/set-next-action"),
    ("POST", "/v1/leads/{id}/win"),
    ("POST", "/v1/leads/{id}/lose"),
    ("GET", "/v1/leads/{id}"),
    ("GET", "/v1/pipeline"),
    ("POST", "/v1/deals"),
    ("POST", "/v1/deals/{id}/activate"),
    ("POST", "/v1/deals/{id}/record-payment"),
    ("POST", "/v1/deals/{id}/record-missed-payment"),
    ("POST", "/v1/deals/{id}/mark-defaulted"),
    ("POST", "/v1/deals/{id}/complete"),
    ("POST", "/v1/deals/{id}/cancel"),
    ("GET", "/v1/deals/{id}"),
    ("GET", "/v1/deals/{id}/events"),
    ("GET", "/v1/kpis"),
    ("GET", "/v1/events"),
    ("GET", "/v1/outbox"),
    ("POST", "/v1/outbox/{id}/requeue"),
    ("GET", "/v1/projections"),
    ("POST", "/v1/projections/{name}/rebuild"),
    ("POST", "/webhooks/kommo/{secret}"),
    ("GET", "/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

async fn documented(app: &TestApp) -> BTreeSet<(String, String)> {
    let r = app.send(app.client.get(app.url("/openapi.json"))).await;
    assert_eq!(r.status, 200);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    let mut out = BTreeSet::new();
    for (path, item) in r.body["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_document_lists_every_route_served_and_serves_every_route_listed() {
    let app = TestApp::spawn().await;
    let documented = documented(&app).await;

    // SPEC §4 -> document, and document -> SPEC §4: nothing missing, nothing extra.
    let spec: BTreeSet<(String, String)> = SPEC_ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_string(), (*p).to_string()))
        .collect();
    let missing: Vec<_> = spec.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&spec).collect();
    assert!(
        missing.is_empty(),
        "routes of the spec not documented: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "documented routes not in the spec: {extra:?}"
    );

    // Every /v1 route has a rule in the role matrix, and every rule a documented route.
    let matrix: BTreeSet<(String, String)> = api::auth::ROLE_MATRIX
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let v1: BTreeSet<(String, String)> = documented
        .iter()
        .filter(|(_, p)| p.starts_with("/v1/"))
        .cloned()
        .collect();
    assert_eq!(v1, matrix);

    // Document -> router: each documented route is served (whatever the answer, it is not the
    // router's "no such route" nor a 405).
    for (method, path) in &documented {
        let r = app
            .send(app.request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                "ceo",
                &concrete(path),
            ))
            .await;
        assert_ne!(r.status, 405, "{method} {path}");
        assert_ne!(
            r.body["code"], "route.not_found",
            "{method} {path} is not served"
        );
    }

    // Router -> document: a path the router does not know gets the router's answer, and every
    // route the router knows is registered through the same table the document is built from
    // (`api::router_and_openapi`), so none can be served undocumented.
    let r = app.get("ceo", "/v1/not-a-route").await;
    assert_eq!(r.body["code"], "route.not_found");
    let (_, doc) = api::router_and_openapi(api::AppState::new(
        app.pool.clone(),
        api::ApiConfig::default(),
    ));
    assert_eq!(
        doc.paths.paths.len(),
        documented
            .iter()
            .map(|(_, p)| p)
            .collect::<BTreeSet<_>>()
            .len()
    );
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = TestApp::spawn().await;
    let r = app.send(app.client.get(app.url("/healthz"))).await;
    assert_eq!(r.status, 200);
    let r = app.send(app.client.get(app.url("/readyz"))).await;
    assert_eq!(r.status, 200);
    let r = app.send(app.client.get(app.url("/healthz"))).await;
    assert!(r.header("x-request-id").is_some(), "request ids are echoed");
    let text = app.metrics_text().await;
    assert!(text.contains("http_requests_total"), "{text}");
    assert!(
        text.contains("projection_events_behind{projection=\"bookings\"}"),
        "{text}"
    );
    assert!(text.contains("route=\"/healthz\""), "{text}");
}
