//! Configuration: raw layers → one validated [`Config`].
//!
//! The layers are, lowest first: the built-in defaults (the `Default` impls
//! in `raw.rs`), a TOML file, and `CHATD_<SECTION>__<KEY>` environment variables.
//! The `config` crate merges them into [`RawConfig`], which mirrors the file
//! format exactly (unknown keys are rejected there). [`RawConfig::validate`]
//! then turns it into the typed [`Config`] the rest of the daemon trusts, and
//! every rejection names the key, the bad value and what is allowed.

mod admin;
mod chat;
mod cluster;
mod error;
mod limits;
mod listen;
mod observability;
mod raw;
mod server;
#[cfg(test)]
mod tests;
mod udp;

pub use admin::{AdminConfig, Role, TokenConfig};
pub use chat::ChatConfig;
pub use cluster::{ClusterConfig, ClusterTimings, NatsAuth, NatsTls, OnUnreachable, Secret};
pub use error::ConfigError;
pub use limits::{ConnectRate, FloodLimits, Limits};
pub use listen::TlsFiles;
pub use observability::{LogConfig, LogFormat, LogTarget, MetricsConfig, TelemetryConfig};
pub use raw::{
    RawAddrs, RawAdmin, RawChat, RawCluster, RawConfig, RawLimits, RawLog, RawMetrics, RawServer,
    RawTelemetry, RawToken, RawUdp,
};
pub use server::{ServerConfig, default_state_dir};
pub use udp::UdpConfig;

use std::path::{Path, PathBuf};

/// Where chatd looks for a config file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/chatd/chatd.toml";

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

/// Keys whose environment variable holds a space-separated list.
const LIST_KEYS: [&str; 6] = [
    "cluster.nats_urls",
    "chat.listen",
    "chat.tls_listen",
    "chat.trusted_proxies",
    "udp.listen",
    "admin.listen",
];

impl RawConfig {
    /// Checks every value and builds the typed [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let server = server::validate_server(&self.server)?;
        let chat = chat::validate_chat(&self.chat)?;
        let udp = udp::validate_udp(&self.udp)?;

        let admin = if self.admin.enabled {
            Some(admin::validate_admin(&self.admin)?)
        } else {
            None
        };

        let limits = limits::validate_limits(&self.limits)?;
        let log = observability::validate_log(&self.log)?;
        let telemetry = observability::validate_telemetry(&self.telemetry)?;
        let metrics = observability::validate_metrics(&self.metrics)?;

        let cluster = cluster::validate_cluster(&self.cluster, || {
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
