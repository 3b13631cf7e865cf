//! `[limits]`: per-connection and server-wide limits.

use std::time::Duration;

use super::error::{ConfigError, range, secs};
use super::raw::RawLimits;

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
    /// The most a client may owe; see the hub's outbox for the flow
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
    /// How many leading bits of an IPv6 address make "one address" for
    /// every per-address limit: one host is handed a whole prefix (a /64
    /// at least), so counting full addresses would let it open a fresh
    /// address per connection.
    pub ipv6_prefix_len: u8,
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

/// Of several bad keys, the first one checked here is the one reported.
pub(super) fn validate_limits(l: &RawLimits) -> Result<Limits, ConfigError> {
    let flood = flood_limits(l)?;
    let connect_rate = connect_rate(l)?;
    let clients = client_limits(l)?;
    let timeouts = timeouts(l)?;
    let output = output_limits(l)?;
    let door = front_door_limits(l)?;
    Ok(Limits {
        max_clients: clients.max_clients,
        max_clients_per_ip: clients.max_clients_per_ip,
        max_line_bytes: clients.max_line_bytes,
        max_overlong_lines: clients.max_overlong_lines,
        flood,
        idle_timeout: timeouts.idle,
        partial_line_timeout: timeouts.partial_line,
        keepalive: timeouts.keepalive,
        outbound_queue_bytes: output.outbound_queue_bytes,
        slow_consumer_timeout: timeouts.slow_consumer,
        room_notice_max: output.room_notice_max,
        handshake_timeout: door.handshake_timeout,
        room_notices_per_sec: output.room_notices_per_sec,
        connect_rate,
        ipv6_prefix_len: door.ipv6_prefix_len,
    })
}

/// `limits.flood_*`: `None` when `flood_lines_per_sec` is 0.
fn flood_limits(l: &RawLimits) -> Result<Option<FloodLimits>, ConfigError> {
    let lines_per_sec = range(
        "limits.flood_lines_per_sec",
        l.flood_lines_per_sec,
        0,
        1_000_000,
        " lines per second, 0 turns flood control off",
    )? as u32;
    let burst = range("limits.flood_burst", l.flood_burst, 1, 1_000_000, " lines")? as u32;
    let max_dropped = range(
        "limits.flood_max_dropped",
        l.flood_max_dropped,
        0,
        1_000_000,
        " lines, 0 never disconnects",
    )? as u32;
    Ok((lines_per_sec > 0).then_some(FloodLimits {
        lines_per_sec,
        burst,
        max_dropped,
    }))
}

/// `limits.connect_*_per_ip`: `None` when the rate is 0.
fn connect_rate(l: &RawLimits) -> Result<Option<ConnectRate>, ConfigError> {
    let per_sec = range(
        "limits.connect_rate_per_ip",
        l.connect_rate_per_ip,
        0,
        1_000_000,
        " connections per second per address, 0 turns the limit off",
    )? as u32;
    let burst = range(
        "limits.connect_burst_per_ip",
        l.connect_burst_per_ip,
        1,
        1_000_000,
        " connections",
    )? as u32;
    Ok((per_sec > 0).then_some(ConnectRate { per_sec, burst }))
}

/// How many clients, and how long their lines may be.
struct ClientLimits {
    max_clients: usize,
    max_clients_per_ip: usize,
    max_line_bytes: usize,
    max_overlong_lines: u32,
}

fn client_limits(l: &RawLimits) -> Result<ClientLimits, ConfigError> {
    Ok(ClientLimits {
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
    })
}

/// The timeouts that cut a client off; each `None` when set to 0.
struct Timeouts {
    idle: Option<Duration>,
    partial_line: Option<Duration>,
    keepalive: Option<Duration>,
    slow_consumer: Option<Duration>,
}

fn timeouts(l: &RawLimits) -> Result<Timeouts, ConfigError> {
    Ok(Timeouts {
        idle: secs(
            "limits.idle_timeout_secs",
            l.idle_timeout_secs,
            30 * 24 * 3600,
        )?,
        partial_line: secs(
            "limits.partial_line_timeout_secs",
            l.partial_line_timeout_secs,
            24 * 3600,
        )?,
        keepalive: secs("limits.keepalive_secs", l.keepalive_secs, 24 * 3600)?,
        slow_consumer: secs("limits.slow_consumer_secs", l.slow_consumer_secs, 24 * 3600)?,
    })
}

/// What the server sends on its own: room notices, and what a client may
/// owe.
struct OutputLimits {
    room_notices_per_sec: u32,
    outbound_queue_bytes: usize,
    room_notice_max: usize,
}

fn output_limits(l: &RawLimits) -> Result<OutputLimits, ConfigError> {
    Ok(OutputLimits {
        room_notices_per_sec: range(
            "limits.room_notices_per_sec",
            l.room_notices_per_sec,
            1,
            1_000_000,
            " notices per second per room",
        )? as u32,
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
    })
}

/// What a new connection is allowed before it is a client, and what counts
/// as one address.
struct FrontDoorLimits {
    handshake_timeout: Duration,
    ipv6_prefix_len: u8,
}

fn front_door_limits(l: &RawLimits) -> Result<FrontDoorLimits, ConfigError> {
    Ok(FrontDoorLimits {
        handshake_timeout: Duration::from_secs(range(
            "limits.handshake_timeout_secs",
            l.handshake_timeout_secs,
            1,
            300,
            " seconds",
        )? as u64),
        ipv6_prefix_len: range(
            "limits.ipv6_prefix_len",
            l.ipv6_prefix_len,
            32,
            128,
            " bits",
        )? as u8,
    })
}
