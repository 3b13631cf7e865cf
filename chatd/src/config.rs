//! Configuration: raw layers → one validated [`Config`].
//!
//! The layers are, lowest first: the built-in defaults (the `Default` impls
//! below), a TOML file, and `CHATD_<SECTION>__<KEY>` environment variables.
//! The `config` crate merges them into [`RawConfig`], which mirrors the file
//! format exactly (unknown keys are rejected there). [`RawConfig::validate`]
//! then turns it into the typed [`Config`] the rest of the daemon trusts, and
//! every rejection names the key, the bad value and what is allowed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol;

/// Where chatd looks for a config file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/chatd/chatd.toml";

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

/// Where the file layer comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--config PATH`: the file must exist.
    Explicit(PathBuf),
    /// No flag: [`DEFAULT_CONFIG_PATH`] if it exists, else defaults only.
    Default,
    /// `--no-config`: no file at all, whatever exists on this machine, so a
    /// run (a test, a one-off instance beside an installed one) depends only
    /// on the built-in defaults and the environment it was given.
    NoFile,
}

impl Source {
    /// The file that will be read, if any.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Source::Explicit(p) => Some(p.clone()),
            Source::Default => {
                let p = Path::new(DEFAULT_CONFIG_PATH);
                p.exists().then(|| p.to_path_buf())
            }
            Source::NoFile => None,
        }
    }
}

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
    pub upgrade_notice: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            name: "chatd".into(),
            motd: String::new(),
            shutdown_timeout_secs: 10,
            state_dir: String::new(),
            worker_threads: 0,
            upgrade_notice: String::new(),
        }
    }
}

/// A listen setting: one address, as before, or a list of them. `""` and
/// `[]` both mean none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawAddrs {
    One(String),
    Many(Vec<String>),
}

impl RawAddrs {
    fn items(&self) -> Vec<&str> {
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
            write_coalesce_ms: 5,
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
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub chat: ChatConfig,
    pub udp: Option<UdpConfig>,
    pub admin: Option<AdminConfig>,
    pub limits: Limits,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub metrics: MetricsConfig,
    /// `None`: cluster mode off, chatd never touches NATS.
    pub cluster: Option<ClusterConfig>,
    /// The merged raw layers, kept for `--print-config`.
    pub raw: RawConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    pub motd: String,
    pub shutdown_timeout: Duration,
    /// Where bans are kept; see [`default_state_dir`].
    pub state_dir: PathBuf,
    /// Runtime worker threads; `None`: one per CPU chatd may use.
    pub worker_threads: Option<usize>,
    /// The one line (after `*** `) a client handed over by a seamless
    /// upgrade reads; empty: none.
    pub upgrade_notice: String,
}

#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// At least one address.
    pub listen: Vec<SocketAddr>,
    /// The TLS listeners; empty: none.
    pub tls_listen: Vec<SocketAddr>,
    /// Required when `tls_listen` is set; re-read on every reload.
    pub tls: Option<TlsFiles>,
    /// Peers whose connections must begin with a PROXY protocol header.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub default_room: String,
    pub history: usize,
    pub backlog: u32,
    /// Shortest time between two writes to one client while lines keep
    /// coming; zero writes every line as soon as it is queued.
    pub write_coalesce: Duration,
}

#[derive(Debug, Clone)]
pub struct UdpConfig {
    pub listen: Vec<SocketAddr>,
    pub max_datagram_bytes: usize,
    pub rate_per_sec: u32,
    pub burst: u32,
}

/// The admin API. `None` in [`Config::admin`] when `admin.enabled` is false.
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Per-connection and server-wide limits. All of them can be changed at run
/// time, which is why connections read them from the hub on each use.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_clients: usize,
    pub max_clients_per_ip: usize,
    pub max_line_bytes: usize,
    pub max_overlong_lines: u32,
    /// `None` turns flood control off.
    pub flood: Option<FloodLimits>,
    /// No complete line for this long: disconnected.
    pub idle_timeout: Option<Duration>,
    /// In the middle of a line for this long: disconnected.
    pub partial_line_timeout: Option<Duration>,
    pub keepalive: Option<Duration>,
    /// The most a client may owe; see [`crate::outbox`] for the flow
    /// control below it.
    pub outbound_queue_bytes: usize,
    /// Owing bytes and reading none for this long: cut as a slow consumer.
    pub slow_consumer_timeout: Option<Duration>,
    pub room_notice_max: usize,
    /// How long a new connection may take to send its PROXY header and
    /// finish the TLS handshake.
    pub handshake_timeout: Duration,
    pub room_notices_per_sec: u32,
    /// New connections per second from one address; `None`: no limit.
    pub connect_rate: Option<ConnectRate>,
}

/// The per-address connection rate: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRate {
    pub per_sec: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct FloodLimits {
    pub lines_per_sec: u32,
    pub burst: u32,
    /// 0: never disconnect, only drop.
    pub max_dropped: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// The journal when stderr is connected to it (`JOURNAL_STREAM`), else
    /// stderr.
    Auto,
    Stderr,
    Journald,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub target: LogTarget,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector; `None` leaves it to
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, and tracing off when that is unset too.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Where Prometheus scrapes `/metrics`; `None`: off.
    pub listen: Option<SocketAddr>,
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// To send the request and read the answer.
    pub timeout: Duration,
}

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

impl Config {
    /// Reads every layer and validates the result.
    pub fn load(source: &Source) -> Result<Config, ConfigError> {
        Self::load_with_env(source, None)
    }

    /// Like [`Config::load`], with the environment layer taken from `env`
    /// instead of the process environment when given (tests use this).
    pub fn load_with_env(
        source: &Source,
        env: Option<Vec<(String, String)>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = source.path() {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            builder = builder
                .add_source(config::File::from_str(&text, config::FileFormat::Toml).required(true));
        }
        let mut env_source = config::Environment::with_prefix("CHATD")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            // Lists in the environment are separated by spaces.
            .list_separator(" ");
        for key in LIST_KEYS {
            env_source = env_source.with_list_parse_key(key);
        }
        if let Some(vars) = env {
            env_source = env_source.source(Some(vars.into_iter().collect()));
        }
        let merged = builder
            .add_source(env_source)
            .build()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let raw: RawConfig = merged
            .try_deserialize()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        raw.validate()
    }

    /// The effective configuration in the file format.
    /// The effective configuration in the file format, with token secrets
    /// replaced: the output is meant to be pasted into bug reports.
    pub fn to_toml(&self) -> String {
        let mut raw = self.raw.clone();
        for token in &mut raw.admin.tokens {
            token.token = "<redacted>".into();
        }
        for secret in [&mut raw.cluster.password, &mut raw.cluster.token] {
            if !secret.is_empty() {
                *secret = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&raw).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn invalid(
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

/// Keys whose environment variable holds a space-separated list.
const LIST_KEYS: [&str; 6] = [
    "cluster.nats_urls",
    "chat.listen",
    "chat.tls_listen",
    "chat.trusted_proxies",
    "udp.listen",
    "admin.listen",
];

/// Every address of a listen setting.
fn addrs(key: &'static str, value: &RawAddrs) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in value.items() {
        let a = addr(key, a.trim())?;
        if out.contains(&a) {
            return Err(invalid(key, a, "each address once"));
        }
        out.push(a);
    }
    Ok(out)
}

/// `10.0.0.0/8`, or a single address such as `192.0.2.1`.
fn nets(key: &'static str, values: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    values
        .iter()
        .map(|v| {
            let v = v.trim();
            v.parse::<ipnet::IpNet>()
                .or_else(|_| v.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    invalid(
                        key,
                        format!("{v:?}"),
                        "a CIDR such as \"10.0.0.0/8\" or \"fd00::/8\", or an address such as \"192.0.2.1\"",
                    )
                })
        })
        .collect()
}

/// Both files or neither.
fn tls_files(
    (cert_key, cert): (&'static str, &str),
    (key_key, key): (&'static str, &str),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some(TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })),
        (false, true) => Err(invalid(
            key_key,
            "\"\"",
            format!("the key file of {cert_key} (set both or neither)"),
        )),
        (true, false) => Err(invalid(
            cert_key,
            "\"\"",
            format!("the certificate file of {key_key} (set both or neither)"),
        )),
    }
}

fn addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?}"),
            "expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\" (port 0 picks a free port)",
        )
    })
}

/// Where bans are kept when `server.state_dir` is empty: `$STATE_DIRECTORY`
/// (systemd's `StateDirectory=`), else `/var/lib/chatd` for root, else
/// `$XDG_STATE_HOME/chatd`, else `~/.local/state/chatd`, else
/// `/tmp/chatd-state-<uid>` for a user without a home.
pub fn default_state_dir(
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    root: bool,
) -> PathBuf {
    let var = |name: &str| lookup(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = lookup("STATE_DIRECTORY").filter(|v| !v.is_empty()) {
        // systemd joins several StateDirectory= entries with colons.
        let dir = dir.to_string_lossy().into_owned();
        if let Some(first) = dir.split(':').find(|p| !p.is_empty()) {
            return PathBuf::from(first);
        }
    }
    if root {
        return PathBuf::from("/var/lib/chatd");
    }
    if let Some(dir) = var("XDG_STATE_HOME") {
        return dir.join("chatd");
    }
    if let Some(home) = var("HOME") {
        return home.join(".local/state/chatd");
    }
    PathBuf::from(format!(
        "/tmp/chatd-state-{}",
        rustix::process::getuid().as_raw()
    ))
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
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

fn validate_admin(raw: &RawAdmin) -> Result<AdminConfig, ConfigError> {
    let listen = addrs("admin.listen", &raw.listen)?;
    let socket = (!raw.socket.is_empty()).then(|| PathBuf::from(&raw.socket));
    if listen.is_empty() && socket.is_none() {
        return Err(invalid(
            "admin.listen",
            "\"\"",
            "an IP:PORT, or set admin.socket, or turn the API off with admin.enabled = false",
        ));
    }
    let mut tokens = Vec::with_capacity(raw.tokens.len() + 1);
    for t in &raw.tokens {
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
        if tokens.iter().any(|c: &TokenConfig| c.name == t.name) {
            return Err(invalid(
                "admin.tokens.name",
                format!("{:?}", t.name),
                "each token needs a name of its own",
            ));
        }
        tokens.push(TokenConfig {
            name: t.name.clone(),
            secret: t.token.clone(),
            role,
        });
    }
    if !raw.token_file.is_empty() {
        let path = PathBuf::from(&raw.token_file);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::TokenFile { path, source })?;
        let secret = text.lines().next().unwrap_or_default().trim().to_string();
        validate_token("admin.token_file", &secret)?;
        tokens.push(TokenConfig {
            name: "token_file".into(),
            secret,
            role: Role::Admin,
        });
    }
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

fn range(
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

fn secs(key: &'static str, value: i64, max: i64) -> Result<Option<Duration>, ConfigError> {
    let v = range(key, value, 0, max, " seconds, 0 turns it off")?;
    // The range check above makes the cast lossless.
    Ok((v > 0).then(|| Duration::from_secs(v as u64)))
}

/// Letters, digits, '-' and '_': safe in a NATS subject token, a header
/// and a nick.
fn is_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[cluster]`; `None` when `nats_urls` is empty. `host_name` gives the
/// default `node_id`.
fn validate_cluster(
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
    if urls.is_empty() {
        return Ok(None);
    }
    for url in &urls {
        let hostport = url
            .strip_prefix("nats://")
            .or_else(|| url.strip_prefix("tls://"))
            .unwrap_or(url);
        let ok = url.parse::<async_nats::ServerAddr>().is_ok()
            && !hostport.is_empty()
            && !url.contains(char::is_whitespace);
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

impl RawConfig {
    /// Checks every value and builds the typed [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        // Every `as` cast below follows a `range` check that bounds the value
        // to the target type, so none truncates.
        let s = &self.server;
        if s.name.is_empty() || s.name.len() > 64 || s.name.chars().any(char::is_control) {
            return Err(invalid(
                "server.name",
                format!("{:?}", s.name),
                "1 to 64 characters, no control characters",
            ));
        }
        let server = ServerConfig {
            name: s.name.clone(),
            motd: s.motd.clone(),
            shutdown_timeout: Duration::from_secs(range(
                "server.shutdown_timeout_secs",
                s.shutdown_timeout_secs,
                0,
                3600,
                " seconds",
            )? as u64),
            state_dir: if s.state_dir.is_empty() {
                default_state_dir(|name| std::env::var_os(name), is_root())
            } else {
                PathBuf::from(&s.state_dir)
            },
            worker_threads: match range(
                "server.worker_threads",
                s.worker_threads,
                0,
                1024,
                ", 0 for one per CPU",
            )? {
                0 => None,
                n => Some(n as usize),
            },
            upgrade_notice: if s.upgrade_notice.len() > 400
                || s.upgrade_notice.chars().any(char::is_control)
            {
                return Err(invalid(
                    "server.upgrade_notice",
                    format!("{:?}", s.upgrade_notice),
                    "at most 400 bytes on one line, no control characters",
                ));
            } else {
                s.upgrade_notice.clone()
            },
        };

        let c = &self.chat;
        let default_room = protocol::normalize_room(&c.default_room).map_err(|why| {
            invalid(
                "chat.default_room",
                format!("{:?}", c.default_room),
                why.to_string(),
            )
        })?;
        let listen = addrs("chat.listen", &c.listen)?;
        if listen.is_empty() {
            return Err(invalid(
                "chat.listen",
                "[]",
                "at least one IP:PORT, e.g. \"0.0.0.0:8080\" or [\"0.0.0.0:8080\", \"[::]:8080\"]",
            ));
        }
        let tls_listen = addrs("chat.tls_listen", &c.tls_listen)?;
        let tls = tls_files(("chat.tls_cert", &c.tls_cert), ("chat.tls_key", &c.tls_key))?;
        if !tls_listen.is_empty() && tls.is_none() {
            return Err(invalid(
                "chat.tls_cert",
                "\"\"",
                "a PEM certificate file (and chat.tls_key), required when chat.tls_listen is set",
            ));
        }
        let chat = ChatConfig {
            listen,
            tls_listen,
            tls,
            trusted_proxies: nets("chat.trusted_proxies", &c.trusted_proxies)?,
            default_room,
            history: range("chat.history", c.history, 0, 1000, " lines")? as usize,
            backlog: range("chat.backlog", c.backlog, 1, 65535, "")? as u32,
            write_coalesce: Duration::from_millis(range(
                "chat.write_coalesce_ms",
                c.write_coalesce_ms,
                0,
                100,
                " milliseconds, 0 turns it off",
            )? as u64),
        };

        let u = &self.udp;
        let udp = if u.enabled {
            let listen = addrs("udp.listen", &u.listen)?;
            if listen.is_empty() {
                return Err(invalid(
                    "udp.listen",
                    "[]",
                    "at least one IP:PORT, or turn UDP echo off with udp.enabled = false",
                ));
            }
            Some(UdpConfig {
                listen,
                max_datagram_bytes: range(
                    "udp.max_datagram_bytes",
                    u.max_datagram_bytes,
                    1,
                    65507,
                    " bytes",
                )? as usize,
                rate_per_sec: range(
                    "udp.rate_per_sec",
                    u.rate_per_sec,
                    1,
                    1_000_000,
                    " datagrams per second per source address",
                )? as u32,
                burst: range("udp.burst", u.burst, 1, 1_000_000, " datagrams")? as u32,
            })
        } else {
            None
        };

        let admin = if self.admin.enabled {
            Some(validate_admin(&self.admin)?)
        } else {
            None
        };

        let l = &self.limits;
        let flood_rate = range(
            "limits.flood_lines_per_sec",
            l.flood_lines_per_sec,
            0,
            1_000_000,
            " lines per second, 0 turns flood control off",
        )? as u32;
        let flood_burst =
            range("limits.flood_burst", l.flood_burst, 1, 1_000_000, " lines")? as u32;
        let flood_max_dropped = range(
            "limits.flood_max_dropped",
            l.flood_max_dropped,
            0,
            1_000_000,
            " lines, 0 never disconnects",
        )? as u32;
        let connect_rate = range(
            "limits.connect_rate_per_ip",
            l.connect_rate_per_ip,
            0,
            1_000_000,
            " connections per second per address, 0 turns the limit off",
        )? as u32;
        let connect_burst = range(
            "limits.connect_burst_per_ip",
            l.connect_burst_per_ip,
            1,
            1_000_000,
            " connections",
        )? as u32;
        let limits = Limits {
            max_clients: range(
                "limits.max_clients",
                l.max_clients,
                1,
                1_000_000,
                " clients",
            )? as usize,
            max_clients_per_ip: range(
                "limits.max_clients_per_ip",
                l.max_clients_per_ip,
                1,
                1_000_000,
                " clients",
            )? as usize,
            max_line_bytes: range(
                "limits.max_line_bytes",
                l.max_line_bytes,
                64,
                65536,
                " bytes",
            )? as usize,
            max_overlong_lines: range(
                "limits.max_overlong_lines",
                l.max_overlong_lines,
                1,
                1_000_000,
                " lines",
            )? as u32,
            flood: (flood_rate > 0).then_some(FloodLimits {
                lines_per_sec: flood_rate,
                burst: flood_burst,
                max_dropped: flood_max_dropped,
            }),
            idle_timeout: secs(
                "limits.idle_timeout_secs",
                l.idle_timeout_secs,
                30 * 24 * 3600,
            )?,
            partial_line_timeout: secs(
                "limits.partial_line_timeout_secs",
                l.partial_line_timeout_secs,
                24 * 3600,
            )?,
            keepalive: secs("limits.keepalive_secs", l.keepalive_secs, 24 * 3600)?,
            slow_consumer_timeout: secs(
                "limits.slow_consumer_secs",
                l.slow_consumer_secs,
                24 * 3600,
            )?,
            room_notices_per_sec: range(
                "limits.room_notices_per_sec",
                l.room_notices_per_sec,
                1,
                1_000_000,
                " notices per second per room",
            )? as u32,
            connect_rate: (connect_rate > 0).then_some(ConnectRate {
                per_sec: connect_rate,
                burst: connect_burst,
            }),
            outbound_queue_bytes: range(
                "limits.outbound_queue_bytes",
                l.outbound_queue_bytes,
                4096,
                1 << 30,
                " bytes",
            )? as usize,
            room_notice_max: range(
                "limits.room_notice_max",
                l.room_notice_max,
                0,
                10_000_000,
                " members, 0 never sends join/leave notices",
            )? as usize,
            handshake_timeout: Duration::from_secs(range(
                "limits.handshake_timeout_secs",
                l.handshake_timeout_secs,
                1,
                300,
                " seconds",
            )? as u64),
        };

        let g = &self.log;
        if let Err(e) = crate::telemetry::check_level(&g.level) {
            return Err(invalid(
                "log.level",
                format!("{:?}", g.level),
                format!(
                    "a level (off, error, warn, info, debug, trace) or a filter like \"info,chatd=debug\" ({e})"
                ),
            ));
        }
        let format = match g.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?}"),
                    "\"text\" or \"json\"",
                ));
            }
        };
        let target = match g.target.as_str() {
            "auto" => LogTarget::Auto,
            "stderr" => LogTarget::Stderr,
            "journald" => LogTarget::Journald,
            other => {
                return Err(invalid(
                    "log.target",
                    format!("{other:?}"),
                    "\"auto\", \"stderr\" or \"journald\"",
                ));
            }
        };
        let log = LogConfig {
            level: g.level.clone(),
            format,
            target,
        };

        let endpoint = self.telemetry.otlp_endpoint.trim();
        let is_url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !endpoint.is_empty() && !is_url {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("{endpoint:?}"),
                "empty (off) or an OTLP/gRPC URL like \"http://127.0.0.1:4317\"",
            ));
        }
        let telemetry = TelemetryConfig {
            otlp_endpoint: (!endpoint.is_empty()).then(|| endpoint.to_string()),
        };

        let m = self.metrics.listen.trim();
        let metrics = MetricsConfig {
            listen: if m.is_empty() {
                None
            } else {
                Some(addr("metrics.listen", m)?)
            },
            max_connections: range(
                "metrics.max_connections",
                self.metrics.max_connections,
                1,
                65536,
                "",
            )? as usize,
            timeout: Duration::from_secs(range(
                "metrics.timeout_secs",
                self.metrics.timeout_secs,
                1,
                3600,
                " seconds",
            )? as u64),
        };

        let cluster = validate_cluster(&self.cluster, || {
            rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned()
        })?;

        Ok(Config {
            server,
            chat,
            udp,
            admin,
            limits,
            log,
            telemetry,
            metrics,
            cluster,
            raw: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Never the machine's /etc/chatd/chatd.toml: these tests must not
        // depend on what is installed.
        Config::load_with_env(&Source::NoFile, Some(env))
    }

    #[test]
    fn defaults_are_valid() {
        let c = RawConfig::default().validate().expect("defaults validate");
        assert_eq!(c.chat.listen.len(), 1);
        assert_eq!(c.chat.listen[0].port(), 8080);
        assert!(c.chat.tls_listen.is_empty() && c.chat.trusted_proxies.is_empty());
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.chat.default_room, "lobby");
        assert!(c.limits.flood.is_some());
    }

    #[test]
    fn cluster_is_off_by_default_and_validated() {
        let c = RawConfig::default().validate().expect("defaults validate");
        assert!(c.cluster.is_none(), "no nats_urls: cluster mode off");
        let c = with_env(&[
            (
                "CHATD_CLUSTER__NATS_URLS",
                "nats://127.0.0.1:4222 127.0.0.1:4223",
            ),
            ("CHATD_CLUSTER__NODE_ID", "node-a"),
            ("CHATD_CLUSTER__ON_UNREACHABLE", "refuse"),
        ])
        .expect("valid");
        let cluster = c.cluster.expect("cluster mode on");
        assert_eq!(cluster.nats_urls.len(), 2);
        assert_eq!(cluster.node_id, "node-a");
        assert_eq!(cluster.name, "chatd");
        assert_eq!(cluster.on_unreachable, OnUnreachable::Refuse);

        let err = with_env(&[
            ("CHATD_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222"),
            ("CHATD_CLUSTER__ON_UNREACHABLE", "wait"),
        ])
        .expect_err("unknown mode");
        let text = err.to_string();
        assert!(
            text.contains("cluster.on_unreachable")
                && text.contains("\"wait\"")
                && text.contains("\"refuse\""),
            "{text}"
        );
        let err = with_env(&[
            ("CHATD_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222"),
            ("CHATD_CLUSTER__NODE_ID", "a.b"),
        ])
        .expect_err("a dot would split the subject");
        assert!(err.to_string().contains("cluster.node_id"), "{err}");
        let err = with_env(&[("CHATD_CLUSTER__NAME", "chat.d")]).expect_err("bad prefix");
        assert!(err.to_string().contains("cluster.name"), "{err}");
    }

    #[test]
    fn cluster_node_id_defaults_to_the_host_name() {
        let raw = RawCluster {
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            ..RawCluster::default()
        };
        let c = validate_cluster(&raw, || "web-1".into())
            .expect("valid")
            .expect("on");
        assert_eq!(c.node_id, "web-1");
        let err = validate_cluster(&raw, || "web.example.org".into()).expect_err("dots");
        assert!(err.to_string().contains("the host name"), "{err}");
    }

    #[test]
    fn nats_credentials_and_tls_are_checked_at_start() {
        let on = |raw: RawCluster| {
            validate_cluster(
                &RawCluster {
                    nats_urls: vec!["nats://127.0.0.1:4222".into()],
                    ..raw
                },
                || "web-1".into(),
            )
        };
        let c = on(RawCluster::default()).expect("valid").expect("on");
        assert_eq!((c.auth, c.tls), (NatsAuth::None, NatsTls::default()));
        let c = on(RawCluster {
            user: "chatd".into(),
            password: "s3cret".into(),
            ..RawCluster::default()
        })
        .expect("valid")
        .expect("on");
        assert!(matches!(c.auth, NatsAuth::UserPassword { ref user, .. } if user == "chatd"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "debug output hides it"
        );
        let err = on(RawCluster {
            user: "chatd".into(),
            ..RawCluster::default()
        })
        .expect_err("a user alone");
        assert!(err.to_string().contains("cluster.password"), "{err}");
        let err = on(RawCluster {
            user: "chatd".into(),
            password: "p".into(),
            token: "t".into(),
            ..RawCluster::default()
        })
        .expect_err("two ways");
        assert!(
            err.to_string().contains("one of cluster.creds_file"),
            "{err}"
        );
        // A file that cannot be read stops the start, naming its key.
        for key in ["creds_file", "tls_ca_file", "tls_cert_file"] {
            let mut raw = RawCluster::default();
            let missing = "/nonexistent/chatd-test.pem".to_string();
            match key {
                "creds_file" => raw.creds_file = missing,
                "tls_ca_file" => raw.tls_ca_file = missing,
                _ => {
                    raw.tls_cert_file = missing.clone();
                    raw.tls_key_file = missing;
                }
            }
            let err = on(raw).expect_err("missing file");
            assert!(
                err.to_string()
                    .starts_with(&format!("cannot read `cluster.{key}`")),
                "{err}"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = dir.path().join("cert.pem");
        std::fs::write(&pem, "").expect("write");
        let err = on(RawCluster {
            tls_cert_file: pem.display().to_string(),
            ..RawCluster::default()
        })
        .expect_err("a certificate without its key");
        assert!(err.to_string().contains("cluster.tls_key_file"), "{err}");
    }

    #[test]
    fn printed_config_hides_nats_secrets() {
        let c = with_env(&[
            ("CHATD_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222"),
            ("CHATD_CLUSTER__TOKEN", "t0ps3cret"),
        ])
        .expect("valid");
        assert_eq!(
            c.cluster.as_ref().map(|c| &c.auth),
            Some(&NatsAuth::Token(Secret("t0ps3cret".into())))
        );
        let printed = c.to_toml();
        assert!(!printed.contains("t0ps3cret"), "{printed}");
        assert!(printed.contains("token = \"<redacted>\""), "{printed}");
    }

    #[test]
    fn env_overrides_split_on_double_underscore() {
        let c = with_env(&[
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
            ("CHATD_LIMITS__MAX_LINE_BYTES", "200"),
        ])
        .expect("valid");
        assert_eq!(c.chat.listen, ["127.0.0.1:0".parse().expect("addr")]);
        assert_eq!(c.limits.max_line_bytes, 200);
    }

    #[test]
    fn bad_values_name_key_value_and_range() {
        let e = with_env(&[("CHATD_LIMITS__MAX_LINE_BYTES", "-5")])
            .expect_err("rejected")
            .to_string();
        assert!(
            e.contains("limits.max_line_bytes") && e.contains("-5") && e.contains("64..=65536"),
            "{e}"
        );
        let e = with_env(&[("CHATD_CHAT__LISTEN", "nowhere")])
            .expect_err("rejected")
            .to_string();
        assert!(
            e.contains("chat.listen") && e.contains("nowhere") && e.contains("IP:PORT"),
            "{e}"
        );
    }

    #[test]
    fn listen_takes_one_address_or_a_list() {
        let c = admin("[chat]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\n").expect("valid");
        assert_eq!(c.chat.listen.len(), 2);
        assert!(c.chat.listen[1].is_ipv6());
        let c = with_env(&[
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0 [::1]:0"),
            ("CHATD_UDP__LISTEN", "[::1]:0"),
            ("CHATD_ADMIN__LISTEN", "127.0.0.1:0 [::1]:0"),
        ])
        .expect("valid");
        assert_eq!(c.chat.listen.len(), 2);
        assert_eq!(c.udp.expect("on").listen.len(), 1);
        assert_eq!(c.admin.expect("on").listen.len(), 2);
        let e = admin("[chat]\nlisten = []\n")
            .expect_err("none")
            .to_string();
        assert!(
            e.contains("chat.listen") && e.contains("at least one"),
            "{e}"
        );
        let e = admin("[admin]\nlisten = [\"127.0.0.1:50051\", \"[::]:50051\"]\n")
            .expect_err("public without token")
            .to_string();
        assert!(
            e.contains("[::]:50051") && e.contains("admin.tokens"),
            "{e}"
        );
    }

    #[test]
    fn tls_listen_needs_a_certificate_and_proxies_are_cidrs() {
        let e = admin("[chat]\ntls_listen = \"127.0.0.1:0\"\n")
            .expect_err("no cert")
            .to_string();
        assert!(
            e.contains("chat.tls_cert") && e.contains("chat.tls_listen"),
            "{e}"
        );
        let e = admin("[chat]\ntls_cert = \"/x.pem\"\n")
            .expect_err("cert without key")
            .to_string();
        assert!(e.contains("chat.tls_key"), "{e}");
        let c = admin("[chat]\ntrusted_proxies = [\"10.1.2.3/8\", \"192.0.2.1\", \"fd00::/8\"]\n")
            .expect("valid");
        let nets: Vec<String> = c
            .chat
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]);
        let e = admin("[chat]\ntrusted_proxies = [\"haproxy\"]\n")
            .expect_err("not a CIDR")
            .to_string();
        assert!(
            e.contains("chat.trusted_proxies") && e.contains("\"haproxy\""),
            "{e}"
        );
        let e = with_env(&[("CHATD_LIMITS__HANDSHAKE_TIMEOUT_SECS", "0")])
            .expect_err("zero")
            .to_string();
        assert!(
            e.contains("limits.handshake_timeout_secs") && e.contains("1..=300"),
            "{e}"
        );
    }

    #[test]
    fn worker_threads_default_to_one_per_cpu_and_are_bounded() {
        let c = RawConfig::default().validate().expect("defaults validate");
        assert_eq!(c.server.worker_threads, None);
        let c = with_env(&[("CHATD_SERVER__WORKER_THREADS", "1")]).expect("1 is fine");
        assert_eq!(c.server.worker_threads, Some(1));
        let e = with_env(&[("CHATD_SERVER__WORKER_THREADS", "-1")])
            .expect_err("rejected")
            .to_string();
        assert!(
            e.contains("server.worker_threads") && e.contains("-1") && e.contains("0..=1024"),
            "{e}"
        );
    }

    #[test]
    fn write_coalescing_is_in_milliseconds_and_bounded() {
        let c = RawConfig::default().validate().expect("defaults validate");
        assert_eq!(c.chat.write_coalesce, Duration::from_millis(5));
        let c = with_env(&[("CHATD_CHAT__WRITE_COALESCE_MS", "0")]).expect("0 turns it off");
        assert!(c.chat.write_coalesce.is_zero());
        let e = with_env(&[("CHATD_CHAT__WRITE_COALESCE_MS", "101")])
            .expect_err("rejected")
            .to_string();
        assert!(
            e.contains("chat.write_coalesce_ms") && e.contains("101") && e.contains("0..=100"),
            "{e}"
        );
    }

    fn admin(toml_text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(toml_text).expect("valid TOML");
        raw.validate()
    }

    #[test]
    fn admin_tokens_roles_and_tls_are_checked() {
        let c = admin(
            "[admin]\ntokens = [{ name = \"ops\", token = \"0123456789abcdef\" }, { name = \"mon\", token = \"fedcba9876543210\", role = \"read\" }]\n",
        )
        .expect("valid");
        let a = c.admin.expect("enabled by default");
        assert_eq!(a.tokens.len(), 2);
        assert_eq!(a.tokens[0].role, Role::Admin);
        assert_eq!(a.tokens[1].role, Role::Read);
        assert!(!format!("{:?}", a.tokens).contains("0123456789abcdef"));

        let e = admin("[admin]\ntokens = [{ name = \"ops\", token = \"short\" }]\n")
            .expect_err("too short")
            .to_string();
        assert!(
            e.contains("admin.tokens.token") && !e.contains("short"),
            "{e}"
        );
        let e = admin(
            "[admin]\ntokens = [{ name = \"ops\", token = \"0123456789abcdef\", role = \"root\" }]\n",
        )
        .expect_err("bad role")
        .to_string();
        assert!(
            e.contains("admin.tokens.role") && e.contains("\"read\""),
            "{e}"
        );
        let e = admin("[admin]\ntls_cert = \"/etc/chatd/admin.crt\"\n")
            .expect_err("cert without key")
            .to_string();
        assert!(e.contains("admin.tls_key"), "{e}");
        assert!(
            admin("[admin]\nenabled = false\nlisten = \"\"\n")
                .expect("valid")
                .admin
                .is_none()
        );
    }

    #[test]
    fn a_public_admin_address_needs_a_token() {
        let e = admin("[admin]\nlisten = \"0.0.0.0:50051\"\n")
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("0.0.0.0:50051") && e.contains("admin.tokens"),
            "{e}"
        );
        admin("[admin]\nlisten = \"0.0.0.0:50051\"\ntokens = [{ name = \"ops\", token = \"0123456789abcdef\" }]\n")
            .expect("a token makes it acceptable");
        admin("[admin]\nlisten = \"[::1]:50051\"\n").expect("loopback needs none");
    }

    #[test]
    fn the_state_dir_follows_systemd_root_and_xdg() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(
            default_state_dir(env(&[("STATE_DIRECTORY", "/var/lib/x:/var/lib/y")]), true),
            PathBuf::from("/var/lib/x")
        );
        assert_eq!(
            default_state_dir(env(&[("HOME", "/home/u")]), true),
            PathBuf::from("/var/lib/chatd")
        );
        assert_eq!(
            default_state_dir(env(&[("XDG_STATE_HOME", "/s"), ("HOME", "/home/u")]), false),
            PathBuf::from("/s/chatd")
        );
        assert_eq!(
            default_state_dir(env(&[("HOME", "/home/u")]), false),
            PathBuf::from("/home/u/.local/state/chatd")
        );
    }

    #[test]
    fn operations_keys_validate() {
        let c = with_env(&[
            ("CHATD_LOG__TARGET", "journald"),
            ("CHATD_TELEMETRY__OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("CHATD_METRICS__LISTEN", "127.0.0.1:9100"),
        ])
        .expect("valid");
        assert_eq!(c.log.target, LogTarget::Journald);
        assert_eq!(
            c.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(c.metrics.listen.map(|a| a.port()), Some(9100));
        let d = with_env(&[]).expect("defaults");
        assert_eq!(d.log.target, LogTarget::Auto);
        assert!(d.telemetry.otlp_endpoint.is_none() && d.metrics.listen.is_none());

        for (key, value, needle) in [
            ("CHATD_LOG__TARGET", "syslog", "log.target"),
            (
                "CHATD_TELEMETRY__OTLP_ENDPOINT",
                "collector:4317",
                "telemetry.otlp_endpoint",
            ),
            ("CHATD_METRICS__LISTEN", "localhost:9100", "metrics.listen"),
        ] {
            let e = with_env(&[(key, value)]).expect_err("rejected").to_string();
            assert!(e.contains(needle) && e.contains(value), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = with_env(&[("CHATD_LIMITS__MAX_LINES", "5")])
            .expect_err("rejected")
            .to_string();
        assert!(e.contains("max_lines"), "{e}");
    }
}
