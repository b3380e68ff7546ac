//! `ZohoClient`: contacts and sales orders in Zoho CRM v6, always as upserts on our external key.
//!
//! The access token (1 hour) is cached in the `TokenStore` and shared by the workers; one worker
//! refreshes at a time; each client keeps the token it last used in memory until it is about to
//! expire or Zoho refuses it. A semaphore keeps this process under Zoho's concurrency limit.
//! Single upserts that wait for a free call are sent together: whoever gets the next call takes
//! every waiting record of that module (up to 100) along, so under load one call carries many
//! records and the concurrency limit stops bounding the record rate.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;

use crate::error::{CrmError, classify_zoho, classify_zoho_record, zoho_refresh_may_help};
use crate::http::{self, ConfigError};
use crate::slots::{CallSlots, Unshared};
use crate::token::{
    EXPIRY_MARGIN, StoredToken, TokenStore, ZOHO_SYSTEM, fresh_token, refresh_candidates,
    refresh_once,
};

/// Default `ZOHO_CONTACT_EXTERNAL_FIELD`.
pub const DEFAULT_CONTACT_EXTERNAL_FIELD: &str = "SkyLuxse_Client_Id";
/// Default `ZOHO_SALES_ORDER_EXTERNAL_FIELD`.
pub const DEFAULT_SALES_ORDER_EXTERNAL_FIELD: &str = "SkyLuxse_Booking_Code";
/// Default `ZOHO_MAX_CONCURRENCY`.
pub const DEFAULT_MAX_CONCURRENCY: usize = 10;
/// Zoho's limit of records per upsert call.
pub const MAX_RECORDS_PER_CALL: usize = 100;

/// Everything a [`ZohoClient`] needs. Build it with [`ZohoConfig::new`], then adjust fields.
pub struct ZohoConfig {
    /// `ZOHO_ACCOUNTS_URL`, e.g. `https://accounts.zoho.com`.
    pub accounts_url: String,
    /// `ZOHO_API_DOMAIN`, e.g. `https://www.zohoapis.com`; the token response's `api_domain`
    /// takes precedence once a token was obtained.
    pub api_domain: String,
    pub client_id: String,
    pub client_secret: SecretString,
    /// `ZOHO_REFRESH_TOKEN`. Zoho refresh tokens do not rotate; this one is tried first, the
    /// stored one after it.
    pub refresh_token: Option<SecretString>,
    /// Where the cached access token lives, shared by all workers.
    pub store: Arc<dyn TokenStore>,
    /// The contacts' unique external-id field (holds our client id).
    pub contact_external_field: String,
    /// The sales orders' unique external-id field (holds the booking code).
    pub sales_order_external_field: String,
    /// Calls in flight at once from this client, at most.
    pub max_concurrency: usize,
    /// The slots of the limit shared with other processes (each call holds one); by default
    /// none beyond `max_concurrency`.
    pub slots: Arc<dyn CallSlots>,
    /// Bound on one HTTP call.
    pub timeout: Duration,
}

impl ZohoConfig {
    /// A configuration with the defaults: the external fields `SkyLuxse_Client_Id` and
    /// `SkyLuxse_Booking_Code`, 10 concurrent calls, a 30 s timeout.
    pub fn new(
        accounts_url: impl Into<String>,
        api_domain: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: SecretString,
        refresh_token: Option<SecretString>,
        store: Arc<dyn TokenStore>,
    ) -> Self {
        Self {
            accounts_url: accounts_url.into(),
            api_domain: api_domain.into(),
            client_id: client_id.into(),
            client_secret,
            refresh_token,
            store,
            contact_external_field: DEFAULT_CONTACT_EXTERNAL_FIELD.into(),
            sales_order_external_field: DEFAULT_SALES_ORDER_EXTERNAL_FIELD.into(),
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            slots: Arc::new(Unshared),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A contact to upsert. Names, email and phone are personal data: never logged by this crate,
/// and `Debug` shows only the external key.
#[derive(Clone, PartialEq, Eq)]
pub struct ZohoContact {
    /// Our client id, written to the contact external field (the duplicate check).
    pub external_key: Uuid,
    /// Mandatory in Zoho.
    pub last_name: String,
    pub first_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub mailing_country: Option<String>,
}

impl std::fmt::Debug for ZohoContact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZohoContact")
            .field("external_key", &self.external_key)
            .finish_non_exhaustive()
    }
}

/// A sales order to upsert, keyed by the booking code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SalesOrder {
    /// Written to the sales-order external field (the duplicate check).
    pub booking_code: String,
    /// E.g. `BK-1052 Rolls-Royce Ghost`.
    pub subject: String,
    /// The client's Zoho contact id (the contact must be synced first).
    pub contact_id: String,
    pub status: String,
    pub items: Vec<SalesOrderItem>,
}

/// One ordered item of a sales order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SalesOrderItem {
    /// The vehicle's Zoho product id (`zoho_item_id`).
    pub product_id: String,
    pub quantity: Decimal,
    pub list_price: Decimal,
    pub description: Option<String>,
}

/// A Zoho CRM v6 client. Share it behind an `Arc`.
pub struct ZohoClient {
    http: reqwest::Client,
    accounts: String,
    api_domain: String,
    client_id: String,
    client_secret: SecretString,
    refresh_token: Option<SecretString>,
    store: Arc<dyn TokenStore>,
    contact_field: String,
    sales_order_field: String,
    permits: Semaphore,
    slots: Arc<dyn CallSlots>,
    /// The access token last loaded or refreshed.
    token: Mutex<Option<StoredToken>>,
    /// Single records waiting to be sent, per module.
    waiting_contacts: Mutex<Vec<Waiting>>,
    waiting_orders: Mutex<Vec<Waiting>>,
}

/// A record waiting for a call, and where its result goes.
struct Waiting {
    record: Value,
    reply: oneshot::Sender<Result<String, CrmError>>,
}

impl std::fmt::Debug for ZohoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZohoClient")
            .field("accounts", &self.accounts)
            .field("api_domain", &self.api_domain)
            .finish_non_exhaustive()
    }
}

impl ZohoClient {
    /// Builds a client.
    pub fn new(config: ZohoConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            http: http::build_client(config.timeout)?,
            accounts: http::base_url(&config.accounts_url, "ZOHO_ACCOUNTS_URL")?,
            api_domain: http::base_url(&config.api_domain, "ZOHO_API_DOMAIN")?,
            client_id: config.client_id,
            client_secret: config.client_secret,
            refresh_token: config.refresh_token,
            store: config.store,
            contact_field: config.contact_external_field,
            sales_order_field: config.sales_order_external_field,
            permits: Semaphore::new(config.max_concurrency.max(1)),
            slots: config.slots,
            token: Mutex::new(None),
            waiting_contacts: Mutex::new(Vec::new()),
            waiting_orders: Mutex::new(Vec::new()),
        })
    }

    /// Upserts one contact on the contact external field; returns its Zoho id.
    pub async fn upsert_contact(&self, contact: &ZohoContact) -> Result<String, CrmError> {
        let record = self.contact_record(contact);
        self.upsert_one("Contacts", record).await
    }

    /// Upserts contacts (any number; sent 100 per call). The answer has one result per input,
    /// in order: a 207 answer gives some `Ok` and some `Err`; a failed call gives its error to
    /// every record it carried.
    pub async fn upsert_contacts(&self, contacts: &[ZohoContact]) -> Vec<Result<String, CrmError>> {
        let mut out = Vec::with_capacity(contacts.len());
        for chunk in contacts.chunks(MAX_RECORDS_PER_CALL) {
            let records = chunk.iter().map(|c| self.contact_record(c)).collect();
            out.extend(self.upsert("Contacts", records, &self.contact_field).await);
        }
        out
    }

    /// Upserts one sales order on the sales-order external field; returns its Zoho id.
    pub async fn upsert_sales_order(&self, order: &SalesOrder) -> Result<String, CrmError> {
        let record = self.sales_order_record(order);
        self.upsert_one("Sales_Orders", record).await
    }

    fn contact_record(&self, c: &ZohoContact) -> Value {
        let mut obj = Map::new();
        obj.insert("Last_Name".into(), json!(c.last_name));
        let optional = [
            ("First_Name", &c.first_name),
            ("Email", &c.email),
            ("Phone", &c.phone),
            ("Mailing_Country", &c.mailing_country),
        ];
        for (field, value) in optional {
            if let Some(v) = value {
                obj.insert(field.into(), json!(v));
            }
        }
        obj.insert(
            self.contact_field.clone(),
            json!(c.external_key.to_string()),
        );
        Value::Object(obj)
    }

    fn sales_order_record(&self, o: &SalesOrder) -> Value {
        let items: Vec<Value> = o
            .items
            .iter()
            .map(|i| {
                let mut item = Map::new();
                item.insert("Product_Name".into(), json!({"id": i.product_id}));
                item.insert("Quantity".into(), decimal(i.quantity));
                item.insert("List_Price".into(), decimal(i.list_price));
                if let Some(d) = &i.description {
                    item.insert("Description".into(), json!(d));
                }
                Value::Object(item)
            })
            .collect();
        let mut obj = Map::new();
        obj.insert("Subject".into(), json!(o.subject));
        obj.insert("Contact_Name".into(), json!({"id": o.contact_id}));
        obj.insert("Status".into(), json!(o.status));
        obj.insert("Ordered_Items".into(), Value::Array(items));
        obj.insert(self.sales_order_field.clone(), json!(o.booking_code));
        Value::Object(obj)
    }

    /// Upserts one record of `module` ("Contacts" or "Sales_Orders"), in a call of its own or
    /// together with other waiting records of the same module. Zoho answers per record, so a
    /// record's result is its own; a failed call fails every record it carried (each is safe
    /// to repeat: upserts on an external id).
    async fn upsert_one(&self, module: &'static str, record: Value) -> Result<String, CrmError> {
        let (queue, field) = match module {
            "Contacts" => (&self.waiting_contacts, &self.contact_field),
            _ => (&self.waiting_orders, &self.sales_order_field),
        };
        let (reply, mut answer) = oneshot::channel();
        lock(queue).push(Waiting { record, reply });
        loop {
            tokio::select! {
                biased;
                result = &mut answer => {
                    return result.unwrap_or_else(|_| {
                        Err(CrmError::transient(None, "zoho: the call carrying this record was cancelled"))
                    });
                }
                permit = self.permits.acquire() => {
                    let _permit = permit.map_err(|_| CrmError::transient(None, "zoho: client closed"))?;
                    // Records keep queueing while the call waits for a shared slot.
                    let _slot = self.slots.acquire().await;
                    let batch: Vec<Waiting> = {
                        let mut waiting = lock(queue);
                        // Records whose delivery was given up meanwhile are not sent: a later
                        // delivery of their row sends its own, current record.
                        waiting.retain(|w| !w.reply.is_closed());
                        let n = waiting.len().min(MAX_RECORDS_PER_CALL);
                        waiting.drain(..n).collect()
                    };
                    if batch.is_empty() {
                        // Another call took this record along: its answer is on the way.
                        drop(_slot);
                        drop(_permit);
                        return (&mut answer).await.unwrap_or_else(|_| {
                            Err(CrmError::transient(None, "zoho: the call carrying this record was cancelled"))
                        });
                    }
                    let (records, replies): (Vec<Value>, Vec<_>) =
                        batch.into_iter().map(|w| (w.record, w.reply)).unzip();
                    let results = self.upsert_permitted(module, records, field).await;
                    for (reply, result) in replies.into_iter().zip(results) {
                        // A waiter that gave up no longer needs its answer.
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }

    /// One upsert call (at most 100 records), once a call is free.
    async fn upsert(
        &self,
        module: &str,
        records: Vec<Value>,
        duplicate_field: &str,
    ) -> Vec<Result<String, CrmError>> {
        let count = records.len();
        let Ok(_permit) = self.permits.acquire().await else {
            return vec![Err(CrmError::transient(None, "zoho: client closed")); count];
        };
        let _slot = self.slots.acquire().await;
        self.upsert_permitted(module, records, duplicate_field)
            .await
    }

    /// One upsert call (at most 100 records), with one refresh-and-retry on a 401; the caller
    /// holds a permit.
    async fn upsert_permitted(
        &self,
        module: &str,
        records: Vec<Value>,
        duplicate_field: &str,
    ) -> Vec<Result<String, CrmError>> {
        let count = records.len();
        let body = json!({
            "data": records,
            "duplicate_check_fields": [duplicate_field],
            "trigger": [],
        });
        let context = format!("zoho POST /crm/v6/{module}/upsert");
        match self.call(&context, module, &body).await {
            Ok((status, answer)) => per_record(&context, status, &answer, count),
            Err(e) => vec![Err(e); count],
        }
    }

    async fn call(
        &self,
        context: &str,
        module: &str,
        body: &Value,
    ) -> Result<(u16, Value), CrmError> {
        let mut token = self.access_token().await?;
        let mut refreshed = false;
        loop {
            let domain = token.api_domain.as_deref().unwrap_or(&self.api_domain);
            let url = format!("{}/crm/v6/{module}/upsert", domain.trim_end_matches('/'));
            let req = self
                .http
                .post(url)
                .header(
                    reqwest::header::AUTHORIZATION,
                    format!("Zoho-oauthtoken {}", token.access_token.expose_secret()),
                )
                .json(body);
            let answer = http::send(req, context).await?;
            tracing::debug!(target: "crm", module, status = answer.status, "zoho answered");
            if answer.status == 401 && zoho_refresh_may_help(&answer.body) {
                if refreshed {
                    tracing::warn!(module, "zoho refused a freshly refreshed token");
                    return Err(CrmError::Unauthorized);
                }
                refreshed = true;
                token = self.refresh(Some(&token.access_token)).await?;
                continue;
            }
            // Per-record answers: 200/201/202, 207 Multi-Status, and a 400 where every record
            // failed on its own.
            if matches!(answer.status, 200..=202 | 207 | 400)
                && let Some(v) = answer.json()
                && v.get("data").is_some_and(Value::is_array)
            {
                return Ok((answer.status, v));
            }
            if (200..=299).contains(&answer.status) {
                return Err(CrmError::transient(
                    Some(answer.status),
                    format!("{context}: unreadable success answer"),
                ));
            }
            return Err(classify_zoho(
                context,
                answer.status,
                answer.retry_after.as_deref(),
                &answer.body,
            ));
        }
    }

    /// The token this client last used while it is fresh, else the stored one, else a new one.
    /// A token another worker replaced keeps working until it expires or Zoho refuses it; a
    /// refusal (401) refreshes, which picks up the other worker's token.
    async fn access_token(&self) -> Result<StoredToken, CrmError> {
        if let Some(t) = lock(&self.token).as_ref()
            && t.is_fresh(Utc::now(), EXPIRY_MARGIN)
        {
            return Ok(t.clone());
        }
        let token = match fresh_token(self.store.as_ref(), ZOHO_SYSTEM).await? {
            Some(t) => t,
            None => self.refresh(None).await?,
        };
        *lock(&self.token) = Some(token.clone());
        Ok(token)
    }

    async fn refresh(&self, stale: Option<&SecretString>) -> Result<StoredToken, CrmError> {
        let token = self.refresh_shared(stale).await?;
        *lock(&self.token) = Some(token.clone());
        Ok(token)
    }

    async fn refresh_shared(&self, stale: Option<&SecretString>) -> Result<StoredToken, CrmError> {
        refresh_once(&self.store, ZOHO_SYSTEM, stale, |current| async move {
            let stored = current.as_ref().and_then(|t| t.refresh_token.as_ref());
            let candidates = refresh_candidates(stored, self.refresh_token.as_ref(), false);
            let mut last = CrmError::permanent(
                0,
                Some("no_refresh_token".into()),
                "zoho: no refresh token stored or configured",
            );
            for refresh_token in candidates {
                match self.request_token(&refresh_token).await {
                    Ok(t) => return Ok(t),
                    Err(e @ CrmError::Permanent { .. }) => {
                        tracing::warn!(error = %e, "zoho refused a refresh token");
                        last = e;
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        })
        .await
    }

    /// `POST {accounts}/oauth/v2/token` (form fields).
    async fn request_token(&self, refresh_token: &SecretString) -> Result<StoredToken, CrmError> {
        let context = "zoho POST /oauth/v2/token";
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
            ("refresh_token", refresh_token.expose_secret()),
        ];
        let req = self
            .http
            .post(format!("{}/oauth/v2/token", self.accounts))
            .form(&form);
        let answer = http::send(req, context).await?;
        let parsed = parse_zoho_token(context, answer.status, answer.json())?;
        Ok(StoredToken {
            access_token: parsed.access_token,
            refresh_token: Some(refresh_token.clone()),
            expires_at: Utc::now() + TimeDelta::seconds(parsed.expires_in),
            api_domain: parsed.api_domain,
        })
    }
}

struct ZohoToken {
    access_token: SecretString,
    expires_in: i64,
    api_domain: Option<String>,
}

/// Reads the accounts server's answer. Zoho reports a bad refresh token or client with HTTP 200
/// and `{"error":"invalid_code"}` (or `invalid_client`): permanent. Its refusal to mint more
/// tokens (`"Access Denied"`, too many requests) is a rate limit.
fn parse_zoho_token(
    context: &str,
    status: u16,
    body: Option<Value>,
) -> Result<ZohoToken, CrmError> {
    let error = body
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .map(crate::error::clip);
    if let Some(error) = error {
        if error == "Access Denied" || status == 429 {
            return Err(CrmError::RateLimited { retry_after: None });
        }
        if status >= 500 {
            return Err(CrmError::transient(
                Some(status),
                format!("{context}: {error}"),
            ));
        }
        return Err(CrmError::permanent(
            status,
            Some(error),
            format!("{context}: refresh token or client credentials rejected"),
        ));
    }
    if status == 200
        && let Some(v) = &body
        && let Some(access) = v.get("access_token").and_then(Value::as_str)
    {
        return Ok(ZohoToken {
            access_token: SecretString::from(access),
            expires_in: v.get("expires_in").and_then(Value::as_i64).unwrap_or(3600),
            api_domain: v
                .get("api_domain")
                .and_then(Value::as_str)
                .map(|d| d.trim_end_matches('/').to_owned()),
        });
    }
    match status {
        200..=299 => Err(CrmError::transient(
            Some(status),
            format!("{context}: unreadable success answer"),
        )),
        429 => Err(CrmError::RateLimited { retry_after: None }),
        408 | 500..=599 => Err(CrmError::transient(
            Some(status),
            format!("{context}: HTTP {status}"),
        )),
        _ => Err(CrmError::permanent(
            status,
            None,
            format!("{context}: refresh refused"),
        )),
    }
}

/// Splits an upsert answer into one result per record sent.
fn per_record(
    context: &str,
    status: u16,
    answer: &Value,
    count: usize,
) -> Vec<Result<String, CrmError>> {
    let data = answer
        .get("data")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    (0..count)
        .map(|i| match data.get(i) {
            Some(record) => classify_zoho_record(context, status, record),
            None => Err(CrmError::transient(
                Some(status),
                format!("{context}: no answer for record {i}"),
            )),
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn decimal(d: Decimal) -> Value {
    d.to_f64()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: &str = "zoho POST /oauth/v2/token";

    #[test]
    fn token_answers() {
        let ok = parse_zoho_token(
            CTX,
            200,
            Some(json!({"access_token": "1000.x", "api_domain": "https://www.zohoapis.eu/", "token_type": "Bearer", "expires_in": 3600})),
        )
        .unwrap();
        assert_eq!(ok.expires_in, 3600);
        assert_eq!(ok.api_domain.as_deref(), Some("https://www.zohoapis.eu"));

        let cases: Vec<(u16, Option<Value>, CrmError)> = vec![
            (
                200,
                Some(json!({"error": "invalid_code"})),
                CrmError::permanent(
                    200,
                    Some("invalid_code".into()),
                    format!("{CTX}: refresh token or client credentials rejected"),
                ),
            ),
            (
                200,
                Some(json!({"error": "invalid_client"})),
                CrmError::permanent(
                    200,
                    Some("invalid_client".into()),
                    format!("{CTX}: refresh token or client credentials rejected"),
                ),
            ),
            (
                400,
                Some(
                    json!({"error": "Access Denied", "error_description": "You have made too many requests continuously."}),
                ),
                CrmError::RateLimited { retry_after: None },
            ),
            (
                200,
                None,
                CrmError::transient(Some(200), format!("{CTX}: unreadable success answer")),
            ),
            (
                503,
                None,
                CrmError::transient(Some(503), format!("{CTX}: HTTP 503")),
            ),
            (
                400,
                None,
                CrmError::permanent(400, None, format!("{CTX}: refresh refused")),
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                parse_zoho_token(CTX, status, body.clone()).err(),
                Some(want),
                "{status} {body:?}"
            );
        }
    }

    #[test]
    fn records_are_matched_in_order() {
        let answer = json!({"data": [
            {"code": "SUCCESS", "details": {"id": "1"}, "status": "success"},
            {"code": "INVALID_DATA", "details": {"api_name": "Email"}, "message": "invalid data", "status": "error"},
        ]});
        let results = per_record("ctx", 207, &answer, 3);
        assert_eq!(results[0], Ok("1".to_owned()));
        assert_eq!(
            results[1].as_ref().unwrap_err().code(),
            Some("INVALID_DATA")
        );
        assert!(results[2].as_ref().unwrap_err().is_retryable());
    }

    #[test]
    fn records_bodies() {
        let client = ZohoClient::new(ZohoConfig::new(
            "http://127.0.0.1:1",
            "http://127.0.0.1:1",
            "id",
            SecretString::from("s"),
            None,
            Arc::new(crate::token::MemoryTokenStore::new()),
        ))
        .unwrap();
        let order = client.sales_order_record(&SalesOrder {
            booking_code: "BK-1052".into(),
            subject: "BK-1052 Rolls-Royce Ghost".into(),
            contact_id: "41".into(),
            status: "Created".into(),
            items: vec![SalesOrderItem {
                product_id: "77".into(),
                quantity: Decimal::new(2, 0),
                list_price: Decimal::new(350050, 2),
                description: None,
            }],
        });
        assert_eq!(
            order,
            json!({
                "Subject": "BK-1052 Rolls-Royce Ghost",
                "Contact_Name": {"id": "41"},
                "Status": "Created",
                "Ordered_Items": [{"Product_Name": {"id": "77"}, "Quantity": 2.0, "List_Price": 3500.5}],
                "SkyLuxse_Booking_Code": "BK-1052",
            })
        );
        let contact = client.contact_record(&ZohoContact {
            external_key: Uuid::nil(),
            last_name: "Roe".into(),
            first_name: None,
            email: Some("j@example.com".into()),
            phone: None,
            mailing_country: Some("AE".into()),
        });
        assert_eq!(
            contact,
            json!({"Last_Name": "Roe", "Email": "j@example.com", "Mailing_Country": "AE",
                   "SkyLuxse_Client_Id": Uuid::nil().to_string()})
        );
    }
}
