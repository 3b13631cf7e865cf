//! `[udp]`: the UDP echo listener and its per-source rate.

use std::net::SocketAddr;

use super::error::{ConfigError, invalid, range};
use super::listen::addrs;
use super::raw::RawUdp;

#[derive(Debug, Clone)]
pub struct UdpConfig {
    pub listen: Vec<SocketAddr>,
    pub max_datagram_bytes: usize,
    pub rate_per_sec: u32,
    pub burst: u32,
}

pub(super) fn validate_udp(u: &RawUdp) -> Result<Option<UdpConfig>, ConfigError> {
    let udp = if u.enabled {
        let listen = addrs("udp.listen", &u.listen)?;
        if listen.is_empty() {
            return Err(invalid(
                "udp.listen",
                "[]",
                "at least one IP:PORT, or turn UDP echo off with udp.enabled = false",
            ));
        }
        Some(UdpConfig {
            listen,
            max_datagram_bytes: range(
                "udp.max_datagram_bytes",
                u.max_datagram_bytes,
                1,
                65507,
                " bytes",
            )? as usize,
            rate_per_sec: range(
                "udp.rate_per_sec",
                u.rate_per_sec,
                1,
                1_000_000,
                " datagrams per second per source address",
            )? as u32,
            burst: range("udp.burst", u.burst, 1, 1_000_000, " datagrams")? as u32,
        })
    } else {
        None
    };
    Ok(udp)
}
