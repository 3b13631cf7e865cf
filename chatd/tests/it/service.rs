//! Running as a service: the systemd notify protocol, native journal
//! records, Prometheus metrics and OpenTelemetry traces, each checked from
//! the receiving side.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use rustix::process::Signal;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket, UnixDatagram};

use crate::support::*;

/// Receives datagrams until one contains `needle` as a line; returns every
/// line received on the way, that one included. Fails after [`WAIT`] even
/// while other notifications (watchdog pings) keep arriving.
async fn until_line(socket: &UnixDatagram, needle: &str) -> Vec<String> {
    until(socket, needle, |l| l == needle).await
}

/// Like [`until_line`], for the first line that satisfies `found`.
async fn until(socket: &UnixDatagram, what: &str, found: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {what:?} within {WAIT:?}; the last of {} lines: {:?}",
                    seen.len(),
                    &seen[seen.len().saturating_sub(6)..]
                )
            })
            .expect("recv");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let hit = text.lines().any(&found);
        seen.extend(text.lines().map(str::to_string));
        if hit {
            return seen;
        }
    }
}

/// A fake service manager: the socket chatd is told about in
/// `NOTIFY_SOCKET`, and the variables that point chatd at it.
struct Manager {
    socket: UnixDatagram,
    path: String,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        Manager {
            socket,
            path: path.to_str().expect("utf-8").to_string(),
            _dir: dir,
        }
    }
}

#[tokio::test]
async fn notify_ready_watchdog_reload_and_stopping_in_order() {
    let manager = Manager::new();
    let socket = &manager.socket;
    let mut server = TestServer::with_env(&[
        ("NOTIFY_SOCKET", &manager.path),
        // 200 ms: chatd must ping at least every 100 ms.
        ("WATCHDOG_USEC", "200000"),
    ]);
    let before = until_line(socket, "READY=1").await;
    assert!(
        !before
            .iter()
            .any(|l| l == "STOPPING=1" || l == "WATCHDOG=1"),
        "{before:?}"
    );
    // READY means served: a client is welcomed straight away.
    let (mut alice, _) = server.join().await;

    // The watchdog keeps being fed while the daemon is healthy, each ping
    // with a status line read from the hub at that moment.
    let started = Instant::now();
    for _ in 0..5 {
        let lines = until_line(socket, "WATCHDOG=1").await;
        assert!(
            lines.iter().any(|l| l.starts_with("STATUS=")),
            "a ping without a status: {lines:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(3), "pings too slow");
    until(socket, "STATUS=1 client", |l| {
        l.starts_with("STATUS=1 client")
    })
    .await;
    let (_bob, _) = server.join().await;
    let lines = until(socket, "STATUS=2 clients", |l| {
        l.starts_with("STATUS=2 clients")
    })
    .await;
    let status = lines.last().expect("the status line");
    assert!(
        status.contains(" 1 room") && status.contains(" lines relayed"),
        "{status:?}"
    );

    server.signal(Signal::HUP);
    let lines = until_line(socket, "RELOADING=1").await;
    assert!(!lines.iter().any(|l| l == "READY=1"), "{lines:?}");
    // systemd (Type=notify-reload) wants the reload's start time in the
    // same datagram.
    let usec = lines.iter().find_map(|l| l.strip_prefix("MONOTONIC_USEC="));
    assert!(
        usec.is_some_and(|u| u.parse::<u64>().is_ok_and(|u| u > 0)),
        "{lines:?}"
    );
    let lines = until_line(socket, "READY=1").await;
    assert!(!lines.iter().any(|l| l == "STOPPING=1"), "{lines:?}");
    server.wait_logged("configuration reloaded").await;
    alice.send("still here\n").await;
    alice.sync().await;

    server.signal(Signal::TERM);
    until_line(socket, "STOPPING=1").await;
    assert_eq!(server.wait_exit().await.code(), Some(0));
}

#[tokio::test]
async fn without_a_watchdog_for_chatd_only_ready_status_and_stopping_are_sent() {
    // The watchdog is meant for another process (systemd sets WATCHDOG_PID
    // to the main pid): chatd must not ping, but still reports its status.
    let manager = Manager::new();
    let socket = &manager.socket;
    let mut server = TestServer::with_env(&[
        ("NOTIFY_SOCKET", &manager.path),
        ("WATCHDOG_USEC", "200000"),
        ("WATCHDOG_PID", "1"),
        ("CHATD_LOG__LEVEL", "debug"),
    ]);
    let mut lines = until_line(socket, "READY=1").await;
    // The notifier's first round sends at once: with a watchdog it would
    // be `WATCHDOG=1` with the status.
    lines.extend(until(socket, "STATUS=", |l| l.starts_with("STATUS=")).await);
    server.wait_logged("notifying the service manager").await;
    server.signal(Signal::TERM);
    lines.extend(until_line(socket, "STOPPING=1").await);
    assert_eq!(server.wait_exit().await.code(), Some(0));
    assert!(!lines.iter().any(|l| l == "WATCHDOG=1"), "{lines:?}");
}

/// `systemctl stop` just after a start: the SIGTERM handler is in place by
/// the time READY=1 goes out, so the stop is graceful, not a kill.
#[tokio::test]
async fn a_stop_right_after_ready_is_graceful() {
    let manager = Manager::new();
    let mut server = TestServer::with_env(&[("NOTIFY_SOCKET", &manager.path)]);
    until_line(&manager.socket, "READY=1").await;
    server.signal(Signal::TERM);
    until_line(&manager.socket, "STOPPING=1").await;
    assert_eq!(server.wait_exit().await.code(), Some(0));
}

#[tokio::test]
async fn without_notify_socket_the_notifier_stays_off_and_chat_works() {
    let server =
        TestServer::with_env(&[("WATCHDOG_USEC", "200000"), ("CHATD_LOG__LEVEL", "debug")]);
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.send("hello\n").await;
    assert_eq!(bob.expect("hello").await, format!("<{a}> hello"));
    // The notifier logs this when it starts (see the test above), and a
    // failed notification would be logged too.
    assert!(server.logged("notifying the service manager").is_empty());
    assert!(server.logged("cannot notify").is_empty());
}

/// One native journal record: `KEY=value` lines, or `KEY\n` followed by a
/// little-endian u64 length, the value and `\n` for values with newlines.
fn parse_journal(mut data: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    while !data.is_empty() {
        let end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
        let line = &data[..end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            data = data.get(end + 1..).unwrap_or_default();
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &data[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
            let value = String::from_utf8_lossy(&rest[8..8 + len]).into_owned();
            fields.insert(key, value);
            data = rest.get(8 + len + 1..).unwrap_or_default();
        }
    }
    fields
}

#[tokio::test]
async fn journald_records_carry_priority_message_and_client_fields() {
    // The journal socket path is fixed (/run/systemd/journal/socket), so
    // chatd runs in a private mount namespace where that directory is ours.
    if !can_unshare() {
        eprintln!("skipped: cannot create a mount namespace here (needs root)");
        return;
    }
    let journal_dir = Path::new("/run/systemd/journal");
    std::fs::create_dir_all(journal_dir).expect("create /run/systemd/journal");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = UnixDatagram::bind(dir.path().join("socket")).expect("bind journal socket");
    let script = format!(
        "mount --bind '{}' /run/systemd/journal && exec '{}' \"$@\"",
        dir.path().display(),
        chatd_bin()
    );
    let mut cmd = Command::new("unshare");
    // `sh -c SCRIPT sh ARGS…`: chatd gets the arguments `prepare` adds.
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    TestServer::prepare(&mut cmd, None, &[("CHATD_LOG__TARGET", "journald")]);
    cmd.stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("start chatd");
    let _kill = KillOnDrop(child.id());

    let mut records: Vec<HashMap<String, String>> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    // Each wait has its own deadline, however many other records arrive.
    let mut next = async |records: &mut Vec<HashMap<String, String>>,
                          deadline: tokio::time::Instant| {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the record awaited did not come within {WAIT:?}"))
            .expect("recv");
        if n > 0 {
            records.push(parse_journal(&buf[..n]));
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !records
        .iter()
        .any(|r| r.get("MESSAGE").is_some_and(|m| m == "listening"))
    {
        next(&mut records, deadline).await;
    }
    let listening = records.last().expect("record").clone();
    assert_eq!(listening["PRIORITY"], "5", "{listening:?}");
    assert_eq!(listening["SYSLOG_IDENTIFIER"], "chatd");
    let chat: SocketAddr = listening["CHAT"].parse().expect("CHAT field is an address");

    let mut alice = Client::connect(chat).await;
    alice.welcome().await;
    alice.send("/nick alice\n/join dev\n").await;
    alice.expect("You are now in dev").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let joined = loop {
        if let Some(r) = records
            .iter()
            .find(|r| r.get("MESSAGE").is_some_and(|m| m == "joined"))
        {
            break r.clone();
        }
        next(&mut records, deadline).await;
    };
    assert_eq!(joined["NICK"], "alice", "{joined:?}");
    assert_eq!(joined["ROOM"], "dev", "{joined:?}");
    assert_eq!(joined["PRIORITY"], "5");
    assert!(joined["CLIENT"].parse::<u64>().is_ok(), "{joined:?}");
    assert!(joined["PEER"].starts_with("127.0.0.1:"), "{joined:?}");
    assert!(joined.contains_key("CODE_FILE"));

    let _ = child.kill();
    let _ = child.wait();
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
}

#[tokio::test]
async fn prometheus_metrics_scrape_after_real_traffic() {
    let server = TestServer::with_env(&[("CHATD_METRICS__LISTEN", "127.0.0.1:0")]);
    let metrics = metrics_addr(&server).await;

    let (mut alice, _) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    alice.send("one\ntwo\nthree\n").await;
    bob.expect("three").await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    udp.send_to(b"ping", server.udp.expect("udp on"))
        .await
        .expect("udp send");
    let mut buf = [0u8; 16];
    tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");

    // The echo is counted just after it is sent: the client may see it a
    // moment before the counter does.
    let deadline = std::time::Instant::now() + WAIT;
    let (head, body) = loop {
        let (head, body) = scrape(metrics, "/metrics").await;
        if sample(&body, "chatd_udp_out_total") >= 1.0 || std::time::Instant::now() > deadline {
            break (head, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert_eq!(sample(&body, "chatd_clients"), 2.0);
    assert_eq!(sample(&body, "chatd_peak_clients"), 2.0);
    assert_eq!(sample(&body, "chatd_rooms"), 1.0);
    assert_eq!(sample(&body, "chatd_bans"), 0.0);
    assert!(sample(&body, "chatd_lines_in_total") >= 3.0);
    assert!(sample(&body, "chatd_deliveries_total") >= 3.0);
    assert!(sample(&body, "chatd_bytes_in_total") >= 14.0);
    assert!(sample(&body, "chatd_bytes_out_total") > 0.0);
    assert_eq!(sample(&body, "chatd_udp_in_total"), 1.0);
    assert_eq!(sample(&body, "chatd_udp_out_total"), 1.0);
    assert_eq!(sample(&body, "chatd_flood_disconnects_total"), 0.0);
    assert!(sample(&body, "chatd_fan_out_seconds_count") >= 1.0);
    assert!(
        body.contains("chatd_fan_out_seconds_bucket{le=\"+Inf\"}"),
        "{body}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");

    let (head, _) = scrape(metrics, "/other").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[tokio::test]
async fn admin_rpcs_are_counted_by_method_and_status() {
    let server = TestServer::with_env(&[("CHATD_METRICS__LISTEN", "127.0.0.1:0")]);
    let metrics = metrics_addr(&server).await;
    server.chatctl(&["list-clients"]).await.ok();
    server.chatctl(&["list-clients"]).await.ok();
    let missing = server.chatctl(&["kick", "nobody", "--reason", "x"]).await;
    assert_eq!(missing.code, 3, "{missing:#?}");
    let refused = server
        .chatctl_env(&["stats"], &[("CHATCTL_TOKEN", "wrong")])
        .await;
    assert_eq!(refused.code, 5, "{refused:#?}");

    let (_, body) = scrape(metrics, "/metrics").await;
    let rpcs = |method: &str, status: &str| {
        sample(
            &body,
            &format!("chatd_admin_rpcs_total{{method=\"{method}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(rpcs("ListClients", "OK"), 2.0);
    assert_eq!(rpcs("KickClient", "NOT_FOUND"), 1.0);
    assert_eq!(rpcs("GetStats", "UNAUTHENTICATED"), 1.0);

    server
        .chatctl(&["ban", "192.0.2.0/24", "--reason", "test"])
        .await
        .ok();
    let (_, body) = scrape(metrics, "/metrics").await;
    assert_eq!(sample(&body, "chatd_bans"), 1.0);
}

/// A stand-in OpenTelemetry collector: keeps every span it is sent.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<SpanSeen>>>,
}

#[derive(Debug, Clone)]
struct SpanSeen {
    name: String,
    service: String,
    attributes: HashMap<String, String>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            other => format!("{other:?}"),
        };
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(SpanSeen {
                        name: span.name.clone(),
                        service: service.clone(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        addr
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&SpanSeen) -> bool) -> SpanSeen {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .spans
                .lock()
                .expect("lock")
                .iter()
                .find(|s| pred(s))
                .cloned();
            if let Some(span) = found {
                return span;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} span; got {:#?}",
                self.spans.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn a_collector_receives_connection_and_command_spans() {
    // Once through the config key, once through the standard variables.
    for by_config in [true, false] {
        let collector = Collector::default();
        let addr = collector.start().await;
        let endpoint = format!("http://{addr}");
        let env: Vec<(&str, &str)> = if by_config {
            vec![
                ("CHATD_TELEMETRY__OTLP_ENDPOINT", &endpoint),
                ("OTEL_SERVICE_NAME", "chatd-test"),
            ]
        } else {
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ]
        };
        let mut env = env;
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "100"));
        let server = TestServer::with_env(&env);
        let (mut alice, _) = server.join().await;
        alice.send("/nick alice\n").await;
        alice.expect("You are now known as alice").await;
        alice.send("/join dev\n").await;
        alice.expect("You are now in dev").await;
        alice.send("hello\n/quit bye\n").await;
        alice.until_eof().await;
        let missing = server.chatctl(&["kick", "nobody", "--reason", "x"]).await;
        assert_eq!(missing.code, 3, "{missing:#?}");

        let rpc = "/chatd.admin.v1.Admin/KickClient";
        let kick = collector.wait_for(rpc, |s| s.name == rpc).await;
        assert_eq!(kick.attributes["rpc.method"], "KickClient");
        assert_eq!(kick.attributes["rpc.grpc.status"], "NOT_FOUND");

        let join = collector.wait_for("/join", |s| s.name == "/join").await;
        let service = if by_config { "chatd-test" } else { "chatd" };
        assert_eq!(join.service, service);
        assert_eq!(join.attributes["command"], "/join");
        assert_eq!(
            join.attributes["room"], "lobby",
            "the room it was issued from"
        );
        let conn = collector.wait_for("conn", |s| s.name == "conn").await;
        assert_eq!(conn.attributes["nick"], "alice", "{conn:?}");
        assert!(conn.attributes["client"].parse::<u64>().is_ok(), "{conn:?}");
        assert!(
            conn.attributes["peer"].starts_with("127.0.0.1:"),
            "{conn:?}"
        );
        // Chat lines have no spans of their own.
        let spans = collector.spans.lock().expect("lock").clone();
        assert!(
            spans
                .iter()
                .all(|s| s.name == "conn" || s.name.starts_with('/')),
            "{spans:#?}"
        );
    }
}

#[tokio::test]
async fn chat_keeps_working_when_the_collector_is_down() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let server = TestServer::with_env(&[
        ("CHATD_TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
    ]);
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    let started = Instant::now();
    for i in 0..50 {
        alice.send(&format!("/who\nline {i}\n")).await;
        assert_eq!(
            bob.expect(&format!("line {i}")).await,
            format!("<{a}> line {i}")
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "chat slowed down: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn idle_metrics_connections_do_not_hold_up_a_scrape() {
    let server = TestServer::with_env(&[("CHATD_METRICS__LISTEN", "127.0.0.1:0")]);
    let metrics = metrics_addr(&server).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(metrics).await.expect("connect"));
    }
    let started = Instant::now();
    let scraped = tokio::time::timeout(Duration::from_secs(3), scrape(metrics, "/metrics")).await;
    let (head, _) = scraped.expect("a scrape answered with 8 idle connections open");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(idle);
}

#[tokio::test]
async fn metrics_connections_are_limited_and_time_out() {
    let server = TestServer::with_env(&[
        ("CHATD_METRICS__LISTEN", "127.0.0.1:0"),
        ("CHATD_METRICS__MAX_CONNECTIONS", "2"),
        ("CHATD_METRICS__TIMEOUT_SECS", "1"),
    ]);
    let metrics = metrics_addr(&server).await;
    let mut idle = [
        TcpStream::connect(metrics).await.expect("connect"),
        TcpStream::connect(metrics).await.expect("connect"),
    ];
    // Past the limit: answered 503 at once.
    let mut extra = TcpStream::connect(metrics).await.expect("connect");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, extra.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    // The idle ones are closed after metrics.timeout_secs.
    for stream in &mut idle {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .expect("read");
    }
    let (head, _) = scrape(metrics, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}
