//! The UDP echo port: every datagram goes back, unchanged, to its sender.
//!
//! Two limits keep it from being used as a reflector against a third party
//! whose address is spoofed: datagrams over `udp.max_datagram_bytes` are
//! dropped, and each source address gets at most `udp.rate_per_sec` answers
//! per second (burst `udp.burst`), an IPv6 source's whole prefix
//! (`limits.ipv6_prefix_len`) counting as one address. The answer is never larger than the
//! request, so there is no amplification either.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use std::sync::Arc;

use crate::handoff::Gate;
use chatd_hub::hub::Hub;
use chatd_text::rate::TokenBucket;

/// Source addresses tracked at once. Beyond it, sources whose bucket has
/// refilled are forgotten; if none has, new sources are not answered.
const MAX_SOURCES: usize = 65_536;

pub async fn run(socket: UdpSocket, hub: Hub, gate: Arc<Gate>, shutdown: CancellationToken) {
    // One buffer for the life of the port, large enough for any datagram so
    // an oversized one is seen as such rather than silently truncated.
    let mut buf = vec![0u8; 65_536];
    let mut sources: HashMap<IpAddr, TokenBucket> = HashMap::new();
    let stats = hub.stats();
    loop {
        let (n, from) = tokio::select! {
            () = shutdown.cancelled() => return,
            // A seamless upgrade: datagrams wait in the socket for
            // whichever process serves next.
            () = gate.frozen() => match gate.settled().await {
                crate::handoff::Outcome::Resumed => continue,
                crate::handoff::Outcome::Committed => return,
            },
            r = socket.recv_from(&mut buf) => match r {
                Ok(got) => got,
                // ICMP errors from earlier sends surface here; they concern
                // one peer only.
                Err(e) => {
                    debug!(error = %e, "udp receive failed");
                    continue;
                }
            },
        };
        stats.udp_in.fetch_add(1, Relaxed);
        let Some(udp) = hub.config().udp.clone() else {
            return;
        };
        if n > udp.max_datagram_bytes {
            stats.udp_dropped.fetch_add(1, Relaxed);
            continue;
        }
        let now = Instant::now();
        // One IPv6 prefix is one source, as for the chat port's limits.
        let source = hub.address_group(from.ip());
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
            sources.retain(|_, b| !b.is_full(udp.rate_per_sec, udp.burst, now));
            if sources.len() >= MAX_SOURCES {
                stats.udp_dropped.fetch_add(1, Relaxed);
                continue;
            }
        }
        let bucket = sources
            .entry(source)
            .or_insert_with(|| TokenBucket::new(udp.burst, now));
        if !bucket.try_take(udp.rate_per_sec, udp.burst, now) {
            stats.udp_dropped.fetch_add(1, Relaxed);
            continue;
        }
        match socket.send_to(&buf[..n], from).await {
            Ok(_) => {
                stats.udp_out.fetch_add(1, Relaxed);
            }
            Err(e) => warn!(peer = %from, error = %e, "udp send failed"),
        }
    }
}
