//! The client thread (`server.client_threads = 1`, the default): every chat
//! connection served by one single-threaded runtime of its own, beside the
//! main runtime that runs accept, the admin API, metrics, the cluster, and
//! TLS (handshakes and the pump; only the chat behind the pump comes here).
//!
//! **Why.** At a steady rate most of chatd's CPU that is not the kernel's
//! `writev` went to threads waking each other: a line arriving woke a
//! worker, and each of a room's grid points woke the second worker to share
//! the writes, which on a machine whose other CPU is busy meant the two
//! workers taking turns on one CPU. One thread that owns every client wakes
//! once per grid point and per burst, and lets busy senders read on the
//! grid (`connection::grid_read`), which needs the read phase to run
//! before the write phase, as only one thread guarantees. It gives up
//! spreading clients over CPUs: a line to a room of 10,000 reaches its last
//! member later than two workers would get it there. `0` keeps the workers'
//! layout; see docs/PERFORMANCE.md.

use std::io;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The running client thread; dropping it stops the thread, and with it
/// every connection still on it.
#[derive(Debug)]
pub struct ClientThread {
    handle: Handle,
    stop: CancellationToken,
}

impl ClientThread {
    /// Starts the thread and its runtime (reactor and timer of its own).
    pub fn start() -> io::Result<ClientThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        // This thread's own lateness: its clients are read late too.
        handle.spawn(crate::stall::watch(stop.clone()));
        std::thread::Builder::new()
            .name("chatd-clients".into())
            .spawn(move || runtime.block_on(stopped.cancelled()))?;
        Ok(ClientThread { handle, stop })
    }

    /// Where client tasks are spawned.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for ClientThread {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
