//! Building the CRM clients from the SPEC §6 settings, or the built-in sandbox when none are set.

use std::sync::Arc;
use std::time::Duration;

use crm::{
    KommoAuth, KommoClient, KommoConfig, KommoOAuth, LocalPacer, SecretString, TokenStore,
    ZohoClient, ZohoConfig,
};
use crm_fakes::{FakeKommo, FakeZoho};
use sqlx::PgPool;

use crate::pg::{EncryptionKey, PgCallSlots, PgPacer, PgTokenStore};
use crate::worker::Targets;

/// The clients, and the sandbox servers when they are in use (kept alive with them).
pub struct Crms {
    pub targets: Targets,
    pub sandbox: Option<(FakeKommo, FakeZoho)>,
    /// The Zoho client's shared call slots: closed when the worker stops, so that the slots of
    /// calls it abandoned are free at once (not after their leases).
    pub zoho_slots: Arc<dyn crm::CallSlots>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "{0} is not set (needed with {1}); the built-in sandbox CRMs run only when no Kommo \
         or Zoho connection setting is set"
    )]
    Missing(&'static str, &'static str),
    #[error("{0} is not a valid number")]
    NotNumber(&'static str),
    #[error("{0} must be from {1} to {2}")]
    OutOfRange(&'static str, u64, u64),
    #[error("CRM client configuration: {0}")]
    Config(String),
    #[error("encryption key: {0}")]
    Key(#[from] crate::pg::KeyError),
    #[error("cannot start the sandbox CRMs: {0}")]
    Sandbox(std::io::Error),
}

/// Clients pointed at fake servers (the sandbox, and the tests): Kommo with its long-lived
/// token, Zoho with OAuth through `store`.
pub fn for_fakes(
    kommo_fake: &FakeKommo,
    zoho_fake: &FakeZoho,
    store: Arc<dyn TokenStore>,
    pacer: Arc<dyn crm::Pacer>,
    timeout: Duration,
    zoho_concurrency: usize,
    zoho_slots: Arc<dyn crm::CallSlots>,
) -> Result<Targets, SetupError> {
    let kommo = KommoClient::new(
        KommoConfig {
            base_url: kommo_fake.base_url(),
            auth: KommoAuth::LongLived(SecretString::from(
                kommo_fake.long_lived_token().to_string(),
            )),
            external_id_field_id: kommo_fake.config().external_id_field_id,
            lead_external_id_field_id: None,
            timeout,
        },
        pacer,
    )
    .map_err(|e| SetupError::Config(e.to_string()))?;
    let mut zc = ZohoConfig::new(
        zoho_fake.base_url(),
        zoho_fake.base_url(),
        zoho_fake.config().client_id.clone(),
        SecretString::from(zoho_fake.config().client_secret.clone()),
        Some(SecretString::from(zoho_fake.refresh_token().to_string())),
        store,
    );
    zc.timeout = timeout;
    zc.max_concurrency = zoho_concurrency;
    zc.slots = zoho_slots;
    let zoho = ZohoClient::new(zc).map_err(|e| SetupError::Config(e.to_string()))?;
    Ok(Targets {
        kommo: Arc::new(kommo),
        zoho: Arc::new(zoho),
    })
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The settings that connect the outbox to the real Kommo and Zoho (SPEC §6). Any one of them
/// turns the built-in sandbox off: a deployment that set some but forgot others must not sync to
/// fakes (their ids would be written back into the log for good).
const CONNECTION_SETTINGS: [&str; 14] = [
    "KOMMO_BASE_URL",
    "KOMMO_ACCESS_TOKEN",
    "KOMMO_CLIENT_ID",
    "KOMMO_CLIENT_SECRET",
    "KOMMO_REFRESH_TOKEN",
    "KOMMO_REDIRECT_URI",
    "KOMMO_EXTERNAL_ID_FIELD_ID",
    "ZOHO_ACCOUNTS_URL",
    "ZOHO_API_DOMAIN",
    "ZOHO_CLIENT_ID",
    "ZOHO_CLIENT_SECRET",
    "ZOHO_REFRESH_TOKEN",
    "ZOHO_CONTACT_EXTERNAL_FIELD",
    "ZOHO_SALES_ORDER_EXTERNAL_FIELD",
];

/// What the CRM clients are built from, read and checked from the environment before anything
/// starts: the key the tokens are stored with, the shared limits and where the outbox delivers.
pub struct CrmSettings {
    key: EncryptionKey,
    limits: Limits,
    target: CrmTarget,
}

/// Where the outbox delivers.
enum CrmTarget {
    /// No connection setting at all: the built-in sandbox CRMs on loopback.
    Sandbox,
    /// Every setting the real CRMs need.
    Real(Box<RealCrms>),
}

/// The real CRMs' settings.
pub struct RealCrms {
    kommo_base_url: String,
    kommo_auth: KommoAuthSettings,
    kommo_external_id_field_id: i64,
    zoho_accounts_url: String,
    zoho_api_domain: String,
    zoho_client_id: String,
    zoho_client_secret: SecretString,
    zoho_refresh_token: Option<SecretString>,
    zoho_contact_field: Option<String>,
    zoho_sales_order_field: Option<String>,
}

enum KommoAuthSettings {
    LongLived(SecretString),
    OAuth {
        client_id: String,
        client_secret: SecretString,
        redirect_uri: String,
        refresh_token: Option<SecretString>,
    },
}

impl CrmSettings {
    /// The sandbox when no connection setting is set; otherwise every one the CRMs need, or
    /// an error naming the first missing (or unreadable) one. Also checks the encryption key
    /// the tokens are stored with (generating the dev key when none is set).
    pub fn from_env() -> Result<Self, SetupError> {
        Ok(Self {
            limits: Limits::from_env()?,
            key: EncryptionKey::from_env_or_dev(
                &store::local_pg::LocalPgConfig::from_env().data_dir,
            )?,
            target: CrmTarget::from_env()?,
        })
    }
}

impl CrmTarget {
    fn from_env() -> Result<Self, SetupError> {
        if CONNECTION_SETTINGS.iter().all(|name| var(name).is_none()) {
            return Ok(Self::Sandbox);
        }
        let kommo_base_url = required("KOMMO_BASE_URL", "Kommo sync")?;
        let kommo_auth = match var("KOMMO_ACCESS_TOKEN") {
            Some(t) => KommoAuthSettings::LongLived(SecretString::from(t)),
            None => KommoAuthSettings::OAuth {
                client_id: required("KOMMO_CLIENT_ID", "Kommo OAuth")?,
                client_secret: SecretString::from(required("KOMMO_CLIENT_SECRET", "Kommo OAuth")?),
                redirect_uri: required("KOMMO_REDIRECT_URI", "Kommo OAuth")?,
                refresh_token: var("KOMMO_REFRESH_TOKEN").map(SecretString::from),
            },
        };
        Ok(Self::Real(Box::new(RealCrms {
            kommo_base_url,
            kommo_auth,
            kommo_external_id_field_id: required("KOMMO_EXTERNAL_ID_FIELD_ID", "Kommo sync")?
                .trim()
                .parse()
                .map_err(|_| SetupError::NotNumber("KOMMO_EXTERNAL_ID_FIELD_ID"))?,
            zoho_accounts_url: required("ZOHO_ACCOUNTS_URL", "Zoho sync")?,
            zoho_api_domain: var("ZOHO_API_DOMAIN")
                .unwrap_or_else(|| "https://www.zohoapis.com".into()),
            zoho_client_id: required("ZOHO_CLIENT_ID", "Zoho sync")?,
            zoho_client_secret: SecretString::from(required("ZOHO_CLIENT_SECRET", "Zoho sync")?),
            zoho_refresh_token: var("ZOHO_REFRESH_TOKEN").map(SecretString::from),
            zoho_contact_field: var("ZOHO_CONTACT_EXTERNAL_FIELD"),
            zoho_sales_order_field: var("ZOHO_SALES_ORDER_EXTERNAL_FIELD"),
        })))
    }
}

/// The CRMs' shared limits (SPEC §6), checked: a process can refuse them before it starts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `KOMMO_RPS`, 1 to Kommo's limit of 7 per account (going over earns 429s and, repeated,
    /// a block of the IP).
    pub kommo_rps: u32,
    /// `ZOHO_MAX_CONCURRENCY`, 1 to 1,000.
    pub zoho_max_concurrency: usize,
}

impl Limits {
    pub fn from_env() -> Result<Self, SetupError> {
        Ok(Self {
            kommo_rps: number(
                "KOMMO_RPS",
                crm::DEFAULT_KOMMO_RPS.into(),
                1,
                crm::KOMMO_MAX_RPS.into(),
            )? as u32,
            zoho_max_concurrency: number(
                "ZOHO_MAX_CONCURRENCY",
                crm::DEFAULT_MAX_CONCURRENCY as u64,
                1,
                1_000,
            )? as usize,
        })
    }
}

/// The whole number setting `name` (`default` when unset), from `min` to `max`.
pub fn number(name: &'static str, default: u64, min: u64, max: u64) -> Result<u64, SetupError> {
    let n = match var(name) {
        Some(v) => v.trim().parse().map_err(|_| SetupError::NotNumber(name))?,
        None => default,
    };
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(SetupError::OutOfRange(name, min, max))
    }
}

fn required(name: &'static str, with: &'static str) -> Result<String, SetupError> {
    var(name).ok_or(SetupError::Missing(name, with))
}

/// Clients for the CRMs `settings` name (`CrmSettings::from_env`); the sandbox (fake Kommo
/// and Zoho on loopback) said loudly.
pub async fn build(pool: &PgPool, settings: CrmSettings) -> Result<Crms, SetupError> {
    let CrmSettings {
        key,
        limits,
        target,
    } = settings;
    let store: Arc<dyn TokenStore> = Arc::new(PgTokenStore::new(pool.clone(), key));
    let rps = limits.kommo_rps;
    let timeout = Duration::from_secs(15);

    let real = match target {
        CrmTarget::Real(real) => real,
        CrmTarget::Sandbox => {
            let kommo_fake = FakeKommo::start().await.map_err(SetupError::Sandbox)?;
            let zoho_fake = FakeZoho::start().await.map_err(SetupError::Sandbox)?;
            tracing::warn!(
                kommo = %kommo_fake.base_url(),
                zoho = %zoho_fake.base_url(),
                "no Kommo/Zoho settings: syncing to the built-in sandbox CRMs (nothing leaves this machine)"
            );
            let targets = for_fakes(
                &kommo_fake,
                &zoho_fake,
                store,
                Arc::new(LocalPacer::from_rps(rps)),
                timeout,
                crm::DEFAULT_MAX_CONCURRENCY,
                Arc::new(crm::Unshared),
            )?;
            return Ok(Crms {
                targets,
                sandbox: Some((kommo_fake, zoho_fake)),
                zoho_slots: Arc::new(crm::Unshared),
            });
        }
    };
    let RealCrms {
        kommo_base_url,
        kommo_auth,
        kommo_external_id_field_id,
        zoho_accounts_url,
        zoho_api_domain,
        zoho_client_id,
        zoho_client_secret,
        zoho_refresh_token,
        zoho_contact_field,
        zoho_sales_order_field,
    } = *real;
    let auth = match kommo_auth {
        KommoAuthSettings::LongLived(token) => KommoAuth::LongLived(token),
        KommoAuthSettings::OAuth {
            client_id,
            client_secret,
            redirect_uri,
            refresh_token,
        } => KommoAuth::OAuth(KommoOAuth {
            client_id,
            client_secret,
            redirect_uri,
            initial_refresh_token: refresh_token,
            store: store.clone(),
        }),
    };
    let kommo = KommoClient::new(
        KommoConfig {
            base_url: kommo_base_url,
            auth,
            external_id_field_id: kommo_external_id_field_id,
            lead_external_id_field_id: None,
            timeout,
        },
        Arc::new(PgPacer::new(pool.clone(), "kommo", rps)),
    )
    .map_err(|e| SetupError::Config(e.to_string()))?;
    let mut zc = ZohoConfig::new(
        zoho_accounts_url,
        zoho_api_domain,
        zoho_client_id,
        zoho_client_secret,
        zoho_refresh_token,
        store,
    );
    if let Some(f) = zoho_contact_field {
        zc.contact_external_field = f;
    }
    if let Some(f) = zoho_sales_order_field {
        zc.sales_order_external_field = f;
    }
    zc.max_concurrency = limits.zoho_max_concurrency;
    zc.timeout = timeout;
    // ZOHO_MAX_CONCURRENCY is the organisation's limit, so every worker process shares it. A
    // live holder renews its slot's lease; a dead one's slot is free again after 15 s.
    let zoho_slots: Arc<dyn crm::CallSlots> = Arc::new(PgCallSlots::new(
        pool.clone(),
        "zoho",
        zc.max_concurrency,
        Duration::from_secs(15),
    ));
    zc.slots = zoho_slots.clone();
    let zoho = ZohoClient::new(zc).map_err(|e| SetupError::Config(e.to_string()))?;
    Ok(Crms {
        targets: Targets {
            kommo: Arc::new(kommo),
            zoho: Arc::new(zoho),
        },
        sandbox: None,
        zoho_slots,
    })
}
