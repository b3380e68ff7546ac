//! The fakes on their own, spoken to with plain HTTP: they must behave as crm-contracts.md says.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crm_fakes::{FakeKommo, FakeZoho, FakeZohoConfig, Fault, FaultRule, Method};
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn kommo_refresh(fake: &FakeKommo, refresh: &str) -> reqwest::Response {
    let c = fake.config();
    http()
        .post(format!("{}/oauth2/access_token", fake.base_url()))
        .json(&json!({
            "client_id": c.client_id, "client_secret": c.client_secret,
            "grant_type": "refresh_token", "refresh_token": refresh, "redirect_uri": c.redirect_uri,
        }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn kommo_refresh_tokens_are_single_use() {
    let fake = FakeKommo::start().await.unwrap();
    let first = fake.refresh_token();
    let answer = kommo_refresh(&fake, &first).await;
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 86_400);
    assert_eq!(body["refresh_token"], fake.refresh_token().as_str());

    let again = kommo_refresh(&fake, &first).await;
    assert_eq!(again.status(), 400, "the used refresh token is dead");

    let access = body["access_token"].as_str().unwrap();
    let ok = http()
        .get(format!("{}/api/v4/contacts", fake.base_url()))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 204, "no contacts yet: 204 with an empty body");
    assert!(ok.bytes().await.unwrap().is_empty());
    let bad = http()
        .get(format!("{}/api/v4/contacts", fake.base_url()))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
}

#[tokio::test]
async fn kommo_contacts_are_searchable_by_any_filled_field() {
    let fake = FakeKommo::start_with(crm_fakes::FakeKommoConfig {
        rate_limit: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let base = fake.base_url();
    let token = fake.long_lived_token().to_owned();
    let create = http()
        .post(format!("{base}/api/v4/contacts"))
        .bearer_auth(&token)
        .json(&json!([{
            "name": "Jane Roe", "request_id": "7",
            "custom_fields_values": [
                {"field_id": crm_fakes::DEFAULT_EXTERNAL_ID_FIELD_ID, "values": [{"value": "client-42"}]},
                {"field_code": "PHONE", "values": [{"value": "+971500000001", "enum_code": "WORK"}]},
            ],
        }]))
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), 200);
    assert!(
        create.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/hal+json")
    );
    let created: Value = create.json().await.unwrap();
    assert_eq!(created["_embedded"]["contacts"][0]["request_id"], "7");

    let hits = |query: &'static str| {
        let request = http()
            .get(format!("{base}/api/v4/contacts"))
            .query(&[("query", query)])
            .bearer_auth(&token);
        async move {
            let response = request.send().await.unwrap();
            if response.status() == 204 {
                return 0;
            }
            let found: Value = response.json().await.unwrap();
            found["_embedded"]["contacts"].as_array().unwrap().len()
        }
    };
    for query in ["client-42", "971500000001", "jane", "NT-4", "ro"] {
        assert_eq!(hits(query).await, 1, "{query}");
    }
    // A renamed contact is found by its new name only.
    let id = created["_embedded"]["contacts"][0]["id"].as_i64().unwrap();
    let renamed = http()
        .patch(format!("{base}/api/v4/contacts/{id}"))
        .bearer_auth(&token)
        .json(&json!({"name": "Joan Doe"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200);
    assert_eq!(hits("jane").await, 0);
    assert_eq!(hits("joan doe").await, 1);
    assert_eq!(hits("client-43").await, 0);

    let unknown_field = http()
        .post(format!("{base}/api/v4/contacts"))
        .bearer_auth(&token)
        .json(&json!([{"name": "X", "custom_fields_values": [{"field_id": 1, "values": [{"value": "x"}]}]}]))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_field.status(), 400);
    let problem: Value = unknown_field.json().await.unwrap();
    assert_eq!(
        problem["validation-errors"][0]["errors"][0]["code"],
        "NotSupportedChoice"
    );
    assert_eq!(fake.creates(), 1);
}

#[tokio::test]
async fn kommo_enforces_seven_requests_per_second_with_a_non_json_429() {
    let fake = FakeKommo::start().await.unwrap();
    let url = format!("{}/api/v4/leads", fake.base_url());
    let token = fake.long_lived_token().to_owned();
    let calls = (0..10).map(|_| http().get(&url).bearer_auth(&token).send());
    let answers = futures::future::join_all(calls).await;
    let mut limited = 0;
    for answer in answers {
        let answer = answer.unwrap();
        if answer.status() == 429 {
            limited += 1;
            assert!(answer.headers().get("retry-after").is_none());
            let body = answer.text().await.unwrap();
            assert!(serde_json::from_str::<Value>(&body).is_err(), "{body}");
        }
    }
    assert_eq!(limited, 3);
    assert_eq!(fake.max_rps_observed(), 10);
    assert_eq!(fake.rate_limited(), 3);
}

#[tokio::test]
async fn faults_apply_in_order_to_matching_requests_and_are_recorded() {
    let fake = FakeKommo::start().await.unwrap();
    let base = fake.base_url();
    let token = fake.long_lived_token().to_owned();
    fake.inject(
        FaultRule::new(Fault::Status500)
            .on(Method::POST, "/api/v4/leads")
            .times(2),
    );
    fake.fail_next(Fault::TooManyRequests {
        retry_after: Some(9),
        json_body: true,
    });

    let get = http()
        .get(format!("{base}/api/v4/leads"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 429, "the first rule does not match a GET");
    assert_eq!(get.headers()["retry-after"], "9");
    for _ in 0..2 {
        let post = http()
            .post(format!("{base}/api/v4/leads"))
            .bearer_auth(&token)
            .json(&json!([{"name": "L"}]))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status(), 500);
    }
    assert_eq!(fake.pending_faults(), 0);
    assert_eq!(fake.leads().len(), 0);

    fake.fail_next(Fault::ResetConnection { apply: true });
    let reset = http()
        .post(format!("{base}/api/v4/leads"))
        .bearer_auth(&token)
        .json(&json!([{"name": "L"}]))
        .send()
        .await;
    assert!(reset.is_err(), "no answer at all");
    assert_eq!(fake.leads().len(), 1, "but the lead was created");

    let requests = fake.requests();
    let statuses: Vec<Option<u16>> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![Some(429), Some(500), Some(500), None]);
    assert_eq!(requests[1].json().unwrap()[0]["name"], "L");
    assert_eq!(
        requests[3].fault,
        Some(Fault::ResetConnection { apply: true })
    );
}

async fn zoho_token(fake: &FakeZoho, refresh: &str) -> (u16, Value) {
    let c = fake.config();
    let answer = http()
        .post(format!("{}/oauth/v2/token", fake.base_url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", c.client_id.as_str()),
            ("client_secret", c.client_secret.as_str()),
            ("refresh_token", refresh),
        ])
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

#[tokio::test]
async fn zoho_tokens_bad_codes_and_limits() {
    let fake = FakeZoho::start_with(FakeZohoConfig {
        max_live_tokens: 2,
        token_mint_limit: Some(3),
        ..FakeZohoConfig::default()
    })
    .await
    .unwrap();
    let (status, body) = zoho_token(&fake, "wrong").await;
    assert_eq!((status, body), (200, json!({"error": "invalid_code"})));

    let refresh = fake.refresh_token().to_owned();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let (status, body) = zoho_token(&fake, &refresh).await;
        assert_eq!(status, 200);
        assert_eq!(body["api_domain"], fake.base_url().as_str());
        tokens.push(body["access_token"].as_str().unwrap().to_owned());
    }
    let (status, body) = zoho_token(&fake, &refresh).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("Access Denied"))
    );

    let upsert = |token: String| {
        let url = format!("{}/crm/v6/Contacts/upsert", fake.base_url());
        async move {
            http()
                .post(url)
                .header("Authorization", format!("Zoho-oauthtoken {token}"))
                .json(&json!({"data": [{"Last_Name": "Roe", "SkyLuxse_Client_Id": "c1"}], "duplicate_check_fields": ["SkyLuxse_Client_Id"]}))
                .send()
                .await
                .unwrap()
        }
    };
    let old = upsert(tokens[0].clone()).await;
    assert_eq!(old.status(), 401, "only the newest two tokens live");
    assert_eq!(old.json::<Value>().await.unwrap()["code"], "INVALID_TOKEN");
    let first: Value = upsert(tokens[2].clone()).await.json().await.unwrap();
    let second: Value = upsert(tokens[1].clone()).await.json().await.unwrap();
    assert_eq!(first["data"][0]["action"], "insert");
    assert_eq!(second["data"][0]["action"], "update");
    assert_eq!(second["data"][0]["duplicate_field"], "SkyLuxse_Client_Id");
    assert_eq!(
        first["data"][0]["details"]["id"],
        second["data"][0]["details"]["id"]
    );
    assert_eq!(fake.contacts().len(), 1);
    assert!(fake.contact_by_external("c1").is_some());
    // Another key is another record; the same key again still finds the first.
    let other: Value = http()
        .post(format!("{}/crm/v6/Contacts/upsert", fake.base_url()))
        .header("Authorization", format!("Zoho-oauthtoken {}", tokens[2]))
        .json(&json!({"data": [{"Last_Name": "Poe", "SkyLuxse_Client_Id": "c2"}, {"Last_Name": "Roe", "SkyLuxse_Client_Id": "c1"}], "duplicate_check_fields": ["SkyLuxse_Client_Id"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(other["data"][0]["action"], "insert");
    assert_eq!(other["data"][1]["action"], "update");
    assert_eq!(
        other["data"][1]["details"]["id"],
        first["data"][0]["details"]["id"]
    );
    assert_eq!(fake.contacts().len(), 2);

    let module = http()
        .post(format!("{}/crm/v6/Bookings/upsert", fake.base_url()))
        .header("Authorization", format!("Zoho-oauthtoken {}", tokens[2]))
        .json(&json!({"data": [{}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(module.status(), 400);
    assert_eq!(
        module.json::<Value>().await.unwrap()["code"],
        "INVALID_MODULE"
    );
}
