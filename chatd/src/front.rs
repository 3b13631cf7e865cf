//! The front door: what happens to an accepted chat socket before the chat
//! itself. The client's real address is settled first (a PROXY protocol
//! header when the peer is a trusted proxy), then a TLS listener's
//! handshake, and only then does [`connection`] see the client, with the
//! address every limit, ban, log line and `list-clients` uses.
//!
//! It runs in the connection's own task, never in the accept loop, so a
//! proxy or a client slow to speak delays nobody else (only the check of
//! the peer against `chat.trusted_proxies` runs as the task is made); both
//! steps together
//! are bounded by `limits.handshake_timeout_secs`.

use std::net::SocketAddr;

use futures_util::future::Either;

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
///
/// Every client's task holds this future for as long as it is connected,
/// so its size is paid per idle connection: the common case (a plain client
/// not from a trusted proxy) is the chat's future alone, and the PROXY
/// header and TLS (a TLS stream, a pump and a connection over a socket
/// pair, several times a plain client's state) are a boxed future of their
/// own. Not an `async fn`, whose arguments and locals would sit beside the
/// chat's future for the connection's whole life.
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    door: Door,
    hub: Hub,
) -> impl Future<Output = ()> + Send {
    // A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`; bans,
    // limits and proxies are written with the IPv4 address.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let trusted = hub
        .config()
        .chat
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer.ip()));
    match door {
        Door::Plain if !trusted => Either::Left(connection::serve_on(stream, peer, false, hub)),
        door => Either::Right(Box::pin(serve_guarded(stream, peer, trusted, door, hub))),
    }
}

/// [`serve`] for a client from a trusted proxy or on a TLS listener.
async fn serve_guarded(
    mut stream: TcpStream,
    peer: SocketAddr,
    trusted: bool,
    door: Door,
    hub: Hub,
) {
    let deadline = hub.config().limits.handshake_timeout;
    let started = tokio::time::Instant::now();
    let client = if trusted {
        match tokio::time::timeout(deadline, proxy::read(&mut stream)).await {
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
        Door::Plain => connection::serve_on(stream, client, false, hub).await,
        Door::Tls(certs) => {
            let left = deadline.saturating_sub(started.elapsed());
            tls::serve(stream, client, certs, hub, left).await;
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
    /// connected. The TLS path and the PROXY header's read, inline, more
    /// than tripled a plain client's future (3.4 KB against 1 KB).
    #[test]
    fn plain_connection_future_is_small() {
        let front = future_size(serve);
        let plain = future_size(connection::serve_on::<TcpStream>);
        assert!(
            front <= plain + 16,
            "front::serve's future is {front} bytes, connection::serve_on's {plain}"
        );
    }
}
