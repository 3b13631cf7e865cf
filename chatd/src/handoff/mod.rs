//! Seamless upgrade: this process hands its listeners, every client socket
//! and every client's state to a new chatd process, which carries on where
//! it stopped. Nobody is disconnected; nothing a client sent or is owed is
//! lost or repeated.
//!
//! - [`gate`]: the freeze inside the old process (accept loops, UDP, every
//!   connection stop at a clean point and wait for the outcome);
//! - [`state`]: the versioned state document;
//! - [`wire`]: JSON frames with descriptors (`SCM_RIGHTS`) over a UNIX
//!   socket;
//! - [`Upgrader`] (here): the old process's side, from starting the new
//!   binary to commit or rollback, with [`exchange`] the messages it
//!   exchanges with the new process up to its `Ready`; [`receive`] and
//!   [`Incoming`]: the new process's side.
//!
//! The exchange, on a private UNIX socket whose path the new process gets in
//! `HANDOFF_FROM_CHATD` (and whose peer must be the process just started).
//! Everything that does not need the clients stopped happens before the
//! freeze; the freeze covers the state and the sockets only:
//!
//! ```text
//! old                                   new (same binary path, args, env)
//!  serving                               load config (an error: exit 1)
//!  ── Hello + old stderr ─────────────▶  log to the old process's stderr
//!  ── Prepare + listeners ────────────▶  bans, admin, TLS, file limit
//!  ◀─────────────────────────── Prepared
//!  freeze, wait for every park
//!  ── State (rooms, counters) ────────▶  restore rooms, history, counters
//!  ── Clients + sockets, by chunks ───▶  adopt each chunk
//!  ── Waiting + sockets (front door) ─▶  serve each after the commit
//!  ── End ────────────────────────────▶  cluster
//!  ◀──────────────────── Ready / Failed
//!  MAINPID=new
//!  ── Commit ─────────────────────────▶  MAINPID=self, READY=1; serve
//!  drop its sockets, exit
//! ```
//!
//! Until `Commit`, the new process touches no socket, so when it fails
//! (exits, says `Failed`, or stays silent past [`READY_TIMEOUT`]) the old
//! one resumes every connection exactly where it parked, or never stopped
//! them if it failed before `Prepared`. Connections not yet registered
//! (in the front door, see [`crate::front`]) park at the freeze as well and
//! go over as bare sockets in `Waiting`. A version 1 old process sends
//! `State` with everything right after `Hello`; [`receive`] takes that too.

mod arrival;
mod exchange;
pub mod gate;
pub mod state;
pub mod wire;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::listen::Listeners;
pub use arrival::Arrival;
use chatd_hub::hub::Hub;
use chatd_hub::hub::handoff::ClientState;
pub use gate::{Export, Gate, Outcome};
pub use state::{Gone, ListenerKind, State, WaitingState};

/// The variable that tells a starting chatd to take over from a running
/// one, and where to ask. Not `CHATD_…`: those are config keys.
pub const HANDOFF_ENV: &str = "HANDOFF_FROM_CHATD";
/// How long connections have to park.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new process waits on the old one's next message (the old
/// one bounds the whole exchange by `server.upgrade_timeout_secs`, at most
/// 600 s).
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Clients per `Clients` message.
const CHUNK: usize = 500;
/// Copies of client sockets that exist at most at once: two chunks, one
/// being sent while the next is collected.
const COPIES: usize = 2 * CHUNK;
/// How much of the new process's stderr is kept for the error message.
const STDERR_TAIL: usize = 4096;

/// How far the exchange with the new process got.
pub(super) struct Exchanged {
    pub(super) pid: u32,
    pub(super) frozen_at: Instant,
    pub(super) clients: usize,
    pub(super) dropped_tls: usize,
    pub(super) waiting: usize,
}

/// Why the exchange stopped before `Ready`.
pub(super) enum Broke {
    /// The channel failed (the new process may have died; its stderr says).
    Io(io::Error),
    /// The new process said why it cannot take over.
    Said(String),
    /// This process gave up.
    Here(UpgradeError),
}

impl From<io::Error> for Broke {
    fn from(e: io::Error) -> Self {
        Broke::Io(e)
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum ToNew {
    /// Carries the old process's stderr.
    Hello,
    /// The listeners, in order, with their descriptors: sent before the
    /// freeze, so the new process prepares while everyone is served.
    /// (Since state version 2.)
    Prepare {
        listeners: Vec<ListenerKind>,
        admin_token: Option<String>,
    },
    /// The state document and its descriptors. Version 1: everything, the
    /// listeners' and every client's descriptors with it. Since version 2:
    /// after `Prepare` and the freeze, without clients or descriptors;
    /// `Clients` follow, then `End`.
    State {
        fds: usize,
        state: serde_json::Value,
    },
    /// A chunk of clients, each with its socket (since version 2), and
    /// the clients of the chunk that could not be handed over (TLS): the
    /// new process announces that they left. Older processes send none,
    /// and ignore them.
    Clients {
        clients: Vec<ClientState>,
        #[serde(default)]
        gone: Vec<Gone>,
    },
    /// Connections still in the front door, each with its socket: sent
    /// after the `Clients` of the same chunk. Older processes send none.
    Waiting {
        waiting: Vec<WaitingState>,
    },
    /// The id the next client gets, read once every client is collected,
    /// just before `End`, when it differs from the state's `next_id` (no
    /// client registers during a freeze: a guard). Older processes send
    /// none.
    NextId {
        next_id: u64,
    },
    /// Every client was sent (since version 2).
    End,
    Commit,
}

#[derive(Debug, Serialize, Deserialize)]
enum ToOld {
    /// Ready for the state: the old process freezes now (answers
    /// `Prepare`).
    Prepared,
    Ready {
        pid: u32,
    },
    Failed {
        error: String,
    },
}

/// A finished upgrade.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub pid: u32,
    /// From the request to the commit, starting the new process included.
    pub duration: Duration,
    /// From the freeze to the commit: how long no connection was served.
    pub frozen: Duration,
    /// Clients handed over.
    pub clients: usize,
    /// TLS clients, which cannot be handed over and were asked to
    /// reconnect.
    pub dropped_tls: usize,
    /// Connections still in the front door (not yet clients), handed over
    /// as bare sockets.
    pub waiting: usize,
}

/// Why an upgrade did not happen; the old process serves on in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already in progress")]
    Busy,
    #[error("the upgrade was interrupted: this process is shutting down")]
    Interrupted,
    #[error("upgrades are not available in this process")]
    Unavailable,
    #[error(
        "chatd is process 1 (a container's init): its exit after the handoff would stop the \
         container and the new process with it; replace the container instead"
    )]
    Pid1,
    #[error("connections did not stop within {0:?}; nothing was handed over")]
    Freeze(Duration),
    #[error("cannot prepare the handoff socket {}: {source}", path.display())]
    Channel { path: PathBuf, source: io::Error },
    #[error("cannot start {}: {source}", exe.display())]
    Spawn { exe: PathBuf, source: io::Error },
    #[error("the new process failed: {0}")]
    NewProcess(String),
    #[error("the new process did not become ready within {0:?}{1}")]
    Timeout(Duration, String),
    #[error(
        "not enough file descriptors for the handoff: {open} open, {needed} more needed \
         (copies of up to two chunks of client sockets), limit {limit}; raise LimitNOFILE / ulimit -n"
    )]
    Descriptors { open: u64, needed: u64, limit: u64 },
    #[error("cannot copy a client's socket for the new process: {0}; nothing was handed over")]
    Copy(io::Error),
    #[error("handoff failed: {0}")]
    Io(#[from] io::Error),
}

/// The old process's side: everything needed to start a successor and hand
/// it this process's sockets. Made once at start; cheap to clone.
#[derive(Clone, Debug)]
pub struct Upgrader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    exe: PathBuf,
    args: Vec<OsString>,
    runtime_dir: PathBuf,
    listeners: Vec<(ListenerKind, OwnedFd)>,
    admin_token: Option<String>,
    /// Cluster mode: what the cluster's receivers have handed on.
    receipts: Option<Arc<chatd_cluster::seq::Receipts>>,
    /// The freeze of this process's sockets.
    gate: Arc<Gate>,
    /// Cancelled at commit: this process then stops as after a signal,
    /// having nobody left to serve.
    shutdown: CancellationToken,
    /// Set while an upgrade runs: a second one is refused.
    running: AtomicBool,
}

/// An upgrade under way in a task of its own, so that whoever asked for it
/// may stop waiting (an admin client that hangs up or times out) without
/// stopping it halfway: it runs to a commit or a rollback, and logs which.
#[derive(Debug)]
pub struct Running {
    outcome: oneshot::Receiver<Result<Upgraded, UpgradeError>>,
}

impl Running {
    /// Waits for the outcome.
    pub async fn outcome(self) -> Result<Upgraded, UpgradeError> {
        self.outcome.await.unwrap_or(Err(UpgradeError::Interrupted))
    }
}

/// The upgrader's "running" flag, cleared however its task ends.
struct Claim(Arc<Inner>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// Resumes every frozen connection if the upgrade's task ends before its
/// outcome is settled (a panic, the runtime torn down): a freeze is never
/// left behind.
struct Thaw<'a> {
    gate: &'a Gate,
    armed: bool,
}

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        if self.armed && self.gate.is_frozen() {
            warn!("upgrade: interrupted during the freeze; every connection resumes here");
            self.gate.resume();
        }
    }
}

/// The new process until it commits: stopped (and reaped by the runtime)
/// when the upgrade ends any other way, so no half-started chatd is left
/// behind.
struct Successor(Option<tokio::process::Child>);

impl Successor {
    fn child(&mut self) -> &mut tokio::process::Child {
        // Set at creation; taken only by `commit`, which consumes `self`.
        self.0
            .as_mut()
            .expect("the successor is present until its commit")
    }

    /// The new process serves: it lives on after this one.
    fn commit(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.start_kill();
        }
    }
}

impl Upgrader {
    /// The command `exe` and `args` as resolved at start (so a package upgrade that
    /// replaced the file is what starts); `runtime_dir` a private directory
    /// for the handoff socket; `listeners` copies of every listening socket
    /// with what it serves.
    pub fn new(
        (exe, args): (PathBuf, Vec<OsString>),
        runtime_dir: PathBuf,
        listeners: Vec<(ListenerKind, OwnedFd)>,
        admin_token: Option<String>,
        receipts: Option<Arc<chatd_cluster::seq::Receipts>>,
        gate: Arc<Gate>,
        shutdown: CancellationToken,
    ) -> Upgrader {
        Upgrader {
            inner: Arc::new(Inner {
                exe,
                args,
                runtime_dir,
                listeners,
                admin_token,
                receipts,
                gate,
                shutdown,
                running: AtomicBool::new(false),
            }),
        }
    }

    /// Copies of `listeners`' sockets, tagged, for [`Upgrader::new`].
    pub fn listener_copies(
        listeners: &Listeners,
        metrics: Option<&tokio::net::TcpListener>,
    ) -> io::Result<Vec<(ListenerKind, OwnedFd)>> {
        let mut out = Vec::new();
        let mut add = |kind, fd: BorrowedFd<'_>| -> io::Result<()> {
            out.push((kind, fd.try_clone_to_owned()?));
            Ok(())
        };
        for l in &listeners.chat {
            add(ListenerKind::Chat, l.as_fd())?;
        }
        for l in &listeners.tls {
            add(ListenerKind::Tls, l.as_fd())?;
        }
        for s in &listeners.udp {
            add(ListenerKind::Udp, s.as_fd())?;
        }
        for l in &listeners.admin.tcp {
            add(ListenerKind::Admin, l.as_fd())?;
        }
        if let Some((l, path)) = &listeners.admin.unix {
            add(ListenerKind::AdminUnix(path.clone()), l.as_fd())?;
        }
        if let Some(l) = metrics {
            add(ListenerKind::Metrics, l.as_fd())?;
        }
        Ok(out)
    }

    /// Starts an upgrade in a task of its own (see [`Running`]); refused
    /// while another runs.
    pub fn start(&self, hub: &Hub) -> Result<Running, UpgradeError> {
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(UpgradeError::Busy);
        }
        let claim = Claim(self.inner.clone());
        let (tx, rx) = oneshot::channel();
        let (this, hub) = (self.clone(), hub.clone());
        tokio::spawn(async move {
            let result = this.run(&hub).await;
            // Free before the outcome is told: a retry right after a
            // failure is not refused as busy.
            drop(claim);
            let _ = tx.send(result);
        });
        Ok(Running { outcome: rx })
    }

    /// [`Upgrader::start`], then its outcome.
    pub async fn upgrade(&self, hub: &Hub) -> Result<Upgraded, UpgradeError> {
        self.start(hub)?.outcome().await
    }

    /// Starts the binary at this process's path and hands everything over;
    /// on success this process is about to exit. On failure every
    /// connection resumes where it stopped (or never stopped, when the new
    /// process failed before the freeze), and the error carries what the
    /// new process said.
    async fn run(&self, hub: &Hub) -> Result<Upgraded, UpgradeError> {
        if std::process::id() == 1 {
            return Err(UpgradeError::Pid1);
        }
        check_descriptors(hub.client_count())?;
        let started = Instant::now();
        let gate = &*self.inner.gate;
        info!(exe = %self.inner.exe.display(), "upgrade: starting the new process");
        let mut thaw = Thaw { gate, armed: true };
        let result = self.hand_over(hub, started).await;
        thaw.armed = false;
        match &result {
            Ok(done) => {
                yield_to_successor();
                gate.commit();
                info!(
                    pid = done.pid,
                    clients = done.clients,
                    waiting = done.waiting,
                    tls_clients_closed = done.dropped_tls,
                    duration_ms = done.duration.as_millis() as u64,
                    frozen_ms = done.frozen.as_millis() as u64,
                    "upgrade: handed over to the new process; exiting"
                );
                self.inner.shutdown.cancel();
            }
            Err(e) => {
                if gate.is_frozen() {
                    gate.resume();
                    // The next upgrade starts from a clean gate.
                    let _ = tokio::time::timeout(FREEZE_TIMEOUT, gate.wait_unparked()).await;
                }
                warn!(error = %e, "upgrade failed; serving on");
            }
        }
        result
    }

    /// Starts the new process and runs the exchange with it, bounded by
    /// `server.upgrade_timeout_secs` from `started`, then commits. However
    /// it ends before the commit, the new process is stopped
    /// ([`Successor`]).
    async fn hand_over(&self, hub: &Hub, started: Instant) -> Result<Upgraded, UpgradeError> {
        let path = self
            .inner
            .runtime_dir
            .join(format!("handoff-{}.sock", std::process::id()));
        let channel = self.open_channel(&path)?;
        let _remove = RemoveOnDrop(path.clone());
        let mut successor = self.spawn_successor(&path).await?;
        let child = successor.child();
        let pid = child.id().unwrap_or(0);
        let stderr = StderrTail::forward(child);
        let limit = hub.config().server.upgrade_timeout;
        let deadline = started + limit;
        let outcome = tokio::select! {
            r = tokio::time::timeout(limit, self.exchange(hub, &channel, pid, deadline)) => r,
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                let why = stderr.why(None).await;
                return Err(UpgradeError::NewProcess(if why.is_empty() { status } else { why }));
            }
        };
        let (sock, exchanged) = match outcome {
            Err(_) => {
                stop(child).await;
                let said = stderr.why(None).await;
                return Err(UpgradeError::Timeout(limit, format!(": {said}")));
            }
            Ok(Err(broke)) => return Err(abandon(child, broke, stderr, limit).await),
            Ok(Ok(done)) => done,
        };
        commit(&sock, &exchanged, successor)?;
        let frozen = exchanged.frozen_at.elapsed();
        Ok(Upgraded {
            pid: exchanged.pid,
            duration: started.elapsed(),
            frozen,
            clients: exchanged.clients,
            dropped_tls: exchanged.dropped_tls,
            waiting: exchanged.waiting,
        })
    }

    /// A private socket, in a 0700 directory, for this one exchange.
    fn open_channel(&self, path: &Path) -> Result<tokio::net::UnixListener, UpgradeError> {
        (|| {
            chatd_hub::files::create_private_dir(&self.inner.runtime_dir)?;
            let _ = std::fs::remove_file(path);
            let listener = std::os::unix::net::UnixListener::bind(path)?;
            listener.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(listener)
        })()
        .map_err(|source| UpgradeError::Channel {
            path: path.to_owned(),
            source,
        })
    }

    /// Starts the binary with this process's arguments, told in
    /// [`HANDOFF_ENV`] where the channel is.
    async fn spawn_successor(&self, path: &Path) -> Result<Successor, UpgradeError> {
        let child = spawn_busy_aware(
            Command::new(&self.inner.exe)
                .args(&self.inner.args)
                .env(HANDOFF_ENV, path)
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(false),
        )
        .await
        .map_err(|source| UpgradeError::Spawn {
            exe: self.inner.exe.clone(),
            source,
        })?;
        Ok(Successor(Some(child)))
    }
}

/// The new process's stderr: copied to ours as it comes, its tail kept for
/// the error message.
struct StderrTail {
    tail: Arc<Mutex<Vec<u8>>>,
    forward: Option<tokio::task::JoinHandle<()>>,
}

impl StderrTail {
    fn forward(child: &mut tokio::process::Child) -> StderrTail {
        let tail = Arc::new(Mutex::new(Vec::new()));
        let forward = child
            .stderr
            .take()
            .map(|e| tokio::spawn(forward_stderr(e, tail.clone())));
        StderrTail { tail, forward }
    }

    /// `why` if given, else what the new process said last; either once
    /// its stderr is closed, or after a second.
    async fn why(self, why: Option<String>) -> String {
        if let Some(f) = self.forward {
            let _ = tokio::time::timeout(Duration::from_secs(1), f).await;
        }
        let said = String::from_utf8_lossy(&chatd_hub::lock::lock(&self.tail))
            .trim()
            .to_string();
        // The last line is the error; earlier ones are logs.
        let last = said.lines().last().unwrap_or_default().to_string();
        match why {
            Some(why) => why,
            None if last.is_empty() => "it exited before it was ready".to_string(),
            None => last,
        }
    }
}

/// The error for an exchange that stopped before `Ready`, once the new
/// process is gone.
async fn abandon(
    child: &mut tokio::process::Child,
    broke: Broke,
    stderr: StderrTail,
    limit: Duration,
) -> UpgradeError {
    match broke {
        Broke::Io(e) => {
            stop(child).await;
            let said = stderr.why(None).await;
            UpgradeError::NewProcess(format!("{said} ({e})"))
        }
        Broke::Said(error) => {
            let _ = tokio::time::timeout(limit, child.wait()).await;
            let _ = child.start_kill();
            UpgradeError::NewProcess(stderr.why(Some(error)).await)
        }
        Broke::Here(e) => {
            // Our side gave up (connections did not park): the new
            // process holds nothing it may use without a commit.
            stop(child).await;
            e
        }
    }
}

async fn stop(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Tells the new process, which holds every client, to serve, and leaves
/// it running: from here on it owns every socket.
fn commit(sock: &UnixStream, exchanged: &Exchanged, successor: Successor) -> io::Result<()> {
    // systemd follows the new process from here.
    crate::notify::main_pid(exchanged.pid);
    tokio::task::block_in_place(|| wire::send(sock, &ToNew::Commit, &[]))?;
    // The new process lives on after this one: nothing waits for it.
    successor.commit();
    Ok(())
}

/// After the commit this process only winds down (ten thousand tasks end,
/// each dropping its copy of a socket), while the new one catches up with
/// what arrived during the freeze: every thread of this process goes to
/// the lowest priority, so that on a busy machine the wind-down takes the
/// CPU the new process leaves, not the other way round. Best effort.
fn yield_to_successor() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let tid = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok());
        if let Some(tid) = tid.and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::setpriority_process(Some(tid), 19);
        }
    }
}

/// Fails before starting anyone when the descriptors would run out
/// halfway: the handoff needs [`COPIES`] copies of client sockets, the
/// channel and the new process's stderr pipe, however many clients there
/// are (the new process inherits the same limit and needs what this one
/// holds now).
fn check_descriptors(clients: usize) -> Result<(), UpgradeError> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let Ok(open) = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64) else {
        return Ok(());
    };
    let needed = clients.min(COPIES) as u64 + 16;
    if open.saturating_add(needed) > limit {
        return Err(UpgradeError::Descriptors {
            open,
            needed,
            limit,
        });
    }
    Ok(())
}

/// Starts `cmd`, retrying for a moment while the file is busy (`ETXTBSY`):
/// a binary just written is busy while any process still holds it open
/// for writing, such as a process forked meanwhile by whoever wrote it,
/// until that process's own exec.
async fn spawn_busy_aware(cmd: &mut Command) -> io::Result<tokio::process::Child> {
    let busy = rustix::io::Errno::TXTBSY.raw_os_error();
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(busy) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => return other,
        }
    }
}

/// Copies the new process's stderr to ours until it takes ours over, and
/// keeps the tail for an error message.
async fn forward_stderr(mut from: tokio::process::ChildStderr, tail: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    let mut out = tokio::io::stderr();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let _ = out.write_all(&buf[..n]).await;
        let mut t = chatd_hub::lock::lock(&tail);
        t.extend_from_slice(&buf[..n]);
        let excess = t.len().saturating_sub(STDERR_TAIL);
        t.drain(..excess);
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why the new process cannot take over; it exits with this, and the old
/// process shows it to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("handoff: cannot reach the running chatd at {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("handoff: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    State(#[from] state::DecodeError),
    #[error("handoff: unexpected message from the running chatd")]
    Protocol,
    #[error("handoff: the running chatd kept serving (no commit): {0}")]
    NoCommit(io::Error),
}

/// The path in [`HANDOFF_ENV`]: set when this process was started to take
/// over from a running one.
pub fn take_path() -> Option<PathBuf> {
    // Left in the environment (removing it is `unsafe` in this edition):
    // [`Upgrader`] sets its own value for each process it starts.
    std::env::var_os(HANDOFF_ENV).map(PathBuf::from)
}

/// What the new process received, not yet serving: the listeners at
/// first; the state and the clients come with [`Incoming::receive_state`].
pub struct Incoming {
    sock: UnixStream,
    pub listeners: Listeners,
    pub metrics: Option<tokio::net::TcpListener>,
    /// The previous process's generated admin token, if any.
    pub admin_token: Option<String>,
    /// A version 1 old process sent everything at once.
    whole: Option<(State, Vec<(ClientState, std::net::TcpStream)>)>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

/// What [`Incoming::receive_state`] hands its caller, in this order: the
/// state once, then the clients in chunks.
#[derive(Debug)]
pub enum Received<'a> {
    State(&'a State),
    /// Each with its socket, not yet registered with the runtime: nothing
    /// may touch it before the commit.
    Clients(Vec<(ClientState, std::net::TcpStream)>),
    /// Connections still in the front door, likewise untouched before the
    /// commit.
    Waiting(Vec<(WaitingState, std::net::TcpStream)>),
    /// The id the next client gets (after every client).
    NextId(u64),
    /// Clients that were not handed over (TLS): announce that they left,
    /// once this process serves.
    Gone(Vec<Gone>),
}

/// The new process's side, up to holding the listeners: connects to the
/// old process, logs from now on where it logs, and takes the listeners
/// (and, from an old process of state version 1, everything). Must run
/// inside the runtime (tokio adopts the sockets).
pub fn receive(path: &Path) -> Result<Incoming, ReceiveError> {
    let sock = UnixStream::connect(path).map_err(|source| ReceiveError::Connect {
        path: path.to_owned(),
        source,
    })?;
    sock.set_read_timeout(Some(READY_TIMEOUT))?;
    let (hello, stderr) = wire::recv::<ToNew>(&sock, |m| usize::from(matches!(m, ToNew::Hello)))?;
    if !matches!(hello, ToNew::Hello) {
        return Err(ReceiveError::Protocol);
    }
    if let Some(stderr) = stderr.first() {
        // Our stderr was a pipe to the old process, which is about to go.
        rustix::stdio::dup2_stderr(stderr).map_err(io::Error::from)?;
    }
    // From here the old process hears why this one cannot take over.
    match take_listeners(sock) {
        Ok(incoming) => Ok(incoming),
        Err((sock, e)) => {
            let _ = wire::send(
                &sock,
                &ToOld::Failed {
                    error: e.to_string(),
                },
                &[],
            );
            Err(e)
        }
    }
}

fn take_listeners(sock: UnixStream) -> Result<Incoming, (UnixStream, ReceiveError)> {
    let got = wire::recv::<ToNew>(&sock, |m| match m {
        ToNew::State { fds, .. } => *fds,
        ToNew::Prepare { listeners, .. } => listeners.len(),
        _ => 0,
    });
    let (msg, fds) = match got {
        Ok(got) => got,
        Err(e) => return Err((sock, e.into())),
    };
    let made = match msg {
        ToNew::Prepare {
            listeners,
            admin_token,
        } => {
            listener_sockets(&listeners, fds.into_iter()).map(|(l, m, _)| (l, m, admin_token, None))
        }
        // Version 1: the state, then every descriptor.
        ToNew::State { state, .. } => (|| {
            let mut state = state::decode_value(state)?;
            let (l, m, rest) = listener_sockets(&state.listeners, fds.into_iter())?;
            let clients = client_sockets(std::mem::take(&mut state.clients), rest.collect())?;
            Ok((l, m, state.admin_token.clone(), Some((state, clients))))
        })(),
        _ => Err(ReceiveError::Protocol),
    };
    match made {
        Ok((listeners, metrics, admin_token, whole)) => Ok(Incoming {
            sock,
            listeners,
            metrics,
            admin_token,
            whole,
        }),
        Err(e) => Err((sock, e)),
    }
}

type Made<I> = (Listeners, Option<tokio::net::TcpListener>, I);

/// Makes the first descriptors listeners again, one per `kinds` entry;
/// returns the rest.
fn listener_sockets<I: Iterator<Item = OwnedFd>>(
    kinds: &[ListenerKind],
    mut fds: I,
) -> Result<Made<I>, ReceiveError> {
    let mut listeners = Listeners::empty();
    let mut metrics = None;
    let tcp = |fd: OwnedFd| {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    };
    for kind in kinds {
        let fd = fds.next().ok_or(ReceiveError::Protocol)?;
        match kind {
            ListenerKind::Chat => listeners.chat.push(tcp(fd)?),
            ListenerKind::Tls => listeners.tls.push(tcp(fd)?),
            ListenerKind::Admin => listeners.admin.tcp.push(tcp(fd)?),
            ListenerKind::Metrics => metrics = Some(tcp(fd)?),
            ListenerKind::Udp => {
                let s = std::net::UdpSocket::from(fd);
                s.set_nonblocking(true)?;
                listeners.udp.push(tokio::net::UdpSocket::from_std(s)?);
            }
            ListenerKind::AdminUnix(path) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                listeners.admin.unix = Some((tokio::net::UnixListener::from_std(l)?, path.clone()));
            }
        }
    }
    Ok((listeners, metrics, fds))
}

/// What the receiving thread passes on.
enum Arrived {
    Clients(Vec<ClientState>, Vec<OwnedFd>, Vec<Gone>),
    Waiting(Vec<WaitingState>, Vec<OwnedFd>),
    NextId(u64),
}

/// The new process's receiving thread: every `Clients` chunk (and
/// `Waiting`, `NextId`) up to `End`, each passed on with its descriptors.
/// Returns the number of clients.
fn receive_chunks(
    sock: &UnixStream,
    chunks: std::sync::mpsc::SyncSender<Arrived>,
) -> Result<usize, ReceiveError> {
    let mut n = 0;
    loop {
        let (msg, fds) = wire::recv::<ToNew>(sock, |m| match m {
            ToNew::Clients { clients, .. } => clients.len(),
            ToNew::Waiting { waiting } => waiting.len(),
            _ => 0,
        })?;
        let arrived = match msg {
            ToNew::Clients { clients, gone } => {
                n += clients.len();
                Arrived::Clients(clients, fds, gone)
            }
            ToNew::Waiting { waiting } => Arrived::Waiting(waiting, fds),
            ToNew::NextId { next_id } => Arrived::NextId(next_id),
            ToNew::End => return Ok(n),
            _ => return Err(ReceiveError::Protocol),
        };
        if chunks.send(arrived).is_err() {
            // Adopting failed: that error is the one to report.
            return Ok(n);
        }
    }
}

/// Pairs each client (or connection in the front door) with its socket.
fn client_sockets<C>(
    clients: Vec<C>,
    fds: Vec<OwnedFd>,
) -> Result<Vec<(C, std::net::TcpStream)>, ReceiveError> {
    if clients.len() != fds.len() {
        return Err(ReceiveError::Protocol);
    }
    // Already non-blocking, as tokio needs: the flag belongs to the
    // socket's open file description, which the old process's tokio socket
    // shares. (Setting it again was an `ioctl` per client in the freeze.)
    Ok(clients
        .into_iter()
        .zip(fds)
        .map(|(client, fd)| (client, std::net::TcpStream::from(fd)))
        .collect())
}

impl Incoming {
    /// Says this process is prepared, which makes the old one freeze its
    /// connections, and hands `take` the state and then the clients, chunk
    /// by chunk as they arrive, so that each chunk is adopted while the
    /// next is on its way. Returns the number of clients. Blocking; must
    /// run inside the runtime (tokio adopts the sockets).
    ///
    /// Clients are frozen until the last chunk is adopted, and receiving
    /// (`recvmsg`, the descriptors, decoding) costs about as much as
    /// adopting (registering each socket with the runtime, the hub): a
    /// thread of its own receives while this one adopts.
    pub fn receive_state(
        &mut self,
        mut take: impl FnMut(Received<'_>),
    ) -> Result<usize, ReceiveError> {
        if let Some((state, clients)) = self.whole.take() {
            take(Received::State(&state));
            let n = clients.len();
            take(Received::Clients(clients));
            return Ok(n);
        }
        wire::send(&self.sock, &ToOld::Prepared, &[])?;
        let (msg, _) = wire::recv::<ToNew>(&self.sock, |_| 0)?;
        let ToNew::State { state, .. } = msg else {
            return Err(ReceiveError::Protocol);
        };
        let state = state::decode_value(state)?;
        take(Received::State(&state));
        let sock = &self.sock;
        std::thread::scope(|scope| {
            // Two chunks in flight at most, as the old process sends them.
            let (chunks, arrived) = std::sync::mpsc::sync_channel(1);
            let receiver = scope.spawn(move || receive_chunks(sock, chunks));
            let adopted = (|| {
                for arrived in arrived {
                    let received = match arrived {
                        Arrived::Clients(clients, fds, gone) => {
                            if !gone.is_empty() {
                                take(Received::Gone(gone));
                            }
                            Received::Clients(client_sockets(clients, fds)?)
                        }
                        Arrived::Waiting(waiting, fds) => {
                            Received::Waiting(client_sockets(waiting, fds)?)
                        }
                        Arrived::NextId(next_id) => Received::NextId(next_id),
                    };
                    take(received);
                }
                Ok::<_, ReceiveError>(())
            })();
            if adopted.is_err() {
                // Unblocks the receiver; the old process serves on.
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            let received = receiver.join().unwrap_or(Err(ReceiveError::Protocol));
            adopted.and(received)
        })
    }

    /// Tells the old process this one is ready and waits for its commit;
    /// after `Ok` this process owns every socket. Blocking.
    pub fn ready(&self) -> Result<(), ReceiveError> {
        wire::send(
            &self.sock,
            &ToOld::Ready {
                pid: std::process::id(),
            },
            &[],
        )?;
        match wire::recv::<ToNew>(&self.sock, |_| 0) {
            Ok((ToNew::Commit, _)) => Ok(()),
            Ok(_) => Err(ReceiveError::Protocol),
            Err(e) => Err(ReceiveError::NoCommit(e)),
        }
    }

    /// Tells the old process why this one cannot take over; it serves on.
    pub fn fail(&self, error: &str) {
        let _ = wire::send(
            &self.sock,
            &ToOld::Failed {
                error: error.to_string(),
            },
            &[],
        );
    }
}
