//! The chat sockets' flow-control options: `TCP_NOTSENT_LOWAT`, which bounds
//! what a socket holds unsent, and `SO_RCVLOWAT` (which `socket2` and
//! `rustix` do not offer), the bytes a socket must hold before it counts as
//! readable. A member that reads on its room's grid raises it so that a
//! line does not wake chatd (see `connection::grid_read`).

use std::io;
use std::os::fd::AsRawFd;

use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::warn;

/// Sets `SO_RCVLOWAT` on `socket` to `bytes` (at least 1).
#[allow(unsafe_code)]
pub fn set_recv_low_water(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `setsockopt` reads `size_of::<c_int>()` bytes from a pointer
    // to a live `c_int` on this stack frame, and `socket` is a descriptor
    // its owner keeps open for the duration of the call. A wrong descriptor
    // or option is reported through the return value, never undefined.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bounds the bytes a chat socket holds unsent to
/// [`chatd_hub::outbox::UNSENT_LIMIT`] (`TCP_NOTSENT_LOWAT`): what it takes
/// then shows what the client reads. Also for a socket taken over from a
/// process that did not set it.
pub fn bound_unsent(stream: &TcpStream) {
    if let Err(e) = SockRef::from(stream).set_tcp_notsent_lowat(chatd_hub::outbox::UNSENT_LIMIT) {
        warn!(error = %e, "cannot bound the unsent bytes of a chat socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    /// With the mark raised, a line no longer makes the socket readable,
    /// yet a read still returns it; lowered, the line already there is
    /// readable at once.
    #[test]
    fn a_raised_mark_hides_a_line_from_readiness_not_from_a_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        set_recv_low_water(&server, 16 * 1024).expect("raise");
        client.write_all(b"hello\n").expect("write");
        let readable = |s: &std::net::TcpStream| {
            let fd = rustix::event::PollFd::new(s, rustix::event::PollFlags::IN);
            let mut fds = [fd];
            let timeout =
                rustix::time::Timespec::try_from(Duration::from_millis(200)).expect("timeout");
            rustix::event::poll(&mut fds, Some(&timeout)).expect("poll") == 1
        };
        assert!(
            !readable(&server),
            "a line under the mark made the socket readable"
        );
        set_recv_low_water(&server, 1).expect("lower");
        assert!(
            readable(&server),
            "the line is readable once the mark is lowered"
        );
        let mut buf = [0u8; 16];
        let n = server.read(&mut buf).expect("read");
        assert_eq!(&buf[..n], b"hello\n");
    }
}
