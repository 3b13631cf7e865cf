//! What the admin API asks of the process it serves in. Reloading the
//! configuration and upgrading the binary live in the daemon, above this
//! layer; the API reaches them only through [`Control`], given at start.

use std::fmt;
use std::time::Duration;

use chatd_hub::cluster_state::BoxFuture;

/// Reload, upgrade, and whether this process handed everything over.
pub trait Control: fmt::Debug + Send + Sync {
    /// Re-reads the configuration and applies what can change at run time.
    /// Blocking (files, certificates): called from a blocking task.
    fn reload(&self) -> Result<ReloadReport, ControlError>;

    /// Starts a seamless upgrade in a task of its own, which runs to a
    /// commit or a rollback whoever waits for it; the future says which.
    fn upgrade(
        &self,
    ) -> Result<BoxFuture<'static, Result<UpgradeReport, ControlError>>, ControlError>;

    /// Whether a new process serves everyone now: this one must then remove
    /// nothing the new one uses (the admin socket, the token files).
    fn handed_over(&self) -> bool;
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The file read; `built-in defaults` when there is none.
    pub config_path: String,
    /// Keys (`limits.max_clients`) whose new value is in effect now.
    pub applied: Vec<String>,
    /// Keys that differ from the running values until a restart.
    pub restart_required: Vec<String>,
    /// The chat certificate served from now on, when TLS is configured.
    pub certificate: Option<CertReport>,
}

/// The certificate a reload left in place, and whether it is a new one (a
/// renewal written over the same files changes no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertReport {
    pub subject: String,
    /// When it expires, e.g. `2027-03-01T12:00:00Z`, and as Unix seconds.
    pub expires: String,
    pub not_after: i64,
    pub serial: String,
    pub changed: bool,
}

/// How an upgrade ended, for its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeReport {
    pub pid: u32,
    /// From the request to the commit, starting the new process included.
    pub duration: Duration,
    /// Clients handed over.
    pub clients: usize,
    /// TLS clients, which cannot be handed over and were asked to
    /// reconnect.
    pub dropped_tls: usize,
}

/// Why a reload or an upgrade was refused; the message is the operator's.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The new configuration does not validate: the running one stays.
    #[error("{0}")]
    Config(String),
    /// An upgrade is already running.
    #[error("{0}")]
    Busy(String),
    /// The upgrade could not start or failed; this process serves on.
    #[error("{0}")]
    Upgrade(String),
}
