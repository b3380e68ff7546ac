//! HTTP clients for Kommo (API v4) and Zoho CRM (v6), following `shared/crm-contracts.md`.
//!
//! What the clients own: authentication (one refresh-and-retry on a 401, rotated refresh tokens
//! saved before use, one refreshing worker at a time through [`TokenStore::lock_refresh`]),
//! never creating a record twice (Kommo: look up by our key before a create; Zoho: upsert on an
//! external-id field), pacing (every Kommo request waits on a [`Pacer`]), and classifying every
//! failure as a [`CrmError`]. What they leave to the caller: retry timing, dead-lettering, and
//! persisting the ids they return.
//!
//! **Architecture Invariant:** no database access here: token persistence and cross-process
//! pacing (Kommo's rate, Zoho's concurrency) are traits, implemented with the database code.

mod error;
mod http;
mod kommo;
mod pacer;
mod slots;
mod token;
mod zoho;

pub use error::{CrmError, classify_kommo, classify_zoho, classify_zoho_record, parse_retry_after};
pub use http::ConfigError;
pub use kommo::{ContactInput, KommoAuth, KommoClient, KommoConfig, KommoOAuth, LeadInput};
pub use pacer::{DEFAULT_KOMMO_RPS, KOMMO_MAX_RPS, LocalPacer, Pacer, Unpaced};
pub use secrecy::SecretString;
pub use slots::{CallSlots, SlotGuard, Unshared};
pub use token::{
    KOMMO_SYSTEM, MemoryTokenStore, RefreshGuard, RefreshTurns, StoredToken, TokenStore,
    TokenStoreError, ZOHO_SYSTEM,
};
pub use zoho::{
    DEFAULT_CONTACT_EXTERNAL_FIELD, DEFAULT_MAX_CONCURRENCY, DEFAULT_SALES_ORDER_EXTERNAL_FIELD,
    MAX_RECORDS_PER_CALL, SalesOrder, SalesOrderItem, ZohoClient, ZohoConfig, ZohoContact,
};
