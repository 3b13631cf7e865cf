//! `[server]`: the daemon's name, shutdown, state directory and threads.

use std::path::PathBuf;
use std::time::Duration;

use super::error::{ConfigError, invalid, range};
use super::raw::RawServer;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    pub motd: String,
    pub shutdown_timeout: Duration,
    /// Where bans are kept; see [`default_state_dir`].
    pub state_dir: PathBuf,
    /// Runtime worker threads; `None`: one per CPU chatd may use.
    pub worker_threads: Option<usize>,
    /// Threads of their own for the chat clients: 1 (the default), one
    /// single-threaded runtime serves them all (see `crate::clients`); 0,
    /// they share the runtime's workers.
    pub client_threads: usize,
    /// The one line (after `*** `) a client handed over by a seamless
    /// upgrade reads; empty: none.
    pub upgrade_notice: String,
    /// How long a new process has, from its start, to take over in a
    /// seamless upgrade before it is stopped and everyone resumes here.
    pub upgrade_timeout: Duration,
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

pub(super) fn validate_server(s: &RawServer) -> Result<ServerConfig, ConfigError> {
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
        upgrade_timeout: Duration::from_secs(range(
            "server.upgrade_timeout_secs",
            s.upgrade_timeout_secs,
            1,
            600,
            " seconds",
        )? as u64),
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
        client_threads: range(
            "server.client_threads",
            s.client_threads,
            0,
            1,
            ", 0 to serve clients on the runtime's workers",
        )? as usize,
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
    Ok(server)
}
