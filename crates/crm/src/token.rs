//! OAuth token persistence behind a trait: the clients share tokens between workers through it.
//!
//! The real store (PostgreSQL, encrypted at rest, an advisory lock for `lock_refresh`) lives
//! with the database code; `MemoryTokenStore` serves tests and single-process runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use secrecy::{ExposeSecret, SecretString};

use crate::error::CrmError;

/// The key under which the Kommo client keeps its token.
pub const KOMMO_SYSTEM: &str = "kommo";
/// The key under which the Zoho client keeps its token.
pub const ZOHO_SYSTEM: &str = "zoho";

/// A token set as kept in the store. `Debug` never shows the secrets.
#[derive(Clone, Debug)]
pub struct StoredToken {
    /// The access token sent with API calls.
    pub access_token: SecretString,
    /// The refresh token. Kommo's are single-use: the one from the last refresh is the only
    /// valid one, so it must be saved before the new access token is used.
    pub refresh_token: Option<SecretString>,
    /// When the access token stops working (the clients refresh a little before).
    pub expires_at: DateTime<Utc>,
    /// Zoho only: the API domain the token belongs to (the token response's `api_domain`).
    pub api_domain: Option<String>,
}

impl StoredToken {
    /// Whether the access token is still good for at least `margin`.
    pub fn is_fresh(&self, now: DateTime<Utc>, margin: TimeDelta) -> bool {
        self.expires_at - margin > now
    }

    /// Whether this set holds the given access token.
    pub(crate) fn has_access_token(&self, token: &SecretString) -> bool {
        self.access_token.expose_secret() == token.expose_secret()
    }
}

/// The store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("token store unavailable: {source}")]
pub struct TokenStoreError {
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl TokenStoreError {
    /// Wraps the store's own error (which must not contain the token values).
    pub fn new(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            source: source.into(),
        }
    }
}

/// Held while one worker refreshes a token; dropping it lets the next one in.
#[must_use = "the refresh lock is released when the guard is dropped"]
pub struct RefreshGuard {
    _inner: Box<dyn Send>,
}

impl RefreshGuard {
    /// Wraps whatever keeps the lock (a mutex guard, a transaction holding an advisory lock...).
    pub fn new<T: Send + 'static>(inner: T) -> Self {
        Self {
            _inner: Box::new(inner),
        }
    }
}

impl std::fmt::Debug for RefreshGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshGuard")
    }
}

/// Where the clients keep tokens, shared by every worker of a deployment.
///
/// `system` is [`KOMMO_SYSTEM`] or [`ZOHO_SYSTEM`].
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// The current token set, if any was saved.
    async fn load(&self, system: &str) -> Result<Option<StoredToken>, TokenStoreError>;
    /// Replaces the token set. It must be durable when this returns: the clients save a rotated
    /// refresh token before they use the new access token.
    async fn save(&self, system: &str, token: &StoredToken) -> Result<(), TokenStoreError>;
    /// Waits until no other worker is refreshing `system`'s token, and holds that lock until the
    /// guard is dropped. Clients re-read the store under the lock before refreshing.
    async fn lock_refresh(&self, system: &str) -> Result<RefreshGuard, TokenStoreError>;
}

/// An in-process [`TokenStore`] for tests and single-process runs.
#[derive(Default)]
pub struct MemoryTokenStore {
    tokens: Mutex<HashMap<String, StoredToken>>,
    saves: Mutex<HashMap<String, usize>>,
    locks: RefreshTurns,
}

impl MemoryTokenStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that already holds `token` for `system`.
    pub fn with_token(system: &str, token: StoredToken) -> Self {
        let store = Self::new();
        store.put(system, token);
        store
    }

    /// Sets the token without counting a save.
    pub fn put(&self, system: &str, token: StoredToken) {
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(system.to_owned(), token);
    }

    /// The current token (synchronous, for assertions).
    pub fn get(&self, system: &str) -> Option<StoredToken> {
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(system)
            .cloned()
    }

    /// How many times `save` was called for `system`.
    pub fn saves(&self, system: &str) -> usize {
        self.saves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(system)
            .copied()
            .unwrap_or(0)
    }
}

#[async_trait]
impl TokenStore for MemoryTokenStore {
    async fn load(&self, system: &str) -> Result<Option<StoredToken>, TokenStoreError> {
        Ok(self.get(system))
    }

    async fn save(&self, system: &str, token: &StoredToken) -> Result<(), TokenStoreError> {
        self.put(system, token.clone());
        *self
            .saves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(system.to_owned())
            .or_default() += 1;
        Ok(())
    }

    async fn lock_refresh(&self, system: &str) -> Result<RefreshGuard, TokenStoreError> {
        Ok(RefreshGuard::new(self.locks.turn(system).await))
    }
}

/// One refresher at a time per system within a process: refreshers queue (first come, first
/// served) and each holds its turn until it drops the guard.
#[derive(Default)]
pub struct RefreshTurns {
    queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl RefreshTurns {
    /// Waits for `system`'s turn.
    pub async fn turn(&self, system: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let queue = self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(system.to_owned())
            .or_default()
            .clone();
        queue.lock_owned().await
    }
}

/// How long before expiry a token counts as stale.
pub(crate) const EXPIRY_MARGIN: TimeDelta = TimeDelta::seconds(60);

pub(crate) fn store_error(e: TokenStoreError) -> CrmError {
    CrmError::transient(None, e.to_string())
}

/// The current access token, if the store has one that is still fresh.
pub(crate) async fn fresh_token(
    store: &dyn TokenStore,
    system: &str,
) -> Result<Option<StoredToken>, CrmError> {
    let token = store.load(system).await.map_err(store_error)?;
    Ok(token.filter(|t| t.is_fresh(Utc::now(), EXPIRY_MARGIN)))
}

/// Refreshes `system`'s token so that only one worker does it at a time: under the store's lock,
/// re-reads the store and returns what another worker saved meanwhile (a fresh token other than
/// the `stale` one that was just refused); otherwise calls `refresh` with the current set and
/// saves the result before returning it (a rotated refresh token must be durable before the new
/// access token is used).
///
/// A rotated refresh token is the only one the CRM still accepts, so it is never dropped: when
/// it cannot be saved within about a second, the caller gets a transient error and a task of its
/// own keeps saving it (holding the refresh lock, so that nobody in this process refreshes with
/// the refused one meanwhile) until the store takes it.
pub(crate) async fn refresh_once<F, Fut>(
    store: &Arc<dyn TokenStore>,
    system: &str,
    stale: Option<&SecretString>,
    refresh: F,
) -> Result<StoredToken, CrmError>
where
    F: FnOnce(Option<StoredToken>) -> Fut,
    Fut: Future<Output = Result<StoredToken, CrmError>>,
{
    let guard = store.lock_refresh(system).await.map_err(store_error)?;
    let current = store.load(system).await.map_err(store_error)?;
    if let Some(t) = &current {
        let refreshed_by_other = stale.is_none_or(|s| !t.has_access_token(s));
        if refreshed_by_other && t.is_fresh(Utc::now(), EXPIRY_MARGIN) {
            tracing::debug!(system, "token already refreshed by another worker");
            return Ok(t.clone());
        }
    }
    let new = refresh(current).await?;
    let mut attempt = 0u32;
    loop {
        match store.save(system, &new).await {
            Ok(()) => break,
            Err(e) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(system, attempt, error = %e, "saving the refreshed token failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            Err(e) => {
                tracing::error!(system, error = %e, "the refreshed token could not be saved yet; saving it in the background");
                tokio::spawn(save_until_stored(
                    store.clone(),
                    system.to_string(),
                    new,
                    guard,
                ));
                return Err(CrmError::transient(
                    None,
                    format!("{system}: refreshed token not saved yet ({e})"),
                ));
            }
        }
    }
    tracing::info!(system, "access token refreshed");
    Ok(new)
}

/// Saves a refreshed token until the store takes it, holding the refresh lock meanwhile.
async fn save_until_stored(
    store: Arc<dyn TokenStore>,
    system: String,
    token: StoredToken,
    _guard: RefreshGuard,
) {
    let mut wait = Duration::from_millis(500);
    loop {
        tokio::time::sleep(wait).await;
        match store.save(&system, &token).await {
            Ok(()) => {
                tracing::info!(system, "the refreshed token is saved at last");
                return;
            }
            Err(e) => {
                tracing::warn!(system, error = %e, "saving the refreshed token failed again; retrying");
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The refresh tokens to try, in order, without repeats: a rejected stored token falls back to
/// the configured one (an operator who re-authorized only has to change the configuration).
pub(crate) fn refresh_candidates(
    stored: Option<&SecretString>,
    configured: Option<&SecretString>,
    stored_first: bool,
) -> Vec<SecretString> {
    let ordered = if stored_first {
        [stored, configured]
    } else {
        [configured, stored]
    };
    let mut out: Vec<SecretString> = Vec::new();
    for t in ordered.into_iter().flatten() {
        if !out.iter().any(|o| o.expose_secret() == t.expose_secret()) {
            out.push(t.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn token(access: &str, minutes: i64) -> StoredToken {
        StoredToken {
            access_token: SecretString::from(access),
            refresh_token: Some(SecretString::from("r")),
            expires_at: Utc::now() + TimeDelta::minutes(minutes),
            api_domain: None,
        }
    }

    #[test]
    fn freshness_and_debug() {
        let now = Utc::now();
        assert!(token("a", 10).is_fresh(now, TimeDelta::minutes(1)));
        assert!(!token("a", 10).is_fresh(now, TimeDelta::minutes(11)));
        assert!(!token("a", -1).is_fresh(now, TimeDelta::zero()));
        let shown = format!("{:?}", token("very-secret-access", 10));
        assert!(!shown.contains("very-secret-access"), "{shown}");
    }

    #[tokio::test]
    async fn memory_store_round_trip_and_lock() {
        let store = Arc::new(MemoryTokenStore::new());
        assert!(store.load("kommo").await.unwrap().is_none());
        store.save("kommo", &token("a1", 10)).await.unwrap();
        assert!(
            store
                .load("kommo")
                .await
                .unwrap()
                .unwrap()
                .has_access_token(&SecretString::from("a1"))
        );
        assert_eq!(store.saves("kommo"), 1);

        let guard = store.lock_refresh("kommo").await.unwrap();
        let other = store.clone();
        let waiter = tokio::spawn(async move { other.lock_refresh("kommo").await.map(drop) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "second lock must wait for the first");
        // Another system is not blocked.
        drop(store.lock_refresh("zoho").await.unwrap());
        drop(guard);
        waiter.await.unwrap().unwrap();
    }
}
