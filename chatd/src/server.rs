//! Binding, the accept loop, and the daemon's life from start to shutdown.
//!
//! [`bind`] is the only code that opens sockets; `main` calls it, prepares a
//! [`Daemon`] and hands it the listeners, and so can anything else that
//! wants to run the daemon on sockets of its own.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::activation::Activated;
use crate::clients::ClientThread;
use crate::connection::Chat;
use crate::control::Controls;
use crate::front::{self, Door};
use crate::handoff::Gate;
use crate::listen::{BindError, Listeners, bind_tcp};
use crate::reload::Reloader;
use crate::telemetry::LogLevel;
use crate::tls::{self, Certs, TlsError};
use crate::udp_echo;
use chatd_admin::AdminListeners;
use chatd_admin::{self as admin, AdminSetup, SetupError};
use chatd_cluster as cluster;
use chatd_config::{Config, Source};
use chatd_hub::bans::{BanError, Bans};
use chatd_hub::cluster_state::AdminBus;
use chatd_hub::hub::{Hub, Refusal};
use chatd_hub::rate_log::RateLimitedLog;

/// Binds every listener the configuration asks for, except those systemd
/// already passed in `activated`.
pub fn bind(config: &Config, activated: Activated) -> Result<Listeners, BindError> {
    let backlog = config.chat.backlog;
    let tcp_all = |key, addrs: &[SocketAddr], given: Vec<std::net::TcpListener>| {
        if !given.is_empty() {
            return given.into_iter().map(adopt_tcp).collect();
        }
        addrs
            .iter()
            .map(|&addr| {
                bind_tcp(addr, backlog).map_err(|source| BindError {
                    key,
                    addr: addr.to_string(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let chat = tcp_all("chat.listen", &config.chat.listen, activated.chat)?;
    let tls = tcp_all("chat.tls_listen", &config.chat.tls_listen, activated.tls)?;
    let udp = match &config.udp {
        Some(_) if !activated.udp.is_empty() => activated
            .udp
            .into_iter()
            .map(|s| {
                s.set_nonblocking(true)
                    .and_then(|()| UdpSocket::from_std(s))
                    .map_err(|source| BindError {
                        key: "udp.listen",
                        addr: "a socket from systemd".into(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(udp) => udp
            .listen
            .iter()
            .map(|&addr| {
                bind_udp(addr).map_err(|source| BindError {
                    key: "udp.listen",
                    addr: addr.to_string(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let mut admin = AdminListeners {
        tcp: Vec::new(),
        unix: None,
    };
    if let Some(config) = &config.admin {
        for &addr in &config.listen {
            admin
                .tcp
                .push(bind_tcp(addr, 128).map_err(|source| BindError {
                    key: "admin.listen",
                    addr: addr.to_string(),
                    source,
                })?);
        }
        if let Some(path) = &config.socket {
            let listener = bind_unix(path).map_err(|source| BindError {
                key: "admin.socket",
                addr: path.display().to_string(),
                source,
            })?;
            admin.unix = Some((listener, path.clone()));
        }
    }
    Ok(Listeners {
        chat,
        tls,
        udp,
        admin,
    })
}

/// A listener systemd opened, made ready for tokio.
fn adopt_tcp(l: std::net::TcpListener) -> Result<TcpListener, BindError> {
    l.set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(l))
        .map_err(|source| BindError {
            key: "chat.listen",
            addr: "a socket from systemd".into(),
            source,
        })
}

/// A UDP socket; an IPv6 one is IPv6-only, so that `0.0.0.0:P` and
/// `[::]:P` can both be listed.
fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A UNIX socket only its owner may connect to (mode 0600). A stale socket
/// file left by a previous run is replaced; a live one, or a file that is
/// not a socket, is an error.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is serving on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        chatd_hub::files::create_private_dir(dir)?;
    }
    // The umask makes the socket 0600 from its creation; the chmod below
    // is for the record. Startup is single-threaded here.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Raises the soft limit on open files to the hard limit, as far as the
/// process may, and returns the limit now in force (`u64::MAX`: unlimited).
/// The usual soft limit, 1024, would otherwise stop chatd near 1,000
/// clients.
pub fn raise_file_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(hard) = limit.maximum else {
        return limit.current.unwrap_or(u64::MAX);
    };
    if limit.current.is_some_and(|soft| soft < hard) {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return hard;
        }
    }
    limit.current.unwrap_or(hard)
}

/// Descriptors kept for everything but chat connections (besides the admin
/// and metrics connections, [`side_connections`]): listeners, the journal,
/// files, the accept loops' spare ([`Spare`]), and a margin for
/// accepting a connection only to refuse it with one line (an eighth of
/// the limit, between 16 and 256), plus the busy rooms' write clocks
/// ([`chatd_hub::grid::MAX_CLOCKS`]).
pub fn reserved_files(open_files: u64) -> u64 {
    (open_files / 8).clamp(16, 256) + chatd_hub::grid::MAX_CLOCKS as u64
}

/// Connections the admin API and the metrics endpoint may hold at once
/// (`admin.max_connections`, `metrics.max_connections`): kept out of the
/// chat's descriptors, so that an operator is never the one who meets
/// `EMFILE` when chat is full.
pub fn side_connections(config: &Config) -> usize {
    let admin = config.admin.as_ref().map_or(0, |a| a.max_connections);
    let metrics = config
        .metrics
        .listen
        .map_or(0, |_| config.metrics.max_connections);
    admin + metrics
}

/// How many chat clients `open_files` descriptors can serve.
pub fn client_capacity(open_files: u64) -> usize {
    let clients = open_files.saturating_sub(reserved_files(open_files));
    usize::try_from(clients).unwrap_or(usize::MAX)
}

/// Why the daemon cannot start; one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot load the bans (`server.state_dir`)")]
    Bans(#[from] BanError),
    #[error(transparent)]
    Admin(#[from] SetupError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot start the client thread (`server.client_threads`)")]
    Clients(#[source] std::io::Error),
}

/// The daemon, prepared: bans loaded, admin tokens ready. Everything that
/// can refuse a start happens in [`Daemon::new`], before serving.
#[derive(Debug)]
pub struct Daemon {
    hub: Hub,
    /// The upgrade's freeze, handed to every task that owns a socket.
    gate: Arc<Gate>,
    /// After an upgrade in cluster mode: the previous process's receiving
    /// positions, until the cluster starts with them.
    inherited: Vec<chatd_cluster::seq::StreamReceipts>,
    /// Reload and upgrade, for the admin API (and SIGHUP, SIGUSR2).
    controls: Arc<Controls>,
    admin: Option<AdminSetup>,
    certs: Certs,
    grace: Duration,
    /// The tasks of clients handed over by the previous process, spawned
    /// as they are adopted; they serve once `commit` is cancelled.
    adopted: TaskTracker,
    commit: CancellationToken,
    /// The client thread, when `server.client_threads` is 1.
    clients: Option<ClientThread>,
    /// The admin API's way to the other nodes, in cluster mode.
    admin_bus: Option<Arc<dyn AdminBus>>,
}

/// How long the admin API may take to finish its last calls at exit.
const ADMIN_STOP: Duration = Duration::from_secs(5);

impl Daemon {
    /// `source` is re-read on reload; `log` lets a reload change the level;
    /// `listeners` are the bound sockets (a generated admin token is written
    /// for each admin address).
    pub fn new(
        config: Config,
        source: Source,
        log: Option<LogLevel>,
        listeners: &Listeners,
    ) -> Result<Daemon, StartError> {
        Daemon::with_admin_token(config, source, log, listeners, None)
    }

    /// [`Daemon::new`], keeping `token` as the generated admin token when
    /// none is configured (the previous process's, after an upgrade).
    pub fn with_admin_token(
        config: Config,
        source: Source,
        log: Option<LogLevel>,
        listeners: &Listeners,
        token: Option<String>,
    ) -> Result<Daemon, StartError> {
        let bans = Bans::load(&config.server.state_dir)?;
        let admin = config
            .admin
            .as_ref()
            .map(|c| AdminSetup::prepare_with(c, &listeners.admin.addrs(), token.clone()))
            .transpose()?;
        let certs = Certs::default();
        if let Some(files) = &config.chat.tls {
            let loaded = tls::load(files)?;
            tracing::info!(subject = %loaded.about.subject, expires = %loaded.about.expires(), serial = %loaded.about.serial, "TLS certificate loaded");
            certs.set(loaded);
        }
        let grace = config.server.shutdown_timeout;
        let clients = match config.server.client_threads {
            0 => None,
            _ => Some(ClientThread::start().map_err(StartError::Clients)?),
        };
        let hub = Hub::with_bans(config, bans);
        let gate = Arc::new(Gate::new(hub.clone()));
        let controls = Arc::new(Controls {
            hub: hub.clone(),
            gate: gate.clone(),
            reloader: Reloader::new(source, hub.clone(), log, certs.clone()),
            upgrader: std::sync::OnceLock::new(),
        });
        Ok(Daemon {
            hub,
            gate,
            inherited: Vec::new(),
            controls,
            admin,
            certs,
            grace,
            adopted: TaskTracker::new(),
            commit: CancellationToken::new(),
            clients,
            admin_bus: None,
        })
    }

    /// The generated admin token, when none is configured: handed to the
    /// next process at an upgrade so that it stays valid.
    pub fn generated_admin_token(&self) -> Option<String> {
        self.admin.as_ref().and_then(AdminSetup::generated_secret)
    }

    /// Takes over what the previous process handed over, as it arrives:
    /// rooms, history and counters first, then each chunk of clients with
    /// what they were owed and, when `server.upgrade_notice` is set, that
    /// one line. Each client's task starts at once but reads and writes
    /// nothing before [`Daemon::run`] (after the commit). Must run inside
    /// the runtime.
    pub fn adopt(&mut self, received: crate::handoff::Received<'_>) {
        let clients = match received {
            crate::handoff::Received::State(state) => {
                self.inherited = state.cluster_receipts.clone();
                return self.hub.restore(
                    &state.rooms,
                    &state.clients,
                    state.next_id,
                    state.stats.as_ref(),
                );
            }
            crate::handoff::Received::NextId(next) => return self.hub.restore_next_id(next),
            crate::handoff::Received::Gone(gone) => {
                let (hub, commit) = (self.hub.clone(), self.commit.clone());
                self.adopted.spawn(async move {
                    // Only once this process serves: before, the old one may
                    // still resume them.
                    commit.cancelled().await;
                    for g in gone {
                        hub.announce_left(&g.nick, &g.room, "reconnecting after a server upgrade");
                    }
                });
                return;
            }
            crate::handoff::Received::Waiting(waiting) => {
                let clients = self.clients.as_ref().map(|c| c.handle().clone());
                for (state, stream) in waiting {
                    // A TLS client's handshake is still to come: it is done
                    // here, and only its chat goes to the client thread.
                    let tls = state.tls;
                    let task = front::serve_handed(
                        stream,
                        state,
                        self.certs.clone(),
                        clients.clone(),
                        self.chat(),
                        self.commit.clone(),
                    );
                    if tls {
                        self.adopted.spawn(task);
                    } else {
                        self.spawn_client(task);
                    }
                }
                return;
            }
            crate::handoff::Received::Clients(clients) => clients,
        };
        let notice = self.hub.config().server.upgrade_notice.clone();
        for (state, stream) in clients {
            let (client, room) = self.hub.adopt(&state);
            if !notice.is_empty() {
                client.notice(&notice, usize::MAX);
            }
            self.spawn_client(crate::connection::handoff::resume(
                stream,
                client,
                room,
                state,
                self.chat(),
                self.commit.clone(),
            ));
        }
    }

    /// Spawns an adopted client's task where clients are served (it
    /// registers its socket from there).
    fn spawn_client(&self, task: impl Future<Output = ()> + Send + 'static) {
        match &self.clients {
            Some(clients) => self.adopted.spawn_on(task, clients.handle()),
            None => self.adopted.spawn(task),
        };
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// What the cluster is given of this daemon: the admin API's answers
    /// and event encoding, the upgrade's freeze, and the receiving
    /// positions the previous process handed over.
    pub fn cluster_seams(&mut self) -> cluster::Seams {
        cluster::Seams {
            admin: Arc::new(admin::RemoteAnswers::new(self.hub.clone())),
            codec: Arc::new(admin::EventCodec),
            pause: self.gate.clone(),
            inherited: std::mem::take(&mut self.inherited),
        }
    }

    /// Cluster mode: the admin API asks the other nodes through `bus`.
    pub fn set_admin_bus(&mut self, bus: Arc<dyn AdminBus>) {
        self.admin_bus = Some(bus);
    }

    /// The upgrade's freeze of this daemon's sockets.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    fn chat(&self) -> Chat {
        Chat {
            hub: self.hub.clone(),
            gate: self.gate.clone(),
        }
    }

    /// For SIGHUP.
    pub fn reloader(&self) -> Reloader {
        self.controls.reloader.clone()
    }

    /// Makes upgrades available to the admin API's `Upgrade`.
    pub fn set_upgrader(&self, upgrader: crate::handoff::Upgrader) {
        let _ = self.controls.upgrader.set(upgrader);
    }

    /// Where the generated admin token was written (once per admin
    /// address), if one was.
    pub fn generated_token_files(&self) -> &[PathBuf] {
        self.admin
            .as_ref()
            .map_or(&[], AdminSetup::generated_token_files)
    }

    /// Serves until `shutdown` is cancelled, then closes every connection
    /// gracefully within `server.shutdown_timeout_secs`. The admin API
    /// reports NOT_SERVING from the start of the shutdown and stops last.
    pub async fn run(self, listeners: Listeners, shutdown: CancellationToken) {
        let admin_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let token_files = self
            .admin
            .as_ref()
            .map_or_else(Vec::new, |a| a.generated_token_files().to_vec());
        if let Some(setup) = self.admin {
            tracker.spawn(admin::serve(
                listeners.admin,
                setup,
                self.hub.clone(),
                self.controls.clone(),
                self.admin_bus.clone(),
                shutdown.clone(),
                admin_stop.clone(),
            ));
        }
        let chat = Listeners {
            admin: AdminListeners {
                tcp: Vec::new(),
                unix: None,
            },
            ..listeners
        };
        // Only called once this process owns every socket.
        self.commit.cancel();
        self.adopted.close();
        let clients = self.clients.as_ref().map(|c| c.handle().clone());
        let gate = self.gate.clone();
        let served = Chat {
            hub: self.hub,
            gate: self.gate,
        };
        serve(chat, served, self.certs, clients, shutdown, self.grace).await;
        // `serve` closed the hub: adopted clients are leaving like the others.
        let _ = tokio::time::timeout(self.grace, self.adopted.wait()).await;
        admin_stop.cancel();
        tracker.close();
        if tokio::time::timeout(ADMIN_STOP, tracker.wait())
            .await
            .is_err()
        {
            warn!("the admin API did not stop in time");
        }
        admin::remove_token_files(&token_files, gate.committed());
    }
}

/// Serves chat and UDP (not the admin API) on `listeners` with a hub the
/// caller keeps, until `shutdown`; then drains within `grace`. `certs` is
/// what the TLS listeners present; `clients` the client thread's runtime,
/// if clients have one.
pub async fn serve(
    listeners: Listeners,
    chat: Chat,
    certs: Certs,
    clients: Option<Handle>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let Chat { hub, gate } = chat;
    let tracker = TaskTracker::new();
    for udp in listeners.udp {
        tracker.spawn(udp_echo::run(
            udp,
            hub.clone(),
            gate.clone(),
            shutdown.clone(),
        ));
    }
    tracker.spawn(reap(hub.clone(), shutdown.clone()));
    tracker.spawn(crate::stall::watch(shutdown.clone()));
    tracker.spawn(flush_notices(hub.clone(), shutdown.clone()));
    let doors = listeners.chat.iter().map(|l| (l, Door::Plain)).chain(
        listeners
            .tls
            .iter()
            .map(|l| (l, Door::Tls(certs.clone(), clients.clone()))),
    );
    let spare = Spare::open();
    let shared = Doors {
        hub: &hub,
        gate: &gate,
        tracker: &tracker,
        clients: clients.as_ref(),
        spare: &spare,
    };
    futures_util::future::join_all(
        doors.map(|(listener, door)| accept_loop(listener, door, &shared, &shutdown)),
    )
    .await;
    drop(spare);
    drop(listeners.chat);
    drop(listeners.tls);
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

/// What every accept loop shares.
struct Doors<'a> {
    hub: &'a Hub,
    gate: &'a Arc<Gate>,
    tracker: &'a TaskTracker,
    clients: Option<&'a Handle>,
    spare: &'a Spare,
}

async fn accept_loop(
    listener: &TcpListener,
    door: Door,
    doors: &Doors<'_>,
    shutdown: &CancellationToken,
) {
    let (hub, gate) = (doors.hub, doors.gate);
    let mut backoff = Backoff::default();
    let out_of_files = OutOfFiles::default();
    // Open for an upgrade's freeze to wait for (see `handoff::gate`).
    let _open = OpenDoor::new(gate);
    loop {
        let accepted = tokio::select! {
            // A freeze before an accept: a loop that starts (or resumes)
            // while one is on takes nobody the freeze did not count.
            biased;
            () = shutdown.cancelled() => return,
            // A seamless upgrade: new connections wait in the backlog for
            // whichever process serves next. The freeze waits for this
            // loop to stop: every connection it took is counted by then.
            () = gate.frozen() => {
                gate.door_closed();
                let outcome = gate.settled().await;
                gate.door_opened();
                match outcome {
                    crate::handoff::Outcome::Resumed => continue,
                    crate::handoff::Outcome::Committed => return,
                }
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                admit(stream, peer, &door, doors);
            }
            Err(e) if is_peer_error(&e) => {}
            // Out of descriptors: the waiting connection is told so at
            // once with the reserved one, whatever the pause below.
            Err(e) if is_out_of_files(&e) && doors.spare.refuse_one(listener, hub) => {
                out_of_files.refused(&e);
            }
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

/// A connection just accepted: counted, or refused with one line without
/// a task; then handed to its own task (on the client thread for a plain
/// one when there is one).
fn admit(stream: TcpStream, peer: SocketAddr, door: &Door, doors: &Doors<'_>) {
    let hub = doors.hub;
    let ip = peer.ip().to_canonical();
    // Behind a trusted proxy the rate and the per-address limit are
    // counted on the client's address, once its PROXY header is read
    // (`front`); the total counts from now.
    let trusted = hub.is_trusted_proxy(ip);
    if !trusted && !hub.admit_connection(ip) {
        front::refuse_fast(&stream, &Refusal::TooFast);
        return;
    }
    let seat = match hub.seat((!trusted).then_some(ip)) {
        Ok(seat) => seat,
        Err(refusal) => {
            front::refuse_fast(&stream, &refusal);
            return;
        }
    };
    tune(&stream, hub);
    let arrival = crate::handoff::Arrival::new(doors.gate);
    // A TLS client is handed to the client thread by `tls`, once its
    // handshake is done.
    let clients = doors.clients.filter(|_| matches!(door, Door::Plain));
    let Some(clients) = clients else {
        doors.tracker.spawn(front::serve(
            stream,
            peer,
            door.clone(),
            Chat {
                hub: hub.clone(),
                gate: doors.gate.clone(),
            },
            arrival,
            seat,
        ));
        return;
    };
    // To the client thread: the socket leaves this runtime's reactor and
    // joins that one's, from its own thread.
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            warn!(%peer, error = %e, "cannot hand a connection to the client thread");
            return;
        }
    };
    let (door, hub, gate) = (door.clone(), hub.clone(), doors.gate.clone());
    doors.tracker.spawn_on(
        async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    front::serve(stream, peer, door, Chat { hub, gate }, arrival, seat).await
                }
                Err(e) => {
                    warn!(%peer, error = %e, "cannot serve a connection on the client thread");
                }
            }
        },
        clients,
    );
}

/// One descriptor held in reserve (`/dev/null`) and shared by the accept
/// loops. When an accept fails for want of descriptors, the spare is
/// closed, the waiting connection accepted with the descriptor it frees,
/// refused with one line and closed, and the spare opened again: a
/// connection that arrives while the process is out of descriptors is
/// told so at once, instead of waiting unanswered in the backlog while
/// the loop pauses. Seats keep chat connections below the file limit, so
/// this is for what they cannot see (the limit lowered under a running
/// process, descriptors of other kinds).
#[derive(Debug, Default)]
pub struct Spare(std::sync::Mutex<Option<std::fs::File>>);

impl Spare {
    pub fn open() -> Spare {
        Spare(std::sync::Mutex::new(std::fs::File::open("/dev/null").ok()))
    }

    /// Refuses one waiting connection on `listener` as a full server, with
    /// the spare descriptor. False when there was no spare to use or no
    /// connection waiting.
    fn refuse_one(&self, listener: &TcpListener, hub: &Hub) -> bool {
        let mut spare = chatd_hub::lock::lock(&self.0);
        if spare.take().is_none() {
            // Taken by a failed reopen: try to have one for next time.
            *spare = std::fs::File::open("/dev/null").ok();
            return false;
        }
        let flags = rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC;
        let refused = match rustix::net::accept_with(listener, flags) {
            Ok(conn) => {
                front::refuse_fast(&conn, &hub.full());
                true
            }
            Err(_) => false,
        };
        *spare = std::fs::File::open("/dev/null").ok();
        refused
    }
}

/// Connections refused with the spare descriptor, logged at most once a
/// second with their number, so that a flood at the file limit costs one
/// log line a second rather than one per connection.
struct OutOfFiles(RateLimitedLog);

impl Default for OutOfFiles {
    fn default() -> Self {
        OutOfFiles(RateLimitedLog::new(Duration::from_secs(1)))
    }
}

impl OutOfFiles {
    fn refused(&self, e: &io::Error) {
        let Some(held_back) = self.0.allow() else {
            return;
        };
        warn!(
            error = %e,
            refused = held_back + 1,
            "out of file descriptors: refused connections with the reserved descriptor"
        );
    }
}

/// Accept errors that say the process (or the system) has no descriptor
/// left.
fn is_out_of_files(e: &io::Error) -> bool {
    let errno = e.raw_os_error();
    errno == Some(rustix::io::Errno::MFILE.raw_os_error())
        || errno == Some(rustix::io::Errno::NFILE.raw_os_error())
}

/// An accept loop counted as open by the upgrade's gate while it lives.
struct OpenDoor<'a>(&'a Gate);

impl<'a> OpenDoor<'a> {
    fn new(gate: &'a Gate) -> OpenDoor<'a> {
        gate.door_opened();
        OpenDoor(gate)
    }
}

impl Drop for OpenDoor<'_> {
    fn drop(&mut self) {
        self.0.door_closed();
    }
}

/// Closes idle, half-a-line and stalled clients. One task scanning every
/// client a few times per deadline is far cheaper than a timer in each of
/// 10,000 connections.
async fn reap(hub: Hub, shutdown: CancellationToken) {
    loop {
        let limits = hub.limits();
        let shortest = [
            limits.idle_timeout,
            limits.partial_line_timeout,
            limits.slow_consumer_timeout,
        ]
        .into_iter()
        .flatten()
        .min();
        let pause = shortest.map_or(Duration::from_secs(5), |l| {
            (l / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        let reaped = hub.reap();
        if reaped.total() > 0 {
            info!(
                idle = reaped.idle,
                partial_line = reaped.partial,
                slow_consumer = reaped.stalled,
                "closed inactive connections"
            );
        }
    }
}

/// Sums up, once a second, the join/leave notices that rooms held back.
async fn flush_notices(hub: Hub, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => hub.flush_notices(),
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

/// Per-socket options: no Nagle delay (we coalesce writes ourselves), a
/// bounded queue of unsent bytes so that what the socket takes shows what
/// the client reads (flow control, see [`chatd_hub::outbox::UNSENT_LIMIT`]),
/// and TCP keepalive so dead peers are noticed even when nobody talks.
fn tune(stream: &TcpStream, hub: &Hub) {
    let _ = stream.set_nodelay(true);
    crate::sockopt::bound_unsent(stream);
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
