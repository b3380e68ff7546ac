//! The Client aggregate: registration and contact details of a customer (SPEC §2).
//!
//! Kommo and Zoho contact ids are written back by the sync worker. **Tier and segment are never
//! set by a command**: they are derived by the `clients` projection, so they do not appear here.
//! Passport and Emirates ID numbers are PII: they are held in [`Pii`], which never prints them.

use chrono::NaiveDate;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::types::{ValidationError, optional_text, required_text};
use crate::{DomainError, ErrorKind};

// ---------------------------------------------------------------------------------------------
// Value types
// ---------------------------------------------------------------------------------------------

/// A personal identifier (passport, Emirates ID). `Debug` and `Display` print `[redacted]`;
/// serde stores the plain string, since the events must keep it. Read it with [`Pii::expose`].
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pii(String);

impl Pii {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The identifier itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Trims; at most 64 characters. Blank is `None`. The error never contains the value.
    fn parse(field: &str, value: &Pii) -> Result<Option<Self>, ValidationError> {
        let v = value.0.trim();
        if v.is_empty() {
            return Ok(None);
        }
        if v.chars().count() > 64 {
            return Err(ValidationError::new(
                field,
                "is too long (at most 64 characters)",
            ));
        }
        Ok(Some(Self(v.to_string())))
    }
}

impl std::fmt::Debug for Pii {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Pii {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Pii {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Pii {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

/// An e-mail address of a basic shape (one `@`, a local part, a dotted domain, no spaces),
/// lowercased.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let v = value.trim();
        let invalid =
            || ValidationError::new(field, "must be an e-mail address such as name@example.com");
        if v.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if v.chars().count() > 254 || v.chars().any(char::is_whitespace) {
            return Err(invalid());
        }
        let (local, domain) = v.split_once('@').ok_or_else(invalid)?;
        if local.is_empty()
            || domain.contains('@')
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
        {
            return Err(invalid());
        }
        Ok(Self(v.to_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A phone number in E.164 form: `+` and 7 to 15 digits. Spaces, dashes and parentheses of the
/// input are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Phone(String);

impl Phone {
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let v: String = value
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '-' | '(' | ')'))
            .collect();
        if v.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        let ok = v.strip_prefix('+').is_some_and(|digits| {
            (7..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit())
        });
        if !ok {
            return Err(ValidationError::new(
                field,
                "must be an international number: + and 7 to 15 digits",
            ));
        }
        Ok(Self(v))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An ISO 3166-1 alpha-2 country code, uppercased (`AE`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CountryCode(String);

impl CountryCode {
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if v.len() != 2 || !v.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(ValidationError::new(
                field,
                "must be a two-letter ISO 3166 country code such as AE",
            ));
        }
        Ok(Self(v.to_ascii_uppercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CountryCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A channel by which the client likes to be contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Whatsapp,
    Phone,
    Email,
    Sms,
    Telegram,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Whatsapp => "whatsapp",
            Self::Phone => "phone",
            Self::Email => "email",
            Self::Sms => "sms",
            Self::Telegram => "telegram",
        }
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        Ok(match value.trim().to_lowercase().as_str() {
            "whatsapp" => Self::Whatsapp,
            "phone" => Self::Phone,
            "email" => Self::Email,
            "sms" => Self::Sms,
            "telegram" => Self::Telegram,
            _ => {
                return Err(ValidationError::new(
                    field,
                    "must be one of whatsapp, phone, email, sms, telegram",
                ));
            }
        })
    }

    /// Parses each channel, in order; a channel named twice is refused.
    pub fn parse_list(field: &str, values: &[String]) -> Result<Vec<Self>, ValidationError> {
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            let c = Self::parse(field, v)?;
            if out.contains(&c) {
                return Err(ValidationError::new(
                    field,
                    format!("names {} more than once", c.as_str()),
                ));
            }
            out.push(c);
        }
        Ok(out)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An optional input parsed by `parse`; blank is `None`.
fn optional<T>(
    field: &str,
    value: Option<&str>,
    parse: fn(&str, &str) -> Result<T, ValidationError>,
) -> Result<Option<T>, ValidationError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => parse(field, v).map(Some),
    }
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Client commands: raw inputs; the aggregate parses them into value types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(
    clippy::large_enum_variant,
    reason = "a command lives for one request; its shape is the API's"
)]
pub enum ClientCommand {
    Register {
        name: String,
        phone: Option<String>,
        email: Option<String>,
        residency_country: Option<String>,
        preferred_language: Option<String>,
        preferred_channels: Vec<String>,
        timezone: Option<String>,
        gender: Option<String>,
        date_of_birth: Option<NaiveDate>,
        passport_number: Option<Pii>,
        emirates_id: Option<Pii>,
        kommo_contact_id: Option<String>,
    },
    /// Each field: `None` leaves it unchanged; a value replaces it (a blank value is refused).
    UpdateDetails {
        name: Option<String>,
        phone: Option<String>,
        email: Option<String>,
        residency_country: Option<String>,
        preferred_language: Option<String>,
        preferred_channels: Option<Vec<String>>,
        timezone: Option<String>,
        gender: Option<String>,
        date_of_birth: Option<NaiveDate>,
        passport_number: Option<Pii>,
        emirates_id: Option<Pii>,
    },
    LinkKommoContact {
        kommo_contact_id: String,
    },
    LinkZohoContact {
        zoho_contact_id: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// Client events. The variant name is the stored `event_type` and never changes; a change of
/// shape bumps `event_version` and gets an upcaster (see `crate::upcasting`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(
    clippy::large_enum_variant,
    reason = "events are stored as JSON; the variants keep the flat shape of their payload"
)]
pub enum ClientEvent {
    ClientRegistered {
        name: String,
        phone: Option<Phone>,
        email: Option<Email>,
        residency_country: Option<CountryCode>,
        preferred_language: Option<String>,
        preferred_channels: Vec<Channel>,
        timezone: Option<String>,
        gender: Option<String>,
        date_of_birth: Option<NaiveDate>,
        passport_number: Option<Pii>,
        emirates_id: Option<Pii>,
        kommo_contact_id: Option<String>,
    },
    /// Only the fields that changed are `Some`.
    ClientDetailsUpdated {
        name: Option<String>,
        phone: Option<Phone>,
        email: Option<Email>,
        residency_country: Option<CountryCode>,
        preferred_language: Option<String>,
        preferred_channels: Option<Vec<Channel>>,
        timezone: Option<String>,
        gender: Option<String>,
        date_of_birth: Option<NaiveDate>,
        passport_number: Option<Pii>,
        emirates_id: Option<Pii>,
    },
    ClientKommoContactLinked {
        kommo_contact_id: String,
    },
    ClientZohoContactLinked {
        zoho_contact_id: String,
    },
}

impl DomainEvent for ClientEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::ClientRegistered { .. } => "ClientRegistered",
            Self::ClientDetailsUpdated { .. } => "ClientDetailsUpdated",
            Self::ClientKommoContactLinked { .. } => "ClientKommoContactLinked",
            Self::ClientZohoContactLinked { .. } => "ClientZohoContactLinked",
        };
        name.to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("the client does not exist")]
    NotFound,
    #[error("the client already exists")]
    AlreadyExists,
    #[error(transparent)]
    Validation(#[from] ValidationError),
}

impl DomainError for ClientError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists => ErrorKind::Conflict,
            Self::Validation(_) => ErrorKind::Validation,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "client.not_found",
            Self::AlreadyExists => "client.already_exists",
            Self::Validation(_) => "client.validation",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// The client's state, folded from its events. Its `Debug` redacts the PII.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Client {
    pub created: bool,
    pub name: String,
    pub phone: Option<Phone>,
    pub email: Option<Email>,
    pub residency_country: Option<CountryCode>,
    pub preferred_language: Option<String>,
    pub preferred_channels: Vec<Channel>,
    pub timezone: Option<String>,
    pub gender: Option<String>,
    pub date_of_birth: Option<NaiveDate>,
    pub passport_number: Option<Pii>,
    pub emirates_id: Option<Pii>,
    pub kommo_contact_id: Option<String>,
    pub zoho_contact_id: Option<String>,
}

/// `Some(new)` when `new` is given and differs from `current`.
fn changed<T: PartialEq>(current: &Option<T>, new: Option<T>) -> Option<T> {
    new.filter(|n| current.as_ref() != Some(n))
}

/// A required replacement value: parsed by `parse`, which refuses a blank one.
fn replacement<T>(
    field: &str,
    value: Option<String>,
    parse: fn(&str, &str) -> Result<T, ValidationError>,
) -> Result<Option<T>, ValidationError> {
    value.map(|v| parse(field, &v)).transpose()
}

fn required_pii(field: &str, value: Option<Pii>) -> Result<Option<Pii>, ValidationError> {
    match value {
        None => Ok(None),
        Some(v) => match Pii::parse(field, &v)? {
            Some(p) => Ok(Some(p)),
            None => Err(ValidationError::new(field, "must not be empty")),
        },
    }
}

fn optional_pii(field: &str, value: Option<Pii>) -> Result<Option<Pii>, ValidationError> {
    match value {
        None => Ok(None),
        Some(v) => Pii::parse(field, &v),
    }
}

impl Aggregate for Client {
    const TYPE: &'static str = "Client";
    type Command = ClientCommand;
    type Event = ClientEvent;
    type Error = ClientError;
    type Services = ();

    async fn handle(
        &mut self,
        command: ClientCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), ClientError> {
        let event = match command {
            ClientCommand::Register {
                name,
                phone,
                email,
                residency_country,
                preferred_language,
                preferred_channels,
                timezone,
                gender,
                date_of_birth,
                passport_number,
                emirates_id,
                kommo_contact_id,
            } => {
                if self.created {
                    return Err(ClientError::AlreadyExists);
                }
                ClientEvent::ClientRegistered {
                    name: required_text("name", &name)?,
                    phone: optional("phone", phone.as_deref(), Phone::parse)?,
                    email: optional("email", email.as_deref(), Email::parse)?,
                    residency_country: optional(
                        "residency_country",
                        residency_country.as_deref(),
                        CountryCode::parse,
                    )?,
                    preferred_language: optional_text(
                        "preferred_language",
                        preferred_language.as_deref(),
                    )?,
                    preferred_channels: Channel::parse_list(
                        "preferred_channels",
                        &preferred_channels,
                    )?,
                    timezone: optional_text("timezone", timezone.as_deref())?,
                    gender: optional_text("gender", gender.as_deref())?,
                    date_of_birth,
                    passport_number: optional_pii("passport_number", passport_number)?,
                    emirates_id: optional_pii("emirates_id", emirates_id)?,
                    kommo_contact_id: optional_text(
                        "kommo_contact_id",
                        kommo_contact_id.as_deref(),
                    )?,
                }
            }
            ClientCommand::UpdateDetails {
                name,
                phone,
                email,
                residency_country,
                preferred_language,
                preferred_channels,
                timezone,
                gender,
                date_of_birth,
                passport_number,
                emirates_id,
            } => {
                if !self.created {
                    return Err(ClientError::NotFound);
                }
                let name = replacement("name", name, required_text)?;
                let phone = replacement("phone", phone, Phone::parse)?;
                let email = replacement("email", email, Email::parse)?;
                let residency_country =
                    replacement("residency_country", residency_country, CountryCode::parse)?;
                let preferred_language =
                    replacement("preferred_language", preferred_language, required_text)?;
                let preferred_channels = preferred_channels
                    .map(|c| Channel::parse_list("preferred_channels", &c))
                    .transpose()?;
                let timezone = replacement("timezone", timezone, required_text)?;
                let gender = replacement("gender", gender, required_text)?;
                let passport_number = required_pii("passport_number", passport_number)?;
                let emirates_id = required_pii("emirates_id", emirates_id)?;

                let event = ClientEvent::ClientDetailsUpdated {
                    name: name.filter(|n| *n != self.name),
                    phone: changed(&self.phone, phone),
                    email: changed(&self.email, email),
                    residency_country: changed(&self.residency_country, residency_country),
                    preferred_language: changed(&self.preferred_language, preferred_language),
                    preferred_channels: preferred_channels
                        .filter(|c| *c != self.preferred_channels),
                    timezone: changed(&self.timezone, timezone),
                    gender: changed(&self.gender, gender),
                    date_of_birth: changed(&self.date_of_birth, date_of_birth),
                    passport_number: changed(&self.passport_number, passport_number),
                    emirates_id: changed(&self.emirates_id, emirates_id),
                };
                if event == Self::no_change() {
                    return Ok(());
                }
                event
            }
            ClientCommand::LinkKommoContact { kommo_contact_id } => {
                if !self.created {
                    return Err(ClientError::NotFound);
                }
                let id = required_text("kommo_contact_id", &kommo_contact_id)?;
                if self.kommo_contact_id.as_deref() == Some(id.as_str()) {
                    return Ok(());
                }
                ClientEvent::ClientKommoContactLinked {
                    kommo_contact_id: id,
                }
            }
            ClientCommand::LinkZohoContact { zoho_contact_id } => {
                if !self.created {
                    return Err(ClientError::NotFound);
                }
                let id = required_text("zoho_contact_id", &zoho_contact_id)?;
                if self.zoho_contact_id.as_deref() == Some(id.as_str()) {
                    return Ok(());
                }
                ClientEvent::ClientZohoContactLinked {
                    zoho_contact_id: id,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: ClientEvent) {
        use ClientEvent as E;
        match event {
            E::ClientRegistered {
                name,
                phone,
                email,
                residency_country,
                preferred_language,
                preferred_channels,
                timezone,
                gender,
                date_of_birth,
                passport_number,
                emirates_id,
                kommo_contact_id,
            } => {
                *self = Self {
                    created: true,
                    name,
                    phone,
                    email,
                    residency_country,
                    preferred_language,
                    preferred_channels,
                    timezone,
                    gender,
                    date_of_birth,
                    passport_number,
                    emirates_id,
                    kommo_contact_id,
                    zoho_contact_id: None,
                };
            }
            E::ClientDetailsUpdated {
                name,
                phone,
                email,
                residency_country,
                preferred_language,
                preferred_channels,
                timezone,
                gender,
                date_of_birth,
                passport_number,
                emirates_id,
            } => {
                if let Some(v) = name {
                    self.name = v;
                }
                if let Some(v) = preferred_channels {
                    self.preferred_channels = v;
                }
                self.phone = phone.or(self.phone.take());
                self.email = email.or(self.email.take());
                self.residency_country = residency_country.or(self.residency_country.take());
                self.preferred_language = preferred_language.or(self.preferred_language.take());
                self.timezone = timezone.or(self.timezone.take());
                self.gender = gender.or(self.gender.take());
                self.date_of_birth = date_of_birth.or(self.date_of_birth);
                self.passport_number = passport_number.or(self.passport_number.take());
                self.emirates_id = emirates_id.or(self.emirates_id.take());
            }
            E::ClientKommoContactLinked { kommo_contact_id } => {
                self.kommo_contact_id = Some(kommo_contact_id);
            }
            E::ClientZohoContactLinked { zoho_contact_id } => {
                self.zoho_contact_id = Some(zoho_contact_id);
            }
        }
    }
}

impl Client {
    /// A `ClientDetailsUpdated` that changes nothing.
    fn no_change() -> ClientEvent {
        ClientEvent::ClientDetailsUpdated {
            name: None,
            phone: None,
            email: None,
            residency_country: None,
            preferred_language: None,
            preferred_channels: None,
            timezone: None,
            gender: None,
            date_of_birth: None,
            passport_number: None,
            emirates_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::{AggregateResultValidator, TestFramework};

    type Clients = TestFramework<Client>;

    const PASSPORT: &str = "N12345678";
    const EMIRATES_ID: &str = "784-1990-1234567-1";

    trait ThenInvalid {
        fn then_expect_invalid(self, field: &str);
    }

    impl ThenInvalid for AggregateResultValidator<Client> {
        /// Expects a validation error on `field`.
        fn then_expect_invalid(self, field: &str) {
            match self.inspect_result() {
                Err(ClientError::Validation(e)) => assert_eq!(e.field, field, "{e}"),
                other => panic!("expected a validation error on {field}, got {other:?}"),
            }
        }
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    /// The fields of a `Register` command, to change one at a time.
    #[derive(Clone)]
    struct Reg {
        name: String,
        phone: Option<String>,
        email: Option<String>,
        residency_country: Option<String>,
        preferred_language: Option<String>,
        preferred_channels: Vec<String>,
        timezone: Option<String>,
        gender: Option<String>,
        date_of_birth: Option<NaiveDate>,
        passport_number: Option<Pii>,
        emirates_id: Option<Pii>,
        kommo_contact_id: Option<String>,
    }

    impl Reg {
        fn cmd(self) -> ClientCommand {
            ClientCommand::Register {
                name: self.name,
                phone: self.phone,
                email: self.email,
                residency_country: self.residency_country,
                preferred_language: self.preferred_language,
                preferred_channels: self.preferred_channels,
                timezone: self.timezone,
                gender: self.gender,
                date_of_birth: self.date_of_birth,
                passport_number: self.passport_number,
                emirates_id: self.emirates_id,
                kommo_contact_id: self.kommo_contact_id,
            }
        }
    }

    fn reg() -> Reg {
        Reg {
            name: "  Amira Haddad ".into(),
            phone: Some("+971 (50) 123-4567".into()),
            email: Some(" Amira.Haddad@Example.COM ".into()),
            residency_country: Some("ae".into()),
            preferred_language: Some("ar".into()),
            preferred_channels: vec!["WhatsApp".into(), " email ".into()],
            timezone: Some("Asia/Dubai".into()),
            gender: Some("female".into()),
            date_of_birth: Some(date(1990, 5, 17)),
            passport_number: Some(Pii::new(format!(" {PASSPORT} "))),
            emirates_id: Some(EMIRATES_ID.into()),
            kommo_contact_id: Some("kommo-77".into()),
        }
    }

    fn registered() -> ClientEvent {
        ClientEvent::ClientRegistered {
            name: "Amira Haddad".into(),
            phone: Some(Phone("+971501234567".into())),
            email: Some(Email("amira.haddad@example.com".into())),
            residency_country: Some(CountryCode("AE".into())),
            preferred_language: Some("ar".into()),
            preferred_channels: vec![Channel::Whatsapp, Channel::Email],
            timezone: Some("Asia/Dubai".into()),
            gender: Some("female".into()),
            date_of_birth: Some(date(1990, 5, 17)),
            passport_number: Some(PASSPORT.into()),
            emirates_id: Some(EMIRATES_ID.into()),
            kommo_contact_id: Some("kommo-77".into()),
        }
    }

    /// The fields of an `UpdateDetails` command; all `None` by default.
    #[derive(Default)]
    struct Upd {
        name: Option<String>,
        phone: Option<String>,
        email: Option<String>,
        residency_country: Option<String>,
        preferred_language: Option<String>,
        preferred_channels: Option<Vec<String>>,
        timezone: Option<String>,
        gender: Option<String>,
        date_of_birth: Option<NaiveDate>,
        passport_number: Option<Pii>,
        emirates_id: Option<Pii>,
    }

    impl Upd {
        fn cmd(self) -> ClientCommand {
            ClientCommand::UpdateDetails {
                name: self.name,
                phone: self.phone,
                email: self.email,
                residency_country: self.residency_country,
                preferred_language: self.preferred_language,
                preferred_channels: self.preferred_channels,
                timezone: self.timezone,
                gender: self.gender,
                date_of_birth: self.date_of_birth,
                passport_number: self.passport_number,
                emirates_id: self.emirates_id,
            }
        }
    }

    // --- register ---

    #[test]
    fn registering_records_the_normalised_details() {
        Clients::with(())
            .given_no_previous_events()
            .when(reg().cmd())
            .then_expect_events(vec![registered()]);
    }

    #[test]
    fn registering_with_only_a_name_leaves_the_rest_empty() {
        let c = Reg {
            name: "Omar".into(),
            phone: Some("  ".into()),
            email: None,
            residency_country: Some("".into()),
            preferred_language: None,
            preferred_channels: vec![],
            timezone: None,
            gender: Some(" ".into()),
            date_of_birth: None,
            passport_number: Some(" ".into()),
            emirates_id: None,
            kommo_contact_id: None,
        };
        Clients::with(())
            .given_no_previous_events()
            .when(c.cmd())
            .then_expect_events(vec![ClientEvent::ClientRegistered {
                name: "Omar".into(),
                phone: None,
                email: None,
                residency_country: None,
                preferred_language: None,
                preferred_channels: vec![],
                timezone: None,
                gender: None,
                date_of_birth: None,
                passport_number: None,
                emirates_id: None,
                kommo_contact_id: None,
            }]);
    }

    #[test]
    fn registering_twice_is_refused() {
        Clients::with(())
            .given(vec![registered()])
            .when(reg().cmd())
            .then_expect_error(ClientError::AlreadyExists);
    }

    #[test]
    fn registering_needs_a_name() {
        for name in ["", "   "] {
            let c = Reg {
                name: name.into(),
                ..reg()
            };
            Clients::with(())
                .given_no_previous_events()
                .when(c.cmd())
                .then_expect_invalid("name");
        }
    }

    #[test]
    fn registering_refuses_a_bad_email() {
        for email in [
            "plainaddress",
            "@example.com",
            "a@b@example.com",
            "amira@localhost",
            "amira @example.com",
            "amira@exa mple.com",
            "amira@.example.com",
            "amira@example.com.",
            "amira@example..com",
        ] {
            let c = Reg {
                email: Some(email.into()),
                ..reg()
            };
            Clients::with(())
                .given_no_previous_events()
                .when(c.cmd())
                .then_expect_invalid("email");
        }
    }

    #[test]
    fn registering_refuses_a_bad_phone() {
        for phone in [
            "0501234567",
            "971501234567",
            "+971 50 12x 4567",
            "+123456",
            "+1234567890123456",
            "+",
            "++971501234567",
            "+971.50.123.4567",
        ] {
            let c = Reg {
                phone: Some(phone.into()),
                ..reg()
            };
            Clients::with(())
                .given_no_previous_events()
                .when(c.cmd())
                .then_expect_invalid("phone");
        }
    }

    #[test]
    fn phones_keep_only_the_plus_and_digits() {
        for (input, expected) in [
            ("+1234567", "+1234567"),
            ("+123456789012345", "+123456789012345"),
            (" +44 (20) 7946-0958 ", "+442079460958"),
        ] {
            assert_eq!(Phone::parse("phone", input).unwrap().as_str(), expected);
        }
    }

    #[test]
    fn registering_refuses_a_bad_country() {
        for country in ["UAE", "A", "a1", "Ü1", "ÄE", "12"] {
            let c = Reg {
                residency_country: Some(country.into()),
                ..reg()
            };
            Clients::with(())
                .given_no_previous_events()
                .when(c.cmd())
                .then_expect_invalid("residency_country");
        }
    }

    #[test]
    fn registering_refuses_unknown_or_repeated_channels() {
        for channels in [
            vec!["fax"],
            vec![""],
            vec!["email", "EMAIL"],
            vec!["whatsapp", "sms", "whatsapp"],
        ] {
            let c = Reg {
                preferred_channels: channels.into_iter().map(String::from).collect(),
                ..reg()
            };
            Clients::with(())
                .given_no_previous_events()
                .when(c.cmd())
                .then_expect_invalid("preferred_channels");
        }
    }

    #[test]
    fn every_channel_is_accepted() {
        let names = ["whatsapp", "phone", "email", "sms", "telegram"];
        let parsed =
            Channel::parse_list("c", &names.map(String::from)).expect("all channels are known");
        assert_eq!(parsed.iter().map(|c| c.as_str()).collect::<Vec<_>>(), names);
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::json!(names)
        );
    }

    #[test]
    fn registering_refuses_an_overlong_passport_without_echoing_it() {
        let long = "X".repeat(65);
        let c = Reg {
            passport_number: Some(long.as_str().into()),
            ..reg()
        };
        let err = Clients::with(())
            .given_no_previous_events()
            .when(c.cmd())
            .inspect_result()
            .unwrap_err();
        assert!(matches!(&err, ClientError::Validation(e) if e.field == "passport_number"));
        assert!(!err.to_string().contains(&long));
    }

    // --- update ---

    #[test]
    fn an_update_carries_only_the_changed_fields() {
        let c = Upd {
            name: Some("Amira Haddad".into()),              // unchanged
            email: Some("AMIRA.HADDAD@example.com".into()), // unchanged once normalised
            phone: Some("+971 50 765 4321".into()),
            residency_country: Some("gb".into()),
            preferred_channels: Some(vec!["telegram".into()]),
            date_of_birth: Some(date(1990, 5, 18)),
            passport_number: Some("P0000001".into()),
            emirates_id: Some(EMIRATES_ID.into()), // unchanged
            ..Upd::default()
        };
        Clients::with(())
            .given(vec![registered()])
            .when(c.cmd())
            .then_expect_events(vec![ClientEvent::ClientDetailsUpdated {
                name: None,
                phone: Some(Phone("+971507654321".into())),
                email: None,
                residency_country: Some(CountryCode("GB".into())),
                preferred_language: None,
                preferred_channels: Some(vec![Channel::Telegram]),
                timezone: None,
                gender: None,
                date_of_birth: Some(date(1990, 5, 18)),
                passport_number: Some("P0000001".into()),
                emirates_id: None,
            }]);
    }

    #[test]
    fn an_update_fills_fields_that_were_empty() {
        let bare = ClientEvent::ClientRegistered {
            name: "Omar".into(),
            phone: None,
            email: None,
            residency_country: None,
            preferred_language: None,
            preferred_channels: vec![],
            timezone: None,
            gender: None,
            date_of_birth: None,
            passport_number: None,
            emirates_id: None,
            kommo_contact_id: None,
        };
        let c = Upd {
            name: Some("Omar Khalil".into()),
            email: Some("omar@example.ae".into()),
            preferred_language: Some("en".into()),
            timezone: Some("Europe/London".into()),
            gender: Some("male".into()),
            emirates_id: Some(EMIRATES_ID.into()),
            ..Upd::default()
        };
        Clients::with(())
            .given(vec![bare])
            .when(c.cmd())
            .then_expect_events(vec![ClientEvent::ClientDetailsUpdated {
                name: Some("Omar Khalil".into()),
                phone: None,
                email: Some(Email("omar@example.ae".into())),
                residency_country: None,
                preferred_language: Some("en".into()),
                preferred_channels: None,
                timezone: Some("Europe/London".into()),
                gender: Some("male".into()),
                date_of_birth: None,
                passport_number: None,
                emirates_id: Some(EMIRATES_ID.into()),
            }]);
    }

    #[test]
    fn an_update_that_changes_nothing_is_a_no_op() {
        for c in [
            Upd::default(),
            Upd {
                name: Some(" Amira Haddad ".into()),
                phone: Some("+971-50-123-4567".into()),
                email: Some("amira.haddad@example.com".into()),
                residency_country: Some("AE".into()),
                preferred_language: Some("ar".into()),
                preferred_channels: Some(vec!["whatsapp".into(), "Email".into()]),
                timezone: Some("Asia/Dubai".into()),
                gender: Some("female".into()),
                date_of_birth: Some(date(1990, 5, 17)),
                passport_number: Some(PASSPORT.into()),
                emirates_id: Some(EMIRATES_ID.into()),
            },
        ] {
            Clients::with(())
                .given(vec![registered()])
                .when(c.cmd())
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn updating_an_unknown_client_is_not_found() {
        Clients::with(())
            .given_no_previous_events()
            .when(
                Upd {
                    name: Some("X".into()),
                    ..Upd::default()
                }
                .cmd(),
            )
            .then_expect_error(ClientError::NotFound);
    }

    #[test]
    fn an_update_refuses_bad_or_blank_values() {
        let cases: Vec<(&str, Upd)> = vec![
            (
                "name",
                Upd {
                    name: Some("  ".into()),
                    ..Upd::default()
                },
            ),
            (
                "email",
                Upd {
                    email: Some("nobody".into()),
                    ..Upd::default()
                },
            ),
            (
                "email",
                Upd {
                    email: Some("".into()),
                    ..Upd::default()
                },
            ),
            (
                "phone",
                Upd {
                    phone: Some("050 123".into()),
                    ..Upd::default()
                },
            ),
            (
                "residency_country",
                Upd {
                    residency_country: Some("ARE".into()),
                    ..Upd::default()
                },
            ),
            (
                "preferred_channels",
                Upd {
                    preferred_channels: Some(vec!["pigeon".into()]),
                    ..Upd::default()
                },
            ),
            (
                "timezone",
                Upd {
                    timezone: Some(" ".into()),
                    ..Upd::default()
                },
            ),
            (
                "passport_number",
                Upd {
                    passport_number: Some("".into()),
                    ..Upd::default()
                },
            ),
        ];
        for (field, c) in cases {
            Clients::with(())
                .given(vec![registered()])
                .when(c.cmd())
                .then_expect_invalid(field);
        }
    }

    // --- Kommo / Zoho links ---

    #[test]
    fn a_kommo_contact_is_linked_and_relinking_the_same_is_a_no_op() {
        Clients::with(())
            .given(vec![registered()])
            .when(ClientCommand::LinkKommoContact {
                kommo_contact_id: " kommo-99 ".into(),
            })
            .then_expect_events(vec![ClientEvent::ClientKommoContactLinked {
                kommo_contact_id: "kommo-99".into(),
            }]);
        Clients::with(())
            .given(vec![registered()])
            .when(ClientCommand::LinkKommoContact {
                kommo_contact_id: "kommo-77".into(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_zoho_contact_is_linked_and_relinking_the_same_is_a_no_op() {
        let linked = ClientEvent::ClientZohoContactLinked {
            zoho_contact_id: "zoho-1".into(),
        };
        Clients::with(())
            .given(vec![registered()])
            .when(ClientCommand::LinkZohoContact {
                zoho_contact_id: "zoho-1".into(),
            })
            .then_expect_events(vec![linked.clone()]);
        Clients::with(())
            .given(vec![registered(), linked])
            .when(ClientCommand::LinkZohoContact {
                zoho_contact_id: "zoho-1".into(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn links_need_an_id_and_a_client() {
        Clients::with(())
            .given(vec![registered()])
            .when(ClientCommand::LinkKommoContact {
                kommo_contact_id: " ".into(),
            })
            .then_expect_invalid("kommo_contact_id");
        Clients::with(())
            .given(vec![registered()])
            .when(ClientCommand::LinkZohoContact {
                zoho_contact_id: "".into(),
            })
            .then_expect_invalid("zoho_contact_id");
        for c in [
            ClientCommand::LinkKommoContact {
                kommo_contact_id: "k".into(),
            },
            ClientCommand::LinkZohoContact {
                zoho_contact_id: "z".into(),
            },
        ] {
            Clients::with(())
                .given_no_previous_events()
                .when(c)
                .then_expect_error(ClientError::NotFound);
        }
    }

    // --- PII, state, events, errors ---

    #[test]
    fn debug_of_an_event_never_shows_the_passport_or_emirates_id() {
        let event = registered();
        let debug = format!("{event:?}");
        assert!(!debug.contains(PASSPORT), "{debug}");
        assert!(!debug.contains(EMIRATES_ID), "{debug}");
        assert!(debug.contains("[redacted]"));
        let pretty = format!("{event:#?}");
        assert!(!pretty.contains(PASSPORT));

        let mut client = Client::default();
        client.apply(event);
        assert!(!format!("{client:?}").contains(PASSPORT));

        let pii = Pii::new(PASSPORT);
        assert_eq!(pii.to_string(), "[redacted]");
        assert_eq!(format!("{pii:?}"), "[redacted]");
        assert_eq!(pii.expose(), PASSPORT);
    }

    #[test]
    fn events_store_the_pii_as_a_plain_string() {
        let value = serde_json::to_value(registered()).unwrap();
        assert_eq!(value["ClientRegistered"]["passport_number"], PASSPORT);
        assert_eq!(value["ClientRegistered"]["emirates_id"], EMIRATES_ID);
        assert_eq!(value["ClientRegistered"]["phone"], "+971501234567");
        assert_eq!(value["ClientRegistered"]["residency_country"], "AE");
        assert_eq!(
            value["ClientRegistered"]["preferred_channels"],
            serde_json::json!(["whatsapp", "email"])
        );
        assert!(value["ClientRegistered"].get("tier").is_none());
        assert!(value["ClientRegistered"].get("segment").is_none());
        let back: ClientEvent = serde_json::from_value(value).unwrap();
        assert_eq!(back, registered());
    }

    #[test]
    fn state_folds_registration_updates_and_links() {
        let mut client = Client::default();
        for e in [
            registered(),
            ClientEvent::ClientDetailsUpdated {
                name: Some("Amira H.".into()),
                phone: None,
                email: None,
                residency_country: None,
                preferred_language: None,
                preferred_channels: Some(vec![Channel::Sms]),
                timezone: None,
                gender: None,
                date_of_birth: None,
                passport_number: Some("P1".into()),
                emirates_id: None,
            },
            ClientEvent::ClientKommoContactLinked {
                kommo_contact_id: "k2".into(),
            },
            ClientEvent::ClientZohoContactLinked {
                zoho_contact_id: "z1".into(),
            },
        ] {
            client.apply(e);
        }
        assert!(client.created);
        assert_eq!(client.name, "Amira H.");
        assert_eq!(client.preferred_channels, vec![Channel::Sms]);
        assert_eq!(
            client.email.as_ref().map(Email::as_str),
            Some("amira.haddad@example.com")
        );
        assert_eq!(
            client.phone.as_ref().map(Phone::as_str),
            Some("+971501234567")
        );
        assert_eq!(client.passport_number.as_ref().map(Pii::expose), Some("P1"));
        assert_eq!(
            client.emirates_id.as_ref().map(Pii::expose),
            Some(EMIRATES_ID)
        );
        assert_eq!(client.kommo_contact_id.as_deref(), Some("k2"));
        assert_eq!(client.zoho_contact_id.as_deref(), Some("z1"));
    }

    #[test]
    fn event_type_is_the_variant_name() {
        for e in [
            registered(),
            Client::no_change(),
            ClientEvent::ClientKommoContactLinked {
                kommo_contact_id: "k".into(),
            },
            ClientEvent::ClientZohoContactLinked {
                zoho_contact_id: "z".into(),
            },
        ] {
            let value = serde_json::to_value(&e).unwrap();
            assert!(value.get(e.event_type()).is_some(), "{value}");
            assert_eq!(e.event_version(), "1.0");
        }
    }

    #[test]
    fn errors_have_stable_codes_and_kinds() {
        let cases = [
            (
                ClientError::NotFound,
                "client.not_found",
                ErrorKind::NotFound,
            ),
            (
                ClientError::AlreadyExists,
                "client.already_exists",
                ErrorKind::Conflict,
            ),
            (
                ClientError::Validation(ValidationError::new("a", "b")),
                "client.validation",
                ErrorKind::Validation,
            ),
        ];
        for (e, code, kind) in cases {
            assert_eq!(e.code(), code);
            assert_eq!(e.kind(), kind);
        }
    }
}
