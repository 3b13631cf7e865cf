//! Prometheus metrics at `http://[metrics] listen/metrics`.
//!
//! Nothing is counted twice: a scrape reads the hub's [`Stats`] counters and
//! gauges as they are, through a `prometheus-client` collector. The only
//! metric kept here is the admin RPC count, which the admin API adds to with
//! [`admin_rpc`].
//!
//! The HTTP side is deliberately tiny: `GET /metrics` and nothing else, one
//! request per connection, at most `metrics.max_connections` connections at
//! once (more are answered 503 and closed at once, never left waiting), each
//! closed after `metrics.timeout_secs`. Idle connections therefore cannot
//! hold a scrape up. It is meant for a loopback or private address.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::listen::{BindError, bind_tcp};
use chatd_config::{Config, MetricsConfig};
use chatd_hub::hub::Hub;
use chatd_hub::stats::{Counters, Stats, StatsSnapshot};

/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Binds `[metrics] listen`, if set.
pub fn bind(config: &Config) -> Result<Option<TcpListener>, BindError> {
    let Some(addr) = config.metrics.listen else {
        return Ok(None);
    };
    bind_tcp(addr, 64).map(Some).map_err(|source| BindError {
        key: "metrics.listen",
        addr: addr.to_string(),
        source,
    })
}

/// The metrics text for `hub`, in the OpenMetrics format Prometheus reads.
pub fn render(hub: &Hub) -> String {
    let mut registry = Registry::with_prefix("chatd");
    registry.register(
        "admin_rpcs",
        "Admin API calls, by method and status",
        chatd_admin::observe::ADMIN_RPCS.clone(),
    );
    registry.register_collector(Box::new(HubCollector { hub: hub.clone() }));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        warn!(error = %e, "cannot encode metrics");
    }
    text
}

/// Reads the hub's counters at scrape time.
#[derive(Debug)]
struct HubCollector {
    hub: Hub,
}

impl Collector for HubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.hub.snapshot();
        let stats = self.hub.stats();
        let bans = self.hub.bans().len() as u64;
        for (name, help, value) in gauges(&snap, bans) {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(metric)?;
        }
        let c = &snap.counters;
        let counters = traffic_counters(c)
            .into_iter()
            .chain(disconnect_counters(c))
            .chain(flow_counters(c))
            .chain(udp_counters(c));
        for (name, help, value) in counters {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        encode_fan_out(&mut encoder, stats)
    }
}

/// A metric without labels: its name, its help text and its value.
type Plain = (&'static str, &'static str, u64);

fn gauges(snap: &StatsSnapshot, bans: u64) -> [Plain; 5] {
    [
        (
            "uptime_seconds",
            "Seconds since the daemon started",
            snap.uptime.as_secs(),
        ),
        ("clients", "Clients connected now", snap.clients),
        (
            "peak_clients",
            "Most clients connected at once",
            snap.counters.peak_clients,
        ),
        ("rooms", "Rooms that exist now", snap.rooms),
        ("bans", "Bans in force now", bans),
    ]
}

/// Connections, and the lines and bytes they carried.
fn traffic_counters(c: &Counters) -> [Plain; 7] {
    [
        (
            "connections",
            "Connections accepted and registered",
            c.connections,
        ),
        (
            "refused",
            "Connections refused (server full, per-address limit, shutdown)",
            c.refused,
        ),
        ("lines_in", "Lines received from clients", c.lines_in),
        ("bytes_in", "Bytes received from clients", c.bytes_in),
        (
            "lines_relayed",
            "Chat lines relayed to a room or a person, each counted once",
            c.lines_relayed,
        ),
        (
            "deliveries",
            "Chat line deliveries: lines relayed times recipients (the lines out)",
            c.deliveries,
        ),
        ("bytes_out", "Bytes written to clients", c.bytes_out),
    ]
}

/// Clients cut off, by reason.
fn disconnect_counters(c: &Counters) -> [Plain; 5] {
    [
        ("kicks", "Clients kicked by an operator", c.kicks),
        (
            "slow_consumer_disconnects",
            "Clients cut off for not reading: queue full, or nothing read for limits.slow_consumer_secs",
            c.slow_consumer_disconnects,
        ),
        (
            "flood_disconnects",
            "Clients cut off for flooding",
            c.flood_disconnects,
        ),
        (
            "idle_disconnects",
            "Clients cut off for being idle or for not finishing a line in time",
            c.idle_disconnects,
        ),
        (
            "overlong_disconnects",
            "Clients cut off for sending too many over-long lines",
            c.overlong_disconnects,
        ),
    ]
}

/// How the fan-out kept up with slow readers and busy senders.
fn flow_counters(c: &Counters) -> [Plain; 2] {
    [
        (
            "flow_control_pauses",
            "Times a sender paused reading because a recipient that is still reading was behind",
            c.flow_pauses,
        ),
        (
            "grid_reads",
            "Reads of busy senders made in their room's read phase (server.client_threads = 1)",
            c.grid_reads,
        ),
    ]
}

fn udp_counters(c: &Counters) -> [Plain; 3] {
    [
        ("udp_in", "UDP datagrams received", c.udp_in),
        ("udp_out", "UDP datagrams echoed", c.udp_out),
        (
            "udp_dropped",
            "UDP datagrams not echoed (too large or rate-limited)",
            c.udp_dropped,
        ),
    ]
}

fn encode_fan_out(encoder: &mut DescriptorEncoder, stats: &Stats) -> Result<(), std::fmt::Error> {
    let (buckets, count, sum) = stats.fan_out_latency.buckets();
    let mut metric = encoder.encode_descriptor(
        "fan_out_seconds",
        "Time to hand one batch of chat lines to every member of a room",
        None,
        MetricType::Histogram,
    )?;
    metric.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    config: MetricsConfig,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let busy = chatd_hub::rate_log::RateLimitedLog::new(Duration::from_secs(60));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Full: say so without waiting for the request, so the
                    // accept loop never blocks on this peer.
                    let _ = stream.try_write(BUSY_RESPONSE);
                    if let Some(suppressed) = busy.allow() {
                        warn!(
                            limit = config.max_connections,
                            suppressed,
                            "metrics connection refused: metrics.max_connections reached"
                        );
                    }
                    continue;
                };
                let hub = hub.clone();
                let timeout = config.timeout;
                tokio::spawn(async move {
                    let answered = tokio::time::timeout(timeout, answer(stream, &hub)).await;
                    if !matches!(answered, Ok(Ok(()))) {
                        debug!(%peer, "metrics scrape failed or timed out");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

const BUSY_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

async fn answer(mut stream: TcpStream, hub: &Hub) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (words.next(), words.next());
    match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => {
            let body = render(hub);
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        (Some(b"GET"), _) => {
            respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The address metrics are served on, for the startup log line.
pub fn describe(listener: Option<&TcpListener>) -> String {
    listener
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "off".to_string(), |a: SocketAddr| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_rpcs_are_counted_by_method_and_status() {
        let config = chatd_config::RawConfig::default()
            .validate()
            .expect("defaults validate");
        let hub = Hub::new(config);
        chatd_admin::observe::admin_rpc("Kick", "OK");
        chatd_admin::observe::admin_rpc("Kick", "OK");
        chatd_admin::observe::admin_rpc("Kick", "NOT_FOUND");
        let text = render(&hub);
        assert!(
            text.contains("chatd_admin_rpcs_total{method=\"Kick\",status=\"OK\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("chatd_admin_rpcs_total{method=\"Kick\",status=\"NOT_FOUND\"} 1"),
            "{text}"
        );
        assert!(text.contains("chatd_clients 0"), "{text}");
    }
}
