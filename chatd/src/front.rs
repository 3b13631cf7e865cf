//! The front door: what happens to an accepted chat socket before the chat
//! itself. The client's real address is settled first (a PROXY protocol
//! header when the peer is a trusted proxy), then a TLS listener's
//! handshake, and only then does [`connection`] see the client, with the
//! address every limit, ban, log line and `list-clients` uses.
//!
//! It runs in the connection's own task, never in the accept loop, so a
//! proxy or a client slow to speak delays nobody else; both steps together
//! are bounded by `limits.handshake_timeout_secs`.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::connection;
use crate::hub::Hub;
use crate::proxy;
use crate::tls::{self, Certs};

/// Which listener accepted the socket.
#[derive(Debug, Clone)]
pub enum Door {
    Plain,
    Tls(Certs),
}

/// Serves one accepted socket: real address, TLS, then the chat.
pub async fn serve(mut stream: TcpStream, peer: SocketAddr, door: Door, hub: Hub) {
    // A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`; bans,
    // limits and proxies are written with the IPv4 address.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let config = hub.config();
    let deadline = config.limits.handshake_timeout;
    let trusted = config
        .chat
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer.ip()));
    drop(config);
    let started = tokio::time::Instant::now();
    let client = if trusted {
        // Boxed, as the TLS path below: the future of every plain
        // connection, which lives as long as the client, is sized for the
        // plain path only (see `tests::plain_connection_future_is_small`).
        let header = Box::pin(tokio::time::timeout(deadline, proxy::read(&mut stream)));
        match header.await {
            Ok(Ok(Some(client))) => {
                let client = SocketAddr::new(client.ip().to_canonical(), client.port());
                debug!(proxy = %peer, %client, "PROXY header");
                if !hub.admit_connection(client.ip()) {
                    refuse_fast(&stream);
                    return;
                }
                client
            }
            Ok(Ok(None)) => peer,
            Ok(Err(e)) => {
                warn!(proxy = %peer, error = %e, "refused connection from a trusted proxy");
                return;
            }
            Err(_) => {
                warn!(proxy = %peer, timeout_secs = deadline.as_secs(), "refused connection from a trusted proxy: no PROXY header in time");
                return;
            }
        }
    } else {
        peer
    };
    match door {
        Door::Plain => connection::serve(stream, client, hub).await,
        Door::Tls(certs) => {
            let left = deadline.saturating_sub(started.elapsed());
            Box::pin(tls::serve(stream, client, certs, hub, left)).await;
        }
    }
}

/// Tells a connection over the rate limit why, if its socket takes the line
/// at once, and drops it: a flood of connections gets no task, no timer and
/// no log line each.
pub(crate) fn refuse_fast(stream: &TcpStream) {
    let line = crate::hub::server_line(&format!("error: {}", crate::hub::Refusal::TooFast));
    let _ = stream.try_write(&line);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<A, B, C, D, F: std::future::Future>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every client's task holds this future for as long as it is
    /// connected, so its size is paid per idle connection. The TLS path
    /// (a TLS stream, a pump and a connection over a socket pair) and the
    /// PROXY header's read are far larger than the plain path and rare:
    /// inline, they more than tripled the plain client's future.
    #[test]
    fn plain_connection_future_is_small() {
        let front = future_size(serve);
        let plain = future_size(connection::serve_on::<TcpStream>);
        assert!(
            front <= plain + 256,
            "front::serve's future is {front} bytes, connection::serve_on's {plain}"
        );
    }
}
