//! The CRM clients against the fake Kommo and Zoho servers: each fault leads to the right outcome.
#![allow(clippy::unwrap_used)]

mod kommo;
mod zoho;

use chrono::{TimeDelta, Utc};
use crm::{SecretString, StoredToken};

/// A token set for a store.
pub fn stored(access: &str, refresh: Option<&str>, valid_for: TimeDelta) -> StoredToken {
    StoredToken {
        access_token: SecretString::from(access),
        refresh_token: refresh.map(SecretString::from),
        expires_at: Utc::now() + valid_for,
        api_domain: None,
    }
}

pub fn secret(s: &str) -> SecretString {
    SecretString::from(s)
}

pub fn exposed(s: &SecretString) -> String {
    use secrecy::ExposeSecret;
    s.expose_secret().to_owned()
}
