//! `ZohoClient` against `FakeZoho`: token caching and refresh, upserts keyed by the external
//! fields, 207 partial results, faults, and the concurrency limit.

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use crm::{
    CrmError, DEFAULT_CONTACT_EXTERNAL_FIELD, MemoryTokenStore, SalesOrder, SalesOrderItem,
    ZOHO_SYSTEM, ZohoClient, ZohoConfig, ZohoContact,
};
use crm_fakes::{FakeZoho, FakeZohoConfig, Fault, FaultRule, Method};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::{exposed, secret, stored};

fn config(fake: &FakeZoho, store: Arc<MemoryTokenStore>) -> ZohoConfig {
    let mut config = ZohoConfig::new(
        fake.base_url(),
        fake.base_url(),
        fake.config().client_id.clone(),
        secret(&fake.config().client_secret),
        Some(secret(fake.refresh_token())),
        store,
    );
    config.timeout = Duration::from_secs(5);
    config
}

fn client(fake: &FakeZoho) -> (ZohoClient, Arc<MemoryTokenStore>) {
    let store = Arc::new(MemoryTokenStore::new());
    (ZohoClient::new(config(fake, store.clone())).unwrap(), store)
}

fn contact(key: Uuid) -> ZohoContact {
    ZohoContact {
        external_key: key,
        last_name: "Roe".into(),
        first_name: Some("Jane".into()),
        email: Some("jane@example.com".into()),
        phone: Some("+971500000001".into()),
        mailing_country: Some("United Arab Emirates".into()),
    }
}

fn order(code: &str, contact_id: &str) -> SalesOrder {
    SalesOrder {
        booking_code: code.into(),
        subject: format!("{code} Rolls-Royce Ghost"),
        contact_id: contact_id.into(),
        status: "Created".into(),
        items: vec![SalesOrderItem {
            product_id: "4150868000000224005".into(),
            quantity: Decimal::new(3, 0),
            list_price: Decimal::new(350_000, 2),
            description: Some("3 days".into()),
        }],
    }
}

#[tokio::test]
async fn contacts_are_upserted_on_the_external_key_with_a_cached_token() {
    let fake = FakeZoho::start().await.unwrap();
    let (client, store) = client(&fake);
    let key = Uuid::new_v4();
    let mut input = contact(key);

    let id = client.upsert_contact(&input).await.unwrap();
    input.phone = Some("+971500000002".into());
    assert_eq!(client.upsert_contact(&input).await.unwrap(), id);

    assert_eq!(fake.contacts().len(), 1);
    assert_eq!((fake.creates(), fake.updates()), (1, 1));
    let record = fake.contact_by_external(&key.to_string()).unwrap();
    assert_eq!(record["id"], id.as_str());
    assert_eq!(record["Phone"], "+971500000002");
    assert_eq!(fake.refreshes(), 1, "the access token is cached");
    let token = store.get(ZOHO_SYSTEM).unwrap();
    assert_eq!(token.api_domain.as_deref(), Some(fake.base_url().as_str()));
    let ttl = token.expires_at - chrono::Utc::now();
    assert!(
        ttl > TimeDelta::minutes(59) && ttl <= TimeDelta::hours(1),
        "{ttl}"
    );
    let upsert = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/crm/v6/Contacts/upsert")
        .unwrap();
    assert_eq!(
        upsert.json().unwrap()["duplicate_check_fields"],
        serde_json::json!(["SkyLuxse_Client_Id"])
    );
}

#[tokio::test]
async fn the_token_answer_api_domain_overrides_the_configured_one() {
    let fake = FakeZoho::start().await.unwrap();
    let store = Arc::new(MemoryTokenStore::new());
    let mut config = config(&fake, store);
    config.api_domain = "http://127.0.0.1:9".into(); // nothing listens there
    let client = ZohoClient::new(config).unwrap();
    client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(fake.contacts().len(), 1);
}

#[tokio::test]
async fn a_bad_refresh_token_is_a_permanent_failure_despite_http_200() {
    let fake = FakeZoho::start().await.unwrap();
    let store = Arc::new(MemoryTokenStore::new());
    let mut config = config(&fake, store);
    config.refresh_token = Some(secret("1000.not-the-right-one"));
    let client = ZohoClient::new(config).unwrap();

    let err = client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, CrmError::Permanent { status: 200, code: Some(c), .. } if c == "invalid_code"),
        "{err:?}"
    );
    assert!(!err.to_string().contains("not-the-right-one"));
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|r| r.path.starts_with("/crm/"))
            .count(),
        0
    );
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_a_second_401_is_unauthorized() {
    let fake = FakeZoho::start().await.unwrap();
    let store = Arc::new(MemoryTokenStore::with_token(
        ZOHO_SYSTEM,
        stored(&fake.issue_access_token(), None, TimeDelta::minutes(30)),
    ));
    let client = ZohoClient::new(config(&fake, store.clone())).unwrap();

    fake.fail_next(Fault::ExpiredToken);
    client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(fake.refreshes(), 1);
    assert_eq!(
        exposed(&store.get(ZOHO_SYSTEM).unwrap().access_token),
        "1000.fake-zoho-access.2",
        "the new access token is cached"
    );

    fake.inject(FaultRule::new(Fault::ExpiredToken).times(2));
    let err = client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err, CrmError::Unauthorized);
    assert_eq!(fake.refreshes(), 2);
    assert_eq!(fake.contacts().len(), 1);
}

#[tokio::test]
async fn a_multi_status_answer_gives_one_result_per_record() {
    let fake = FakeZoho::start().await.unwrap();
    let (client, _) = client(&fake);
    let inputs: Vec<ZohoContact> = (0..3).map(|_| contact(Uuid::new_v4())).collect();
    fake.fail_next(Fault::PartialSuccess);

    let results = client.upsert_contacts(&inputs).await;

    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert!(
        matches!(&results[2], Err(CrmError::Permanent { status: 207, code: Some(c), .. }) if c == "INVALID_DATA"),
        "{results:?}"
    );
    assert_eq!(fake.contacts().len(), 2);
    assert!(
        fake.contact_by_external(&inputs[2].external_key.to_string())
            .is_none()
    );
}

#[tokio::test]
async fn batches_are_split_by_one_hundred() {
    let fake = FakeZoho::start().await.unwrap();
    let (client, _) = client(&fake);
    let inputs: Vec<ZohoContact> = (0..150).map(|_| contact(Uuid::new_v4())).collect();
    let results = client.upsert_contacts(&inputs).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(fake.contacts().len(), 150);
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|r| r.path.ends_with("/upsert"))
            .count(),
        2
    );
}

#[tokio::test]
async fn refusals_and_failures_are_classified() {
    let fake = FakeZoho::start().await.unwrap();
    let (client, _) = client(&fake);

    let mut nameless = contact(Uuid::new_v4());
    nameless.last_name = String::new();
    let err = client.upsert_contact(&nameless).await.unwrap_err();
    assert!(
        matches!(&err, CrmError::Permanent { status: 400, code: Some(c), .. } if c == "MANDATORY_NOT_FOUND"),
        "{err:?}"
    );

    fake.fail_next(Fault::TooManyRequests {
        retry_after: None,
        json_body: true,
    });
    let err = client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err, CrmError::RateLimited { retry_after: None });

    fake.fail_next(Fault::Status500);
    let err = client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CrmError::Transient {
                status: Some(500),
                ..
            }
        ),
        "{err:?}"
    );

    fake.fail_next(Fault::Validation400);
    let err = client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("INVALID_DATA"));
    assert!(!err.is_retryable());

    fake.fail_next(Fault::ResetConnection { apply: false });
    let err = client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CrmError::Transient { status: None, .. }),
        "{err:?}"
    );

    assert_eq!(fake.contacts().len(), 0);
}

#[tokio::test]
async fn a_sales_order_retried_after_a_timeout_is_updated_not_duplicated() {
    let fake = FakeZoho::start().await.unwrap();
    let store = Arc::new(MemoryTokenStore::new());
    let mut config = config(&fake, store);
    config.timeout = Duration::from_millis(1500);
    let client = ZohoClient::new(config).unwrap();
    let contact_id = client
        .upsert_contact(&contact(Uuid::new_v4()))
        .await
        .unwrap();
    fake.inject(
        FaultRule::new(Fault::Delay(Duration::from_millis(4000)))
            .on(Method::POST, "/crm/v6/Sales_Orders"),
    );

    let err = client
        .upsert_sales_order(&order("BK-1052", &contact_id))
        .await
        .unwrap_err();
    assert_eq!(err, CrmError::Timeout);
    let id = client
        .upsert_sales_order(&order("BK-1052", &contact_id))
        .await
        .unwrap();

    assert_eq!(fake.sales_orders().len(), 1);
    let record = fake.sales_order_by_external("BK-1052").unwrap();
    assert_eq!(record["id"], id.as_str());
    assert_eq!(record["Contact_Name"]["id"], contact_id.as_str());
    assert_eq!(record["Ordered_Items"][0]["List_Price"], 3500.0);

    // A sales order for a contact Zoho does not know is refused.
    let err = client
        .upsert_sales_order(&order("BK-1053", "1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("INVALID_DATA"));
}

#[tokio::test]
async fn the_semaphore_keeps_calls_within_the_concurrency_limit() {
    let fake = FakeZoho::start_with(FakeZohoConfig {
        latency: Some(Duration::from_millis(20)),
        ..FakeZohoConfig::default()
    })
    .await
    .unwrap();
    let (client, _) = client(&fake);
    let client = Arc::new(client);
    let calls = (0..30).map(|_| {
        let client = client.clone();
        async move { client.upsert_contact(&contact(Uuid::new_v4())).await }
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(
        fake.max_concurrency_observed() <= 10,
        "{}",
        fake.max_concurrency_observed()
    );
    assert_eq!(
        fake.refreshes(),
        1,
        "one refresh for thirty concurrent first calls"
    );

    // Without the client's limit, the fake answers 429 without Retry-After.
    let store = Arc::new(MemoryTokenStore::new());
    let mut unbounded = config(&fake, store);
    unbounded.max_concurrency = 30;
    let unbounded = Arc::new(ZohoClient::new(unbounded).unwrap());
    let calls = (0..30).map(|_| {
        let client = unbounded.clone();
        async move { client.upsert_contact(&contact(Uuid::new_v4())).await }
    });
    let results = futures::future::join_all(calls).await;
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(CrmError::RateLimited { retry_after: None }))),
        "{results:?}"
    );
}

/// A record whose caller gave up while it waited for a free call is not sent with a later call:
/// its row's next delivery sends its own, current record (a stale one could overwrite it).
#[tokio::test]
async fn a_record_whose_caller_gave_up_while_queued_is_not_sent() {
    let fake = FakeZoho::start_with(FakeZohoConfig {
        latency: Some(Duration::from_millis(300)),
        ..FakeZohoConfig::default()
    })
    .await
    .unwrap();
    let store = Arc::new(MemoryTokenStore::new());
    let mut one_call = config(&fake, store);
    one_call.max_concurrency = 1;
    let client = Arc::new(ZohoClient::new(one_call).unwrap());
    let upsert = |key: Uuid| {
        let client = client.clone();
        tokio::spawn(async move { client.upsert_contact(&contact(key)).await })
    };
    let (first, given_up, last) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // The first holds the only call; the second queues behind it, and its caller gives up.
    let first_call = upsert(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fake.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no call was made");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gave_up = upsert(given_up);
    tokio::time::sleep(Duration::from_millis(20)).await;
    gave_up.abort();
    let last_call = upsert(last);
    first_call.await.unwrap().unwrap();
    last_call.await.unwrap().unwrap();

    let keys: Vec<String> = fake
        .contacts()
        .iter()
        .filter_map(|c| c[DEFAULT_CONTACT_EXTERNAL_FIELD].as_str().map(String::from))
        .collect();
    assert!(keys.contains(&first.to_string()) && keys.contains(&last.to_string()));
    assert!(
        !keys.contains(&given_up.to_string()),
        "the given-up record was sent: {keys:?}"
    );
}
