//! A JSON document as the events table stores it (a `json` column: the text as it was written,
//! validated by PostgreSQL on the way in), parsed into a [`Value`] only when someone asks for
//! one. Most readers decode a payload straight into a typed event
//! ([`StoredJson::parse`]) and never need the generic tree, which costs a map and a string per
//! member to build and to drop.

use std::ops::Deref;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use serde_json::Value;

#[derive(Clone)]
pub struct StoredJson {
    text: String,
    value: OnceLock<Value>,
}

impl StoredJson {
    /// A document from its JSON text (as a `json` or `jsonb` column holds it: always valid).
    pub fn from_text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            value: OnceLock::new(),
        }
    }

    /// A document from a value (tests, and events built in memory).
    pub fn from_value(value: Value) -> Self {
        Self {
            text: value.to_string(),
            value: OnceLock::from(value),
        }
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Deserializes the text straight into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(&self.text)
    }

    /// The document as a generic tree, parsed on first use and kept. Text that is not JSON
    /// (which a `json` column cannot hold) reads as `null`: use [`StoredJson::parse`] where
    /// that must be an error.
    pub fn value(&self) -> &Value {
        self.value
            .get_or_init(|| serde_json::from_str(&self.text).unwrap_or(Value::Null))
    }

    pub fn into_value(self) -> Value {
        match self.value.into_inner() {
            Some(value) => value,
            None => serde_json::from_str(&self.text).unwrap_or(Value::Null),
        }
    }
}

impl Deref for StoredJson {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.value()
    }
}

impl From<Value> for StoredJson {
    fn from(value: Value) -> Self {
        Self::from_value(value)
    }
}

impl std::fmt::Debug for StoredJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Equal when they hold the same JSON, whatever the spacing or the order of members.
impl PartialEq for StoredJson {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text || self.value() == other.value()
    }
}

impl Serialize for StoredJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_and_value_read_the_same_document() {
        let stored = StoredJson::from_text(r#"{"b": [1, 2], "a": "x"}"#);
        assert_eq!(stored.get("a"), Some(&json!("x")));
        assert_eq!(
            stored.parse::<Value>().ok(),
            Some(json!({"a": "x", "b": [1, 2]}))
        );
        assert_eq!(
            stored,
            StoredJson::from_value(json!({"a": "x", "b": [1, 2]}))
        );
        assert_ne!(
            stored,
            StoredJson::from_value(json!({"a": "x", "b": [2, 1]}))
        );
        assert_eq!(stored.clone().into_value(), json!({"a": "x", "b": [1, 2]}));
    }

    #[test]
    fn text_that_is_not_json_reads_as_null_and_fails_to_parse() {
        let stored = StoredJson::from_text("{not json");
        assert!(stored.parse::<Value>().is_err());
        assert_eq!(stored.value(), &Value::Null);
        assert!(stored.parse::<Value>().is_err());
    }
}
