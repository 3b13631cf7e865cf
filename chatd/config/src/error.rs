//! Why a configuration is refused, and the helpers that build messages
//! naming the key, the bad value and what is allowed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why the configuration cannot be used. Each message is one line an operator
/// can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read `admin.token_file` {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read `{key}` {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error(
        "refusing to serve the admin API on {0} without a token: set `admin.tokens` or `admin.token_file`, or listen on a loopback address"
    )]
    Insecure(SocketAddr),
    #[error("invalid value for `{key}`: {value} — {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
}

pub(super) fn invalid(
    key: &'static str,
    value: impl std::fmt::Display,
    allowed: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// Every `as` cast in the section validators follows a `range` check that
/// bounds the value to the target type, so none truncates.
pub(super) fn range(
    key: &'static str,
    value: i64,
    min: i64,
    max: i64,
    note: &str,
) -> Result<i64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(key, value, format!("allowed: {min}..={max}{note}")))
    }
}

pub(super) fn secs(
    key: &'static str,
    value: i64,
    max: i64,
) -> Result<Option<Duration>, ConfigError> {
    let v = range(key, value, 0, max, " seconds, 0 turns it off")?;
    // The range check above makes the cast lossless.
    Ok((v > 0).then(|| Duration::from_secs(v as u64)))
}
