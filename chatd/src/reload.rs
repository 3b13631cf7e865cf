//! Reloading the configuration while running: the admin API's `Reload` and
//! SIGHUP.
//!
//! The file the daemon started with is read again (with the environment
//! layer) and validated; a bad file changes nothing. Settings that the
//! running daemon reads on each use (limits, MOTD, server name, history, UDP
//! rates, log level, the state directory and its bans file, trusted
//! proxies) apply at once. The TLS certificate and key are read again every
//! time, even from unchanged paths, and serve new connections; a bad one
//! refuses the whole reload.
//! The others (listen addresses, the admin API, log format, shutdown timeout,
//! `[cluster]`)
//! are reported as needing a restart, and the running values stay in force.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::telemetry::LogLevel;
use crate::tls::{self, Certs, TlsError};
use chatd_admin::control::{CertReport, ReloadReport};
use chatd_config::{Config, ConfigError, RawConfig, Source, UdpConfig};
use chatd_hub::bans::BanError;
use chatd_hub::hub::Hub;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bans(#[from] BanError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Re-reads the configuration; clone it freely.
#[derive(Debug, Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    source: Source,
    hub: Hub,
    log: Option<LogLevel>,
    /// The chat listener's certificate, re-read on every reload.
    certs: Certs,
    /// The configuration the daemon started with: what restart-only keys
    /// are compared against. The lock also serialises reloads.
    started: Mutex<RawConfig>,
}

impl Reloader {
    pub fn new(source: Source, hub: Hub, log: Option<LogLevel>, certs: Certs) -> Reloader {
        let started = hub.config().raw.clone();
        Reloader {
            inner: Arc::new(Inner {
                source,
                hub,
                log,
                certs,
                started: Mutex::new(started),
            }),
        }
    }

    /// Reads, validates and applies. Blocks on file I/O: call it from a
    /// blocking task.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let inner = &*self.inner;
        let started = chatd_hub::lock::lock(&inner.started);
        let new = Config::load(&inner.source)?;
        // Read even when the paths are unchanged: renewed certificates
        // are usually written over the old files. A bad one changes nothing.
        let certs = new.chat.tls.as_ref().map(tls::load).transpose()?;
        let old = inner.hub.config();
        inner.hub.reload_bans(&new.server.state_dir)?;
        let mut applied = Vec::new();
        for key in changed(&old.raw, &new.raw) {
            if !reloadable(&key) {
                continue;
            }
            if key == "log.level" && !inner.log.as_ref().is_some_and(|l| l.set(&new.log.level)) {
                // RUST_LOG pins the filter; nothing changed.
                continue;
            }
            applied.push(key);
        }
        let restart_required = changed(&started, &new.raw)
            .into_iter()
            .filter(|k| !reloadable(k))
            .collect();
        inner.hub.set_config(keep_running_values(&old, new));
        let certificate = certs.map(|loaded| self.swap_certificate(loaded));
        if certificate.as_ref().is_some_and(|c| c.changed)
            && !applied.iter().any(|k| k == "chat.tls_cert")
        {
            applied.push("chat.tls_cert".to_string());
        }
        Ok(ReloadReport {
            config_path: inner
                .source
                .path()
                .map_or("built-in defaults".to_string(), |p| p.display().to_string()),
            applied,
            restart_required,
            certificate,
        })
    }

    /// Serves `loaded` to new connections from now on, and says (and logs)
    /// whether it differs from the one it replaces.
    fn swap_certificate(&self, loaded: tls::Loaded) -> CertReport {
        let about = loaded.about.clone();
        let changed = self.inner.certs.about().is_none_or(|old| !old.same(&about));
        self.inner.certs.set(loaded);
        let report = CertReport {
            expires: about.expires(),
            subject: about.subject,
            not_after: about.not_after,
            serial: about.serial,
            changed,
        };
        if changed {
            tracing::info!(subject = %report.subject, expires = %report.expires, serial = %report.serial, "TLS certificate renewed: new connections get it");
        } else {
            tracing::info!(subject = %report.subject, expires = %report.expires, "TLS certificate re-read: unchanged");
        }
        report
    }
}

/// Whether the running daemon picks up a new value of `key` at once.
fn reloadable(key: &str) -> bool {
    key.starts_with("limits.")
        || matches!(
            key,
            "server.name"
                | "server.motd"
                | "server.upgrade_notice"
                | "server.upgrade_timeout_secs"
                | "server.state_dir"
                | "chat.default_room"
                | "chat.history"
                | "chat.write_coalesce_ms"
                | "chat.trusted_proxies"
                | "chat.tls_cert"
                | "chat.tls_key"
                | "udp.max_datagram_bytes"
                | "udp.rate_per_sec"
                | "udp.burst"
                | "log.level"
        )
}

/// `new`, with the settings that need a restart set back to what runs.
fn keep_running_values(old: &Config, new: Config) -> Config {
    let mut next = new;
    next.chat.listen = old.chat.listen.clone();
    next.chat.tls_listen = old.chat.tls_listen.clone();
    next.chat.backlog = old.chat.backlog;
    next.udp = match (&old.udp, next.udp.take()) {
        (Some(old), Some(new)) => Some(UdpConfig {
            listen: old.listen.clone(),
            ..new
        }),
        (old, _) => old.clone(),
    };
    next.admin = old.admin.clone();
    next.log.format = old.log.format;
    next.server.shutdown_timeout = old.server.shutdown_timeout;
    next.server.worker_threads = old.server.worker_threads;
    next.server.client_threads = old.server.client_threads;
    next.cluster = old.cluster.clone();
    next
}

/// The `section.key`s whose values differ.
fn changed(old: &RawConfig, new: &RawConfig) -> BTreeSet<String> {
    let (Ok(old), Ok(new)) = (toml::Table::try_from(old), toml::Table::try_from(new)) else {
        return BTreeSet::new();
    };
    let mut keys = BTreeSet::new();
    for (section, values) in old.iter().chain(new.iter()) {
        let Some(values) = values.as_table() else {
            continue;
        };
        for key in values.keys() {
            let get = |t: &toml::Table| t.get(section).and_then(|s| s.get(key)).cloned();
            if get(&old) != get(&new) {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_named_by_section() {
        let old = RawConfig::default();
        let mut new = RawConfig::default();
        new.limits.max_clients = 5;
        new.chat.listen = "127.0.0.1:1".into();
        let keys: Vec<String> = changed(&old, &new).into_iter().collect();
        assert_eq!(keys, ["chat.listen", "limits.max_clients"]);
        assert!(reloadable("limits.max_clients"));
        assert!(!reloadable("chat.listen"));
        assert!(!reloadable("admin.tokens"));
    }
}
