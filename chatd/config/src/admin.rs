//! `[admin]`: the admin API's listeners, tokens and roles.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::error::{ConfigError, invalid, range};
use super::listen::{TlsFiles, addrs, tls_files};
use super::raw::{RawAdmin, RawToken};

/// The admin API. `None` in [`Config::admin`](super::Config::admin) when
/// `admin.enabled` is false.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Empty: no TCP listener (`admin.listen = ""`), only the socket.
    pub listen: Vec<SocketAddr>,
    pub socket: Option<PathBuf>,
    /// Configured tokens; empty means one is generated at start.
    pub tokens: Vec<TokenConfig>,
    pub tls: Option<TlsFiles>,
    /// Connections open at once, per listener; more are closed at accept.
    pub max_connections: usize,
    /// From accept to the first call.
    pub handshake_timeout: Duration,
    /// Silence allowed while no call is in progress.
    pub idle_timeout: Duration,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// List, show, watch, stats.
    Read,
    /// Everything, including kick, broadcast, ban and reload.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Admin => "admin",
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub name: String,
    pub secret: String,
    pub role: Role,
}

// The secret never reaches a log or `{:?}`.
impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Shortest token accepted from the config: shorter ones can be guessed.
const MIN_TOKEN_LEN: usize = 16;

fn validate_token(key: &'static str, token: &str) -> Result<(), ConfigError> {
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            key,
            format!("a token of {} characters", token.len()),
            format!("at least {MIN_TOKEN_LEN} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

pub(super) fn validate_admin(raw: &RawAdmin) -> Result<AdminConfig, ConfigError> {
    let (listen, socket) = endpoints(raw)?;
    let tokens = tokens(raw)?;
    if let Some(public) = listen.iter().find(|a| !a.ip().is_loopback())
        && tokens.is_empty()
    {
        return Err(ConfigError::Insecure(*public));
    }
    let tls = tls_files(
        ("admin.tls_cert", &raw.tls_cert),
        ("admin.tls_key", &raw.tls_key),
    )?;
    let positive_secs = |key: &'static str, value: i64| {
        range(key, value, 1, 24 * 3600, " seconds").map(|v| Duration::from_secs(v as u64))
    };
    Ok(AdminConfig {
        listen,
        socket,
        tokens,
        tls,
        max_connections: range("admin.max_connections", raw.max_connections, 1, 65536, "")?
            as usize,
        handshake_timeout: positive_secs(
            "admin.handshake_timeout_secs",
            raw.handshake_timeout_secs,
        )?,
        idle_timeout: positive_secs("admin.idle_timeout_secs", raw.idle_timeout_secs)?,
    })
}

/// `admin.listen` and `admin.socket`: at least one of them, or the API
/// could not be reached.
fn endpoints(raw: &RawAdmin) -> Result<(Vec<SocketAddr>, Option<PathBuf>), ConfigError> {
    let listen = addrs("admin.listen", &raw.listen)?;
    let socket = (!raw.socket.is_empty()).then(|| PathBuf::from(&raw.socket));
    if listen.is_empty() && socket.is_none() {
        return Err(invalid(
            "admin.listen",
            "\"\"",
            "an IP:PORT, or set admin.socket, or turn the API off with admin.enabled = false",
        ));
    }
    Ok((listen, socket))
}

/// `admin.tokens`, each with a name of its own, then `admin.token_file`.
fn tokens(raw: &RawAdmin) -> Result<Vec<TokenConfig>, ConfigError> {
    let mut tokens = Vec::with_capacity(raw.tokens.len() + 1);
    for t in &raw.tokens {
        let token = configured_token(t)?;
        if tokens.iter().any(|c: &TokenConfig| c.name == token.name) {
            return Err(invalid(
                "admin.tokens.name",
                format!("{:?}", t.name),
                "each token needs a name of its own",
            ));
        }
        tokens.push(token);
    }
    tokens.extend(token_from_file(raw)?);
    Ok(tokens)
}

/// One `[[admin.tokens]]` entry, checked on its own.
fn configured_token(t: &RawToken) -> Result<TokenConfig, ConfigError> {
    if t.name.is_empty() || t.name.len() > 64 || t.name.chars().any(char::is_control) {
        return Err(invalid(
            "admin.tokens.name",
            format!("{:?}", t.name),
            "1 to 64 characters, no control characters",
        ));
    }
    validate_token("admin.tokens.token", &t.token)?;
    let role = match t.role.as_str() {
        "admin" | "" => Role::Admin,
        "read" => Role::Read,
        other => {
            return Err(invalid(
                "admin.tokens.role",
                format!("{other:?}"),
                "\"admin\" or \"read\"",
            ));
        }
    };
    Ok(TokenConfig {
        name: t.name.clone(),
        secret: t.token.clone(),
        role,
    })
}

/// `admin.token_file`, if set: its first line is an admin token.
fn token_from_file(raw: &RawAdmin) -> Result<Option<TokenConfig>, ConfigError> {
    if raw.token_file.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(&raw.token_file);
    let text =
        std::fs::read_to_string(&path).map_err(|source| ConfigError::TokenFile { path, source })?;
    let secret = text.lines().next().unwrap_or_default().trim().to_string();
    validate_token("admin.token_file", &secret)?;
    Ok(Some(TokenConfig {
        name: "token_file".into(),
        secret,
        role: Role::Admin,
    }))
}
