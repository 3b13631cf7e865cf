//! TLS on the chat port: the certificate (re-read on every reload) and the
//! pump that lets the plain connection code serve a TLS client.
//!
//! [`connection`](crate::connection) drives its socket by readiness
//! (`try_read`, vectored `try_write`), which a TLS stream cannot offer. So a
//! TLS client's connection runs, unchanged, on one end of a UNIX socket
//! pair, and [`serve`] copies between the other end and the TLS stream with
//! two bounded buffers; the pair's kernel buffers are kept small too, so a
//! TLS client's queue is about as deep as a plain client's.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use std::pin::pin;

use arc_swap::ArcSwapOption;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Handle;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::connection::{self, Chat};
use crate::handoff::Arrival;
use chatd_config::TlsFiles;
use chatd_hub::hub::{Refusal, Seat, TLS_PUMP_FILES, server_line};

/// Plaintext bytes the pump holds per direction.
const PUMP_BUF: usize = 16 * 1024;
/// How long the pump may go on once the connection is over: enough to
/// deliver the last lines and `close_notify`, not enough to let a client
/// that stopped reading hold the socket.
const PUMP_GRACE: Duration = Duration::from_secs(5);
/// How long a refusal's line may take to leave.
const REFUSE_FLUSH: Duration = Duration::from_secs(2);

/// Why the certificate or key cannot be used; one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{key}` {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("`{key}` {path} holds no {what} in PEM format ({reason})")]
    Pem {
        key: &'static str,
        path: String,
        what: &'static str,
        reason: String,
    },
    #[error("`chat.tls_key` {key} is not the key of the certificate in `chat.tls_cert` {cert}")]
    Mismatch { cert: String, key: String },
    #[error("`chat.tls_cert` and `chat.tls_key` cannot be used together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A loaded certificate and what an operator recognises it by.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub about: CertInfo,
}

/// The leaf certificate as an operator knows it: for a reload's report and
/// the log, so that a renewal is seen to have happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, e.g. `CN=chat.example.org`.
    pub subject: String,
    /// When it expires, seconds since the Unix epoch.
    pub not_after: i64,
    /// The serial number in hex: two renewals with the same subject differ
    /// here.
    pub serial: String,
    /// The leaf's DER, to tell whether a reload changed it.
    der: Vec<u8>,
}

impl CertInfo {
    fn of(der: &CertificateDer<'_>, path: &Path) -> Result<CertInfo, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Pem {
            key: "chat.tls_cert",
            path: path.display().to_string(),
            what: "certificate",
            reason: format!("not a valid X.509 certificate: {e}"),
        })?;
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.timestamp(),
            serial: cert.raw_serial_as_string(),
            der: der.to_vec(),
        })
    }

    /// Whether `other` is the same certificate.
    pub fn same(&self, other: &CertInfo) -> bool {
        self.der == other.der
    }

    /// The expiry as `2027-03-01T12:00:00Z`.
    pub fn expires(&self) -> String {
        u64::try_from(self.not_after)
            .ok()
            .and_then(|secs| {
                std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))
            })
            .filter(|t| {
                *t < std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799)
            })
            .map_or_else(
                || format!("{} (Unix seconds)", self.not_after),
                |t| humantime::format_rfc3339_seconds(t).to_string(),
            )
    }
}

/// Reads and checks the certificate chain and its key. Blocks on file I/O.
pub fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let certs = read_pem("chat.tls_cert", &files.cert, "certificate", |bytes| {
        CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>()
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            key: "chat.tls_cert",
            path: files.cert.display().to_string(),
            what: "certificate",
            reason: "no CERTIFICATE block".into(),
        });
    }
    let about = CertInfo::of(&certs[0], &files.cert)?;
    let key = read_pem("chat.tls_key", &files.key, "private key", |bytes| {
        PrivateKeyDer::from_pem_slice(bytes)
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: files.cert.display().to_string(),
                key: files.key.display().to_string(),
            },
            other => TlsError::Rustls(other),
        })?;
    Ok(Loaded {
        config: Arc::new(config),
        about,
    })
}

fn read_pem<T>(
    key: &'static str,
    path: &Path,
    what: &'static str,
    parse: impl FnOnce(&[u8]) -> Result<T, rustls_pki_types::pem::Error>,
) -> Result<T, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })?;
    parse(&bytes).map_err(|e| TlsError::Pem {
        key,
        path: path.display().to_string(),
        what,
        reason: e.to_string(),
    })
}

/// The certificate in use, shared by the TLS listeners and the reloader:
/// a reload swaps it for new handshakes; connections already up keep theirs.
#[derive(Debug, Clone, Default)]
pub struct Certs {
    current: Arc<ArcSwapOption<ServerConfig>>,
    about: Arc<ArcSwapOption<CertInfo>>,
}

impl Certs {
    pub fn set(&self, loaded: Loaded) {
        self.current.store(Some(loaded.config));
        self.about.store(Some(Arc::new(loaded.about)));
    }

    /// The certificate served now.
    pub fn about(&self) -> Option<Arc<CertInfo>> {
        self.about.load_full()
    }

    pub fn get(&self) -> Option<Arc<ServerConfig>> {
        self.current.load_full()
    }
}

/// Completes the handshake within `deadline`, then serves the client
/// through a pump. With `clients` (the client thread), the chat behind the
/// pump is served there; the handshake and the pump stay here. `seat` has
/// counted the connection since it was accepted; the pump's socket pair is
/// counted in it before it is made, and refused as a full server when the
/// file limit has no room for it.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    certs: Certs,
    clients: Option<Handle>,
    chat: Chat,
    deadline: Duration,
    mut seat: Seat,
) {
    let Some(config) = certs.get() else {
        debug!(%peer, "TLS connection without a certificate loaded; closing");
        return;
    };
    let started = std::time::Instant::now();
    match tokio::time::timeout(deadline, first_byte(&stream)).await {
        Ok(Some(byte)) if byte != TLS_HANDSHAKE_RECORD => return plain_text(stream, peer).await,
        Ok(Some(_)) => {}
        Ok(None) => return,
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    }
    let deadline = deadline.saturating_sub(started.elapsed());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    if let Err(refusal) = seat.add_files(TLS_PUMP_FILES) {
        return refuse(tls, peer, refusal).await;
    }
    let (ours, theirs) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot create the TLS pump's socket pair");
            return;
        }
    };
    // Small kernel buffers in the pair, so that a TLS client that stops
    // reading fills its outbox, and is cut off, about as soon as a plain one.
    for end in [&ours, &theirs] {
        let _ = socket2::SockRef::from(end).set_send_buffer_size(PUMP_BUF);
    }
    let done = CancellationToken::new();
    let chat = async {
        match clients {
            None => connection::serve_on(ours, peer, true, chat, Arrival::none(), seat).await,
            Some(clients) => serve_on_client_thread(ours, peer, chat, &clients, seat).await,
        }
        done.cancel();
    };
    tokio::join!(chat, pump(tls, theirs, done.clone()));
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The first byte the client sent, left in the socket; `None` when it
/// closed or failed first.
async fn first_byte(stream: &TcpStream) -> Option<u8> {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(1) => Some(byte[0]),
        _ => None,
    }
}

/// A client that typed plain text on the TLS port (`nc HOST 8443`): rather
/// than TLS alert bytes, one line it can read saying how to connect, as the
/// plain port answers a TLS or HTTP client.
async fn plain_text(mut stream: TcpStream, peer: SocketAddr) {
    let port = stream.local_addr().map_or(0, |a| a.port());
    debug!(%peer, "plain text on the TLS port");
    let line = server_line(&format!(
        "This is chatd's TLS port: connect with TLS, e.g. \
         `openssl s_client -quiet -connect HOST:{port}` or `ncat --ssl HOST {port}`; \
         nc and telnet go to the plain chat port."
    ));
    let answer = async {
        stream.write_all(&line).await?;
        stream.shutdown().await?;
        // Read what the client sent, so that closing does not reset the
        // connection before it has read the line.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
}

/// The chat end of the pump's pair, served on the client thread: the
/// socket leaves this runtime's reactor and joins that one's, from its own
/// thread. Returns when the connection is over there.
async fn serve_on_client_thread(
    ours: UnixStream,
    peer: SocketAddr,
    chat: Chat,
    clients: &Handle,
    seat: Seat,
) {
    let ours = match ours.into_std() {
        Ok(ours) => ours,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot hand a TLS connection to the client thread");
            return;
        }
    };
    let chat = clients.spawn(async move {
        match UnixStream::from_std(ours) {
            Ok(ours) => connection::serve_on(ours, peer, true, chat, Arrival::none(), seat).await,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot serve a TLS connection on the client thread");
            }
        }
    });
    // An error only says the client thread stopped, and the connection with it.
    let _ = chat.await;
}

/// Tells a client whose handshake is done why it cannot be served, in one
/// line, and closes.
async fn refuse(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    refusal: Refusal,
) {
    tracing::info!(%peer, reason = %refusal, "refused connection");
    let line = server_line(&format!("error: {refusal}"));
    let send = async {
        tls.write_all(&line).await?;
        tls.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSE_FLUSH, send).await;
}

/// Copies both ways. Ends when the connection's side is closed and its
/// last bytes and `close_notify` are sent (the connection has already
/// waited for the client's EOF by then), or [`PUMP_GRACE`] after the
/// connection is over, whichever comes first.
async fn pump(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    mut inner: UnixStream,
    done: CancellationToken,
) {
    let (tls_r, mut tls_w) = tokio::io::split(tls);
    let (in_r, mut in_w) = inner.split();
    let up = async {
        let mut from = BufReader::with_capacity(PUMP_BUF, tls_r);
        if let Err(e) = tokio::io::copy_buf(&mut from, &mut in_w).await {
            debug!(error = %e, "TLS read ended");
        }
        let _ = in_w.shutdown().await;
    };
    let down = async {
        let mut from = BufReader::with_capacity(PUMP_BUF, in_r);
        if tokio::io::copy_buf(&mut from, &mut tls_w).await.is_ok() {
            let _ = tls_w.shutdown().await;
        }
    };
    let grace = async {
        done.cancelled().await;
        tokio::time::sleep(PUMP_GRACE).await;
    };
    let (mut up, mut down, mut grace) = (pin!(up), pin!(down), pin!(grace));
    tokio::select! {
        () = &mut up => {
            tokio::select! {
                () = &mut down => {}
                () = &mut grace => {}
            }
        }
        () = &mut down => {}
        () = &mut grace => {}
    }
}
