//! Reaching chatd: the endpoint forms we accept, the channel (TCP, TLS or a
//! UNIX socket) and the bearer token sent on every call.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use chatd_proto::admin::v1::admin_client::AdminClient;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::error::ChatctlError;

/// Where the admin API listens, as given by `--endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddr {
    /// `http://…` or `https://…`, and the text as given.
    Url { uri: Uri, text: String },
    /// `unix:/path` or `unix:///path`.
    Unix(PathBuf),
}

impl EndpointAddr {
    /// Parses `--endpoint`; errors name the forms that are accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        const FORMS: &str = "expected http://HOST:PORT, https://HOST:PORT or unix:/PATH";
        if let Some(rest) = text.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(format!("no socket path in {text:?}; {FORMS}"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let uri: Uri = text.parse().map_err(|e| format!("{e}; {FORMS}"))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.host().is_some() => Ok(Self::Url {
                uri,
                text: text.to_owned(),
            }),
            _ => Err(FORMS.to_owned()),
        }
    }

    fn is_https(&self) -> bool {
        matches!(self, Self::Url { uri, .. } if uri.scheme_str() == Some("https"))
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url { text, .. } => f.write_str(text),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every request, when we have one.
#[derive(Debug, Clone, Default)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    /// `origin` names where the token came from, for the error message.
    pub fn new(token: Option<&str>, origin: &str) -> Result<Self, ChatctlError> {
        let Some(token) = token else {
            return Ok(Self::default());
        };
        let bad = |reason: &str| ChatctlError::BadToken {
            origin: origin.to_owned(),
            reason: reason.to_owned(),
        };
        if token.is_empty() {
            return Err(bad("it is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("it must be printable ASCII without spaces"));
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| bad("it is not a valid header value"))?;
        Ok(Self {
            header: Some(header),
        })
    }
}

impl Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, BearerAuth>>;

/// Connects now, so an unreachable daemon is reported before any call.
/// `heard` is set once the server sends a byte (always, for TLS, where the
/// handshake is the server's answer).
pub async fn channel(
    addr: &EndpointAddr,
    ca_cert: Option<&std::path::Path>,
    timeout: Duration,
    heard: &Arc<AtomicBool>,
) -> Result<Channel, ChatctlError> {
    if ca_cert.is_some() && !addr.is_https() {
        return Err(ChatctlError::Usage(
            "--ca-cert needs an https:// endpoint".to_owned(),
        ));
    }
    let unreachable = |err| unreachable(addr, &err);
    match addr {
        EndpointAddr::Url { uri, .. } => {
            let mut endpoint = Endpoint::from(uri.clone()).connect_timeout(timeout);
            if addr.is_https() {
                endpoint = endpoint
                    .tls_config(tls_config(ca_cert)?)
                    .map_err(unreachable)?;
                let channel = endpoint.connect().await.map_err(unreachable)?;
                heard.store(true, Ordering::Relaxed);
                return Ok(channel);
            }
            let host = uri
                .host()
                .unwrap_or("localhost")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let heard = heard.clone();
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let host = host.clone();
                    let heard = heard.clone();
                    async move {
                        let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                        stream.set_nodelay(true)?;
                        Ok::<_, std::io::Error>(TokioIo::new(Heard {
                            inner: stream,
                            heard,
                        }))
                    }
                }))
                .await
                .map_err(unreachable)
        }
        EndpointAddr::Unix(path) => {
            let path = path.clone();
            let heard = heard.clone();
            // The URI only fills the :authority header; the connector ignores it.
            Endpoint::from_static("http://localhost")
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    let heard = heard.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(Heard {
                            inner: stream,
                            heard,
                        }))
                    }
                }))
                .await
                .map_err(unreachable)
        }
    }
}

/// Why a connection to `addr` failed, in the user's words.
fn unreachable(addr: &EndpointAddr, err: &tonic::transport::Error) -> ChatctlError {
    let cause = error_chain(err);
    // rustls's words for a server that answered TLS with plain bytes.
    if addr.is_https() && cause.contains("InvalidContentType") {
        return ChatctlError::NotTls {
            endpoint: addr.to_string(),
        };
    }
    ChatctlError::Unreachable {
        endpoint: addr.to_string(),
        cause,
    }
}

/// Trusts `ca_cert` alone when given, else the system's roots.
fn tls_config(ca_cert: Option<&std::path::Path>) -> Result<ClientTlsConfig, ChatctlError> {
    Ok(match ca_cert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| ChatctlError::CaCert {
                path: path.to_owned(),
                source,
            })?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_enabled_roots(),
    })
}

/// A stream that notes whether the server ever sent a byte: a call that
/// times out on a connection that never heard a word was never answered by
/// an HTTP/2 server (chatd's admin API sends its settings at once), which
/// is unreachability, not a slow chatd.
struct Heard<S> {
    inner: S,
    heard: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An error with its causes, `outer: inner: innermost`, skipping repeats.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether `addr` answers like chatd's chat port: its first line starts
/// with `*** ` (the chat port's server lines) after we send the HTTP/2
/// preface, as our gRPC client did. Sends no token; gives up quietly.
pub async fn is_chat_port(addr: &EndpointAddr, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn probe<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<bool> {
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await?;
        let mut seen = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while seen.len() < 4 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(seen.starts_with(b"*** "))
    }

    let attempt = async {
        match addr {
            EndpointAddr::Url { uri, .. } => {
                let Some(host) = uri.host() else {
                    return Ok(false);
                };
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = uri
                    .port_u16()
                    .unwrap_or(if addr.is_https() { 443 } else { 80 });
                probe(tokio::net::TcpStream::connect((host, port)).await?).await
            }
            EndpointAddr::Unix(path) => probe(tokio::net::UnixStream::connect(path).await?).await,
        }
    };
    matches!(
        tokio::time::timeout(timeout.min(Duration::from_secs(2)), attempt).await,
        Ok(Ok(true))
    )
}
