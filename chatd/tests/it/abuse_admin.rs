//! Attacks on the admin API while an honest pair talks in the lobby: each
//! test prints its figures (docs/RELIABILITY.md) and asserts that chat goes
//! on with a bounded delay and that the API still serves its operator.

use std::time::{Duration, Instant};

use chatd_proto::admin::v1::WatchEventsRequest;
use chatd_proto::admin::v1::admin_client::AdminClient;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};
use tower::{Service, ServiceExt};

use crate::abuse::{Probe, fds, fds_return_to};
use crate::support::*;

async fn channel(server: &TestServer) -> Channel {
    Endpoint::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the admin API")
}

fn token(server: &TestServer) -> String {
    let admin = server.admin.expect("admin over TCP");
    let file = format!("admin-{}-{}.token", admin.ip(), admin.port());
    std::fs::read_to_string(server.runtime_dir().join(file))
        .expect("the generated token")
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A raw gRPC POST to `path`, with `auth` as the authorization header.
fn raw_call(
    server: &TestServer,
    path: &str,
    auth: Option<&str>,
    body: Vec<u8>,
) -> http::Request<tonic::body::Body> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{}{path}", server.endpoint()))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    req.body(tonic::body::Body::new(grpc_frame(body)))
        .expect("request")
}

/// A body of one gRPC frame holding `payload`: flag, 4-byte length,
/// message. (A `String` body needs no extra crate; the payloads used here
/// are empty.)
fn grpc_frame(payload: Vec<u8>) -> String {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    String::from_utf8(frame).unwrap_or_default()
}

/// The gRPC status of a response: from the headers (trailers-only) or 0.
fn grpc_status<B>(resp: &http::Response<B>) -> Option<String> {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_and_wrong_tokens_are_refused_fast_and_chat_goes_on() {
    let server = TestServer::start();
    let probe = Probe::start(&server).await;
    let mut ch = channel(&server).await;
    let started = Instant::now();
    let mut refused = 0;
    let mut times = Vec::new();
    for i in 0..300 {
        let auth = match i % 3 {
            0 => None,
            1 => Some(format!("Bearer wrong-token-{i:020}")),
            _ => Some(format!("Basic {}", "x".repeat(i))),
        };
        let t = Instant::now();
        let req = raw_call(
            &server,
            "/chatd.admin.v1.Admin/ListClients",
            auth.as_deref(),
            Vec::new(),
        );
        let resp = ch
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("an answer");
        times.push(t.elapsed());
        // 16 = UNAUTHENTICATED.
        if grpc_status(&resp).as_deref() == Some("16") {
            refused += 1;
        }
    }
    let elapsed = started.elapsed();
    times.sort();
    let p99 = times[times.len() * 99 / 100 - 1];
    assert_eq!(
        refused, 300,
        "every call without the right token is refused"
    );
    // The operator with the token is still served.
    server.chatctl(&["ls"]).await.ok();
    let (figures, _, _l) = probe.finish().await;
    println!(
        "admin bad tokens: 300 calls refused in {elapsed:?} (p99 time to refuse {p99:?}); RSS {} KiB; {figures}",
        server.rss_kib()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_bogus_paths_cost_nothing_lasting() {
    let server = TestServer::start();
    let probe = Probe::start(&server).await;
    let mut ch = channel(&server).await;
    let auth = format!("Bearer {}", token(&server));
    let rss_before = server.rss_kib();
    let started = Instant::now();
    for i in 0..2000 {
        let path = format!("/bogus{i}.Service{i}/Method{i}");
        let req = raw_call(
            &server,
            &path,
            if i % 2 == 0 { Some(&auth) } else { None },
            Vec::new(),
        );
        let resp = ch
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("an answer");
        let status = grpc_status(&resp);
        // 12 = UNIMPLEMENTED, 16 = UNAUTHENTICATED.
        assert!(
            matches!(status.as_deref(), Some("12") | Some("16")),
            "{path}: {status:?}"
        );
    }
    let elapsed = started.elapsed();
    let rss_after = server.rss_kib();
    server.chatctl(&["ls"]).await.ok();
    let (figures, _, _l) = probe.finish().await;
    println!(
        "admin bogus paths: 2000 unique paths in {elapsed:?}; RSS {rss_before} → {rss_after} KiB; {figures}"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "unique paths left memory behind: {rss_before} → {rss_after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_do_not_lock_the_operator_out() {
    let server = TestServer::start();
    let probe = Probe::start(&server).await;
    let admin = server.admin.expect("admin over TCP");
    let fds_before = fds(server.pid());
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(admin)
                .await
                .expect("connect"),
        );
    }
    let fds_peak = fds(server.pid());
    let t = Instant::now();
    server.chatctl(&["ls"]).await.ok();
    let served = t.elapsed();
    drop(idle);
    let fds_after = fds_return_to(&server, fds_before).await;
    let (figures, _, _l) = probe.finish().await;
    println!(
        "admin idle: 200 idle connections, operator served in {served:?}; fds {fds_before} → {fds_peak} → {fds_after}; {figures}"
    );
    assert!(
        fds_after <= fds_before,
        "admin connections leaked descriptors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_closed_by_the_daemon() {
    let server = TestServer::start();
    let admin = server.admin.expect("admin over TCP");
    let mut idle = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let t = Instant::now();
    let mut buf = [0u8; 256];
    // A connection that never speaks HTTP/2 is closed within a minute.
    loop {
        let n = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
        )
        .await
        .expect("the daemon closes an idle admin connection")
        .unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    println!("admin idle: closed after {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_broadcast_is_refused_with_a_clear_error() {
    let server = TestServer::start();
    let (mut listener, _) = server.join().await;
    // As large as one command-line argument may be (128 KiB).
    let huge = "x".repeat(120 * 1024);
    let out = server.chatctl(&["broadcast", &huge]).await;
    assert_ne!(out.code, 0, "a 120 KiB broadcast was accepted");
    let text = listener.sync().await;
    assert!(
        text.iter().all(|l| l.len() < 64 * 1024),
        "the broadcast reached the room"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watch_streams_that_never_read_do_not_slow_chat() {
    tokio::time::timeout(WAIT * 6, watchers_that_never_read())
        .await
        .expect("chat went on while 50 watch streams were unread");
}

/// Watch streams (with chat messages) that never read, each on a
/// connection of its own, as separate operators' would be; they end when
/// this is dropped.
pub(crate) struct UnreadWatchers {
    _hold: tokio::sync::watch::Sender<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for UnreadWatchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Opens `n` watch streams on `server` that never read, and waits until the
/// daemon has started them all.
pub(crate) async fn unread_watchers(server: &TestServer, n: usize) -> UnreadWatchers {
    // Each watcher opens its stream and then never polls it. (The response
    // headers may wait for the first event, so each runs in its own task.)
    let (hold, held) = tokio::sync::watch::channel(());
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut client = AdminClient::new(channel(server).await);
        let mut req = tonic::Request::new(WatchEventsRequest {
            include_messages: true,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token(server)).parse().expect("header"),
        );
        let mut held = held.clone();
        tasks.push(tokio::spawn(async move {
            let stream = client.watch_events(req).await.expect("watch");
            let _ = held.changed().await;
            drop(stream);
        }));
    }
    let deadline = Instant::now() + WAIT;
    while server.logged("admin: watch started").len() < n {
        assert!(Instant::now() < deadline, "{n} watchers started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    UnreadWatchers { _hold: hold, tasks }
}

async fn watchers_that_never_read() {
    // Flood control off: the talkers below send more than a burst each.
    let server = TestServer::with_env(&[("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")]);
    let watchers = unread_watchers(&server, 50).await;
    let probe = Probe::start(&server).await;
    let rss_before = server.rss_kib();
    // A busy room: 10 talkers × 200 lines of 500 bytes, each event going to
    // 50 watchers that never read.
    let mut talkers = Vec::new();
    for _ in 0..10 {
        let (c, _) = server.join().await;
        talkers.push(c);
    }
    let filler = "w".repeat(500);
    let started = Instant::now();
    for round in 0..10 {
        for t in &mut talkers {
            let burst: String = (0..20).map(|i| format!("{round}-{i} {filler}\n")).collect();
            t.send(&burst).await;
        }
        for t in &mut talkers {
            t.sync().await;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let elapsed = started.elapsed();
    let rss_after = server.rss_kib();
    // The operator is still served.
    server.chatctl(&["stats"]).await.ok();
    let (figures, _, _l) = probe.finish().await;
    println!(
        "admin watchers: 50 unread watch streams, 2000 lines × 500 B in {elapsed:?}; RSS {rss_before} → {rss_after} KiB; {figures}"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "unread watch streams held the traffic: {rss_before} → {rss_after} KiB"
    );
    drop(watchers);
}
