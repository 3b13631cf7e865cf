//! The wire: one client's socket and the bytes on their way through it.
//!
//! What only touches bytes and the socket lives here: the [`Socket`] a
//! connection is generic over, the lines taken from the outbox and not yet
//! written, and the state of write coalescing and of reading on the grid.
//! Its methods are spread by concern: `write` (the write path and its
//! coalescing) and `grid_read` (reading at the room's grid points). What
//! the bytes mean to the chat is the [`Session`](super::session::Session)'s.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncWrite, Interest};
use tokio::net::{TcpStream, UnixStream};

use chatd_hub::grid::Ticket;
use chatd_hub::hub::Client;

/// What a connection needs of its socket: readiness-driven, non-blocking
/// I/O. A TCP socket for plain clients; one end of a UNIX socket pair for
/// TLS clients, whose other end the TLS pump serves (see [`crate::tls`]).
pub trait Socket: AsyncWrite + Unpin + Send + Sync + 'static {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Like `try_read`; a read shorter than `buf` emptied the socket, so
    /// it also clears the read readiness, as a `WouldBlock` would: the
    /// syscall that would only say `WouldBlock` is saved. The readiness is
    /// sampled before the read, so data arriving after it is never missed.
    fn try_read_draining(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// A copy of the socket for a seamless upgrade; `None` when it cannot
    /// be handed to another process (a TLS client's socket pair).
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>>;
    /// Reads what the socket holds now, whatever the reactor last said of
    /// its readiness: a socket reading on the grid is read in the read
    /// phase without having been reported readable.
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sets the bytes the socket must hold before it counts as readable
    /// (see [`super::grid_read`]).
    fn set_read_low_water(&self, bytes: usize) -> io::Result<()>;
}

/// Which sockets another process can take over.
trait HandoffFd {
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>>;
    /// Only a TCP socket reads on the grid: a TLS client's socket pair
    /// reports every byte.
    fn set_read_low_water(&self, _bytes: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl HandoffFd for TcpStream {
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned().map(Some)
    }
    fn set_read_low_water(&self, bytes: usize) -> io::Result<()> {
        crate::sockopt::set_recv_low_water(self, bytes)
    }
}

impl HandoffFd for UnixStream {
    fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
        Ok(None)
    }
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_read_draining(&self, buf: &mut [u8]) -> io::Result<usize> {
                let len = buf.len();
                let mut short = None;
                let read = <$t>::try_io(self, Interest::READABLE, || {
                    match <$t>::try_read(self, buf)? {
                        n if n > 0 && n < len => {
                            short = Some(n);
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                        n => Ok(n),
                    }
                });
                match (read, short) {
                    (_, Some(n)) => Ok(n),
                    (read, None) => read,
                }
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn handoff_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
                <$t as HandoffFd>::handoff_fd(self)
            }
            fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
                Ok(rustix::net::recv(self, buf, rustix::net::RecvFlags::DONTWAIT)?.0)
            }
            fn set_read_low_water(&self, bytes: usize) -> io::Result<()> {
                <$t as HandoffFd>::set_read_low_water(self, bytes)
            }
        }
    };
}

socket!(TcpStream);
socket!(UnixStream);

/// One client's socket and the bytes on their way through it.
pub(super) struct Wire<S> {
    pub(super) stream: S,
    /// Lines taken from the outbox and not yet fully written.
    pub(super) pending: VecDeque<Bytes>,
    /// When the last write to the socket happened (write coalescing).
    pub(super) last_write: Option<tokio::time::Instant>,
    /// Recent lines per second queued for this client, measured at each
    /// write: how long write coalescing may hold a write (see `hold_write`).
    pub(super) arrivals: f32,
    /// Lines queued for this client in all, at the last write.
    pub(super) lines_seen: u64,
    /// Wakes the task when a held-back write is due; made on first use, so
    /// a client that is never busy does not carry a timer.
    pub(super) write_gate: Option<Pin<Box<tokio::time::Sleep>>>,
    /// This client's place in its room's queue for the grid's next tick,
    /// when busy (see [`chatd_hub::grid`]).
    pub(super) ticket: Ticket,
    /// Set while the socket refuses bytes: wakes the task when it takes
    /// them again, telling the outbox first (see [`Writable`]). Made on
    /// the first refusal and kept.
    pub(super) writable: Option<Arc<Writable>>,
    /// The socket refused bytes and has taken none since.
    pub(super) refused: bool,
    /// Reading on the room's grid (see [`super::grid_read`]).
    pub(super) grid_read: GridRead,
}

impl<S: Socket> Wire<S> {
    /// A socket with nothing owed to it and no write yet.
    pub(super) fn new(stream: S) -> Self {
        Wire {
            stream,
            pending: VecDeque::new(),
            last_write: None,
            arrivals: 0.0,
            lines_seen: 0,
            write_gate: None,
            ticket: Ticket::default(),
            writable: None,
            refused: false,
            grid_read: GridRead::new(),
        }
    }

    /// One read into `buf`: as the reactor says the socket is readable,
    /// or (`raw`, the grid's read phase) whatever it holds now.
    pub(super) fn read(&self, buf: &mut [u8], raw: bool) -> io::Result<usize> {
        if raw {
            self.stream.read_now(buf)
        } else {
            self.stream.try_read_draining(buf)
        }
    }
}

/// A connection's state for reading on the grid.
#[derive(Debug, Default)]
pub(super) struct GridRead {
    /// Whether this connection may read on the grid at all (it runs on a
    /// single-threaded runtime, and its socket takes the mark).
    pub(super) allowed: bool,
    /// Reading on the grid: the mark is raised.
    pub(super) on: bool,
    /// The place in the queue for the grid's next read phase.
    pub(super) ticket: Ticket,
    /// Within this poll, the read phase: read, and hold the write.
    pub(super) phase: bool,
    /// A read phase came and the socket has not been read since.
    pub(super) owed: bool,
    /// Read phases in a row that found nothing to read.
    pub(super) empty: u8,
    /// Whether the client sent anything since this connection last went
    /// on the grid or read in a phase.
    pub(super) sent: bool,
}

impl GridRead {
    pub(super) fn new() -> Self {
        GridRead {
            allowed: tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread),
            ..GridRead::default()
        }
    }
}

/// The waker a connection whose socket refused bytes waits for write
/// readiness with. The reactor wakes it as soon as the client has read
/// enough to free buffer space, and it tells the client's outbox at that
/// moment, before the connection task gets a worker: whether the client
/// still reads (flow control, [`chatd_hub::outbox`]) must not depend on how
/// long chatd takes to get to it.
pub(super) struct Writable {
    pub(super) client: Arc<Client>,
    pub(super) task: AtomicWaker,
}

impl Wake for Writable {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.client.outbox.writable();
        self.task.wake();
    }
}
