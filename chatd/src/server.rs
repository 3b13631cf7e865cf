//! Binding, the accept loop, and the daemon's life from start to shutdown.
//!
//! [`bind`] is the only code that opens sockets; `main` calls it, prepares a
//! [`Daemon`] and hands it the listeners, and so can anything else that
//! wants to run the daemon on sockets of its own.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{self, AdminListeners, AdminSetup, SetupError};
use crate::bans::{BanError, Bans};
use crate::config::{Config, Source};
use crate::connection;
use crate::hub::Hub;
use crate::reload::Reloader;
use crate::telemetry::LogLevel;
use crate::udp_echo;

/// Every socket the daemon serves, already bound.
#[derive(Debug)]
pub struct Listeners {
    pub chat: TcpListener,
    pub udp: Option<UdpSocket>,
    pub admin: AdminListeners,
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

/// Binds every listener the configuration asks for.
pub fn bind(config: &Config) -> Result<Listeners, BindError> {
    let chat_addr = config.chat.listen;
    let chat = bind_tcp(chat_addr, config.chat.backlog).map_err(|source| BindError {
        key: "chat.listen",
        addr: chat_addr.to_string(),
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
                    addr: udp.listen.to_string(),
                    source,
                })?;
            Some(socket)
        }
        None => None,
    };
    let mut admin = AdminListeners {
        tcp: None,
        unix: None,
    };
    if let Some(config) = &config.admin {
        if let Some(addr) = config.listen {
            admin.tcp = Some(bind_tcp(addr, 128).map_err(|source| BindError {
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
    Ok(Listeners { chat, udp, admin })
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
        crate::files::create_private_dir(dir)?;
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

/// Why the daemon cannot start; one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot load the bans (`server.state_dir`)")]
    Bans(#[from] BanError),
    #[error(transparent)]
    Admin(#[from] SetupError),
}

/// The daemon, prepared: bans loaded, admin tokens ready. Everything that
/// can refuse a start happens in [`Daemon::new`], before serving.
#[derive(Debug)]
pub struct Daemon {
    hub: Hub,
    reloader: Reloader,
    admin: Option<AdminSetup>,
    grace: Duration,
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
        let bans = Bans::load(&config.server.state_dir)?;
        let admin = config
            .admin
            .as_ref()
            .map(|c| AdminSetup::prepare(c, &listeners.admin.addrs()))
            .transpose()?;
        let grace = config.server.shutdown_timeout;
        let hub = Hub::with_bans(config, bans);
        let reloader = Reloader::new(source, hub.clone(), log);
        Ok(Daemon {
            hub,
            reloader,
            admin,
            grace,
        })
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// For SIGHUP.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
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
        if let Some(setup) = self.admin {
            tracker.spawn(admin::serve(
                listeners.admin,
                setup,
                self.hub.clone(),
                self.reloader.clone(),
                shutdown.clone(),
                admin_stop.clone(),
            ));
        }
        let chat = Listeners {
            admin: AdminListeners {
                tcp: None,
                unix: None,
            },
            ..listeners
        };
        serve(chat, self.hub, shutdown, self.grace).await;
        admin_stop.cancel();
        tracker.close();
        if tokio::time::timeout(ADMIN_STOP, tracker.wait())
            .await
            .is_err()
        {
            warn!("the admin API did not stop in time");
        }
    }
}

/// Serves chat and UDP (not the admin API) on `listeners` with a hub the
/// caller keeps, until `shutdown`; then drains within `grace`.
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
