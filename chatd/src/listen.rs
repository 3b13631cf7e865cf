//! The daemon's bound listeners ([`Listeners`]), opening a TCP listener,
//! and the error that names the config key to change when a listener
//! cannot be opened. Shared by the chat, admin and metrics listeners and by
//! the upgrade handoff (which passes listeners to the next process), so
//! that none of them depends on another's module.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;

use chatd_admin::AdminListeners;
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

/// Every socket the daemon serves, already bound.
#[derive(Debug)]
pub struct Listeners {
    /// Plain chat; at least one.
    pub chat: Vec<TcpListener>,
    /// Chat over TLS; may be empty.
    pub tls: Vec<TcpListener>,
    pub udp: Vec<UdpSocket>,
    pub admin: AdminListeners,
}

impl Listeners {
    /// No socket at all.
    pub fn empty() -> Listeners {
        Listeners {
            chat: Vec::new(),
            tls: Vec::new(),
            udp: Vec::new(),
            admin: AdminListeners {
                tcp: Vec::new(),
                unix: None,
            },
        }
    }
}

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
