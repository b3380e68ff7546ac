//! `FakeKommo`: a stateful Kommo API v4 on loopback (contacts, leads, notes, OAuth with rotating
//! refresh tokens, the 7 requests/s account limit), with scripted faults.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
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
    finish_with, lock, no_content, percent_decode, serve, too_many,
};

/// The custom-field id the fake uses for the external key unless configured otherwise.
pub const DEFAULT_EXTERNAL_ID_FIELD_ID: i64 = 900_001;

const HAL: &str = "application/hal+json";
const PROBLEM: &str = "application/problem+json";
const ENUM_CODES: [&str; 7] = ["WORK", "WORKDD", "MOB", "FAX", "HOME", "OTHER", "PRIV"];

/// How a [`FakeKommo`] behaves.
#[derive(Clone, Debug)]
pub struct FakeKommoConfig {
    /// Where to listen; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Added to every answer (benchmarks use 20 ms).
    pub latency: Option<Duration>,
    /// Requests allowed in any one-second window (Kommo: 7); `None` disables the limit.
    pub rate_limit: Option<usize>,
    /// The contacts' custom field that holds the external key (only known fields are accepted).
    pub external_id_field_id: i64,
    /// The leads' custom field that holds the external key.
    pub lead_external_id_field_id: i64,
    /// The long-lived token (private integration) accepted as a Bearer token.
    pub long_lived_token: String,
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
    /// The refresh token valid at start.
    pub initial_refresh_token: String,
}

impl Default for FakeKommoConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: None,
            rate_limit: Some(7),
            external_id_field_id: DEFAULT_EXTERNAL_ID_FIELD_ID,
            lead_external_id_field_id: DEFAULT_EXTERNAL_ID_FIELD_ID,
            long_lived_token: "fake-kommo-long-lived-token".into(),
            client_id: "fake-kommo-client-id".into(),
            client_secret: "fake-kommo-client-secret".into(),
            redirect_uri: "https://skyluxse.example/oauth/kommo".into(),
            initial_refresh_token: "fake-kommo-refresh-0".into(),
        }
    }
}

#[derive(Default)]
struct Data {
    contacts: BTreeMap<i64, Value>,
    leads: BTreeMap<i64, Value>,
    notes: BTreeMap<i64, Value>,
    /// What `query` searches in each contact and lead, kept up to date by every write.
    search: SearchIndex,
    next_id: i64,
    creates: usize,
    refresh_token: String,
    access_tokens: HashSet<String>,
    issued: usize,
    refreshes: usize,
    window: VecDeque<Instant>,
    max_rps: usize,
    rate_limited: usize,
}

struct Shared {
    core: Core,
    config: FakeKommoConfig,
    data: Mutex<Data>,
}

/// A running fake Kommo; stops when dropped. See the crate docs for what it models.
pub struct FakeKommo {
    shared: Arc<Shared>,
    running: Running,
}

impl std::fmt::Debug for FakeKommo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKommo")
            .field("addr", &self.running.addr)
            .finish_non_exhaustive()
    }
}

impl FakeKommo {
    /// Starts a fake with the defaults on `127.0.0.1:0`.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(FakeKommoConfig::default()).await
    }

    /// Starts a fake with `config`.
    pub async fn start_with(config: FakeKommoConfig) -> io::Result<Self> {
        let data = Data {
            next_id: 1_000_001,
            refresh_token: config.initial_refresh_token.clone(),
            ..Data::default()
        };
        let shared = Arc::new(Shared {
            core: Core::new(config.latency),
            data: Mutex::new(data),
            config,
        });
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let running = serve(shared.config.bind, router).await?;
        Ok(Self { shared, running })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.running.addr)
    }

    /// The configuration it runs with (tokens and client credentials included).
    pub fn config(&self) -> &FakeKommoConfig {
        &self.shared.config
    }

    /// The accepted long-lived token.
    pub fn long_lived_token(&self) -> &str {
        &self.shared.config.long_lived_token
    }

    /// The refresh token valid now (it changes at every refresh).
    pub fn refresh_token(&self) -> String {
        lock(&self.shared.data).refresh_token.clone()
    }

    /// Issues a new token pair as an authorization would: returns `(access, refresh)`; the
    /// previous refresh token stops working.
    pub fn issue_tokens(&self) -> (String, String) {
        rotate(&mut lock(&self.shared.data))
    }

    /// Makes every OAuth access token issued so far invalid (as if they expired).
    pub fn expire_access_tokens(&self) {
        lock(&self.shared.data).access_tokens.clear();
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

    /// Faults still queued (counting each remaining application).
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
        lock(&self.shared.data).contacts.values().cloned().collect()
    }

    /// The stored leads, by id.
    pub fn leads(&self) -> Vec<Value> {
        lock(&self.shared.data).leads.values().cloned().collect()
    }

    /// The stored notes, by id.
    pub fn notes(&self) -> Vec<Value> {
        lock(&self.shared.data).notes.values().cloned().collect()
    }

    /// Deletes a contact, as a user of the account may (a merge deletes the merged one too);
    /// whether it existed.
    pub fn delete_contact(&self, id: i64) -> bool {
        lock(&self.shared.data).contacts.remove(&id).is_some()
    }

    /// One contact.
    pub fn contact(&self, id: i64) -> Option<Value> {
        lock(&self.shared.data).contacts.get(&id).cloned()
    }

    /// One lead.
    pub fn lead(&self, id: i64) -> Option<Value> {
        lock(&self.shared.data).leads.get(&id).cloned()
    }

    /// Records created (contacts, leads and notes).
    pub fn creates(&self) -> usize {
        lock(&self.shared.data).creates
    }

    /// Successful token refreshes.
    pub fn refreshes(&self) -> usize {
        lock(&self.shared.data).refreshes
    }

    /// The most requests seen in any one-second window.
    pub fn max_rps_observed(&self) -> usize {
        lock(&self.shared.data).max_rps
    }

    /// Requests refused with 429 by the rate limit (not by faults).
    pub fn rate_limited(&self) -> usize {
        lock(&self.shared.data).rate_limited
    }
}

fn rotate(data: &mut Data) -> (String, String) {
    data.issued += 1;
    let access = format!("fake-kommo-access-{}", data.issued);
    let refresh = format!("fake-kommo-refresh-{}", data.issued);
    data.access_tokens.insert(access.clone());
    data.refresh_token = refresh.clone();
    (access, refresh)
}

fn problem(status: u16, title: &str, detail: &str) -> Response {
    answer(
        status,
        PROBLEM,
        json!({"title": title, "type": format!("https://httpstatus.es/{status}"), "status": status, "detail": detail})
            .to_string(),
    )
}

fn validation_error(errors: Vec<Value>) -> Response {
    answer(
        400,
        PROBLEM,
        json!({
            "validation-errors": errors,
            "title": "Bad Request",
            "type": "https://httpstatus.es/400",
            "status": 400,
            "detail": "Request validation failed",
        })
        .to_string(),
    )
}

fn field_error(request_id: &str, code: &str, path: &str, detail: &str) -> Value {
    json!({"request_id": request_id, "errors": [{"code": code, "path": path, "detail": detail}]})
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
    let limited = {
        let mut data = lock(&shared.data);
        let now = Instant::now();
        while data
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            data.window.pop_front();
        }
        data.window.push_back(now);
        data.max_rps = data.max_rps.max(data.window.len());
        let over = shared
            .config
            .rate_limit
            .is_some_and(|limit| data.window.len() > limit);
        if over {
            data.rate_limited += 1;
        }
        over
    };
    if let Some(latency) = shared.core.latency {
        tokio::time::sleep(latency).await;
    }
    if limited {
        shared.core.finish(index, Some(429), None);
        return too_many(None, None);
    }

    let fault = shared
        .core
        .take_fault(&method, &path, path.starts_with("/api/"));
    let mut after = After::Answer;
    let early = match &fault {
        Some(Fault::Status500) => Some(problem(500, "Internal Server Error", "Internal Server Error")),
        Some(Fault::Unavailable { retry_after }) => Some(crate::server::with_retry_after(
            problem(503, "Service Unavailable", "Service Unavailable"),
            *retry_after,
        )),
        Some(Fault::TooManyRequests {
            retry_after,
            json_body,
        }) => Some(too_many(
            *retry_after,
            json_body.then(|| {
                json!({"title": "Too Many Requests", "type": "https://httpstatus.es/429", "status": 429, "detail": "Too Many Requests"})
                    .to_string()
            }),
        )),
        Some(Fault::Validation400) => Some(validation_error(vec![field_error(
            "0",
            "NotSupportedChoice",
            "custom_fields_values.0.field_id",
            "The value you selected is not a valid choice.",
        )])),
        Some(Fault::ExpiredToken) => {
            if let Some(token) = auth_token(&headers, "Bearer") {
                lock(&shared.data).access_tokens.remove(token);
            }
            Some(problem(401, "Unauthorized", "Unauthorized"))
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
        Some(Fault::PartialSuccess) | None => None,
    };
    let response = match early {
        Some(r) => r,
        None => route(&shared, &method, &path, uri.query(), &headers, &body),
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
) -> Response {
    if path == "/oauth2/access_token" {
        return if method == Method::POST {
            token(shared, body)
        } else {
            problem(405, "Method Not Allowed", "Method Not Allowed")
        };
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["api", "v4", entity, rest @ ..] = segments.as_slice() else {
        return problem(404, "Not Found", "Not Found");
    };
    if !matches!(*entity, "contacts" | "leads") {
        return problem(404, "Not Found", "Not Found");
    }
    let authorized = auth_token(headers, "Bearer").is_some_and(|t| {
        t == shared.config.long_lived_token || lock(&shared.data).access_tokens.contains(t)
    });
    if !authorized {
        return problem(401, "Unauthorized", "Unauthorized");
    }
    let parsed: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => Some(v),
            Err(_) => return problem(400, "Bad Request", "Malformed JSON"),
        }
    };
    let mut data = lock(&shared.data);
    let kind = Kind::of(entity, &shared.config);
    match (method.clone(), rest) {
        (Method::GET, []) => search(&data, kind, query),
        (Method::POST, []) => create(&mut data, kind, parsed.as_ref()),
        (Method::PATCH, []) => patch_many(&mut data, kind, parsed.as_ref()),
        (Method::POST, ["notes"]) if kind.entity == "leads" => {
            add_notes(&mut data, parsed.as_ref())
        }
        (Method::GET, [id]) => match id
            .parse::<i64>()
            .ok()
            .and_then(|id| kind.table(&data).get(&id))
        {
            Some(record) => answer(200, HAL, record.to_string()),
            None => no_content(),
        },
        (Method::PATCH, [id]) => match id.parse::<i64>() {
            Ok(id) => patch_one(&mut data, kind, id, parsed.as_ref()),
            Err(_) => problem(404, "Not Found", "Not Found"),
        },
        _ => problem(405, "Method Not Allowed", "Method Not Allowed"),
    }
}

fn token(shared: &Shared, body: &Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return problem(400, "Bad Request", "Malformed JSON");
    };
    let field = |name: &str| req.get(name).and_then(Value::as_str).unwrap_or_default();
    let config = &shared.config;
    if field("client_id") != config.client_id || field("client_secret") != config.client_secret {
        return answer(
            401,
            PROBLEM,
            json!({"hint": "Client authentication failed", "title": "Unauthorized", "type": "https://httpstatus.es/401", "status": 401, "detail": "Client authentication failed"})
                .to_string(),
        );
    }
    if field("grant_type") != "refresh_token" || field("redirect_uri") != config.redirect_uri {
        return problem(
            400,
            "Bad Request",
            "The request is missing a required parameter or is malformed.",
        );
    }
    let mut data = lock(&shared.data);
    if field("refresh_token") != data.refresh_token {
        return answer(
            400,
            PROBLEM,
            json!({"hint": "Token has been revoked", "title": "Bad Request", "type": "https://httpstatus.es/400", "status": 400, "detail": "The refresh token is invalid."})
                .to_string(),
        );
    }
    let (access, refresh) = rotate(&mut data);
    data.refreshes += 1;
    answer(
        200,
        "application/json",
        json!({"token_type": "Bearer", "expires_in": 86_400, "access_token": access, "refresh_token": refresh})
            .to_string(),
    )
}

#[derive(Clone, Copy)]
struct Kind {
    entity: &'static str,
    field_id: i64,
}

impl Kind {
    fn of(entity: &str, config: &FakeKommoConfig) -> Self {
        if entity == "leads" {
            Self {
                entity: "leads",
                field_id: config.lead_external_id_field_id,
            }
        } else {
            Self {
                entity: "contacts",
                field_id: config.external_id_field_id,
            }
        }
    }

    fn table<'a>(&self, data: &'a Data) -> &'a BTreeMap<i64, Value> {
        if self.entity == "leads" {
            &data.leads
        } else {
            &data.contacts
        }
    }

    fn table_mut<'a>(&self, data: &'a mut Data) -> &'a mut BTreeMap<i64, Value> {
        if self.entity == "leads" {
            &mut data.leads
        } else {
            &mut data.contacts
        }
    }
}

/// Every filled value of a record, as text: what `query` searches.
fn searchable(record: &Value, out: &mut Vec<String>) {
    match record {
        Value::String(s) => out.push(s.to_lowercase()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Array(items) => items.iter().for_each(|v| searchable(v, out)),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "_links" | "created_at" | "updated_at" | "account_id"
                )
            })
            .for_each(|(_, v)| searchable(v, out)),
        _ => {}
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Records what `query` finds in a stored record (after every write to it).
fn reindex(data: &mut Data, kind: Kind, id: i64, record: &Value) {
    data.search.set(kind.entity, id, record);
}

/// Substring search like Kommo's `query`, without reading every record for every search (a
/// fake that slows down as it fills up would bill the outside world's cost to the worker in
/// benchmarks): a needle of three bytes or more can only be in a record that holds each of its
/// trigrams, so only the records of its rarest trigram are checked in full.
#[derive(Default)]
struct SearchIndex {
    texts: HashMap<(&'static str, i64), Vec<String>>,
    grams: HashMap<(&'static str, [u8; 3]), BTreeSet<i64>>,
}

impl SearchIndex {
    fn set(&mut self, entity: &'static str, id: i64, record: &Value) {
        if let Some(old) = self.texts.remove(&(entity, id)) {
            for g in trigrams(&old) {
                if let Some(ids) = self.grams.get_mut(&(entity, g)) {
                    ids.remove(&id);
                }
            }
        }
        let mut texts = Vec::new();
        searchable(record, &mut texts);
        for g in trigrams(&texts) {
            self.grams.entry((entity, g)).or_default().insert(id);
        }
        self.texts.insert((entity, id), texts);
    }

    /// The ids, in order, of the records of `table` whose searchable text contains `needle`
    /// (lower case).
    fn find(&self, entity: &'static str, table: &BTreeMap<i64, Value>, needle: &str) -> Vec<i64> {
        let holds = |id: &i64| {
            self.texts
                .get(&(entity, *id))
                .is_some_and(|texts| texts.iter().any(|t| t.contains(needle)))
        };
        let rarest = trigrams(std::slice::from_ref(&needle.to_string()))
            .into_iter()
            .min_by_key(|g| self.grams.get(&(entity, *g)).map_or(0, BTreeSet::len));
        match rarest {
            Some(g) => self
                .grams
                .get(&(entity, g))
                .into_iter()
                .flatten()
                .copied()
                .filter(|id| table.contains_key(id) && holds(id))
                .collect(),
            None => table.keys().copied().filter(holds).collect(),
        }
    }
}

/// The distinct three-byte windows of `texts`.
fn trigrams(texts: &[String]) -> HashSet<[u8; 3]> {
    texts
        .iter()
        .flat_map(|t| t.as_bytes().windows(3).map(|w| [w[0], w[1], w[2]]))
        .collect()
}

fn search(data: &Data, kind: Kind, query: Option<&str>) -> Response {
    let needle = query_param(query, "query").map(|q| q.to_lowercase());
    let table = kind.table(data);
    let found: Vec<Value> = match needle.filter(|n| !n.is_empty()) {
        None => table.values().cloned().collect(),
        Some(n) => data
            .search
            .find(kind.entity, table, &n)
            .into_iter()
            .filter_map(|id| table.get(&id).cloned())
            .collect(),
    };
    if found.is_empty() {
        return no_content();
    }
    answer(
        200,
        HAL,
        json!({
            "_page": 1,
            "_links": {"self": {"href": format!("/api/v4/{}", kind.entity)}},
            "_embedded": {kind.entity: found},
        })
        .to_string(),
    )
}

/// Checks one incoming item; returns the validation errors (Kommo's shape) if any.
fn validate(
    data: &Data,
    kind: Kind,
    item: &Value,
    index: usize,
    request_id: &str,
    is_create: bool,
) -> Vec<Value> {
    let mut errors = Vec::new();
    let mut err = |code: &str, path: String, detail: &str| {
        errors.push(json!({"code": code, "path": path, "detail": detail}));
    };
    let Some(obj) = item.as_object() else {
        err(
            "InvalidType",
            format!("{index}"),
            "This value should be of type object.",
        );
        return vec![json!({"request_id": request_id, "errors": errors})];
    };
    for key in ["name", "first_name", "last_name"] {
        if obj.get(key).is_some_and(|v| !v.is_string()) {
            err(
                "InvalidType",
                key.to_owned(),
                "This value should be of type string.",
            );
        }
    }
    if is_create
        && kind.entity == "contacts"
        && !["name", "first_name", "last_name"].iter().any(|k| {
            obj.get(*k)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
    {
        err("NotBlank", "name".into(), "This value should not be blank.");
    }
    for key in ["price", "status_id", "pipeline_id", "responsible_user_id"] {
        if obj.get(key).is_some_and(|v| !(v.is_i64() || v.is_u64())) {
            err(
                "InvalidType",
                key.to_owned(),
                "This value should be of type int.",
            );
        }
    }
    if let Some(fields) = obj.get("custom_fields_values") {
        match fields.as_array() {
            None if fields.is_null() => {}
            None => err(
                "InvalidType",
                "custom_fields_values".into(),
                "This value should be of type array.",
            ),
            Some(fields) => {
                for (i, f) in fields.iter().enumerate() {
                    let known = match (
                        f.get("field_id"),
                        f.get("field_code").and_then(Value::as_str),
                    ) {
                        (Some(id), _) => id.as_i64() == Some(kind.field_id),
                        (None, Some(code)) => {
                            kind.entity == "contacts" && matches!(code, "PHONE" | "EMAIL")
                        }
                        (None, None) => false,
                    };
                    if !known {
                        err(
                            "NotSupportedChoice",
                            format!("custom_fields_values.{i}.field_id"),
                            "The value you selected is not a valid choice.",
                        );
                        continue;
                    }
                    let Some(values) = f.get("values").and_then(Value::as_array) else {
                        err(
                            "InvalidType",
                            format!("custom_fields_values.{i}.values"),
                            "This value should be of type array.",
                        );
                        continue;
                    };
                    for (j, v) in values.iter().enumerate() {
                        if !v
                            .get("value")
                            .is_some_and(|x| x.is_string() || x.is_number())
                        {
                            err(
                                "NotBlank",
                                format!("custom_fields_values.{i}.values.{j}.value"),
                                "This value should not be blank.",
                            );
                        }
                        if let Some(code) = v.get("enum_code")
                            && !code.as_str().is_some_and(|c| ENUM_CODES.contains(&c))
                        {
                            err(
                                "NotSupportedChoice",
                                format!("custom_fields_values.{i}.values.{j}.enum_code"),
                                "The value you selected is not a valid choice.",
                            );
                        }
                    }
                }
            }
        }
    }
    if let Some(contacts) = obj.get("_embedded").and_then(|e| e.get("contacts")) {
        let ids: Option<Vec<i64>> = contacts.as_array().map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("id").and_then(Value::as_i64))
                .collect()
        });
        match ids {
            Some(ids) if ids.iter().all(|id| data.contacts.contains_key(id)) => {}
            _ => err(
                "NotFound",
                "_embedded.contacts".into(),
                "Contact not found.",
            ),
        }
    }
    if errors.is_empty() {
        Vec::new()
    } else {
        vec![json!({"request_id": request_id, "errors": errors})]
    }
}

fn request_id(item: &Value, index: usize) -> String {
    match item.get("request_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => index.to_string(),
    }
}

const STORED_FIELDS: [&str; 8] = [
    "name",
    "first_name",
    "last_name",
    "price",
    "status_id",
    "pipeline_id",
    "responsible_user_id",
    "custom_fields_values",
];

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn create(data: &mut Data, kind: Kind, body: Option<&Value>) -> Response {
    let Some(items) = body
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty() && a.len() <= 250)
    else {
        return validation_error(vec![field_error(
            "0",
            "InvalidType",
            "",
            "The request body should be a non-empty array of at most 250 items.",
        )]);
    };
    let errors: Vec<Value> = items
        .iter()
        .enumerate()
        .flat_map(|(i, item)| validate(data, kind, item, i, &request_id(item, i), true))
        .collect();
    if !errors.is_empty() {
        return validation_error(errors);
    }
    let mut created = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let id = data.next_id;
        data.next_id += 1;
        let mut record = Map::new();
        record.insert("id".into(), json!(id));
        for key in STORED_FIELDS {
            if let Some(v) = item.get(key) {
                record.insert(key.into(), v.clone());
            }
        }
        if kind.entity == "leads" {
            record.entry("price").or_insert(json!(0));
            if let Some(e) = item.get("_embedded") {
                record.insert("_embedded".into(), e.clone());
            }
        }
        record.insert("created_at".into(), json!(now()));
        record.insert("updated_at".into(), json!(now()));
        record.insert("account_id".into(), json!(29_013_640));
        record.insert(
            "_links".into(),
            json!({"self": {"href": format!("/api/v4/{}/{id}", kind.entity)}}),
        );
        let record = Value::Object(record);
        reindex(data, kind, id, &record);
        kind.table_mut(data).insert(id, record);
        data.creates += 1;
        created.push(json!({"id": id, "request_id": request_id(item, i), "_links": {"self": {"href": format!("/api/v4/{}/{id}", kind.entity)}}}));
    }
    answer(
        200,
        HAL,
        json!({"_links": {"self": {"href": format!("/api/v4/{}", kind.entity)}}, "_embedded": {kind.entity: created}}).to_string(),
    )
}

/// Applies a PATCH to a stored record: plain fields are replaced, custom fields are replaced
/// field by field.
fn merge(record: &mut Value, patch: &Value) {
    let (Some(record), Some(patch)) = (record.as_object_mut(), patch.as_object()) else {
        return;
    };
    for key in STORED_FIELDS {
        let Some(v) = patch.get(key) else { continue };
        if key == "custom_fields_values" {
            let mut fields: Vec<Value> = record
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for f in v.as_array().into_iter().flatten() {
                let same = |g: &Value| {
                    (f.get("field_id").is_some() && g.get("field_id") == f.get("field_id"))
                        || (f.get("field_code").is_some()
                            && g.get("field_code") == f.get("field_code"))
                };
                match fields.iter_mut().find(|g| same(g)) {
                    Some(g) => *g = f.clone(),
                    None => fields.push(f.clone()),
                }
            }
            record.insert(key.into(), Value::Array(fields));
        } else {
            record.insert(key.into(), v.clone());
        }
    }
    record.insert("updated_at".into(), json!(now()));
}

fn patch_one(data: &mut Data, kind: Kind, id: i64, body: Option<&Value>) -> Response {
    let Some(patch) = body.filter(|b| b.is_object()) else {
        return validation_error(vec![field_error(
            "0",
            "InvalidType",
            "",
            "This value should be of type object.",
        )]);
    };
    let errors = validate(data, kind, patch, 0, "0", false);
    if !errors.is_empty() {
        return validation_error(errors);
    }
    let Some(record) = kind.table_mut(data).get_mut(&id) else {
        return problem(404, "Not Found", "Entity not found");
    };
    merge(record, patch);
    let record = record.clone();
    reindex(data, kind, id, &record);
    answer(
        200,
        HAL,
        json!({"id": id, "updated_at": now(), "_links": {"self": {"href": format!("/api/v4/{}/{id}", kind.entity)}}}).to_string(),
    )
}

fn patch_many(data: &mut Data, kind: Kind, body: Option<&Value>) -> Response {
    let Some(items) = body.and_then(Value::as_array).filter(|a| !a.is_empty()) else {
        return validation_error(vec![field_error(
            "0",
            "InvalidType",
            "",
            "The request body should be a non-empty array.",
        )]);
    };
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rid = request_id(item, i);
        let exists = item
            .get("id")
            .and_then(Value::as_i64)
            .is_some_and(|id| kind.table(data).contains_key(&id));
        if !exists {
            errors.push(field_error(&rid, "NotFound", "id", "Entity not found."));
        }
        errors.extend(validate(data, kind, item, i, &rid, false));
    }
    if !errors.is_empty() {
        return validation_error(errors);
    }
    let mut updated = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(id) = item.get("id").and_then(Value::as_i64) else {
            continue;
        };
        if let Some(record) = kind.table_mut(data).get_mut(&id) {
            merge(record, item);
            let record = record.clone();
            reindex(data, kind, id, &record);
        }
        updated.push(json!({"id": id, "updated_at": now(), "request_id": request_id(item, i)}));
    }
    answer(
        200,
        HAL,
        json!({"_links": {}, "_embedded": {kind.entity: updated}}).to_string(),
    )
}

fn add_notes(data: &mut Data, body: Option<&Value>) -> Response {
    let Some(items) = body.and_then(Value::as_array).filter(|a| !a.is_empty()) else {
        return validation_error(vec![field_error(
            "0",
            "InvalidType",
            "",
            "The request body should be a non-empty array.",
        )]);
    };
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rid = request_id(item, i);
        if !item
            .get("entity_id")
            .and_then(Value::as_i64)
            .is_some_and(|id| data.leads.contains_key(&id))
        {
            errors.push(field_error(
                &rid,
                "NotFound",
                "entity_id",
                "Entity not found.",
            ));
        }
        if item.get("note_type").and_then(Value::as_str) != Some("common") {
            errors.push(field_error(
                &rid,
                "NotSupportedChoice",
                "note_type",
                "The value you selected is not a valid choice.",
            ));
        }
        if item
            .get("params")
            .and_then(|p| p.get("text"))
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errors.push(field_error(
                &rid,
                "NotBlank",
                "params.text",
                "This value should not be blank.",
            ));
        }
    }
    if !errors.is_empty() {
        return validation_error(errors);
    }
    let mut created = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let id = data.next_id;
        data.next_id += 1;
        let entity_id = item.get("entity_id").cloned().unwrap_or(Value::Null);
        data.notes.insert(
            id,
            json!({"id": id, "entity_id": entity_id, "note_type": "common", "params": item.get("params"), "created_at": now()}),
        );
        data.creates += 1;
        created.push(json!({"id": id, "entity_id": entity_id, "request_id": request_id(item, i)}));
    }
    answer(
        200,
        HAL,
        json!({"_links": {}, "_embedded": {"notes": created}}).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        assert_eq!(
            query_param(Some("a=1&query=J%C3%B6rg+x%2B1"), "query").as_deref(),
            Some("Jörg x+1")
        );
        assert_eq!(
            query_param(Some("query=%zz%4"), "query").as_deref(),
            Some("%zz%4")
        );
        assert_eq!(query_param(None, "query"), None);
    }
}
