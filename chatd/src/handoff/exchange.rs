//! The old process's side of the exchange with the new one, up to its
//! `Ready`, phase by phase: meet the process just started, let it prepare
//! while everyone is served, freeze, send the state, send the clients in
//! chunks, and read its answer. Starting it, the deadline, the commit and
//! the rollback are [`Upgrader::hand_over`]'s.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::info;

use super::gate::{Export, Gate};
use super::{
    Broke, CHUNK, COPIES, Exchanged, FREEZE_TIMEOUT, Gone, ListenerKind, State, ToNew, ToOld,
    UpgradeError, Upgrader, WaitingState, state, wire,
};
use chatd_hub::hub::Hub;
use chatd_hub::hub::handoff::ClientState;

/// Clients for one `Clients` message, with their sockets' copies,
/// connections still in the front door for a `Waiting` one, and how many
/// exports they came from (TLS clients' included).
struct Chunk {
    clients: Vec<ClientState>,
    fds: Vec<OwnedFd>,
    waiting: Vec<WaitingState>,
    waiting_fds: Vec<OwnedFd>,
    /// Clients told to reconnect (TLS), for the new process to announce.
    gone: Vec<Gone>,
    exports: usize,
}

/// How many exports the collection took, and what they were.
struct Collected {
    exports: usize,
    /// Clients handed over with their socket.
    clients: usize,
    waiting: usize,
}

/// The new process's last answer, and the socket it came on.
type Answer = (UnixStream, (ToOld, Vec<OwnedFd>));

impl Upgrader {
    /// The exchange with the new process `pid`, up to its `Ready`: the
    /// listeners first, while everyone is served; once it says it is
    /// prepared, the freeze, the state, and the clients in chunks.
    pub(super) async fn exchange(
        &self,
        hub: &Hub,
        channel: &tokio::net::UnixListener,
        pid: u32,
        deadline: Instant,
    ) -> Result<(UnixStream, Exchanged), Broke> {
        let sock = meet(channel, pid, deadline).await?;
        let kinds = self.listener_kinds();
        self.prepare(&sock, &kinds)?;
        // The new process is up and waits: freeze for the transfer only.
        let frozen_at = Instant::now();
        let gate = &self.inner.gate;
        let freeze = freeze(hub, gate).await?;
        let parked_ms = frozen_at.elapsed().as_millis() as u64;
        let exports = gate.collect();
        let next_id = hub.next_client_id();
        self.send_state(hub, &sock, kinds, next_id)?;
        // The clients, a chunk at a time: each chunk's copies of sockets
        // are closed once sent, before more are made. A thread of its own
        // sends (blocking writes, bounded by the socket's deadlines) while
        // the next chunk is collected.
        let (chunks, to_send) = mpsc::channel::<Chunk>(1);
        let (sending, releasing) = (hub.clone(), gate.clone());
        let sender = tokio::task::spawn_blocking(move || {
            send_chunks(sock, to_send, (&sending, &releasing), freeze, next_id)
        });
        let collected = collect(hub, gate, freeze, exports, chunks).await?;
        let collected_ms = frozen_at.elapsed().as_millis() as u64;
        let (sock, reply) = sender.await.map_err(io::Error::other)??;
        let new_pid = ready(reply.0)?;
        info!(
            clients = collected.clients,
            waiting = collected.waiting,
            parked_ms,
            collected_ms,
            ready_ms = frozen_at.elapsed().as_millis() as u64,
            "upgrade: the new process holds every client"
        );
        Ok((
            sock,
            Exchanged {
                pid: new_pid,
                frozen_at,
                clients: collected.clients,
                dropped_tls: collected.exports - collected.clients - collected.waiting,
                waiting: collected.waiting,
            },
        ))
    }

    fn listener_kinds(&self) -> Vec<ListenerKind> {
        self.inner
            .listeners
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Hands the new process this process's stderr and the listeners, and
    /// waits until it is prepared; everyone is served meanwhile.
    fn prepare(&self, sock: &UnixStream, kinds: &[ListenerKind]) -> Result<(), Broke> {
        let listener_fds: Vec<BorrowedFd<'_>> = self
            .inner
            .listeners
            .iter()
            .map(|(_, f)| f.as_fd())
            .collect();
        let stderr = io::stderr();
        // Blocking writes, answered by a process that reads them at once;
        // the socket's deadlines bound them.
        let reply = tokio::task::block_in_place(|| {
            wire::send(sock, &ToNew::Hello, &[stderr.as_fd()])?;
            wire::send(
                sock,
                &ToNew::Prepare {
                    listeners: kinds.to_vec(),
                    admin_token: self.inner.admin_token.clone(),
                },
                &listener_fds,
            )?;
            wire::recv::<ToOld>(sock, |_| 0)
        })?;
        match reply.0 {
            ToOld::Prepared => Ok(()),
            ToOld::Failed { error } => Err(Broke::Said(error)),
            ToOld::Ready { .. } => Err(Broke::Io(protocol_error("Ready before the state"))),
        }
    }

    /// The rooms, the counters and what the cluster handed on, with no
    /// client: they follow in chunks.
    fn send_state(
        &self,
        hub: &Hub,
        sock: &UnixStream,
        kinds: Vec<ListenerKind>,
        next_id: u64,
    ) -> Result<(), Broke> {
        let state = State {
            version: state::CURRENT,
            listeners: kinds,
            next_id,
            rooms: hub.export_rooms(),
            clients: Vec::new(),
            admin_token: self.inner.admin_token.clone(),
            stats: Some(hub.stats().counters()),
            // Taken before any client is exported: from here on the
            // cluster's listeners hand nothing on (they wait out the freeze).
            cluster_receipts: self
                .inner
                .receipts
                .as_ref()
                .map_or_else(Vec::new, |r| r.export()),
        };
        let state = serde_json::to_value(&state).map_err(io::Error::other)?;
        tokio::task::block_in_place(|| wire::send(sock, &ToNew::State { fds: 0, state }, &[]))?;
        Ok(())
    }
}

/// Accepts the new process on `channel` (only `pid` may connect) and makes
/// the socket blocking, bounded by `deadline`.
async fn meet(
    channel: &tokio::net::UnixListener,
    pid: u32,
    deadline: Instant,
) -> Result<UnixStream, Broke> {
    let (sock, _) = channel.accept().await?;
    let sock = sock.into_std()?;
    check_peer(&sock, pid)?;
    sock.set_nonblocking(false)?;
    // Blocking calls cannot be interrupted: each waits at most until
    // the upgrade's own deadline.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))?;
    Ok(sock)
}

/// Only the process this one started may take its sockets.
fn check_peer(sock: &UnixStream, pid: u32) -> io::Result<()> {
    let cred = rustix::net::sockopt::socket_peercred(sock)?;
    if cred.pid.as_raw_nonzero().get() as u32 != pid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the handoff socket was reached by pid {}, not the new process {pid}",
                cred.pid.as_raw_nonzero()
            ),
        ));
    }
    Ok(())
}

/// Stops every connection at a clean point and waits until all have
/// parked; returns the freeze's number, for [`super::Gate::release`].
async fn freeze(hub: &Hub, gate: &Gate) -> Result<u64, Broke> {
    let freeze = gate.freeze();
    hub.wake_connections();
    let all_parked = gate.wait_parked(|| hub.client_count());
    if tokio::time::timeout(FREEZE_TIMEOUT, all_parked)
        .await
        .is_err()
    {
        return Err(Broke::Here(UpgradeError::Freeze(FREEZE_TIMEOUT)));
    }
    Ok(freeze)
}

/// Collects every parked connection's export into chunks for the sender,
/// letting at most [`COPIES`] exports (and copies of sockets) exist at
/// once: the sender returns each chunk's permits once it has closed them.
async fn collect(
    hub: &Hub,
    gate: &Gate,
    freeze: u64,
    mut exports: mpsc::UnboundedReceiver<Export>,
    chunks: mpsc::Sender<Chunk>,
) -> Result<Collected, Broke> {
    let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
    let mut collected = Collected {
        exports: 0,
        clients: 0,
        waiting: 0,
    };
    gate.release(freeze, COPIES);
    loop {
        // Both only fall now: nobody registers or arrives in a freeze.
        let total = hub.client_count() + gate.arrivals();
        if collected.exports >= total {
            break;
        }
        let want = (total - collected.exports).min(CHUNK);
        let chunk = next_chunk(want, &mut exports, deadline).await?;
        collected.exports += want;
        collected.clients += chunk.clients.len();
        collected.waiting += chunk.waiting.len();
        if chunks.send(chunk).await.is_err() {
            // The sender stopped on an error, which it returns.
            break;
        }
    }
    Ok(collected)
}

/// The next `want` exports, by `deadline`.
async fn next_chunk(
    want: usize,
    exports: &mut mpsc::UnboundedReceiver<Export>,
    deadline: tokio::time::Instant,
) -> Result<Chunk, Broke> {
    let mut chunk = Chunk {
        clients: Vec::with_capacity(want),
        fds: Vec::with_capacity(want),
        waiting: Vec::new(),
        waiting_fds: Vec::new(),
        gone: Vec::new(),
        exports: want,
    };
    for _ in 0..want {
        match tokio::time::timeout_at(deadline, exports.recv()).await {
            Ok(Some(export)) => chunk.add(export)?,
            Ok(None) | Err(_) => {
                return Err(Broke::Here(UpgradeError::Freeze(FREEZE_TIMEOUT)));
            }
        }
    }
    Ok(chunk)
}

impl Chunk {
    /// A socket that could not be copied abandons the upgrade.
    fn add(&mut self, export: Export) -> Result<(), Broke> {
        match export {
            Export::Client { state, fd } => {
                // A TLS client has no socket to hand over.
                match fd.map_err(|e| Broke::Here(UpgradeError::Copy(e)))? {
                    Some(fd) => {
                        self.clients.push(state);
                        self.fds.push(fd);
                    }
                    None => self.gone.push(Gone {
                        nick: state.nick,
                        room: state.room,
                    }),
                }
            }
            Export::Waiting { state, fd } => {
                let fd = fd.map_err(|e| Broke::Here(UpgradeError::Copy(e)))?;
                self.waiting.push(state);
                self.waiting_fds.push(fd);
            }
        }
        Ok(())
    }
}

/// The sending thread: every chunk as it comes, then `NextId` if needed
/// and `End`; returns the new process's answer. Blocking.
fn send_chunks(
    sock: UnixStream,
    mut to_send: mpsc::Receiver<Chunk>,
    (hub, gate): (&Hub, &Gate),
    freeze: u64,
    next_id: u64,
) -> io::Result<Answer> {
    while let Some(chunk) = to_send.blocking_recv() {
        let exports = chunk.exports;
        send_chunk(&sock, chunk)?;
        // Closed: as many more may be copied.
        gate.release(freeze, exports);
    }
    // Only if it moved (it cannot while registration is refused):
    // the previous release, which knows neither `NextId` nor
    // `Waiting`, can take over whenever nobody is in the front door.
    let now = hub.next_client_id();
    if now != next_id {
        wire::send(&sock, &ToNew::NextId { next_id: now }, &[])?;
    }
    wire::send(&sock, &ToNew::End, &[])?;
    let reply = wire::recv::<ToOld>(&sock, |_| 0)?;
    Ok((sock, reply))
}

/// One chunk's `Clients` and, if any, `Waiting`; its copies of sockets are
/// closed on return.
fn send_chunk(sock: &UnixStream, chunk: Chunk) -> io::Result<()> {
    let Chunk {
        clients,
        fds,
        waiting,
        waiting_fds,
        gone,
        exports: _,
    } = chunk;
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    wire::send(sock, &ToNew::Clients { clients, gone }, &borrowed)?;
    if !waiting.is_empty() {
        let borrowed: Vec<BorrowedFd<'_>> = waiting_fds.iter().map(|f| f.as_fd()).collect();
        wire::send(sock, &ToNew::Waiting { waiting }, &borrowed)?;
    }
    Ok(())
}

/// The new process's answer once it holds every client: its pid.
fn ready(reply: ToOld) -> Result<u32, Broke> {
    match reply {
        ToOld::Ready { pid } => Ok(pid),
        ToOld::Failed { error } => Err(Broke::Said(error)),
        ToOld::Prepared => Err(Broke::Io(protocol_error("Prepared twice"))),
    }
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected message from the new process: {what}"),
    )
}
