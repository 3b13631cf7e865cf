//! The file format as read: the `Raw*` structs mirror the TOML sections
//! exactly, and their `Default` impls are the built-in defaults layer.

use serde::{Deserialize, Serialize};

/// The file format, section by section. Numbers are read as `i64` so that a
/// negative or huge value reaches [`RawConfig::validate`] and gets a message
/// naming its allowed range instead of a generic type error.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    pub chat: RawChat,
    pub udp: RawUdp,
    pub admin: RawAdmin,
    pub limits: RawLimits,
    pub log: RawLog,
    pub telemetry: RawTelemetry,
    pub metrics: RawMetrics,
    pub cluster: RawCluster,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServer {
    pub name: String,
    pub motd: String,
    pub shutdown_timeout_secs: i64,
    pub state_dir: String,
    pub worker_threads: i64,
    pub client_threads: i64,
    pub upgrade_notice: String,
    pub upgrade_timeout_secs: i64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            name: "chatd".into(),
            motd: String::new(),
            shutdown_timeout_secs: 10,
            state_dir: String::new(),
            worker_threads: 0,
            client_threads: 1,
            upgrade_notice: String::new(),
            upgrade_timeout_secs: 30,
        }
    }
}

/// A listen setting: one address or a list of them. `""` and
/// `[]` both mean none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawAddrs {
    One(String),
    Many(Vec<String>),
}

impl RawAddrs {
    pub(super) fn items(&self) -> Vec<&str> {
        match self {
            RawAddrs::One(a) if a.trim().is_empty() => Vec::new(),
            RawAddrs::One(a) => vec![a.as_str()],
            RawAddrs::Many(list) => list
                .iter()
                .map(String::as_str)
                .filter(|a| !a.trim().is_empty())
                .collect(),
        }
    }
}

impl Default for RawAddrs {
    fn default() -> Self {
        RawAddrs::Many(Vec::new())
    }
}

impl From<&str> for RawAddrs {
    fn from(a: &str) -> Self {
        RawAddrs::One(a.to_string())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawChat {
    pub listen: RawAddrs,
    pub tls_listen: RawAddrs,
    pub tls_cert: String,
    pub tls_key: String,
    pub trusted_proxies: Vec<String>,
    pub default_room: String,
    pub history: i64,
    pub backlog: i64,
    pub write_coalesce_ms: i64,
}

impl Default for RawChat {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            tls_listen: RawAddrs::default(),
            tls_cert: String::new(),
            tls_key: String::new(),
            trusted_proxies: Vec::new(),
            default_room: "lobby".into(),
            history: 20,
            backlog: 4096,
            write_coalesce_ms: 9,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUdp {
    pub enabled: bool,
    pub listen: RawAddrs,
    pub max_datagram_bytes: i64,
    pub rate_per_sec: i64,
    pub burst: i64,
}

impl Default for RawUdp {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:8080".into(),
            max_datagram_bytes: 1024,
            rate_per_sec: 10,
            burst: 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAdmin {
    pub enabled: bool,
    pub listen: RawAddrs,
    pub socket: String,
    pub tokens: Vec<RawToken>,
    pub token_file: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub max_connections: i64,
    pub handshake_timeout_secs: i64,
    pub idle_timeout_secs: i64,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:50051".into(),
            socket: String::new(),
            tokens: Vec::new(),
            token_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            max_connections: 64,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 300,
        }
    }
}

/// One entry of `admin.tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawToken {
    pub name: String,
    pub token: String,
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    pub max_clients: i64,
    pub max_clients_per_ip: i64,
    pub max_line_bytes: i64,
    pub max_overlong_lines: i64,
    pub flood_lines_per_sec: i64,
    pub flood_burst: i64,
    pub flood_max_dropped: i64,
    pub idle_timeout_secs: i64,
    pub partial_line_timeout_secs: i64,
    pub keepalive_secs: i64,
    pub outbound_queue_bytes: i64,
    pub slow_consumer_secs: i64,
    pub room_notice_max: i64,
    pub room_notices_per_sec: i64,
    pub connect_rate_per_ip: i64,
    pub connect_burst_per_ip: i64,
    pub handshake_timeout_secs: i64,
    pub ipv6_prefix_len: i64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_clients: 10_000,
            max_clients_per_ip: 32,
            max_line_bytes: 1024,
            max_overlong_lines: 5,
            flood_lines_per_sec: 10,
            flood_burst: 20,
            flood_max_dropped: 100,
            idle_timeout_secs: 3600,
            partial_line_timeout_secs: 30,
            keepalive_secs: 60,
            outbound_queue_bytes: 1024 * 1024,
            slow_consumer_secs: 30,
            room_notice_max: 500,
            room_notices_per_sec: 10,
            connect_rate_per_ip: 10,
            connect_burst_per_ip: 20,
            handshake_timeout_secs: 10,
            ipv6_prefix_len: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    pub level: String,
    pub format: String,
    pub target: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
            target: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: String,
    pub max_connections: i64,
    pub timeout_secs: i64,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: String::new(),
            max_connections: 16,
            timeout_secs: 5,
        }
    }
}

/// `[cluster]`: several nodes acting as one chat service through NATS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCluster {
    pub nats_urls: Vec<String>,
    pub node_id: String,
    pub name: String,
    pub on_unreachable: String,
    pub creds_file: String,
    pub user: String,
    pub password: String,
    pub token: String,
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub tls_required: bool,
    pub nick_expiry_secs: i64,
    pub nick_rewrite_secs: i64,
    pub member_silence_secs: i64,
    pub history_load_ms: i64,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            nats_urls: Vec::new(),
            node_id: String::new(),
            name: "chatd".into(),
            on_unreachable: "local".into(),
            creds_file: String::new(),
            user: String::new(),
            password: String::new(),
            token: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_required: false,
            nick_expiry_secs: 20,
            nick_rewrite_secs: 5,
            member_silence_secs: 6,
            history_load_ms: 2000,
        }
    }
}
