//! Logging setup: human-readable text or JSON lines on stderr, with a level
//! that a config reload can change.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes the log filter of the running daemon.
#[derive(Debug, Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over `log.level`, also on reload.
    pinned: bool,
}

impl LogLevel {
    /// Applies `level` (already validated); false when `RUST_LOG` pins the
    /// filter or the subscriber is gone.
    pub fn set(&self, level: &str) -> bool {
        if self.pinned {
            return false;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => self.handle.reload(filter).is_ok(),
            Err(_) => false,
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides
/// `log.level`.
pub fn init(log: &LogConfig) -> LogLevel {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok());
    let pinned = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&log.level));
    let (filter, handle) = reload::Layer::new(filter);
    let (text, json) = match log.format {
        LogFormat::Text => (
            Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    LogLevel { handle, pinned }
}
