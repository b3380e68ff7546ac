//! `KommoClient`: contacts, leads and notes in Kommo API v4, never creating a record twice.
//!
//! Every request waits on the `Pacer` first. Creates are preceded by a search on our stable key
//! (kept in a custom field), so a create whose answer was lost is found instead of repeated.

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::error::{CrmError, classify_kommo};
use crate::http::{self, Answer, ConfigError};
use crate::pacer::Pacer;
use crate::token::{
    KOMMO_SYSTEM, StoredToken, TokenStore, fresh_token, refresh_candidates, refresh_once,
};

/// How the client authenticates to Kommo.
pub enum KommoAuth {
    /// A long-lived token of a private integration (`KOMMO_ACCESS_TOKEN`); never refreshed.
    LongLived(SecretString),
    /// OAuth 2 with rotating refresh tokens kept in a [`TokenStore`].
    OAuth(KommoOAuth),
}

/// OAuth 2 settings (`KOMMO_CLIENT_ID`, `KOMMO_CLIENT_SECRET`, `KOMMO_REDIRECT_URI`,
/// `KOMMO_REFRESH_TOKEN`).
#[derive(Clone)]
pub struct KommoOAuth {
    /// The integration id.
    pub client_id: String,
    /// The integration secret.
    pub client_secret: SecretString,
    /// The redirect URI registered with the integration (Kommo checks it on refresh).
    pub redirect_uri: String,
    /// The refresh token from the configuration, used when the store has none (first start) or
    /// when the stored one is rejected (after an operator re-authorized).
    pub initial_refresh_token: Option<SecretString>,
    /// Where the current token set lives, shared by all workers.
    pub store: Arc<dyn TokenStore>,
}

/// Everything a [`KommoClient`] needs.
pub struct KommoConfig {
    /// `KOMMO_BASE_URL`, e.g. `https://skyluxse.kommo.com`.
    pub base_url: String,
    /// Long-lived token or OAuth.
    pub auth: KommoAuth,
    /// `KOMMO_EXTERNAL_ID_FIELD_ID`: the contacts' custom field holding our client id.
    pub external_id_field_id: i64,
    /// The leads' custom field holding our lead key, when it differs from the contacts' one
    /// (Kommo custom fields belong to one entity type); `None` = `external_id_field_id`.
    pub lead_external_id_field_id: Option<i64>,
    /// Bound on one HTTP call (connect, send, answer).
    pub timeout: std::time::Duration,
}

/// A contact to create or update. Phone, email and names are personal data: this crate never
/// puts them in errors or logs, and `Debug` shows only the external key.
#[derive(Clone, PartialEq, Eq)]
pub struct ContactInput {
    /// Our client id, kept in the external-id custom field.
    pub external_key: Uuid,
    /// Display name (required by Kommo).
    pub name: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
}

impl std::fmt::Debug for ContactInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactInput")
            .field("external_key", &self.external_key)
            .finish_non_exhaustive()
    }
}

/// A lead (deal) to create or update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeadInput {
    /// Our stable key (sales-lead id or booking code), kept in the leads' external-id field.
    pub external_key: String,
    pub name: String,
    /// Whole currency units, as Kommo wants.
    pub price: i64,
    /// Pipeline stage; `None` = Kommo's default (first stage of the main pipeline).
    pub status_id: Option<i64>,
    pub pipeline_id: Option<i64>,
    /// Kommo contact to link on creation.
    pub contact_id: Option<i64>,
}

/// A Kommo API v4 client. Cheap to share behind an `Arc`; safe to use from many tasks.
pub struct KommoClient {
    http: reqwest::Client,
    base: String,
    auth: KommoAuth,
    contact_field: i64,
    lead_field: i64,
    pacer: Arc<dyn Pacer>,
}

impl std::fmt::Debug for KommoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KommoClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl KommoClient {
    /// Builds a client; `pacer` is shared by every client talking to the same account.
    pub fn new(config: KommoConfig, pacer: Arc<dyn Pacer>) -> Result<Self, ConfigError> {
        Ok(Self {
            http: http::build_client(config.timeout)?,
            base: http::base_url(&config.base_url, "KOMMO_BASE_URL")?,
            auth: config.auth,
            contact_field: config.external_id_field_id,
            lead_field: config
                .lead_external_id_field_id
                .unwrap_or(config.external_id_field_id),
            pacer,
        })
    }

    /// Creates or updates a contact and returns its Kommo id; never creates a second contact
    /// for the same `external_key`. With `known_id` (stored from an earlier call) it patches
    /// that contact; otherwise, or when that contact is gone from Kommo (deleted, or merged
    /// into another), it searches by the external key and patches the match, or creates the
    /// contact. A returned id other than `known_id` is the one to store.
    pub async fn upsert_contact(
        &self,
        contact: &ContactInput,
        known_id: Option<i64>,
    ) -> Result<i64, CrmError> {
        let body = self.contact_body(contact);
        if let Some(id) = known_id
            && self.patch_known("contacts", id, &body).await?
        {
            tracing::debug!(kommo_id = id, "kommo contact updated");
            return Ok(id);
        }
        match self.find_contact(&contact.external_key.to_string()).await? {
            Some(id) => {
                self.patch("contacts", id, &body).await?;
                tracing::debug!(kommo_id = id, "kommo contact updated");
                Ok(id)
            }
            None => {
                let id = self.create("contacts", body).await?;
                tracing::debug!(kommo_id = id, "kommo contact created");
                Ok(id)
            }
        }
    }

    /// `PATCH /api/v4/{entity}/{id}`.
    async fn patch(&self, entity: &str, id: i64, body: &Value) -> Result<(), CrmError> {
        self.call(
            Method::PATCH,
            &format!("/api/v4/{entity}/{id}"),
            None,
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// Patches a record by the id stored for it: false when Kommo no longer has it (404).
    async fn patch_known(&self, entity: &str, id: i64, body: &Value) -> Result<bool, CrmError> {
        match self.patch(entity, id, body).await {
            Ok(()) => Ok(true),
            Err(CrmError::Permanent { status: 404, .. }) => {
                tracing::warn!(
                    kommo_id = id,
                    entity,
                    "the stored Kommo id is gone; looking the record up by our key"
                );
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The id of the contact whose external-id field equals `external_key`, if any (the oldest
    /// when several match).
    pub async fn find_contact(&self, external_key: &str) -> Result<Option<i64>, CrmError> {
        self.find("contacts", self.contact_field, external_key)
            .await
    }

    /// Creates or updates a lead and returns its Kommo id, like [`KommoClient::upsert_contact`]:
    /// `known_id` while Kommo has it, else a search on the external key, else a create linked
    /// to `contact_id`. An update does not change the linked contact.
    pub async fn upsert_lead(
        &self,
        lead: &LeadInput,
        known_id: Option<i64>,
    ) -> Result<i64, CrmError> {
        let mut body = self.lead_body(lead);
        if let Some(id) = known_id
            && self.patch_known("leads", id, &body).await?
        {
            tracing::debug!(kommo_id = id, "kommo lead updated");
            return Ok(id);
        }
        match self.find_lead(&lead.external_key).await? {
            Some(id) => {
                self.patch("leads", id, &body).await?;
                tracing::debug!(kommo_id = id, "kommo lead updated");
                Ok(id)
            }
            None => {
                if let (Some(contact), Some(obj)) = (lead.contact_id, body.as_object_mut()) {
                    obj.insert("_embedded".into(), json!({"contacts": [{"id": contact}]}));
                }
                let id = self.create("leads", body).await?;
                tracing::debug!(kommo_id = id, "kommo lead created");
                Ok(id)
            }
        }
    }

    /// The id of the lead whose external-id field equals `external_key`, if any.
    pub async fn find_lead(&self, external_key: &str) -> Result<Option<i64>, CrmError> {
        self.find("leads", self.lead_field, external_key).await
    }

    /// Moves a lead to a pipeline stage. Repeating it is harmless.
    pub async fn update_lead_status(
        &self,
        lead_id: i64,
        status_id: i64,
        pipeline_id: i64,
    ) -> Result<(), CrmError> {
        let body = json!({"status_id": status_id, "pipeline_id": pipeline_id});
        self.call(
            Method::PATCH,
            &format!("/api/v4/leads/{lead_id}"),
            None,
            Some(&body),
        )
        .await?;
        Ok(())
    }

    /// Adds a common note to a lead and returns the note id. Kommo has no way to look a note
    /// up by a key, so after a `Timeout` or an unanswered `Transient` a repeat may add the note
    /// twice.
    pub async fn add_note(&self, lead_id: i64, text: &str) -> Result<i64, CrmError> {
        let body = json!([{
            "entity_id": lead_id,
            "note_type": "common",
            "params": {"text": text},
            "request_id": "0",
        }]);
        let answer = self
            .call(Method::POST, "/api/v4/leads/notes", None, Some(&body))
            .await?;
        first_embedded_id(&answer, "notes")
            .ok_or_else(|| malformed("kommo POST /api/v4/leads/notes", answer.status))
    }

    fn contact_body(&self, c: &ContactInput) -> Value {
        let mut fields = vec![json!({
            "field_id": self.contact_field,
            "values": [{"value": c.external_key.to_string()}],
        })];
        for (code, value) in [("PHONE", &c.phone), ("EMAIL", &c.email)] {
            if let Some(v) = value {
                fields.push(
                    json!({"field_code": code, "values": [{"value": v, "enum_code": "WORK"}]}),
                );
            }
        }
        let mut obj = Map::new();
        obj.insert("name".into(), json!(c.name));
        if let Some(v) = &c.first_name {
            obj.insert("first_name".into(), json!(v));
        }
        if let Some(v) = &c.last_name {
            obj.insert("last_name".into(), json!(v));
        }
        obj.insert("custom_fields_values".into(), Value::Array(fields));
        Value::Object(obj)
    }

    fn lead_body(&self, l: &LeadInput) -> Value {
        let mut obj = Map::new();
        obj.insert("name".into(), json!(l.name));
        obj.insert("price".into(), json!(l.price));
        if let Some(v) = l.status_id {
            obj.insert("status_id".into(), json!(v));
        }
        if let Some(v) = l.pipeline_id {
            obj.insert("pipeline_id".into(), json!(v));
        }
        obj.insert(
            "custom_fields_values".into(),
            json!([{"field_id": self.lead_field, "values": [{"value": l.external_key}]}]),
        );
        Value::Object(obj)
    }

    async fn create(&self, entity: &str, mut item: Value) -> Result<i64, CrmError> {
        if let Some(obj) = item.as_object_mut() {
            obj.insert("request_id".into(), json!("0"));
        }
        let path = format!("/api/v4/{entity}");
        let answer = self
            .call(Method::POST, &path, None, Some(&Value::Array(vec![item])))
            .await?;
        first_embedded_id(&answer, entity)
            .ok_or_else(|| malformed(&format!("kommo POST {path}"), answer.status))
    }

    async fn find(&self, entity: &str, field_id: i64, key: &str) -> Result<Option<i64>, CrmError> {
        let path = format!("/api/v4/{entity}");
        let answer = self
            .call(Method::GET, &path, Some(("query", key)), None)
            .await?;
        if answer.status == 204 || answer.body.is_empty() {
            return Ok(None);
        }
        let body = answer
            .json()
            .ok_or_else(|| malformed(&format!("kommo GET {path}"), answer.status))?;
        let items = body
            .get("_embedded")
            .and_then(|e| e.get(entity))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let found = matching_ids(items, field_id, key);
        if found.len() > 1 {
            tracing::warn!(entity, ids = ?found, "several Kommo records carry the same external key; using the oldest");
        }
        Ok(found.first().copied())
    }

    /// Sends one API call: paced, authenticated, and on a 401 (OAuth only) refreshed once and
    /// repeated once.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: Option<(&str, &str)>,
        body: Option<&Value>,
    ) -> Result<Answer, CrmError> {
        let context = format!("kommo {method} {path}");
        let mut token = self.access_token().await?;
        let mut refreshed = false;
        loop {
            self.pacer.acquire().await;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(token.expose_secret());
            if let Some(q) = query {
                req = req.query(&[q]);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let answer = http::send(req, &context).await?;
            tracing::debug!(target: "crm", %method, path, status = answer.status, "kommo answered");
            if answer.is_success() {
                return Ok(answer);
            }
            if answer.status == 401 {
                if let KommoAuth::OAuth(oauth) = &self.auth
                    && !refreshed
                {
                    refreshed = true;
                    token = self.refresh(oauth, Some(&token)).await?.access_token;
                    continue;
                }
                tracing::warn!(path, "kommo refused the access token");
                return Err(CrmError::Unauthorized);
            }
            let error = classify_kommo(
                &context,
                answer.status,
                answer.retry_after.as_deref(),
                &answer.body,
            );
            return Err(hold_off_on_429(self.pacer.as_ref(), error).await);
        }
    }

    async fn access_token(&self) -> Result<SecretString, CrmError> {
        match &self.auth {
            KommoAuth::LongLived(token) => Ok(token.clone()),
            KommoAuth::OAuth(oauth) => match fresh_token(oauth.store.as_ref(), KOMMO_SYSTEM).await?
            {
                Some(t) => Ok(t.access_token),
                None => Ok(self.refresh(oauth, None).await?.access_token),
            },
        }
    }

    /// Kommo rotates the refresh token on every refresh: once asked, its answer must be saved
    /// even if the caller stops waiting (a delivery given up, a worker shutting down), or the
    /// account has to be re-authorized by hand. So the refresh runs in a task of its own, which
    /// a cancelled caller does not stop.
    async fn refresh(
        &self,
        oauth: &KommoOAuth,
        stale: Option<&SecretString>,
    ) -> Result<StoredToken, CrmError> {
        let token_endpoint = TokenEndpoint {
            http: self.http.clone(),
            base: self.base.clone(),
            pacer: self.pacer.clone(),
            oauth: oauth.clone(),
        };
        let stale = stale.cloned();
        tokio::spawn(async move { token_endpoint.refresh(stale.as_ref()).await })
            .await
            .unwrap_or_else(|e| {
                Err(CrmError::transient(
                    None,
                    format!("kommo: the token refresh stopped: {e}"),
                ))
            })
    }
}

/// What a token refresh needs, owned, so that it can outlive the call that started it.
struct TokenEndpoint {
    http: reqwest::Client,
    base: String,
    pacer: Arc<dyn Pacer>,
    oauth: KommoOAuth,
}

impl TokenEndpoint {
    async fn refresh(&self, stale: Option<&SecretString>) -> Result<StoredToken, CrmError> {
        let oauth = &self.oauth;
        refresh_once(&oauth.store, KOMMO_SYSTEM, stale, |current| async move {
            let stored = current.as_ref().and_then(|t| t.refresh_token.as_ref());
            let candidates = refresh_candidates(stored, oauth.initial_refresh_token.as_ref(), true);
            let mut last = CrmError::permanent(
                0,
                Some("no_refresh_token".into()),
                "kommo: no refresh token stored or configured",
            );
            for refresh_token in candidates {
                match self.request_token(&refresh_token).await {
                    Ok(t) => return Ok(t),
                    Err(e @ CrmError::Permanent { .. }) => {
                        tracing::warn!(error = %e, "kommo refused a refresh token");
                        last = e;
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        })
        .await
    }

    /// `POST /oauth2/access_token` with a refresh token.
    async fn request_token(&self, refresh_token: &SecretString) -> Result<StoredToken, CrmError> {
        let oauth = &self.oauth;
        let context = "kommo POST /oauth2/access_token";
        let body = json!({
            "client_id": oauth.client_id,
            "client_secret": oauth.client_secret.expose_secret(),
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.expose_secret(),
            "redirect_uri": oauth.redirect_uri,
        });
        self.pacer.acquire().await;
        let req = self
            .http
            .post(format!("{}/oauth2/access_token", self.base))
            .json(&body);
        let answer = http::send(req, context).await?;
        match answer.status {
            200..=204 => {
                parse_kommo_token(&answer).ok_or_else(|| malformed(context, answer.status))
            }
            400 | 401 | 403 => Err(CrmError::permanent(
                answer.status,
                Some("invalid_grant".into()),
                format!("{context}: refresh token or client credentials rejected"),
            )),
            s => {
                let error = classify_kommo(context, s, answer.retry_after.as_deref(), &answer.body);
                Err(hold_off_on_429(self.pacer.as_ref(), error).await)
            }
        }
    }
}

/// After a 429 the whole account holds off (see [`Pacer::hold_off`]); returns the error.
async fn hold_off_on_429(pacer: &dyn Pacer, error: CrmError) -> CrmError {
    if let CrmError::RateLimited { retry_after } = &error {
        pacer
            .hold_off(crate::pacer::hold_off_after_429(*retry_after))
            .await;
    }
    error
}

fn parse_kommo_token(answer: &Answer) -> Option<StoredToken> {
    let v = answer.json()?;
    let access = v.get("access_token")?.as_str()?;
    let refresh = v.get("refresh_token")?.as_str()?;
    let expires_in = v
        .get("expires_in")
        .and_then(Value::as_i64)
        .unwrap_or(86_400);
    Some(StoredToken {
        access_token: SecretString::from(access),
        refresh_token: Some(SecretString::from(refresh)),
        expires_at: Utc::now() + TimeDelta::seconds(expires_in),
        api_domain: None,
    })
}

fn malformed(context: &str, status: u16) -> CrmError {
    CrmError::transient(
        Some(status),
        format!("{context}: unreadable success answer"),
    )
}

fn first_embedded_id(answer: &Answer, entity: &str) -> Option<i64> {
    answer
        .json()?
        .get("_embedded")?
        .get(entity)?
        .as_array()?
        .first()?
        .get("id")?
        .as_i64()
}

/// The ids (ascending) of the records whose custom field `field_id` holds exactly `key`: Kommo's
/// `query` search matches substrings of any field, so its hits are filtered here.
fn matching_ids(items: &[Value], field_id: i64, key: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = items
        .iter()
        .filter(|item| {
            item.get("custom_fields_values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|f| f.get("field_id").and_then(Value::as_i64) == Some(field_id))
                .filter_map(|f| f.get("values").and_then(Value::as_array))
                .flatten()
                .any(|v| match v.get("value") {
                    Some(Value::String(s)) => s == key,
                    Some(Value::Number(n)) => n.to_string() == key,
                    _ => false,
                })
        })
        .filter_map(|item| item.get("id").and_then(Value::as_i64))
        .collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_hits_are_filtered_on_the_exact_key() {
        let items = vec![
            json!({"id": 30, "custom_fields_values": [{"field_id": 7, "values": [{"value": "abc"}]}]}),
            json!({"id": 10, "name": "abc-def", "custom_fields_values": [{"field_id": 7, "values": [{"value": "abc-def"}]}]}),
            json!({"id": 20, "custom_fields_values": [{"field_id": 8, "values": [{"value": "abc"}]}]}),
            json!({"id": 5, "custom_fields_values": null}),
            json!({"id": 4, "custom_fields_values": [{"field_id": 7, "values": [{"value": "abc"}]}]}),
        ];
        assert_eq!(matching_ids(&items, 7, "abc"), vec![4, 30]);
        assert_eq!(matching_ids(&items, 7, "zzz"), Vec::<i64>::new());
    }

    fn client() -> KommoClient {
        KommoClient::new(
            KommoConfig {
                base_url: "http://127.0.0.1:1/".into(),
                auth: KommoAuth::LongLived(SecretString::from("t")),
                external_id_field_id: 7,
                lead_external_id_field_id: Some(8),
                timeout: std::time::Duration::from_secs(1),
            },
            Arc::new(crate::pacer::Unpaced),
        )
        .unwrap()
    }

    #[test]
    fn bodies() {
        let c = client();
        let key = Uuid::nil();
        let body = c.contact_body(&ContactInput {
            external_key: key,
            name: "Jane Roe".into(),
            first_name: Some("Jane".into()),
            last_name: None,
            phone: Some("+971500000000".into()),
            email: None,
        });
        assert_eq!(
            body,
            json!({
                "name": "Jane Roe",
                "first_name": "Jane",
                "custom_fields_values": [
                    {"field_id": 7, "values": [{"value": key.to_string()}]},
                    {"field_code": "PHONE", "values": [{"value": "+971500000000", "enum_code": "WORK"}]},
                ],
            })
        );
        let lead = c.lead_body(&LeadInput {
            external_key: "BK-1".into(),
            name: "BK-1".into(),
            price: 1200,
            status_id: Some(1),
            pipeline_id: None,
            contact_id: Some(3),
        });
        assert_eq!(
            lead,
            json!({"name": "BK-1", "price": 1200, "status_id": 1,
                   "custom_fields_values": [{"field_id": 8, "values": [{"value": "BK-1"}]}]})
        );
        assert_eq!(c.base, "http://127.0.0.1:1");
    }
}
