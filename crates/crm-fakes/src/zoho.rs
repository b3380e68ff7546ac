//! `FakeZoho`: a stateful Zoho CRM v6 (upserts of contacts and sales orders keyed by their
//! external-id fields) that is also its own accounts server, with scripted faults.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::server::{
    After, ConnKill, Core, Fault, FaultRule, RecordedRequest, Running, answer, auth_token,
    finish_with, lock, no_content, serve, too_many,
};

const JSON: &str = "application/json;charset=UTF-8";
const CONTACTS: &str = "Contacts";
const SALES_ORDERS: &str = "Sales_Orders";

/// How a [`FakeZoho`] behaves.
#[derive(Clone, Debug)]
pub struct FakeZohoConfig {
    /// Where to listen; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Added to every answer.
    pub latency: Option<Duration>,
    /// API calls allowed in flight at once (Zoho: 10 to 25 by edition); beyond: 429 without
    /// `Retry-After`. `None` disables the limit.
    pub max_concurrency: Option<usize>,
    /// Access tokens one refresh token may mint per 10 minutes (Zoho: 10); `None` = no limit.
    pub token_mint_limit: Option<usize>,
    /// Access tokens alive at once; older ones stop working (Zoho: 15).
    pub max_live_tokens: usize,
    /// The contacts' unique external-id field.
    pub contact_external_field: String,
    /// The sales orders' unique external-id field.
    pub sales_order_external_field: String,
    pub client_id: String,
    pub client_secret: String,
    /// The (non-rotating) refresh token accepted.
    pub refresh_token: String,
}

impl Default for FakeZohoConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: None,
            max_concurrency: Some(10),
            token_mint_limit: Some(10),
            max_live_tokens: 15,
            contact_external_field: "SkyLuxse_Client_Id".into(),
            sales_order_external_field: "SkyLuxse_Booking_Code".into(),
            client_id: "1000.FAKEZOHOCLIENT".into(),
            client_secret: "fake-zoho-client-secret".into(),
            refresh_token: "1000.fake-zoho-refresh".into(),
        }
    }
}

#[derive(Default)]
struct Data {
    modules: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// The ids of the records holding each scalar field value (module, field, value as JSON),
    /// so that an upsert finds its duplicate without reading every record: a fake that slows
    /// down as it fills up would bill the outside world's cost to the worker in benchmarks.
    by_value: HashMap<(&'static str, String, String), BTreeSet<String>>,
    next_id: u64,
    creates: usize,
    updates: usize,
    live_tokens: VecDeque<String>,
    minted_at: VecDeque<Instant>,
    minted: usize,
    refreshes: usize,
    in_flight: usize,
    max_in_flight: usize,
}

struct Shared {
    core: Core,
    config: FakeZohoConfig,
    data: Mutex<Data>,
    base_url: Mutex<String>,
}

/// A running fake Zoho (API and accounts server on one port); stops when dropped.
pub struct FakeZoho {
    shared: Arc<Shared>,
    running: Running,
}

impl std::fmt::Debug for FakeZoho {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeZoho")
            .field("addr", &self.running.addr)
            .finish_non_exhaustive()
    }
}

impl FakeZoho {
    /// Starts a fake with the defaults on `127.0.0.1:0`.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(FakeZohoConfig::default()).await
    }

    /// Starts a fake with `config`.
    pub async fn start_with(config: FakeZohoConfig) -> io::Result<Self> {
        let data = Data {
            next_id: 4_150_868_000_000_000_001,
            ..Data::default()
        };
        let shared = Arc::new(Shared {
            core: Core::new(config.latency),
            data: Mutex::new(data),
            config,
            base_url: Mutex::new(String::new()),
        });
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let running = serve(shared.config.bind, router).await?;
        *lock(&shared.base_url) = format!("http://{}", running.addr);
        Ok(Self { shared, running })
    }

    /// `http://127.0.0.1:<port>`: both the accounts URL and the API domain (the token answer's
    /// `api_domain`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.running.addr)
    }

    /// The configuration it runs with (credentials included).
    pub fn config(&self) -> &FakeZohoConfig {
        &self.shared.config
    }

    /// The accepted refresh token.
    pub fn refresh_token(&self) -> &str {
        &self.shared.config.refresh_token
    }

    /// Mints an access token directly (as a refresh would, counted in the live-token limit).
    pub fn issue_access_token(&self) -> String {
        mint(
            &mut lock(&self.shared.data),
            self.shared.config.max_live_tokens,
        )
    }

    /// Makes every access token minted so far invalid (as if they expired).
    pub fn expire_access_tokens(&self) {
        lock(&self.shared.data).live_tokens.clear();
    }

    /// Queues a fault rule.
    pub fn inject(&self, rule: FaultRule) {
        self.shared.core.inject(rule);
    }

    /// Queues `fault` for the next API call.
    pub fn fail_next(&self, fault: Fault) {
        self.inject(FaultRule::new(fault));
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.shared.core.clear_faults();
    }

    /// Faults still queued.
    pub fn pending_faults(&self) -> usize {
        self.shared.core.pending_faults()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.core.requests()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        self.shared.core.clear_requests();
    }

    /// The stored contacts, by id.
    pub fn contacts(&self) -> Vec<Value> {
        self.records(CONTACTS)
    }

    /// The stored sales orders, by id.
    pub fn sales_orders(&self) -> Vec<Value> {
        self.records(SALES_ORDERS)
    }

    /// The contact whose external-id field holds `key`.
    pub fn contact_by_external(&self, key: &str) -> Option<Value> {
        let field = &self.shared.config.contact_external_field;
        self.contacts()
            .into_iter()
            .find(|r| r.get(field).and_then(Value::as_str) == Some(key))
    }

    /// The sales order whose external-id field holds `booking_code`.
    pub fn sales_order_by_external(&self, booking_code: &str) -> Option<Value> {
        let field = &self.shared.config.sales_order_external_field;
        self.sales_orders()
            .into_iter()
            .find(|r| r.get(field).and_then(Value::as_str) == Some(booking_code))
    }

    fn records(&self, module: &str) -> Vec<Value> {
        lock(&self.shared.data)
            .modules
            .get(module)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Records inserted.
    pub fn creates(&self) -> usize {
        lock(&self.shared.data).creates
    }

    /// Records updated by an upsert.
    pub fn updates(&self) -> usize {
        lock(&self.shared.data).updates
    }

    /// Successful token refreshes.
    pub fn refreshes(&self) -> usize {
        lock(&self.shared.data).refreshes
    }

    /// The most API calls seen in flight at once.
    pub fn max_concurrency_observed(&self) -> usize {
        lock(&self.shared.data).max_in_flight
    }
}

fn mint(data: &mut Data, max_live: usize) -> String {
    data.minted += 1;
    let token = format!("1000.fake-zoho-access.{}", data.minted);
    data.live_tokens.push_back(token.clone());
    while data.live_tokens.len() > max_live.max(1) {
        data.live_tokens.pop_front();
    }
    data.minted_at.push_back(Instant::now());
    token
}

fn error_body(code: &str, message: &str, details: Value) -> String {
    json!({"code": code, "details": details, "message": message, "status": "error"}).to_string()
}

fn error(status: u16, code: &str, message: &str) -> Response {
    answer(status, JSON, error_body(code, message, json!({})))
}

fn record_error(code: &str, message: &str, api_name: &str, index: usize) -> Value {
    json!({
        "code": code,
        "details": {"api_name": api_name, "json_path": format!("$.data[{index}].{api_name}")},
        "message": message,
        "status": "error",
    })
}

/// Counts an API call in flight for as long as it lives.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut data = lock(&self.0.data);
        data.in_flight = data.in_flight.saturating_sub(1);
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Extension(kill): Extension<ConnKill>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let index = shared.core.record(&method, &path, uri.query(), &body);
    let is_api = path.starts_with("/crm/");
    let (_in_flight, over_limit) = if is_api {
        let mut data = lock(&shared.data);
        data.in_flight += 1;
        data.max_in_flight = data.max_in_flight.max(data.in_flight);
        let over = shared
            .config
            .max_concurrency
            .is_some_and(|limit| data.in_flight > limit);
        (Some(InFlight(&shared)), over)
    } else {
        (None, false)
    };
    if let Some(latency) = shared.core.latency {
        tokio::time::sleep(latency).await;
    }
    if over_limit {
        shared.core.finish(index, Some(429), None);
        return error(429, "TOO_MANY_REQUESTS", "concurrency limit exceeded");
    }

    let fault = shared.core.take_fault(&method, &path, is_api);
    let mut after = After::Answer;
    let mut partial = false;
    let early = match &fault {
        Some(Fault::Status500) => Some(error(500, "INTERNAL_ERROR", "Internal Server Error")),
        Some(Fault::Unavailable { retry_after }) => Some(crate::server::with_retry_after(
            error(503, "INTERNAL_ERROR", "Service Unavailable"),
            *retry_after,
        )),
        Some(Fault::TooManyRequests {
            retry_after,
            json_body,
        }) => Some(too_many(
            *retry_after,
            json_body.then(|| {
                error_body(
                    "TOO_MANY_REQUESTS",
                    "please check if the API credits or the concurrency limit are exceeded",
                    json!({}),
                )
            }),
        )),
        Some(Fault::Validation400) => {
            let count = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("data").and_then(Value::as_array).map(Vec::len))
                .unwrap_or(1)
                .max(1);
            let data: Vec<Value> = (0..count)
                .map(|i| record_error("INVALID_DATA", "invalid data", "Last_Name", i))
                .collect();
            Some(answer(400, JSON, json!({"data": data}).to_string()))
        }
        Some(Fault::ExpiredToken) => {
            if let Some(token) = auth_token(&headers, "Zoho-oauthtoken") {
                lock(&shared.data).live_tokens.retain(|t| t != token);
            }
            Some(error(401, "INVALID_TOKEN", "invalid oauth token"))
        }
        Some(Fault::PartialSuccess) => {
            partial = true;
            None
        }
        Some(Fault::Delay(d)) => {
            after = After::Delay(*d);
            None
        }
        Some(Fault::ResetConnection { apply }) => {
            if !*apply {
                shared.core.finish(index, None, fault.clone());
                return kill.kill().await;
            }
            after = After::Kill;
            None
        }
        None => None,
    };
    let response = match early {
        Some(r) => r,
        None => route(
            &shared,
            &method,
            &path,
            uri.query(),
            &headers,
            &body,
            partial,
        ),
    };
    let status = match after {
        After::Kill => None,
        _ => Some(response.status().as_u16()),
    };
    shared.core.finish(index, status, fault);
    finish_with(after, &kill, response).await
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
    partial: bool,
) -> Response {
    if path == "/oauth/v2/token" {
        return if method == Method::POST {
            token(shared, query, body)
        } else {
            error(
                405,
                "INVALID_REQUEST_METHOD",
                "The http request method type is not a valid one",
            )
        };
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["crm", "v6", module, rest @ ..] = segments.as_slice() else {
        return error(
            404,
            "INVALID_URL_PATTERN",
            "Please check if the URL trying to access is a correct one",
        );
    };
    match auth_token(headers, "Zoho-oauthtoken") {
        None => return error(401, "AUTHENTICATION_FAILURE", "Authentication failed"),
        Some(t) if !lock(&shared.data).live_tokens.iter().any(|l| l == t) => {
            return error(401, "INVALID_TOKEN", "invalid oauth token");
        }
        Some(_) => {}
    }
    let module = match *module {
        CONTACTS => CONTACTS,
        SALES_ORDERS => SALES_ORDERS,
        _ => {
            return answer(
                400,
                JSON,
                error_body(
                    "INVALID_MODULE",
                    "the module name given seems to be invalid",
                    json!({"resource_path_index": 0}),
                ),
            );
        }
    };
    match (method.clone(), rest) {
        (Method::POST, ["upsert"]) => upsert(shared, module, body, partial),
        (Method::GET, [id]) => match lock(&shared.data)
            .modules
            .get(module)
            .and_then(|m| m.get(*id))
        {
            Some(record) => answer(200, JSON, json!({"data": [record]}).to_string()),
            None => no_content(),
        },
        _ => error(
            405,
            "INVALID_REQUEST_METHOD",
            "The http request method type is not a valid one",
        ),
    }
}

fn form_fields(query: Option<&str>, body: &Bytes) -> BTreeMap<String, String> {
    let body = String::from_utf8_lossy(body);
    [query.unwrap_or_default(), body.as_ref()]
        .iter()
        .flat_map(|s| s.split('&'))
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                crate::server::percent_decode(k),
                crate::server::percent_decode(v),
            )
        })
        .collect()
}

fn token(shared: &Shared, query: Option<&str>, body: &Bytes) -> Response {
    let fields = form_fields(query, body);
    let field = |name: &str| fields.get(name).map(String::as_str).unwrap_or_default();
    let config = &shared.config;
    // Zoho answers these with HTTP 200.
    if field("grant_type") != "refresh_token" {
        return answer(
            200,
            JSON,
            json!({"error": "unsupported_grant_type"}).to_string(),
        );
    }
    if field("client_id") != config.client_id || field("client_secret") != config.client_secret {
        return answer(200, JSON, json!({"error": "invalid_client"}).to_string());
    }
    if field("refresh_token") != config.refresh_token {
        return answer(200, JSON, json!({"error": "invalid_code"}).to_string());
    }
    let mut data = lock(&shared.data);
    let now = Instant::now();
    while data
        .minted_at
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(600))
    {
        data.minted_at.pop_front();
    }
    if config
        .token_mint_limit
        .is_some_and(|limit| data.minted_at.len() >= limit)
    {
        return answer(
            400,
            JSON,
            json!({
                "error_description": "You have made too many requests continuously. Please try again after some time.",
                "error": "Access Denied",
                "status": "failure",
            })
            .to_string(),
        );
    }
    let access = mint(&mut data, config.max_live_tokens);
    data.refreshes += 1;
    answer(
        200,
        JSON,
        json!({
            "access_token": access,
            "scope": "ZohoCRM.modules.ALL",
            "api_domain": *lock(&shared.base_url),
            "token_type": "Bearer",
            "expires_in": 3600,
        })
        .to_string(),
    )
}

fn external_field<'a>(config: &'a FakeZohoConfig, module: &str) -> &'a str {
    if module == CONTACTS {
        &config.contact_external_field
    } else {
        &config.sales_order_external_field
    }
}

/// The record-level checks Zoho makes: mandatory fields and plausible values.
fn check_record(data: &Data, module: &str, record: &Value, index: usize) -> Option<Value> {
    let Some(obj) = record.as_object() else {
        return Some(record_error("INVALID_DATA", "invalid data", "data", index));
    };
    let text = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
    };
    if module == CONTACTS {
        if text("Last_Name").is_none() {
            return Some(record_error(
                "MANDATORY_NOT_FOUND",
                "required field not found",
                "Last_Name",
                index,
            ));
        }
        if obj
            .get("Email")
            .is_some_and(|e| !e.as_str().is_some_and(|s| s.contains('@')))
        {
            return Some(record_error("INVALID_DATA", "invalid data", "Email", index));
        }
        return None;
    }
    if text("Subject").is_none() {
        return Some(record_error(
            "MANDATORY_NOT_FOUND",
            "required field not found",
            "Subject",
            index,
        ));
    }
    let Some(items) = obj
        .get("Ordered_Items")
        .and_then(Value::as_array)
        .filter(|i| !i.is_empty())
    else {
        return Some(record_error(
            "MANDATORY_NOT_FOUND",
            "required field not found",
            "Ordered_Items",
            index,
        ));
    };
    for item in items {
        let product = item.get("Product_Name").and_then(|p| p.get("id"));
        if !product.is_some_and(|p| p.is_string() || p.is_number()) {
            return Some(record_error(
                "INVALID_DATA",
                "invalid data",
                "Product_Name",
                index,
            ));
        }
        if !item
            .get("Quantity")
            .and_then(Value::as_f64)
            .is_some_and(|q| q > 0.0)
        {
            return Some(record_error(
                "INVALID_DATA",
                "invalid data",
                "Quantity",
                index,
            ));
        }
        if item.get("List_Price").is_some_and(|p| !p.is_number()) {
            return Some(record_error(
                "INVALID_DATA",
                "invalid data",
                "List_Price",
                index,
            ));
        }
    }
    if let Some(contact) = obj.get("Contact_Name") {
        let id = contact.get("id").and_then(Value::as_str);
        let exists = id.is_some_and(|id| {
            data.modules
                .get(CONTACTS)
                .is_some_and(|c| c.contains_key(id))
        });
        if !exists {
            return Some(record_error(
                "INVALID_DATA",
                "the related id given seems to be invalid",
                "Contact_Name",
                index,
            ));
        }
    }
    None
}

fn upsert(shared: &Shared, module: &'static str, body: &Bytes, partial: bool) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return error(400, "INVALID_DATA", "body is not valid JSON");
    };
    let Some(records) = request.get("data").and_then(Value::as_array) else {
        return answer(
            400,
            JSON,
            error_body(
                "MANDATORY_NOT_FOUND",
                "required param not found",
                json!({"param_name": "data"}),
            ),
        );
    };
    if records.is_empty() || records.len() > 100 {
        return error(
            400,
            "LIMIT_EXCEEDED",
            "the number of records must be between 1 and 100",
        );
    }
    let unique = external_field(&shared.config, module);
    let check_fields: Vec<String> = match request
        .get("duplicate_check_fields")
        .and_then(Value::as_array)
    {
        Some(fields) => fields
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        None => vec![unique.to_owned()],
    };
    let mut data = lock(&shared.data);
    let mut results = Vec::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        if partial && i + 1 == records.len() {
            results.push(record_error("INVALID_DATA", "invalid data", unique, i));
            continue;
        }
        if let Some(err) = check_record(&data, module, record, i) {
            results.push(err);
            continue;
        }
        results.push(apply(&mut data, module, unique, &check_fields, record, i));
    }
    let ok = results
        .iter()
        .filter(|r| r.get("status") == Some(&json!("success")))
        .count();
    let status = match ok {
        n if n == results.len() => 200,
        0 => 400,
        _ => 207,
    };
    answer(status, JSON, json!({"data": results}).to_string())
}

/// The ids, in order, of the records of `module` whose `field` equals `value`.
fn holding(data: &Data, module: &'static str, field: &str, value: &Value) -> Vec<String> {
    let Some(records) = data.modules.get(module) else {
        return Vec::new();
    };
    match scalar_key(value) {
        Some(key) => data
            .by_value
            .get(&(module, field.to_string(), key))
            .into_iter()
            .flatten()
            .filter(|id| records.get(*id).and_then(|r| r.get(field)) == Some(value))
            .cloned()
            .collect(),
        None => records
            .iter()
            .filter(|(_, r)| r.get(field) == Some(value))
            .map(|(id, _)| id.clone())
            .collect(),
    }
}

/// Adds (or removes) record `id`'s scalar field values to (from) the index.
fn index_values(
    index: &mut HashMap<(&'static str, String, String), BTreeSet<String>>,
    module: &'static str,
    id: &str,
    record: &Value,
    add: bool,
) {
    let Some(fields) = record.as_object() else {
        return;
    };
    for (field, value) in fields {
        let Some(key) = scalar_key(value) else {
            continue;
        };
        let entry = (module, field.clone(), key);
        if add {
            index.entry(entry).or_default().insert(id.to_string());
        } else if let Some(ids) = index.get_mut(&entry) {
            ids.remove(id);
        }
    }
}

/// A string, number or boolean as its JSON text; other values are not indexed.
fn scalar_key(value: &Value) -> Option<String> {
    match value {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Some(value.to_string()),
        _ => None,
    }
}

/// Inserts or updates one checked record.
fn apply(
    data: &mut Data,
    module: &'static str,
    unique: &str,
    check_fields: &[String],
    record: &Value,
    index: usize,
) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    let matched = check_fields.iter().find_map(|field| {
        let value = record.get(field).filter(|v| !v.is_null())?;
        holding(data, module, field, value)
            .into_iter()
            .next()
            .map(|id| (id, field.clone()))
    });
    // The unique external field may not end up on two records.
    if let Some(value) = record.get(unique).filter(|v| !v.is_null())
        && let Some(other) = holding(data, module, unique, value)
            .into_iter()
            .find(|id| matched.as_ref().is_none_or(|(m, _)| m != id))
    {
        return json!({
            "code": "DUPLICATE_DATA",
            "details": {"api_name": unique, "json_path": format!("$.data[{index}].{unique}"), "duplicate_record": {"id": other}},
            "message": "duplicate data",
            "status": "error",
        });
    }
    let by = json!({"name": "Fake Zoho", "id": "4150868000000000000"});
    let Some(fields) = record.as_object() else {
        return record_error("INVALID_DATA", "invalid data", "data", index);
    };
    match matched {
        Some((id, field)) => {
            let stored = data.modules.get_mut(module).and_then(|m| m.remove(&id));
            let created = match stored {
                Some(mut stored) => {
                    index_values(&mut data.by_value, module, &id, &stored, false);
                    if let Some(obj) = stored.as_object_mut() {
                        for (k, v) in fields {
                            if k != "id" {
                                obj.insert(k.clone(), v.clone());
                            }
                        }
                        obj.insert("Modified_Time".into(), json!(now));
                    }
                    let created = stored.get("Created_Time").cloned().unwrap_or(Value::Null);
                    index_values(&mut data.by_value, module, &id, &stored, true);
                    data.modules
                        .entry(module)
                        .or_default()
                        .insert(id.clone(), stored);
                    created
                }
                None => Value::Null,
            };
            data.updates += 1;
            json!({
                "code": "SUCCESS",
                "duplicate_field": field,
                "action": "update",
                "details": {"Modified_Time": now, "Modified_By": by, "Created_Time": created, "id": id, "Created_By": by},
                "message": "record updated",
                "status": "success",
            })
        }
        None => {
            let id = data.next_id.to_string();
            data.next_id += 1;
            let mut stored: Map<String, Value> = fields.clone();
            stored.insert("id".into(), json!(id));
            stored.insert("Created_Time".into(), json!(now));
            stored.insert("Modified_Time".into(), json!(now));
            let stored = Value::Object(stored);
            index_values(&mut data.by_value, module, &id, &stored, true);
            data.modules
                .entry(module)
                .or_default()
                .insert(id.clone(), stored);
            data.creates += 1;
            json!({
                "code": "SUCCESS",
                "duplicate_field": null,
                "action": "insert",
                "details": {"Modified_Time": now, "Modified_By": by, "Created_Time": now, "id": id, "Created_By": by},
                "message": "record added",
                "status": "success",
            })
        }
    }
}
