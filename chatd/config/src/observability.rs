//! `[log]`, `[telemetry]` and `[metrics]`: where logs, traces and metrics go.

use std::net::SocketAddr;
use std::time::Duration;

use super::error::{ConfigError, invalid, range};
use super::listen::addr;
use super::raw::{RawLog, RawMetrics, RawTelemetry};

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

pub(super) fn validate_log(g: &RawLog) -> Result<LogConfig, ConfigError> {
    if let Err(e) = check_level(&g.level) {
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
    Ok(log)
}

pub(super) fn validate_telemetry(raw: &RawTelemetry) -> Result<TelemetryConfig, ConfigError> {
    let endpoint = raw.otlp_endpoint.trim();
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
    Ok(telemetry)
}

pub(super) fn validate_metrics(raw: &RawMetrics) -> Result<MetricsConfig, ConfigError> {
    let m = raw.listen.trim();
    let metrics = MetricsConfig {
        listen: if m.is_empty() {
            None
        } else {
            Some(addr("metrics.listen", m)?)
        },
        max_connections: range("metrics.max_connections", raw.max_connections, 1, 65536, "")?
            as usize,
        timeout: Duration::from_secs(range(
            "metrics.timeout_secs",
            raw.timeout_secs,
            1,
            3600,
            " seconds",
        )? as u64),
    };
    Ok(metrics)
}

/// Checks a `log.level` value. `EnvFilter` reads a bare word it does not know
/// (`inf`, `verbose`) as a *target* name, which silently turns off every
/// other log line; so each comma-separated directive must be a level, or end
/// in `=LEVEL` (`chatd=debug`, `chatd[conn]=trace`), and the whole must parse.
fn check_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word.trim()));
    if level.trim().is_empty() {
        return Err("it is empty".into());
    }
    for directive in level.split(',') {
        let directive = directive.trim();
        let ok = match directive.rsplit_once('=') {
            // `=` may also appear inside a span field filter.
            Some((target, lvl)) => !target.trim().is_empty() && is_level(lvl),
            None => is_level(directive),
        };
        if !ok {
            return Err(format!("{directive:?} is neither a level nor TARGET=LEVEL"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters_pass() {
        for ok in [
            "info",
            "WARN",
            "off",
            "info,chatd=debug",
            "warn,chatd::connection=trace",
            "chatd[conn{nick=alice}]=debug",
        ] {
            assert_eq!(check_level(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn typos_are_refused() {
        for bad in [
            "inf",
            "verbose",
            "",
            " ",
            "info,chatd",
            "chatd=verbose",
            "=debug",
            "info,",
        ] {
            assert!(check_level(bad).is_err(), "{bad:?}");
        }
    }
}
