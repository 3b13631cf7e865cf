//! The gRPC admin API: `chatd.admin.v1.Admin`, with `grpc.health.v1` and
//! server reflection beside it on the same listeners (TCP, optionally TLS,
//! and/or a UNIX socket).
//!
//! - `observe`: a span and a metric per call, outermost;
//! - `auth`: bearer tokens and roles, a tower layer in front of everything;
//! - `service`: the `Admin` methods, each a thin call into the hub;
//! - `convert`: hub types → protobuf messages;
//! - `error`: the one conversion from domain errors to `tonic::Status`.
//!
//! [`AdminSetup::prepare`] does everything that can fail before serving
//! (tokens, the generated token file, TLS files), so a problem stops startup
//! with one line; [`serve`] then runs until stopped.

mod auth;
mod convert;
mod error;
mod observe;
mod service;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chatd_proto::admin::v1::admin_server::AdminServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

pub use auth::{AuthLayer, Caller, Tokens};
pub use error::AdminError;
use service::AdminService;

use crate::config::{AdminConfig, Role, TokenConfig};
use crate::files;
use crate::hub::Hub;
use crate::reload::Reloader;

/// The admin API's sockets, bound by [`crate::server::bind`].
#[derive(Debug)]
pub struct AdminListeners {
    /// One per `admin.listen` address.
    pub tcp: Vec<TcpListener>,
    /// The listener and its path (removed at exit).
    pub unix: Option<(UnixListener, PathBuf)>,
}

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
#[derive(Debug)]
pub struct AdminSetup {
    tokens: Arc<Tokens>,
    tls: Option<ServerTlsConfig>,
    generated: Option<PathBuf>,
}

/// Bytes of randomness in a generated token (hex-encoded: twice as many
/// characters).
const GENERATED_TOKEN_BYTES: usize = 32;

impl AdminSetup {
    /// Takes the configured tokens, or generates one and writes it, mode
    /// 0600, to [`chatd_proto::default_token_write_path`], where `chatctl`
    /// looks; reads the TLS files.
    pub fn prepare(config: &AdminConfig) -> Result<AdminSetup, SetupError> {
        let mut tokens = config.tokens.clone();
        let mut generated = None;
        if tokens.is_empty() {
            let path = chatd_proto::default_token_write_path();
            let secret = generate_token()?;
            write_token(&path, &secret).map_err(|source| SetupError::TokenFile {
                path: path.clone(),
                source,
            })?;
            tokens.push(TokenConfig {
                name: "generated".into(),
                secret,
                role: Role::Admin,
            });
            generated = Some(path);
        }
        let tls = match &config.tls {
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
                // Building the server config parses the PEM: fail now, not
                // at the first connection.
                Server::builder()
                    .tls_config(tls.clone())
                    .map_err(|e| SetupError::Tls(error_chain(&e)))?;
                Some(tls)
            }
            None => None,
        };
        Ok(AdminSetup {
            tokens: Arc::new(Tokens::new(tokens)),
            tls,
            generated,
        })
    }

    /// Where the generated token was written, when none is configured.
    pub fn generated_token_file(&self) -> Option<&Path> {
        self.generated.as_deref()
    }
}

/// Writes the token 0600 into a directory only we control, so nobody else
/// can read it or swap it.
fn write_token(path: &Path, secret: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        files::create_private_dir(dir)?;
        files::check_private_dir(dir)?;
    }
    files::atomic_write(path, format!("{secret}\n").as_bytes())
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

/// Serves the admin API on `listeners` until `stop` is cancelled. When
/// `shutdown` is cancelled (shutdown has begun), health turns NOT_SERVING
/// and open `WatchEvents` streams end; the API keeps answering until `stop`.
pub async fn serve(
    listeners: AdminListeners,
    setup: AdminSetup,
    hub: Hub,
    reloader: Reloader,
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
    let admin = AdminServer::new(AdminService::new(hub, reloader, shutdown.clone()));
    let router = |tls: Option<&ServerTlsConfig>| {
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            // Checked in `prepare`; this cannot fail again.
            builder = match builder.tls_config(tls.clone()) {
                Ok(b) => b,
                Err(e) => {
                    error!(error = %error_chain(&e), "admin TLS setup failed");
                    Server::builder()
                }
            };
        }
        builder
            .layer(observe::ObserveLayer)
            .layer(AuthLayer::new(setup.tokens.clone()))
            .add_service(health_service.clone())
            .add_optional_service(reflection.clone())
            .add_optional_service(reflection_alpha.clone())
            .add_service(admin.clone())
    };
    let tcp = futures_util::future::join_all(listeners.tcp.into_iter().map(|listener| {
        let served = router(setup.tls.as_ref())
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.cancelled());
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
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let result = router(None)
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await;
        if let Err(e) = result {
            error!(error = %error_chain(&e), "admin API (UNIX socket) failed");
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
