//! `stats`.

use std::time::Duration;

use chatd_proto::admin::v1 as pb;
use serde::Serialize;

use super::{Ctx, written};
use crate::cli::Output;
use crate::error::ChatctlError;
use crate::format::{self, clean};

#[derive(Serialize)]
struct StatsView {
    version: String,
    started_at: Option<String>,
    uptime_secs: u64,
    clients: u64,
    peak_clients: u64,
    rooms: u64,
    totals: TotalsView,
}

#[derive(Serialize)]
struct TotalsView {
    connections: u64,
    lines_in: u64,
    lines_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    kicks: u64,
    slow_consumer_disconnects: u64,
    flood_disconnects: u64,
    udp_datagrams_in: u64,
    udp_datagrams_out: u64,
    udp_datagrams_dropped: u64,
}

impl From<pb::Totals> for TotalsView {
    fn from(t: pb::Totals) -> Self {
        Self {
            connections: t.connections,
            lines_in: t.lines_in,
            lines_out: t.lines_out,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            kicks: t.kicks,
            slow_consumer_disconnects: t.slow_consumer_disconnects,
            flood_disconnects: t.flood_disconnects,
            udp_datagrams_in: t.udp_datagrams_in,
            udp_datagrams_out: t.udp_datagrams_out,
            udp_datagrams_dropped: t.udp_datagrams_dropped,
        }
    }
}

pub async fn show(ctx: &mut Ctx<'_>) -> Result<(), ChatctlError> {
    let request = ctx.request(pb::GetStatsRequest {});
    let mut admin = ctx.admin.clone();
    let reply = ctx.call(admin.get_stats(request)).await?;
    super::note_partial(&reply.answered_nodes, &reply.missing_nodes);
    let uptime = reply
        .uptime
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    let stats = StatsView {
        version: reply.version,
        started_at: format::system_time(reply.started_at.as_ref()).map(format::rfc3339),
        uptime_secs: uptime.as_secs(),
        clients: reply.clients,
        peak_clients: reply.peak_clients,
        rooms: reply.rooms,
        totals: reply.totals.unwrap_or_default().into(),
    };
    if ctx.output == Output::Json {
        return ctx.json(&stats);
    }
    let t = &stats.totals;
    written(format::write_fields(
        ctx.out,
        &[
            ("version", clean(&stats.version).into_owned()),
            ("uptime", format::duration(uptime)),
            (
                "started",
                stats.started_at.clone().unwrap_or_else(|| "-".into()),
            ),
            (
                "clients",
                format!("{} (peak {})", stats.clients, stats.peak_clients),
            ),
            ("rooms", stats.rooms.to_string()),
            ("connections", t.connections.to_string()),
            // Not a client's "lines out" (every line written to it, server
            // lines included): chat lines times the members they reached.
            (
                "lines",
                format!("{} in, {} delivered", t.lines_in, t.lines_out),
            ),
            (
                "bytes",
                format::in_out(format::bytes(t.bytes_in), format::bytes(t.bytes_out)),
            ),
            ("kicks", t.kicks.to_string()),
            (
                "disconnects",
                format!(
                    "{} slow consumer, {} flood",
                    t.slow_consumer_disconnects, t.flood_disconnects
                ),
            ),
            (
                "udp datagrams",
                format!(
                    "{} in, {} out, {} dropped",
                    t.udp_datagrams_in, t.udp_datagrams_out, t.udp_datagrams_dropped
                ),
            ),
        ],
    ))
}
