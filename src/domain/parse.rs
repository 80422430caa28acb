//! A value read from its text (an environment variable) or its native TOML form (a file), for
//! settings and the programme's rules alike.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// Parses a value from its text (environment) or its native TOML form (file).
pub(crate) fn parsed<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let value = toml::Value::deserialize(deserializer)?;
    let text = match value {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        other => {
            return Err(de::Error::custom(format!(
                "expected a single value, found {}",
                other.type_str()
            )));
        }
    };
    text.trim().parse().map_err(de::Error::custom)
}
