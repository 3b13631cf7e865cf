//! How a node proves who it is to NATS and protects the link: the
//! `cluster.creds_file`, `user`/`password`, `token` and `tls_*` keys applied
//! to async-nats's `ConnectOptions`, and which failed connection is a
//! refusal rather than a NATS that is not there.
//!
//! A refusal (credentials rejected, a certificate that does not verify, a
//! server that will not speak TLS when it is required) stops the start
//! whatever `cluster.on_unreachable` says: it will not heal by waiting, and
//! a node that quietly served alone because its password is wrong would
//! split the service without anyone noticing. Only plain unreachability
//! (refused or timed-out connections) is left to `on_unreachable`.

use async_nats::{ConnectError, ConnectErrorKind, ConnectOptions};

use chatd_config::{ClusterConfig, NatsAuth};

/// Why the options could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot use `cluster.creds_file` {path}: {source}")]
pub struct CredsError {
    path: String,
    source: std::io::Error,
}

/// Adds the configured credentials and TLS settings to `options`.
pub async fn secure(
    mut options: ConnectOptions,
    config: &ClusterConfig,
) -> Result<ConnectOptions, CredsError> {
    options = match &config.auth {
        NatsAuth::None => options,
        NatsAuth::Creds(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|source| CredsError {
                    path: path.display().to_string(),
                    source,
                })?
        }
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.0.clone())
        }
        NatsAuth::Token(token) => options.token(token.0.clone()),
    };
    let tls = &config.tls;
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tls.client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if tls.required {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// A connection NATS (or its certificate) refused, as opposed to a NATS
/// that did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server rejected this node's credentials, or wants some.
    Auth,
    /// TLS could not be set up or did not verify.
    Tls,
}

impl Refusal {
    /// The keys an operator should look at, for the error line.
    pub fn keys(self, config: &ClusterConfig) -> &'static str {
        match (self, &config.auth) {
            (Refusal::Tls, _) => {
                "cluster.tls_ca_file, cluster.tls_cert_file/tls_key_file and cluster.tls_required"
            }
            (Refusal::Auth, NatsAuth::None) => {
                "the server wants credentials: set cluster.creds_file, cluster.user/password or cluster.token"
            }
            (Refusal::Auth, NatsAuth::Creds(_)) => "cluster.creds_file",
            (Refusal::Auth, NatsAuth::UserPassword { .. }) => "cluster.user and cluster.password",
            (Refusal::Auth, NatsAuth::Token(_)) => "cluster.token",
        }
    }
}

/// Whether `err` is a refusal; `None` means NATS was merely unreachable.
/// A TLS handshake failure reaches us as an I/O error wrapping rustls's, so
/// the whole chain of causes is searched.
pub fn refusal(err: &ConnectError) -> Option<Refusal> {
    match err.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            return Some(Refusal::Auth);
        }
        ConnectErrorKind::Tls => return Some(Refusal::Tls),
        _ => {}
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = cause {
        if e.is::<async_nats::rustls::Error>() {
            return Some(Refusal::Tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
        {
            return Some(Refusal::Tls);
        }
        cause = e.source();
    }
    None
}
