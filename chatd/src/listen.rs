//! Opening a TCP listener, and the error that names the config key to
//! change when a listener cannot be opened. Shared by the chat, admin and
//! metrics listeners, so that none of them depends on another's module.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket};

/// Why a listener could not be opened; names the config key to change.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (`{key}`): {source}")]
pub struct BindError {
    pub key: &'static str,
    /// An address, or a socket path.
    pub addr: String,
    pub source: io::Error,
}

/// A TCP listener with address reuse (so a restart does not wait out
/// TIME_WAIT) and a configurable backlog (so a connection storm is queued by
/// the kernel instead of refused). IPv6 listeners are IPv6-only.
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let socket = TcpSocket::new_v6()?;
        // IPv6-only, so that `0.0.0.0:P` and `[::]:P` can both be listed
        // whatever the system's `bindv6only` default.
        SockRef::from(&socket).set_only_v6(true)?;
        socket
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
