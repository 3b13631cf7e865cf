//! `[cluster]`: several nodes acting as one chat service through NATS.

use std::path::PathBuf;
use std::time::Duration;

use super::error::{ConfigError, invalid, range};
use super::raw::RawCluster;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// At least one `nats://HOST:PORT` (several for a NATS cluster).
    pub nats_urls: Vec<String>,
    /// This node's name in the cluster: letters, digits, '-' and '_'.
    pub node_id: String,
    /// The subject prefix, so that two clusters can share one NATS.
    pub name: String,
    pub on_unreachable: OnUnreachable,
    /// How this node proves who it is to NATS.
    pub auth: NatsAuth,
    pub tls: NatsTls,
    pub timings: ClusterTimings,
}

/// How fast the cluster forgets a node and how long it waits on NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterTimings {
    /// `nick_expiry_secs`: how long a nick key outlives its node's last
    /// rewrite, so the most a crashed node's nicks stay taken. It is the
    /// nick bucket's max age, so the same on every node.
    pub nick_expiry: Duration,
    /// `nick_rewrite_secs`: how often a node rewrites the nicks it holds;
    /// at most a third of the expiry, so that two rewrites may fail
    /// without losing a nick.
    pub nick_rewrite: Duration,
    /// `member_silence_secs`: a node not heard for this long no longer
    /// counts in `/who`, `/rooms` and room counts.
    pub member_silence: Duration,
    /// `history_load_ms`: the most a joining client waits for the room's
    /// history from NATS.
    pub history_load: Duration,
}

impl Default for ClusterTimings {
    fn default() -> Self {
        ClusterTimings {
            nick_expiry: Duration::from_secs(20),
            nick_rewrite: Duration::from_secs(5),
            member_silence: Duration::from_secs(6),
            history_load: Duration::from_millis(2000),
        }
    }
}

/// Nodes say they are there every 2 s (`cluster::HEARTBEAT`): silence
/// shorter than two of those would drop live nodes' members.
const MIN_MEMBER_SILENCE_SECS: i64 = 4;
/// A node heard within this is still asked in admin calls
/// (`cluster::PRESENCE_TTL`); and a dead node's members must leave `/who`
/// within 10 s.
const MAX_MEMBER_SILENCE_SECS: i64 = 10;
/// A crashed node's nicks are free within 30 s.
const MAX_NICK_EXPIRY_SECS: i64 = 30;

/// `nick_expiry_secs`, `nick_rewrite_secs`, `member_silence_secs` and
/// `history_load_ms`.
fn validate_timings(raw: &RawCluster) -> Result<ClusterTimings, ConfigError> {
    let rewrite = range(
        "cluster.nick_rewrite_secs",
        raw.nick_rewrite_secs,
        1,
        MAX_NICK_EXPIRY_SECS / 3,
        " seconds (at most a third of cluster.nick_expiry_secs, which is at most 30)",
    )?;
    let expiry = range(
        "cluster.nick_expiry_secs",
        raw.nick_expiry_secs,
        3 * rewrite,
        MAX_NICK_EXPIRY_SECS,
        &format!(
            " seconds (at least 3 × cluster.nick_rewrite_secs ({rewrite}), so that two rewrites \
             may fail; at most 30, so a crashed node's nicks are free within 30 s)"
        ),
    )?;
    let silence = range(
        "cluster.member_silence_secs",
        raw.member_silence_secs,
        MIN_MEMBER_SILENCE_SECS,
        MAX_MEMBER_SILENCE_SECS,
        " seconds (at least two 2 s heartbeats; at most 10, so a dead node's members leave /who within 10 s)",
    )?;
    let load = range(
        "cluster.history_load_ms",
        raw.history_load_ms,
        100,
        30_000,
        " milliseconds a joining client waits at most for the room's history",
    )?;
    // The range checks above make the casts lossless.
    Ok(ClusterTimings {
        nick_expiry: Duration::from_secs(expiry as u64),
        nick_rewrite: Duration::from_secs(rewrite as u64),
        member_silence: Duration::from_secs(silence as u64),
        history_load: Duration::from_millis(load as u64),
    })
}

/// One of NATS's ways to authenticate a client (`[cluster]` allows one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    /// A `.creds` file (JWT and NKey seed), as `nsc` writes it.
    Creds(PathBuf),
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
}

/// TLS to NATS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    /// Trust these CAs (PEM) for the servers' certificates, besides the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify
    /// clients.
    pub client: Option<(PathBuf, PathBuf)>,
    /// Refuse a server that does not speak TLS (also when a URL is
    /// `tls://` or a file above is set).
    pub required: bool,
}

/// A password or token: never printed, even in debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a node does when NATS cannot be reached at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnreachable {
    /// Serve local users alone, and join the cluster once NATS answers.
    Local,
    /// Exit with an error.
    Refuse,
}

/// Letters, digits, '-' and '_': safe in a NATS subject token, a header
/// and a nick.
fn is_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[cluster]`; `None` when `nats_urls` is empty. `host_name` gives the
/// default `node_id`.
pub(super) fn validate_cluster(
    raw: &RawCluster,
    host_name: impl FnOnce() -> String,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let urls: Vec<String> = raw
        .nats_urls
        .iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let on_unreachable = match raw.on_unreachable.as_str() {
        "local" => OnUnreachable::Local,
        "refuse" => OnUnreachable::Refuse,
        other => {
            return Err(invalid(
                "cluster.on_unreachable",
                format!("{other:?}"),
                "\"local\" (serve local users alone) or \"refuse\" (exit)",
            ));
        }
    };
    if raw.name.is_empty() || raw.name.len() > 32 || !is_token(&raw.name) {
        return Err(invalid(
            "cluster.name",
            format!("{:?}", raw.name),
            "1 to 32 letters, digits, '-' or '_' (it prefixes NATS subjects)",
        ));
    }
    // Checked with cluster mode off too: a typo is caught before it is
    // turned on.
    let timings = validate_timings(raw)?;
    if urls.is_empty() {
        return Ok(None);
    }
    for url in &urls {
        let hostport = url
            .strip_prefix("nats://")
            .or_else(|| url.strip_prefix("tls://"))
            .unwrap_or(url);
        let ok = is_nats_url(url) && !hostport.is_empty() && !url.contains(char::is_whitespace);
        if !ok {
            return Err(invalid(
                "cluster.nats_urls",
                format!("{url:?}"),
                "NATS server URLs such as \"nats://127.0.0.1:4222\"; an empty list turns cluster mode off",
            ));
        }
    }
    let node_id = if raw.node_id.is_empty() {
        host_name()
    } else {
        raw.node_id.clone()
    };
    if node_id.is_empty() || node_id.len() > 63 || !is_token(&node_id) {
        let why = if raw.node_id.is_empty() {
            " (the host name, as no node_id is set)"
        } else {
            ""
        };
        return Err(invalid(
            "cluster.node_id",
            format!("{node_id:?}{why}"),
            "1 to 63 letters, digits, '-' or '_', unique in the cluster",
        ));
    }
    let (auth, tls) = validate_nats_security(raw)?;
    Ok(Some(ClusterConfig {
        nats_urls: urls,
        node_id,
        name: raw.name.clone(),
        on_unreachable,
        auth,
        tls,
        timings,
    }))
}

/// `cluster.creds_file`, `user`/`password`, `token` and `tls_*`. Every file
/// named must be readable now, so that a typo stops the start with the key's
/// name rather than surfacing as a failed connection later.
fn validate_nats_security(raw: &RawCluster) -> Result<(NatsAuth, NatsTls), ConfigError> {
    let file = |key: &'static str, value: &str| -> Result<Option<PathBuf>, ConfigError> {
        if value.is_empty() {
            return Ok(None);
        }
        let path = PathBuf::from(value);
        std::fs::File::open(&path).map_err(|source| ConfigError::File {
            key,
            path: path.clone(),
            source,
        })?;
        Ok(Some(path))
    };
    let one_way = "one of cluster.creds_file, cluster.user with cluster.password, or cluster.token";
    let ways = [
        !raw.creds_file.is_empty(),
        !raw.user.is_empty() || !raw.password.is_empty(),
        !raw.token.is_empty(),
    ];
    if ways.iter().filter(|set| **set).count() > 1 {
        return Err(invalid(
            "cluster.token",
            "several ways to authenticate set",
            one_way,
        ));
    }
    let auth = if let Some(path) = file("cluster.creds_file", &raw.creds_file)? {
        NatsAuth::Creds(path)
    } else if !raw.token.is_empty() {
        NatsAuth::Token(Secret(raw.token.clone()))
    } else if raw.user.is_empty() != raw.password.is_empty() {
        let key = if raw.user.is_empty() {
            "cluster.user"
        } else {
            "cluster.password"
        };
        return Err(invalid(
            key,
            "\"\"",
            "set together with the other, or neither",
        ));
    } else if !raw.user.is_empty() {
        NatsAuth::UserPassword {
            user: raw.user.clone(),
            password: Secret(raw.password.clone()),
        }
    } else {
        NatsAuth::None
    };
    let cert = file("cluster.tls_cert_file", &raw.tls_cert_file)?;
    let key = file("cluster.tls_key_file", &raw.tls_key_file)?;
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(invalid(
                "cluster.tls_cert_file",
                "\"\"",
                "set together with cluster.tls_key_file, or neither",
            ));
        }
        (Some(_), None) => {
            return Err(invalid(
                "cluster.tls_key_file",
                "\"\"",
                "set together with cluster.tls_cert_file, or neither",
            ));
        }
    };
    let tls = NatsTls {
        ca_file: file("cluster.tls_ca_file", &raw.tls_ca_file)?,
        client,
        required: raw.tls_required,
    };
    Ok((auth, tls))
}

/// What the NATS client accepts as a server address: a URL with the scheme
/// `nats`, `tls`, `ws` or `wss`, or `host:port` (read as `nats://host:port`).
/// Parsed with the same URL parser the client uses, so a URL that passes
/// here connects there.
fn is_nats_url(input: &str) -> bool {
    let parsed = if input.contains("://") {
        url::Url::parse(input)
    } else {
        url::Url::parse(&format!("nats://{input}"))
    };
    parsed.is_ok_and(|url| matches!(url.scheme(), "nats" | "tls" | "ws" | "wss"))
}
