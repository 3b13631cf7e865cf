//! Bounding the admin listeners' connections: how many at once, how long one
//! may take to make its first call, and how long it may stay open with no
//! call in progress.
//!
//! hyper serves HTTP/2 connections for as long as the peer keeps them, and
//! an idle one costs a file descriptor out of the budget chat clients share.
//! So every accepted stream is wrapped in a [`Limited`] that holds a slot of
//! the connection limit and a deadline: `admin.handshake_timeout_secs` from
//! accept until the first call, then `admin.idle_timeout_secs` of silence
//! while no call is in progress. A call in progress — a `watch` stream
//! included — keeps its connection open however quiet it is: the
//! [`BusyLayer`] counts calls per connection until their response body ends.
//! When the deadline passes, a read fails and hyper closes the connection.
//!
//! A full listener does not lock its operator out: a new connection evicts
//! the connection that has been quiet longest with no call in progress (a
//! `watch` is never evicted), so idle connections, however many an
//! attacker opens, cost the operator at most one reconnect.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::codegen::http;
use tonic::transport::server::{Connected, TlsConnectInfo};

use chatd_hub::lock::lock;

/// The limits of one listener (from `[admin]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// What a connection's calls share with the connection: found in every
/// request's extensions (tonic puts the connection's info there).
#[derive(Debug)]
pub struct Activity {
    calls: AtomicUsize,
    called: AtomicBool,
    /// When the peer last sent bytes or a call last ended. What the server
    /// writes on its own (hyper's SETTINGS and pings) does not count: an
    /// idle peer stays idle, and eviction picks the connection whose *peer*
    /// has been quiet longest, whatever order their tasks first ran in.
    last_io: std::sync::Mutex<Instant>,
    accepted: Instant,
    /// Set to make room for a new connection; the connection's next read
    /// fails.
    evicted: AtomicBool,
    /// The connection's task, to wake it when evicted.
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        let now = Instant::now();
        Arc::new(Activity {
            calls: AtomicUsize::new(0),
            called: AtomicBool::new(false),
            last_io: std::sync::Mutex::new(now),
            accepted: now,
            evicted: AtomicBool::new(false),
            waker: std::sync::Mutex::new(None),
        })
    }

    /// Closes this connection (at its next poll) to make room.
    fn evict(&self) {
        self.evicted.store(true, Relaxed);
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
    }

    fn touch(&self) {
        *lock(&self.last_io) = Instant::now();
    }

    /// Marks a call in progress until the guard is dropped.
    fn busy(self: &Arc<Self>) -> BusyGuard {
        self.calls.fetch_add(1, Relaxed);
        self.called.store(true, Relaxed);
        BusyGuard(self.clone())
    }

    /// When the connection should be closed; `None`: not while a call runs.
    fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.calls.load(Relaxed) > 0 {
            None
        } else if !self.called.load(Relaxed) {
            Some(self.accepted + limits.handshake_timeout)
        } else {
            Some(*lock(&self.last_io) + limits.idle_timeout)
        }
    }
}

#[derive(Debug)]
struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.calls.fetch_sub(1, Relaxed);
    }
}

/// An accepted stream with its slot and its deadline.
pub struct Limited<IO> {
    io: IO,
    activity: Arc<Activity>,
    limits: ConnLimits,
    timer: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Limited<IO> {
    fn new(io: IO, limits: ConnLimits, slot: OwnedSemaphorePermit) -> Self {
        let activity = Activity::new();
        let timer = Box::pin(tokio::time::sleep_until(
            activity.accepted + limits.handshake_timeout,
        ));
        Limited {
            io,
            activity,
            limits,
            timer,
            _slot: slot,
        }
    }

    /// `Ready(Err)` once the deadline has passed; otherwise arranges to be
    /// woken at the deadline (or, during a call, one idle period later to
    /// look again).
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        *lock(&self.activity.waker) = Some(cx.waker().clone());
        if self.activity.evicted.load(Relaxed) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "admin connection closed to make room for a new one",
            )));
        }
        loop {
            let next = match self.activity.deadline(&self.limits) {
                Some(deadline) if deadline <= Instant::now() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "admin connection idle for too long",
                    )));
                }
                Some(deadline) => deadline,
                None => Instant::now() + self.limits.idle_timeout,
            };
            if self.timer.deadline() != next {
                self.timer.as_mut().reset(next);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO> Connected for Limited<IO> {
    type ConnectInfo = Arc<Activity>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.activity.clone()
    }
}

/// Something that accepts streams: a TCP or a UNIX listener.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok(stream)
    }
}

/// The accepted streams of `listener`, each [`Limited`]. Past the limit a
/// stream is closed at once (the peer sees EOF rather than a hang), and
/// that is logged at most once a minute.
pub fn incoming<L: Accept>(
    listener: L,
    limits: ConnLimits,
) -> impl Stream<Item = io::Result<Limited<L::Io>>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refused = chatd_hub::rate_log::RateLimitedLog::new(Duration::from_secs(60));
    let open: Vec<std::sync::Weak<Activity>> = Vec::new();
    futures_util::stream::unfold(
        (listener, slots, refused, open),
        move |(listener, slots, refused, mut open)| async move {
            loop {
                let io = match listener.accept().await {
                    Ok(io) => io,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let mut slot = slots.clone().try_acquire_owned().ok();
                if slot.is_none() && evict_quietest(&mut open) {
                    // The evicted connection gives its slot back as soon as
                    // its task notices.
                    slot = tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                match slot {
                    Some(slot) => {
                        let next = Limited::new(io, limits, slot);
                        open.retain(|a| a.strong_count() > 0);
                        open.push(Arc::downgrade(&next.activity));
                        return Some((Ok(next), (listener, slots, refused, open)));
                    }
                    None => {
                        if let Some(suppressed) = refused.allow() {
                            tracing::warn!(
                                limit = limits.max_connections,
                                suppressed,
                                "admin connection refused: admin.max_connections reached"
                            );
                        }
                        drop(io);
                    }
                }
            }
        },
    )
}

/// How long a new connection waits for the slot of the one it evicted.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Evicts the open connection quiet for longest with no call in progress;
/// returns whether there was one.
fn evict_quietest(open: &mut Vec<std::sync::Weak<Activity>>) -> bool {
    open.retain(|a| a.strong_count() > 0);
    let quietest = open
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter(|a| a.calls.load(Relaxed) == 0 && !a.evicted.load(Relaxed))
        .min_by_key(|a| *lock(&a.last_io));
    match quietest {
        Some(activity) => {
            activity.evict();
            true
        }
        None => false,
    }
}

/// Counts each call as in progress on its connection until its response
/// body has ended (or is dropped), so streaming calls keep their connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct BusyLayer;

impl<S> tower::Layer<S> for BusyLayer {
    type Service = Busy<S>;

    fn layer(&self, inner: S) -> Busy<S> {
        Busy { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Busy<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Busy<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let guard = extensions
            .get::<Arc<Activity>>()
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<Arc<Activity>>>()
                    .map(TlsConnectInfo::get_ref)
            })
            .map(Activity::busy);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| tonic::body::Body::new(Guarded { body, guard })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call counted until it ends.
struct Guarded {
    body: tonic::body::Body,
    guard: BusyGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(Some(Ok(_)))) {
            this.guard.0.touch();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
