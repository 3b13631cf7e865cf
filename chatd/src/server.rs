//! Binding, the accept loop, and the daemon's life from start to shutdown.
//!
//! [`bind`] is the only code that opens sockets; `main` calls it and hands
//! the result to [`run`], and so can anything else that wants to run the
//! daemon on sockets of its own.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::connection;
use crate::hub::Hub;
use crate::udp_echo;

/// Every socket the daemon serves, already bound.
#[derive(Debug)]
pub struct Listeners {
    pub chat: TcpListener,
    pub udp: Option<UdpSocket>,
}

/// Why a listener could not be opened; names the config key to change.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (`{key}`): {source}")]
pub struct BindError {
    pub key: &'static str,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Binds every listener the configuration asks for.
pub fn bind(config: &Config) -> Result<Listeners, BindError> {
    let chat_addr = config.chat.listen;
    let chat = bind_tcp(chat_addr, config.chat.backlog).map_err(|source| BindError {
        key: "chat.listen",
        addr: chat_addr,
        source,
    })?;
    let udp = match &config.udp {
        Some(udp) => {
            let socket = std::net::UdpSocket::bind(udp.listen)
                .and_then(|s| {
                    s.set_nonblocking(true)?;
                    UdpSocket::from_std(s)
                })
                .map_err(|source| BindError {
                    key: "udp.listen",
                    addr: udp.listen,
                    source,
                })?;
            Some(socket)
        }
        None => None,
    };
    Ok(Listeners { chat, udp })
}

/// A TCP listener with address reuse (so a restart does not wait out
/// TIME_WAIT) and a configurable backlog (so a connection storm is queued by
/// the kernel instead of refused).
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves until `shutdown` is cancelled, then closes every connection
/// gracefully within `server.shutdown_timeout_secs`.
pub async fn run(listeners: Listeners, config: Config, shutdown: CancellationToken) {
    let grace = config.server.shutdown_timeout;
    let hub = Hub::new(config);
    serve(listeners, hub, shutdown, grace).await
}

/// Like [`run`], with a hub the caller keeps (for an admin API, say).
pub async fn serve(listeners: Listeners, hub: Hub, shutdown: CancellationToken, grace: Duration) {
    let tracker = TaskTracker::new();
    if let Some(udp) = listeners.udp {
        tracker.spawn(udp_echo::run(udp, hub.clone(), shutdown.clone()));
    }
    tracker.spawn(reap_idle(hub.clone(), shutdown.clone()));
    accept_loop(&listeners.chat, &hub, &shutdown, &tracker).await;
    drop(listeners.chat);
    hub.close();
    tracker.close();
    info!(
        clients = hub.snapshot().clients,
        "shutting down: closing connections"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            remaining = tracker.len(),
            "shutdown deadline passed; closing the remaining connections"
        );
    }
}

async fn accept_loop(
    listener: &TcpListener,
    hub: &Hub,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                tune(&stream, hub);
                tracker.spawn(connection::serve(stream, peer, hub.clone()));
            }
            Err(e) if is_peer_error(&e) => {}
            Err(e) => {
                let pause = backoff.next();
                error!(error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Closes idle clients. One task scanning every client a few times per
/// timeout is far cheaper than a timer in each of 10,000 connections.
async fn reap_idle(hub: Hub, shutdown: CancellationToken) {
    loop {
        let limit = hub.limits().idle_timeout;
        let pause = limit.map_or(Duration::from_secs(5), |l| {
            (l / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        if let Some(limit) = limit {
            let closed = hub.reap_idle(limit);
            if closed > 0 {
                info!(clients = closed, "closed idle connections");
            }
        }
    }
}

/// Errors that concern one connection that went away before we accepted it.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Per-socket options: no Nagle delay (we coalesce writes ourselves) and TCP
/// keepalive so dead peers are noticed even when nobody talks.
fn tune(stream: &TcpStream, hub: &Hub) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = hub.limits().keepalive {
        let keepalive = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10).min(idle))
            .with_retries(3);
        if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
            warn!(error = %e, "cannot enable TCP keepalive");
        }
    }
}

/// Exponential pause after resource errors (EMFILE, ENFILE, ENOBUFS…): gives
/// closing connections time to free descriptors instead of spinning.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ms = 5u64 << self.failures.min(8);
        Duration::from_millis(ms.min(1000))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}
