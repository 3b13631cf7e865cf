//! The gRPC admin API: `chatd.admin.v1.Admin`, with `grpc.health.v1` and
//! server reflection beside it on the same listeners (TCP, optionally TLS,
//! and/or a UNIX socket).
//!
//! - `observe`: a span and a metric per call, outermost;
//! - `auth`: bearer tokens and roles, a tower layer in front of everything;
//! - `service`: the `Admin` methods, each a thin call into the hub;
//! - `convert`: hub types → protobuf messages;
//! - `error`: the one conversion from domain errors to `tonic::Status`;
//! - `conn`: the connection limit and the handshake and idle deadlines;
//! - `remote`: what the cluster is given to answer other nodes' requests
//!   and to relay this node's events to their watches (the cluster itself
//!   only carries bytes).
//!
//! [`AdminSetup::prepare`] does everything that can fail before serving
//! (tokens, the generated token files, TLS), so a problem stops startup
//! with one line; [`serve`] then runs until stopped, and cannot fall back
//! to anything less than what was prepared (TLS fails closed).

mod auth;
mod conn;
pub mod control;
mod convert;
mod error;
pub mod observe;
mod remote;
mod service;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chatd_proto::admin::v1::admin_server::AdminServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

pub use auth::{AuthLayer, Caller, Tokens};
pub use control::Control;
pub use error::AdminError;
pub use remote::{EventCodec, RemoteAnswers};
use service::AdminService;
pub use service::MAX_BROADCAST_BYTES;

use chatd_config::{AdminConfig, Role, TokenConfig};
use chatd_hub::cluster_state::AdminBus;
use chatd_hub::files;
use chatd_hub::hub::Hub;

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot generate an admin token: {0}")]
    Random(String),
    #[error("cannot write the generated admin token to {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read `{key}` {}: {source}", path.display())]
    TlsFile {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use `admin.tls_cert` / `admin.tls_key`: {0}")]
    Tls(String),
}

/// What the admin server needs, checked before serving.
pub struct AdminSetup {
    tokens: Arc<Tokens>,
    /// The TCP listener's server, TLS already applied when configured: built
    /// once here, so serving cannot end up with anything else.
    tcp_server: Server,
    limits: conn::ConnLimits,
    generated: Vec<PathBuf>,
    generated_secret: Option<String>,
}

impl std::fmt::Debug for AdminSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSetup")
            .field("tokens", &self.tokens)
            .field("limits", &self.limits)
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

/// Bytes of randomness in a generated token (hex-encoded: twice as many
/// characters).
const GENERATED_TOKEN_BYTES: usize = 32;

impl AdminSetup {
    /// Takes the configured tokens, or generates one and writes it, mode
    /// 0600, into [`chatd_proto::default_token_write_dir`] once for each of
    /// `addrs` (the bound admin addresses), where `chatctl` looks for its
    /// endpoint; reads the TLS files and builds the TLS server.
    pub fn prepare(
        config: &AdminConfig,
        addrs: &[chatd_proto::AdminAddr],
    ) -> Result<AdminSetup, SetupError> {
        Self::prepare_with(config, addrs, None)
    }

    /// [`AdminSetup::prepare`], with `given` as the generated token instead
    /// of a new one (a seamless upgrade keeps the previous process's).
    pub fn prepare_with(
        config: &AdminConfig,
        addrs: &[chatd_proto::AdminAddr],
        given: Option<String>,
    ) -> Result<AdminSetup, SetupError> {
        let mut tokens = config.tokens.clone();
        let mut generated = Vec::new();
        let mut generated_secret = None;
        if tokens.is_empty() {
            let dir = chatd_proto::default_token_write_dir();
            remove_stale_tokens(&dir, addrs);
            let secret = match given {
                Some(secret) => secret,
                None => generate_token()?,
            };
            generated_secret = Some(secret.clone());
            for addr in addrs {
                let path = dir.join(addr.file_name());
                write_token(&path, &chatd_proto::token::token_file_text(&secret, addr)).map_err(
                    |source| SetupError::TokenFile {
                        path: path.clone(),
                        source,
                    },
                )?;
                generated.push(path);
            }
            tokens.push(TokenConfig {
                name: "generated".into(),
                secret,
                role: Role::Admin,
            });
        }
        // No HTTP/2 keepalive pings: their answers would count as traffic
        // and keep an idle connection open forever.
        let base = Server::builder();
        let tcp_server = match &config.tls {
            Some(files) => {
                let read = |key: &'static str, path: &Path| {
                    std::fs::read(path).map_err(|source| SetupError::TlsFile {
                        key,
                        path: path.to_owned(),
                        source,
                    })
                };
                let cert = read("admin.tls_cert", &files.cert)?;
                let key = read("admin.tls_key", &files.key)?;
                let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
                // This parses the PEM: a problem stops startup now, and the
                // server kept is the TLS one or none at all.
                base.tls_config(tls)
                    .map_err(|e| SetupError::Tls(error_chain(&e)))?
            }
            None => base,
        };
        Ok(AdminSetup {
            tokens: Arc::new(Tokens::new(tokens)),
            tcp_server,
            limits: conn::ConnLimits {
                max_connections: config.max_connections,
                handshake_timeout: config.handshake_timeout,
                idle_timeout: config.idle_timeout,
            },
            generated,
            generated_secret,
        })
    }

    /// The generated token's secret, when none is configured.
    pub fn generated_secret(&self) -> Option<String> {
        self.generated_secret.clone()
    }

    /// Where the generated token was written (once per admin address), when
    /// none is configured.
    pub fn generated_token_files(&self) -> &[PathBuf] {
        &self.generated
    }
}

/// Removes the token files in `dir` (ours alone: it is private) whose
/// recorded address nothing serves any more, left by a chatd that was
/// killed, except those for `addrs`, which are written again now. A file
/// whose address still answers, or cannot be told, is kept.
fn remove_stale_tokens(dir: &Path, addrs: &[chatd_proto::AdminAddr]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let ours: Vec<String> = addrs.iter().map(|a| a.file_name()).collect();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("admin-") || !name.ends_with(".token") || ours.contains(&name) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let (_, addr) = chatd_proto::token::parse_token_file(&text);
        if addr.as_deref().is_some_and(nothing_serves) && std::fs::remove_file(entry.path()).is_ok()
        {
            info!(path = %entry.path().display(), "removed a stale admin token file (nothing serves its address)");
        }
    }
}

/// Whether nothing listens at `addr` (`IP:PORT` or `unix:PATH`, as token
/// files record it): the connection is refused or the socket is gone.
fn nothing_serves(addr: &str) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    let refused = |e: std::io::Error| matches!(e.kind(), ConnectionRefused | NotFound);
    match addr.strip_prefix("unix:") {
        Some(path) => std::os::unix::net::UnixStream::connect(path).is_err_and(refused),
        None => addr.parse::<std::net::SocketAddr>().is_ok_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(250)).is_err_and(refused)
        }),
    }
}

/// Writes the token file 0600 into a directory only we control (checked
/// without following links), so nobody else can read it or swap it.
fn write_token(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        files::create_private_dir(dir)?;
        files::check_private_dir(dir)?;
    }
    files::atomic_write(path, text.as_bytes())
}

fn generate_token() -> Result<String, SetupError> {
    let mut bytes = [0u8; GENERATED_TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| SetupError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The admin API's sockets, bound by the daemon.
#[derive(Debug)]
pub struct AdminListeners {
    /// One per `admin.listen` address.
    pub tcp: Vec<TcpListener>,
    /// The listener and its path (removed at exit).
    pub unix: Option<(UnixListener, PathBuf)>,
}

impl AdminListeners {
    /// The bound addresses, as the token files name them.
    pub fn addrs(&self) -> Vec<chatd_proto::AdminAddr> {
        let tcp = self
            .tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(chatd_proto::AdminAddr::Tcp);
        let unix = self
            .unix
            .as_ref()
            .map(|(_, path)| chatd_proto::AdminAddr::Unix(path.clone()));
        tcp.into_iter().chain(unix).collect()
    }
}

/// Serves the admin API on `listeners` until `stop` is cancelled. When
/// `shutdown` is cancelled (shutdown has begun), health turns NOT_SERVING
/// and open `WatchEvents` streams end; the API keeps answering until `stop`.
/// `bus` is the way to the other nodes, in cluster mode.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listeners: AdminListeners,
    setup: AdminSetup,
    hub: Hub,
    control: Arc<dyn Control>,
    bus: Option<Arc<dyn AdminBus>>,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<AdminService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(chatd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .inspect_err(|e| error!(error = %e, "server reflection is off"))
        .ok();
    // v1alpha too, for older grpcurl and grpc_cli.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(chatd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .inspect_err(|e| error!(error = %e, "server reflection (v1alpha) is off"))
        .ok();
    let handed_over = control.clone();
    let admin = AdminServer::new(AdminService::new(hub, control, bus, shutdown.clone()));
    let limits = setup.limits;
    let router = |server: Server| {
        server
            .layer(conn::BusyLayer)
            .layer(observe::ObserveLayer)
            .layer(AuthLayer::new(setup.tokens.clone()))
            .add_service(health_service.clone())
            .add_optional_service(reflection.clone())
            .add_optional_service(reflection_alpha.clone())
            .add_service(admin.clone())
    };
    let tcp = futures_util::future::join_all(listeners.tcp.into_iter().map(|listener| {
        let served = router(setup.tcp_server.clone())
            .serve_with_incoming_shutdown(conn::incoming(listener, limits), stop.cancelled());
        async {
            if let Err(e) = served.await {
                error!(error = %error_chain(&e), "admin API (TCP) failed");
            }
        }
    }));
    let unix = async {
        let Some((listener, path)) = listeners.unix else {
            return;
        };
        // The socket never uses TLS (it is a private file).
        let result = router(Server::builder())
            .serve_with_incoming_shutdown(conn::incoming(listener, limits), stop.cancelled())
            .await;
        if let Err(e) = result {
            error!(error = %error_chain(&e), "admin API (UNIX socket) failed");
        }
        // After a seamless upgrade the new process serves this socket.
        if handed_over.handed_over() {
            return;
        }
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %e, "cannot remove the admin socket");
        }
    };
    let not_serving = async {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = stop.cancelled() => return,
        }
        health.set_not_serving::<AdminServer<AdminService>>().await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        info!("admin API: health is NOT_SERVING");
    };
    tokio::join!(tcp, unix, not_serving);
}

/// Removes the generated token files once nothing serves their addresses,
/// unless a new process took over (it keeps the token and its files).
pub fn remove_token_files(files: &[PathBuf], handed_over: bool) {
    if handed_over {
        return;
    }
    for path in files {
        if let Err(e) = std::fs::remove_file(path) {
            warn!(path = %path.display(), error = %e, "cannot remove the admin token file");
        }
    }
}
