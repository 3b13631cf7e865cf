//! systemd socket activation: the sockets systemd opened for us
//! (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`; see `sd_listen_fds(3)`).
//!
//! A socket named `tls` (`FileDescriptorName=tls`, as in
//! `deploy/systemd/chatd-tls.socket`) serves chat over TLS, one named `udp`
//! UDP echo; any other (`chat`, as `chatd.socket` names its TCP and UDP
//! sockets, or systemd's default, the unit's name) is used by its type: a
//! TCP listener for chat, a UDP socket for echo. A listener that receives
//! sockets this way ignores its `listen` addresses; the others bind as
//! usual, so activation can cover some listeners and not others.

use std::net::{TcpListener, UdpSocket};

use listenfd::ListenFd;

/// The sockets passed in, by listener; all empty without activation.
#[derive(Debug, Default)]
pub struct Activated {
    pub chat: Vec<TcpListener>,
    pub tls: Vec<TcpListener>,
    pub udp: Vec<UdpSocket>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: the socket named {name:?} (fd {fd}) is not a {want}: {source}")]
    WrongType {
        name: String,
        fd: usize,
        want: &'static str,
        source: std::io::Error,
    },
    #[error(
        "socket activation: fd {fd} ({name:?}) is neither a TCP listener nor a UDP socket; chatd serves TCP listeners and UDP sockets"
    )]
    Unknown { name: String, fd: usize },
}

/// Takes the sockets systemd passed to this process. Call it once, early:
/// it clears `LISTEN_FDS` and `LISTEN_PID`. Sockets meant for another
/// process (`LISTEN_PID` is not ours, or is unset) are left alone.
pub fn take() -> Result<Activated, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    if pid.as_deref().and_then(|p| p.trim().parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(Activated::default());
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut fds = ListenFd::from_env();
    let mut out = Activated::default();
    for i in 0..fds.len() {
        let name = names.get(i).cloned().unwrap_or_default();
        let wrong = |want, source| ActivationError::WrongType {
            name: name.clone(),
            fd: 3 + i,
            want,
            source,
        };
        match name.as_str() {
            "tls" => out.tls.extend(
                fds.take_tcp_listener(i)
                    .map_err(|e| wrong("TCP listener", e))?,
            ),
            "udp" => out
                .udp
                .extend(fds.take_udp_socket(i).map_err(|e| wrong("UDP socket", e))?),
            _ => {
                if let Ok(l) = fds.take_tcp_listener(i) {
                    out.chat.extend(l);
                } else if let Ok(s) = fds.take_udp_socket(i) {
                    out.udp.extend(s);
                } else {
                    return Err(ActivationError::Unknown { name, fd: 3 + i });
                }
            }
        }
    }
    Ok(out)
}
