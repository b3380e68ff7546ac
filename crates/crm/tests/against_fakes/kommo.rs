//! `KommoClient` against `FakeKommo`: token refresh and rotation, lookup before create, faults,
//! and pacing under the account limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::TimeDelta;
use crm::{
    ContactInput, CrmError, KOMMO_SYSTEM, KommoAuth, KommoClient, KommoConfig, KommoOAuth,
    LeadInput, LocalPacer, MemoryTokenStore, Pacer, RefreshGuard, StoredToken, TokenStore,
    TokenStoreError, Unpaced,
};
use crm_fakes::{DEFAULT_EXTERNAL_ID_FIELD_ID, FakeKommo, Fault, FaultRule, Method};
use uuid::Uuid;

use crate::{exposed, secret, stored};

const TIMEOUT: Duration = Duration::from_secs(5);

fn contact(key: Uuid) -> ContactInput {
    ContactInput {
        external_key: key,
        name: "Jane Roe".into(),
        first_name: Some("Jane".into()),
        last_name: Some("Roe".into()),
        phone: Some("+971500000001".into()),
        email: Some("jane@example.com".into()),
    }
}

fn client_with(
    fake: &FakeKommo,
    auth: KommoAuth,
    timeout: Duration,
    pacer: Arc<dyn Pacer>,
) -> KommoClient {
    KommoClient::new(
        KommoConfig {
            base_url: fake.base_url(),
            auth,
            external_id_field_id: DEFAULT_EXTERNAL_ID_FIELD_ID,
            lead_external_id_field_id: None,
            timeout,
        },
        pacer,
    )
    .unwrap()
}

fn oauth(fake: &FakeKommo, store: Arc<dyn TokenStore>, initial: Option<&str>) -> KommoAuth {
    let config = fake.config();
    KommoAuth::OAuth(KommoOAuth {
        client_id: config.client_id.clone(),
        client_secret: secret(&config.client_secret),
        redirect_uri: config.redirect_uri.clone(),
        initial_refresh_token: initial.map(secret),
        store,
    })
}

/// A store holding a valid token pair issued by the fake, and a client using it.
fn oauth_client(fake: &FakeKommo) -> (KommoClient, Arc<MemoryTokenStore>, String) {
    let (access, refresh) = fake.issue_tokens();
    let store = Arc::new(MemoryTokenStore::with_token(
        KOMMO_SYSTEM,
        stored(&access, Some(&refresh), TimeDelta::hours(20)),
    ));
    let client = client_with(fake, oauth(fake, store.clone(), None), TIMEOUT, paced());
    (client, store, refresh)
}

/// Each client paces itself as in production, or the fake's 7/s limit would answer 429.
fn paced() -> Arc<dyn Pacer> {
    Arc::new(LocalPacer::default())
}

fn long_lived_client(fake: &FakeKommo, timeout: Duration) -> KommoClient {
    client_with(
        fake,
        KommoAuth::LongLived(secret(fake.long_lived_token())),
        timeout,
        paced(),
    )
}

#[tokio::test]
async fn expired_token_is_refreshed_once_and_the_rotated_refresh_token_stored() {
    let fake = FakeKommo::start().await.unwrap();
    let (client, store, old_refresh) = oauth_client(&fake);
    fake.fail_next(Fault::ExpiredToken);

    let id = client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap();

    assert_eq!(fake.refreshes(), 1);
    assert_eq!(fake.contacts().len(), 1);
    assert_eq!(fake.contacts()[0]["id"], id);
    let token = store.get(KOMMO_SYSTEM).unwrap();
    let new_refresh = exposed(token.refresh_token.as_ref().unwrap());
    assert_ne!(new_refresh, old_refresh);
    assert_eq!(
        new_refresh,
        fake.refresh_token(),
        "the rotated refresh token is the one stored"
    );
    assert_eq!(store.saves(KOMMO_SYSTEM), 1);

    // The next call uses the stored token without refreshing again.
    client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap();
    assert_eq!(fake.refreshes(), 1);
}

/// Kommo rotates the refresh token when it answers a refresh. A caller that stops waiting (a
/// delivery given up, a worker shutting down) does not stop the refresh: the rotated pair is
/// still stored, and the account needs no re-authorizing.
#[tokio::test]
async fn a_refresh_whose_caller_gives_up_still_stores_the_rotated_token() {
    let fake = FakeKommo::start().await.unwrap();
    let (client, store, old_refresh) = oauth_client(&fake);
    let client = Arc::new(client);
    fake.fail_next(Fault::ExpiredToken);
    fake.inject(
        FaultRule::new(Fault::Delay(Duration::from_millis(500)))
            .on(Method::POST, "/oauth2/access_token"),
    );
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.upsert_contact(&contact(Uuid::new_v4()), None).await }
    });
    // Kommo has rotated the pair (its answer is on the way); then the caller gives up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.refreshes() == 0 {
        assert!(Instant::now() < deadline, "no refresh was asked for");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored = store
            .get(KOMMO_SYSTEM)
            .and_then(|t| t.refresh_token.as_ref().map(exposed));
        if stored.as_deref() == Some(fake.refresh_token().as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated refresh token was lost: the store still has the old one"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(fake.refresh_token(), old_refresh);
    assert_eq!(fake.refreshes(), 1);
}

#[tokio::test]
async fn a_second_401_is_unauthorized() {
    let fake = FakeKommo::start().await.unwrap();
    let (client, _store, _) = oauth_client(&fake);
    fake.inject(FaultRule::new(Fault::ExpiredToken).times(2));

    let err = client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap_err();

    assert_eq!(err, CrmError::Unauthorized);
    assert_eq!(fake.refreshes(), 1, "one refresh, not a loop");
    assert_eq!(fake.creates(), 0);
}

#[tokio::test]
async fn a_refused_long_lived_token_is_unauthorized_at_once() {
    let fake = FakeKommo::start().await.unwrap();
    let client = long_lived_client(&fake, TIMEOUT);
    fake.fail_next(Fault::ExpiredToken);
    let err = client.update_lead_status(1, 2, 3).await.unwrap_err();
    assert_eq!(err, CrmError::Unauthorized);
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_used_refresh_token_is_permanent_and_the_configured_one_is_the_fallback() {
    let fake = FakeKommo::start().await.unwrap();
    let (_, used) = fake.issue_tokens();
    fake.issue_tokens(); // rotates: `used` is dead now
    let store = Arc::new(MemoryTokenStore::with_token(
        KOMMO_SYSTEM,
        stored("expired", Some(&used), TimeDelta::minutes(-1)),
    ));
    let client = client_with(&fake, oauth(&fake, store.clone(), None), TIMEOUT, paced());
    let err = client.find_contact("x").await.unwrap_err();
    assert!(
        matches!(&err, CrmError::Permanent { status: 400, code: Some(c), .. } if c == "invalid_grant"),
        "{err:?}"
    );
    assert!(!err.to_string().contains(&used), "no token in messages");

    // An operator re-authorized and configured the new refresh token: it is tried after the
    // stored one fails, and the rotated result is stored.
    let current = fake.refresh_token();
    let client = client_with(
        &fake,
        oauth(&fake, store.clone(), Some(&current)),
        TIMEOUT,
        paced(),
    );
    assert_eq!(client.find_contact("x").await.unwrap(), None);
    assert_eq!(
        exposed(
            store
                .get(KOMMO_SYSTEM)
                .unwrap()
                .refresh_token
                .as_ref()
                .unwrap()
        ),
        fake.refresh_token()
    );
}

#[tokio::test]
async fn an_empty_store_starts_from_the_configured_refresh_token() {
    let fake = FakeKommo::start().await.unwrap();
    let store = Arc::new(MemoryTokenStore::new());
    let initial = fake.refresh_token();
    let client = client_with(
        &fake,
        oauth(&fake, store.clone(), Some(&initial)),
        TIMEOUT,
        paced(),
    );
    client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap();
    assert_eq!(fake.refreshes(), 1);
    let token = store.get(KOMMO_SYSTEM).unwrap();
    assert_eq!(
        exposed(token.refresh_token.as_ref().unwrap()),
        fake.refresh_token()
    );
}

#[tokio::test]
async fn workers_sharing_a_store_refresh_only_once() {
    let fake = FakeKommo::start().await.unwrap();
    let (first, store, _) = oauth_client(&fake);
    let second = client_with(&fake, oauth(&fake, store.clone(), None), TIMEOUT, paced());
    fake.expire_access_tokens();

    let (a, b) = tokio::join!(first.find_contact("a"), second.find_contact("b"));

    assert_eq!((a.unwrap(), b.unwrap()), (None, None));
    assert_eq!(
        fake.refreshes(),
        1,
        "the second worker reuses the first one's refresh"
    );
}

/// A store whose saves fail: a rotated token that cannot be kept must not be used.
struct FailingSaves {
    inner: MemoryTokenStore,
    failing: AtomicBool,
}

#[async_trait]
impl TokenStore for FailingSaves {
    async fn load(&self, system: &str) -> Result<Option<StoredToken>, TokenStoreError> {
        self.inner.load(system).await
    }
    async fn save(&self, system: &str, token: &StoredToken) -> Result<(), TokenStoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(TokenStoreError::new("database is down"));
        }
        self.inner.save(system, token).await
    }
    async fn lock_refresh(&self, system: &str) -> Result<RefreshGuard, TokenStoreError> {
        self.inner.lock_refresh(system).await
    }
}

#[tokio::test]
async fn a_rotated_token_is_not_used_before_it_is_saved_and_never_dropped() {
    let fake = FakeKommo::start().await.unwrap();
    let (access, refresh) = fake.issue_tokens();
    let store = Arc::new(FailingSaves {
        inner: MemoryTokenStore::with_token(
            KOMMO_SYSTEM,
            stored(&access, Some(&refresh), TimeDelta::hours(1)),
        ),
        failing: AtomicBool::new(true),
    });
    let client = client_with(&fake, oauth(&fake, store.clone(), None), TIMEOUT, paced());
    fake.fail_next(Fault::ExpiredToken);

    let err = client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap_err();

    assert!(
        matches!(err, CrmError::Transient { status: None, .. }),
        "{err:?}"
    );
    let api_calls = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/api/"))
        .count();
    assert_eq!(api_calls, 1, "no API call with the unsaved token");
    assert_eq!(fake.creates(), 0);

    // Kommo took the old refresh token back: the rotated one is the only one left, and it is
    // saved as soon as the store works again, never dropped.
    store.failing.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let saved = store.inner.load(KOMMO_SYSTEM).await.unwrap();
        let rotated = saved.and_then(|t| t.refresh_token);
        if rotated.is_some_and(|r| exposed(&r) == fake.refresh_token()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated refresh token was never saved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap();
    // And the next expiry refreshes with it.
    fake.fail_next(Fault::ExpiredToken);
    client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap();
    assert_eq!(fake.refreshes(), 2);
    assert_eq!(fake.creates(), 2);
}

/// A contact deleted in Kommo (by a user, or merged into another) is not a dead end: its
/// stored id answers 404, so the contact is looked up by our key and, gone for good, created
/// again; the new id is returned to be stored.
#[tokio::test]
async fn a_contact_gone_from_kommo_is_looked_up_by_our_key_and_created_again() {
    let fake = FakeKommo::start().await.unwrap();
    let client = long_lived_client(&fake, TIMEOUT);
    let input = contact(Uuid::new_v4());
    let first = client.upsert_contact(&input, None).await.unwrap();
    assert_eq!(
        client.upsert_contact(&input, Some(first)).await.unwrap(),
        first
    );
    assert!(fake.delete_contact(first));

    let again = client.upsert_contact(&input, Some(first)).await.unwrap();

    assert_ne!(again, first);
    assert_eq!(fake.contacts().len(), 1);
    assert_eq!(fake.creates(), 2);
    assert_eq!(
        client.upsert_contact(&input, Some(again)).await.unwrap(),
        again
    );
    assert_eq!(fake.contacts().len(), 1);
}

#[tokio::test]
async fn a_timeout_after_the_create_was_applied_then_a_retry_finds_the_record() {
    let fake = FakeKommo::start().await.unwrap();
    let client = long_lived_client(&fake, Duration::from_millis(1500));
    let input = contact(Uuid::new_v4());
    fake.inject(
        FaultRule::new(Fault::Delay(Duration::from_millis(4000)))
            .on(Method::POST, "/api/v4/contacts"),
    );

    let err = client.upsert_contact(&input, None).await.unwrap_err();
    assert_eq!(err, CrmError::Timeout);
    assert_eq!(fake.contacts().len(), 1, "the server did the work");

    let id = client.upsert_contact(&input, None).await.unwrap();

    assert_eq!(fake.contacts().len(), 1, "exactly one record");
    assert_eq!(fake.creates(), 1);
    assert_eq!(fake.contacts()[0]["id"], id);
    let retry: Vec<_> = fake
        .requests()
        .into_iter()
        .skip(2)
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        retry,
        vec![
            (Method::GET, "/api/v4/contacts".to_owned()),
            (Method::PATCH, format!("/api/v4/contacts/{id}")),
        ]
    );
}

#[tokio::test]
async fn a_reset_connection_is_transient_and_safe_to_retry() {
    for apply in [true, false] {
        let fake = FakeKommo::start().await.unwrap();
        let client = long_lived_client(&fake, TIMEOUT);
        let input = contact(Uuid::new_v4());
        fake.inject(
            FaultRule::new(Fault::ResetConnection { apply }).on(Method::POST, "/api/v4/contacts"),
        );

        let err = client.upsert_contact(&input, None).await.unwrap_err();
        assert!(
            matches!(err, CrmError::Transient { status: None, .. }),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(fake.contacts().len(), usize::from(apply));

        client.upsert_contact(&input, None).await.unwrap();
        assert_eq!(fake.contacts().len(), 1, "apply={apply}");
        assert_eq!(fake.creates(), 1);
    }
}

#[tokio::test]
async fn rate_limits_server_errors_and_validation_are_classified() {
    let fake = FakeKommo::start().await.unwrap();
    let client = long_lived_client(&fake, TIMEOUT);
    let cases = [
        (
            Fault::TooManyRequests {
                retry_after: None,
                json_body: false,
            },
            CrmError::RateLimited { retry_after: None },
        ),
        (
            Fault::TooManyRequests {
                retry_after: Some(3),
                json_body: true,
            },
            CrmError::RateLimited {
                retry_after: Some(Duration::from_secs(3)),
            },
        ),
    ];
    for (fault, want) in cases {
        fake.fail_next(fault);
        assert_eq!(client.find_contact("k").await.unwrap_err(), want);
    }

    fake.fail_next(Fault::Status500);
    let err = client.find_contact("k").await.unwrap_err();
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

    fake.fail_next(Fault::Unavailable { retry_after: 120 });
    let err = client.find_contact("k").await.unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)), "{err:?}");
    assert!(err.is_retryable());

    fake.inject(FaultRule::new(Fault::Validation400).on(Method::POST, "/api/v4/contacts"));
    let err = client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CrmError::Permanent { status: 400, code: Some(c), .. } if c == "NotSupportedChoice"),
        "{err:?}"
    );
    assert_eq!(fake.creates(), 0);

    // A misconfigured external-id field is refused by the fake's own validation.
    let wrong = KommoClient::new(
        KommoConfig {
            base_url: fake.base_url(),
            auth: KommoAuth::LongLived(secret(fake.long_lived_token())),
            external_id_field_id: 12345,
            lead_external_id_field_id: None,
            timeout: TIMEOUT,
        },
        paced(),
    )
    .unwrap();
    let err = wrong
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(!err.to_string().contains("jane@example.com"));
}

/// A 429 pauses the whole account, not just the request that got it: the next request, any
/// request, waits for its `Retry-After` (repeated 429s would earn the IP a block).
#[tokio::test]
async fn a_429_holds_every_request_of_the_account_for_its_retry_after() {
    let fake = FakeKommo::start().await.unwrap();
    let client = long_lived_client(&fake, TIMEOUT);
    fake.fail_next(Fault::TooManyRequests {
        retry_after: Some(2),
        json_body: true,
    });
    let err = client.find_contact("k").await.unwrap_err();
    assert!(matches!(err, CrmError::RateLimited { .. }), "{err:?}");
    let refused_at = std::time::Instant::now();
    assert_eq!(client.find_contact("another").await.unwrap(), None);
    let waited = refused_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1_900),
        "sent after {waited:?}"
    );
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn leads_are_looked_up_before_create_and_notes_added() {
    let fake = FakeKommo::start().await.unwrap();
    let client = long_lived_client(&fake, TIMEOUT);
    let contact_id = client
        .upsert_contact(&contact(Uuid::new_v4()), None)
        .await
        .unwrap();
    let mut lead = LeadInput {
        external_key: "BK-1052".into(),
        name: "BK-1052 Rolls-Royce Ghost".into(),
        price: 4200,
        status_id: Some(47_888_833),
        pipeline_id: Some(5_389_528),
        contact_id: Some(contact_id),
    };

    let lead_id = client.upsert_lead(&lead, None).await.unwrap();
    lead.price = 5000;
    assert_eq!(client.upsert_lead(&lead, None).await.unwrap(), lead_id);
    assert_eq!(
        client.upsert_lead(&lead, Some(lead_id)).await.unwrap(),
        lead_id
    );
    client
        .update_lead_status(lead_id, 47_873_533, 5_389_528)
        .await
        .unwrap();
    let note_id = client.add_note(lead_id, "Booking confirmed").await.unwrap();

    assert_eq!(fake.leads().len(), 1);
    let stored = fake.lead(lead_id).unwrap();
    assert_eq!(stored["price"], 5000);
    assert_eq!(stored["status_id"], 47_873_533);
    assert_eq!(stored["_embedded"]["contacts"][0]["id"], contact_id);
    assert_eq!(fake.notes().len(), 1);
    assert_eq!(fake.notes()[0]["id"], note_id);
    assert_eq!(fake.notes()[0]["entity_id"], lead_id);

    // A known id that no longer exists (merged away in Kommo) is not a dead end, nor a second
    // lead: the lead is found by our key.
    assert_eq!(client.upsert_lead(&lead, Some(1)).await.unwrap(), lead_id);
    assert_eq!(fake.leads().len(), 1);
}

#[tokio::test]
async fn pacing_keeps_thirty_concurrent_calls_within_seven_per_second() {
    let fake = FakeKommo::start().await.unwrap();
    let setup = long_lived_client(&fake, TIMEOUT);
    let lead = LeadInput {
        external_key: "BK-1".into(),
        name: "BK-1".into(),
        price: 1,
        status_id: None,
        pipeline_id: None,
        contact_id: None,
    };
    let lead_id = setup.upsert_lead(&lead, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // let the setup calls leave the window

    let pacer: Arc<dyn Pacer> = Arc::new(LocalPacer::default());
    let client = Arc::new(client_with(
        &fake,
        KommoAuth::LongLived(secret(fake.long_lived_token())),
        TIMEOUT,
        pacer,
    ));
    let started = Instant::now();
    let calls = (0..30).map(|i| {
        let client = client.clone();
        async move { client.add_note(lead_id, &format!("note {i}")).await }
    });
    let results = futures::future::join_all(calls).await;

    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(fake.notes().len(), 30);
    assert_eq!(fake.rate_limited(), 0);
    assert!(
        fake.max_rps_observed() <= 7,
        "observed {}",
        fake.max_rps_observed()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "30 calls at 6/s take about 5 s"
    );
}

#[tokio::test]
async fn without_pacing_the_account_limit_answers_429() {
    let fake = FakeKommo::start().await.unwrap();
    let client = Arc::new(client_with(
        &fake,
        KommoAuth::LongLived(secret(fake.long_lived_token())),
        TIMEOUT,
        Arc::new(Unpaced),
    ));
    let calls = (0..15).map(|i| {
        let client = client.clone();
        async move { client.find_contact(&format!("k{i}")).await }
    });
    let results = futures::future::join_all(calls).await;
    let limited = results
        .iter()
        .filter(|r| matches!(r, Err(CrmError::RateLimited { retry_after: None })))
        .count();
    assert!(limited >= 8, "{results:?}");
    assert!(fake.max_rps_observed() >= 15);
}
