//! The front door: what happens to an accepted chat socket before the chat
//! itself. The client's real address is settled first (a PROXY protocol
//! header when the peer is a trusted proxy), then a TLS listener's
//! handshake, and only then does [`connection`] see the client, with the
//! address every limit, ban, log line and `list-clients` uses.
//!
//! It runs in the connection's own task, never in the accept loop, so a
//! proxy or a client slow to speak delays nobody else (only the check of
//! the peer against `chat.trusted_proxies` runs as the task is made); both
//! steps together are bounded by `limits.handshake_timeout_secs`. All the
//! while the connection holds the [`Seat`] its accept loop took: it counts
//! against the limits here as much as once it chats, and a trusted proxy's
//! connection is counted against its client's address as soon as the
//! header names it.
//!
//! A seamless upgrade's freeze counts every connection here that has read
//! nothing a new process could not be told ([`Arrival`](crate::handoff::Arrival)): a plain one until
//! it registers, a trusted proxy's until its PROXY header is read (the
//! bytes of it read so far go with it). Such a connection parks at the
//! freeze and its bare socket is handed over ([`serve_handed`] in the new
//! process). A TLS handshake cannot be: it goes on in the old process, and
//! the client is told to reconnect if the upgrade commits.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use futures_util::future::Either;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::connection::{self, Chat};
use crate::handoff::{Arrival, Export, Outcome, WaitingState};
use crate::proxy;
use crate::tls::{self, Certs};
use chatd_hub::hub::{Refusal, Seat};

/// Which listener accepted the socket.
#[derive(Debug, Clone)]
pub enum Door {
    Plain,
    /// A TLS listener's, with the client thread when there is one. The
    /// handshake and the TLS pump stay on the main runtime, whose workers do
    /// the crypto: a flood of handshakes, or one client's bulk encryption,
    /// never holds up the thread that writes everyone's lines. Only the chat
    /// behind the pump moves to the client thread ([`tls::serve`]).
    Tls(Certs, Option<Handle>),
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
    chat: Chat,
    arrival: Arrival,
    seat: Seat,
) -> impl Future<Output = ()> + Send {
    let hub = &chat.hub;
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
        Door::Plain if !trusted => Either::Left(connection::serve_on(
            stream, peer, false, chat, arrival, seat,
        )),
        door => Either::Right(Box::pin(serve_guarded(
            stream,
            peer,
            Guarded {
                trusted,
                door,
                arrival,
                seat,
                header: Vec::new(),
                started: Instant::now(),
            },
            chat,
        ))),
    }
}

/// Serves a connection the previous process handed over from its front
/// door (see the module doc), once `commit` says this process owns it:
/// from where it stopped, with what it had read of a PROXY header.
pub async fn serve_handed(
    stream: std::net::TcpStream,
    state: WaitingState,
    certs: Certs,
    clients: Option<Handle>,
    chat: Chat,
    commit: CancellationToken,
) {
    let arrival = Arrival::new(&chat.gate);
    // Admitted by the previous process: counted, never refused. A trusted
    // proxy's client is counted by its address once its header is read.
    let known = state.proxy_header.is_none().then_some(state.peer.ip());
    let seat = chat.hub.seat_handed(known);
    commit.cancelled().await;
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(e) => {
            warn!(peer = %state.peer, error = %e, "could not serve a connection taken over from the previous process");
            return;
        }
    };
    debug!(peer = %state.peer, "connection taken over from the previous process's front door");
    let Some(header) = state.proxy_header else {
        return connection::serve_on(stream, state.peer, false, chat, arrival, seat).await;
    };
    let now = Instant::now();
    let started = now
        .checked_sub(std::time::Duration::from_millis(state.age_ms))
        .unwrap_or(now);
    let door = if state.tls {
        Door::Tls(certs, clients)
    } else {
        Door::Plain
    };
    let guarded = Guarded {
        trusted: true,
        door,
        arrival,
        seat,
        header,
        started,
    };
    serve_guarded(stream, state.peer, guarded, chat).await;
}

/// What [`serve_guarded`] goes on from.
struct Guarded {
    trusted: bool,
    door: Door,
    arrival: Arrival,
    seat: Seat,
    /// The PROXY header's bytes read so far.
    header: Vec<u8>,
    /// When the connection was accepted: the handshake deadline's clock.
    started: Instant,
}

/// [`serve`] for a client from a trusted proxy or on a TLS listener.
async fn serve_guarded(mut stream: TcpStream, peer: SocketAddr, guarded: Guarded, chat: Chat) {
    let (hub, gate) = (&chat.hub, &chat.gate);
    let Guarded {
        trusted,
        door,
        mut arrival,
        mut seat,
        mut header,
        started,
    } = guarded;
    let deadline = hub.config().limits.handshake_timeout;
    let client = if trusted {
        let read = loop {
            tokio::select! {
                read = tokio::time::timeout_at(started + deadline, proxy::read(&mut stream, &mut header)) => break read,
                () = gate.frozen(), if arrival.counted() => {}
            }
            // An upgrade: nothing but the header's bytes so far was read,
            // and they go with the socket.
            let tls = matches!(door, Door::Tls(..));
            let export = || Export::Waiting {
                state: WaitingState {
                    peer,
                    proxy_header: Some(header.clone()),
                    tls,
                    age_ms: started.elapsed().as_millis() as u64,
                },
                fd: std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned(),
            };
            if gate.park(export).await == Outcome::Committed {
                debug!(proxy = %peer, "handed over with its PROXY header unfinished");
                return;
            }
        };
        match read {
            Ok(Ok(Some(client))) => {
                let client = SocketAddr::new(client.ip().to_canonical(), client.port());
                debug!(proxy = %peer, %client, "PROXY header");
                if !hub.admit_connection(client.ip()) {
                    refuse_fast(&stream, &Refusal::TooFast);
                    return;
                }
                if let Err(refusal) = seat.settle(client.ip()) {
                    refuse_fast(&stream, &refusal);
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
        Door::Plain => connection::serve_on(stream, client, false, chat, arrival, seat).await,
        Door::Tls(certs, clients) => {
            // A handshake that began cannot be handed over.
            arrival.leave();
            let left = deadline.saturating_sub(started.elapsed());
            tls::serve(stream, client, certs, clients, chat, left, seat).await;
        }
    }
}

/// Tells a connection refused at the door why, if its socket takes the line
/// at once, and drops it: a flood of connections gets no task, no timer
/// and no log line each, and its descriptor is free again at once.
pub(crate) fn refuse_fast(stream: &impl AsFd, refusal: &Refusal) {
    let line = chatd_hub::hub::server_line(&format!("error: {refusal}"));
    let _ = rustix::net::send(
        stream,
        &line,
        rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<A, B, C, D, E, G, F: std::future::Future>(
        _: impl Fn(A, B, C, D, E, G) -> F,
    ) -> usize {
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
