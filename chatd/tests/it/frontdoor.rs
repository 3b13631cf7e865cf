//! The front door: PROXY protocol behind a real HAProxy, TLS with the real
//! `openssl s_client` and `ncat --ssl`, several addresses and IPv6, and
//! socket activation the way systemd does it.
//!
//! Tests that need an outside tool skip, with one line, where it is
//! missing; with `REQUIRE_TEST_TOOLS=1` (as `.ci/run` sets) they fail
//! instead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::support::*;

/// The path of an outside tool, or `None` after one line saying it is
/// missing.
pub(crate) fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        skip(&format!("{name} is not installed"));
    }
    found
}

/// A free loopback port, for tools that cannot be told to pick one.
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A TCP connection from a chosen loopback source address.
async fn connect_from(source: &str, to: SocketAddr) -> (Client, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind the source address");
    let stream = tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .expect("connect in time")
        .expect("connect");
    let local = stream.local_addr().expect("local addr");
    (Client::from_stream(stream), local)
}

/// The nick in a welcome line.
fn nick_of(welcome: &str) -> String {
    welcome
        .strip_prefix("*** Welcome to ")
        .and_then(|r| r.split_once(", "))
        .and_then(|(_, r)| r.split_once('!'))
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| panic!("not a welcome line: {welcome:?}"))
}

/// `list-clients -o json`, by nick: (address, tls).
async fn clients(server: &TestServer) -> Vec<(String, String, bool)> {
    let json = server.chatctl(&["ls", "-o", "json"]).await.json();
    json["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| {
            (
                c["nick"].as_str().expect("nick").to_string(),
                c["addr"].as_str().expect("addr").to_string(),
                c["tls"].as_bool().expect("tls"),
            )
        })
        .collect()
}

async fn client_of(server: &TestServer, nick: &str) -> (String, bool) {
    clients(server)
        .await
        .into_iter()
        .find(|(n, _, _)| n == nick)
        .map(|(_, a, t)| (a, t))
        .unwrap_or_else(|| panic!("{nick} is not listed"))
}

/// A line-based outside program (`openssl s_client`, `ncat`) used as a
/// chat client through its stdin and stdout.
struct Tool {
    _child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    seen: Vec<String>,
}

impl Tool {
    fn spawn(cmd: &mut Command) -> Tool {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the client tool");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Tool {
            _child: child,
            stdin,
            out,
            seen: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) {
        self.stdin.write_all(text.as_bytes()).await.expect("send");
        self.stdin.flush().await.expect("flush");
    }

    /// The next line, `None` at EOF.
    async fn try_line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.out.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no line in time; saw {:#?}", self.seen))
            .unwrap_or(0);
        (n > 0).then(|| line.trim_end_matches(['\r', '\n']).to_string())
    }

    async fn expect(&mut self, needle: &str) -> String {
        loop {
            match self.try_line().await {
                Some(l) if l.contains(needle) => return l,
                Some(l) => self.seen.push(l),
                None => panic!("EOF before {needle:?}; saw {:#?}", self.seen),
            }
        }
    }

    /// Reads the welcome; returns the nick.
    async fn welcome(&mut self) -> String {
        let nick = nick_of(&self.expect("*** Welcome to ").await);
        self.expect("You are now in").await;
        nick
    }
}

fn s_client(openssl: &Path, addr: SocketAddr) -> Tool {
    Tool::spawn(Command::new(openssl).args(["s_client", "-quiet", "-connect", &addr.to_string()]))
}

/// A self-signed certificate and its key, written to `dir` as `NAME.crt`
/// and `NAME.key`; returns the certificate's PEM.
fn certificate(dir: &Path, name: &str) -> String {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed certificate");
    let pem = cert.cert.pem();
    std::fs::write(dir.join(format!("{name}.crt")), &pem).expect("write");
    std::fs::write(
        dir.join(format!("{name}.key")),
        cert.signing_key.serialize_pem(),
    )
    .expect("write");
    pem
}

/// A daemon with a TLS listener on loopback; the certificate files are
/// `tls.crt` and `tls.key` in the returned directory.
fn tls_server(extra: &[(&str, &str)]) -> (TestServer, tempfile::TempDir, SocketAddr) {
    let certs = tempfile::tempdir().expect("tempdir");
    certificate(certs.path(), "tls");
    let cert = certs.path().join("tls.crt");
    let key = certs.path().join("tls.key");
    let mut env = vec![
        ("CHATD_CHAT__TLS_LISTEN", "127.0.0.1:0"),
        ("CHATD_CHAT__TLS_CERT", cert.to_str().expect("utf-8")),
        ("CHATD_CHAT__TLS_KEY", key.to_str().expect("utf-8")),
    ];
    env.extend_from_slice(extra);
    let server = TestServer::with_env(&env);
    let tls = server.listening["tls"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("TLS address");
    (server, certs, tls)
}

// --- PROXY protocol ---------------------------------------------------------

/// HAProxy in front of the chat port: `fe_v1` sends PROXY v1, `fe_v2` v2,
/// `fe_tls` v2 in front of the TLS listener. Killed on drop.
struct Haproxy {
    child: std::process::Child,
    v1: SocketAddr,
    v2: SocketAddr,
    tls: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(haproxy: &Path, chat: SocketAddr, tls: SocketAddr) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let [v1, v2, fe_tls] = [0; 3].map(|_| free_port("127.0.0.1"));
        let config = format!(
            "global\n  maxconn 200\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend fe_v1\n  bind 127.0.0.1:{v1}\n  default_backend chat_v1\n\
             frontend fe_v2\n  bind 127.0.0.1:{v2}\n  default_backend chat_v2\n\
             frontend fe_tls\n  bind 127.0.0.1:{fe_tls}\n  default_backend chat_tls\n\
             backend chat_v1\n  server chatd {chat} send-proxy\n\
             backend chat_v2\n  server chatd {chat} send-proxy-v2\n\
             backend chat_tls\n  server chatd {tls} send-proxy-v2\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = std::process::Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let proxy = Haproxy {
            child,
            v1: addr(v1),
            v2: addr(v2),
            tls: addr(fe_tls),
            _dir: dir,
        };
        // Ready when every frontend accepts.
        let deadline = Instant::now() + WAIT;
        for fe in [proxy.v1, proxy.v2, proxy.tls] {
            while std::net::TcpStream::connect(fe).is_err() {
                assert!(Instant::now() < deadline, "haproxy did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        proxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn behind_haproxy_clients_keep_their_own_addresses_and_bans_hit_them() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let (server, _certs, tls) = tls_server(&[("CHATD_CHAT__TRUSTED_PROXIES", "127.0.0.1/32")]);
    let proxy = Haproxy::start(&haproxy, server.chat, tls);

    let (mut alice, alice_addr) = connect_from("127.0.0.2", proxy.v1).await;
    let a = alice.welcome().await;
    let (mut bob, bob_addr) = connect_from("127.0.0.3", proxy.v2).await;
    let b = bob.welcome().await;
    assert_eq!(
        client_of(&server, &a).await,
        (alice_addr.to_string(), false),
        "PROXY v1"
    );
    assert_eq!(
        client_of(&server, &b).await,
        (bob_addr.to_string(), false),
        "PROXY v2"
    );
    alice.send("hello through the balancer\n").await;
    bob.expect(&format!("<{a}> hello through the balancer"))
        .await;

    // PROXY v2 in front of the TLS listener.
    if let Some(openssl) = tool("openssl") {
        let mut carol = s_client(&openssl, proxy.tls);
        let c = carol.welcome().await;
        let (addr, tls) = client_of(&server, &c).await;
        assert!(tls, "{c} came through TLS");
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    }

    // A ban on the real address reaches the client behind the proxy, and
    // only it.
    server
        .chatctl(&["ban", "127.0.0.2", "--reason", "spam"])
        .await
        .ok();
    alice.expect("You are banned").await;
    assert_eq!(alice.try_line().await, None);
    let (mut again, _) = connect_from("127.0.0.2", proxy.v2).await;
    let refused = again.line().await;
    assert!(refused.contains("banned"), "{refused}");
    bob.sync().await;
    bob.send("still here\n").await;
    bob.sync().await;
    let listed = clients(&server).await;
    assert!(
        listed
            .iter()
            .all(|(_, addr, _)| !addr.starts_with("127.0.0.2:")),
        "{listed:?}"
    );
}

#[tokio::test]
async fn a_trusted_proxy_must_send_a_header_and_nothing_more_is_read() {
    let server = TestServer::with_env(&[
        ("CHATD_CHAT__TRUSTED_PROXIES", "127.0.0.0/8"),
        ("CHATD_LIMITS__HANDSHAKE_TIMEOUT_SECS", "1"),
        // Counted per real address, not per proxy.
        ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "1"),
    ]);
    // No header: refused without a word, and logged.
    let mut plain = Client::connect(server.chat).await;
    plain.send("hello\r\n").await;
    assert_eq!(plain.try_line().await, None);
    let log = server
        .wait_logged("refused connection from a trusted proxy")
        .await;
    assert!(
        log["error"]
            .as_str()
            .is_some_and(|e| e.contains("PROXY protocol header")),
        "{log}"
    );
    // Silence: refused when the handshake time is up.
    let started = Instant::now();
    let mut silent = Client::connect(server.chat).await;
    assert_eq!(silent.try_line().await, None);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A v1 header split over two writes, with a command right behind it in
    // the same segment: the command is not swallowed.
    let mut viaproxy = Client::connect(server.chat).await;
    viaproxy.send("PROXY TCP4 192.0.2.1 12").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    viaproxy
        .send("7.0.0.1 5555 8080\r\n/nick viaproxy\r\n")
        .await;
    viaproxy.welcome().await;
    viaproxy.expect("You are now known as viaproxy").await;
    assert_eq!(client_of(&server, "viaproxy").await.0, "192.0.2.1:5555");
    // The per-address limit sees the real address: a second client from
    // 192.0.2.1 is refused, one from 192.0.2.2 is not.
    let mut second = Client::connect(server.chat).await;
    second
        .send("PROXY TCP4 192.0.2.1 127.0.0.1 5556 8080\r\n")
        .await;
    let refused = second.line().await;
    assert!(refused.contains("too many connections"), "{refused}");
    let mut other = Client::connect(server.chat).await;
    other
        .send("PROXY TCP4 192.0.2.2 127.0.0.1 5557 8080\r\n")
        .await;
    other.welcome().await;
    // IPv6 in v1.
    let mut six = Client::connect(server.chat).await;
    six.send("PROXY TCP6 2001:db8::5 ::1 4444 8080\r\n/nick six\r\n")
        .await;
    six.expect("You are now known as six").await;
    assert_eq!(client_of(&server, "six").await.0, "[2001:db8::5]:4444");

    // v2 LOCAL (a health check): the proxy's own address.
    let mut local = Client::connect(server.chat).await;
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    local.send_raw(&header).await;
    local.send("/nick checker\r\n").await;
    local.expect("You are now known as checker").await;
    assert!(
        client_of(&server, "checker")
            .await
            .0
            .starts_with("127.0.0.1:")
    );
}

#[tokio::test]
async fn forged_proxy_headers_from_anyone_else_are_just_text() {
    // 127.0.0.1 is not in the trusted range.
    let server = TestServer::with_env(&[("CHATD_CHAT__TRUSTED_PROXIES", "10.0.0.0/8")]);
    let (mut bob, _) = server.join().await;
    let mut forger = Client::connect(server.chat).await;
    let local = {
        forger
            .send("PROXY TCP4 203.0.113.9 127.0.0.1 4000 8080\r\n")
            .await;
        forger.welcome().await
    };
    bob.expect(&format!(
        "<{local}> PROXY TCP4 203.0.113.9 127.0.0.1 4000 8080"
    ))
    .await;
    let (addr, _) = client_of(&server, &local).await;
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    // A binary v2 header is text too: the address does not change.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[
        0x21, 0x11, 0x00, 0x0c, 203, 0, 113, 9, 127, 0, 0, 1, 0x0f, 0xa0, 0x1f, 0x90,
    ]);
    forger.send_raw(&header).await;
    forger.send("\r\n").await;
    forger.sync().await;
    let (addr, _) = client_of(&server, &local).await;
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
}

// --- TLS --------------------------------------------------------------------

#[tokio::test]
async fn tls_clients_chat_with_plain_clients() {
    tls_and_plain_clients_chat(&[]).await;
}

/// The same on the workers' layout: the TLS pump's chat end is not handed
/// to a client thread there.
#[tokio::test]
async fn tls_clients_chat_with_plain_clients_on_the_workers() {
    tls_and_plain_clients_chat(&[("CHATD_SERVER__CLIENT_THREADS", "0")]).await;
}

async fn tls_and_plain_clients_chat(extra: &[(&str, &str)]) {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let (server, _certs, tls) = tls_server(extra);
    let (mut plain, p) = server.join().await;
    let mut secure = s_client(&openssl, tls);
    let s = secure.welcome().await;
    secure.send("hello from openssl\n").await;
    plain.expect(&format!("<{s}> hello from openssl")).await;
    plain.send("hello from nc\n").await;
    secure.expect(&format!("<{p}> hello from nc")).await;

    if let Some(ncat) = tool("ncat") {
        let mut other = Tool::spawn(Command::new(ncat).args([
            "--ssl",
            &tls.ip().to_string(),
            &tls.port().to_string(),
        ]));
        let n = other.welcome().await;
        other.send("hello from ncat\n").await;
        plain.expect(&format!("<{n}> hello from ncat")).await;
        secure.expect(&format!("<{n}> hello from ncat")).await;
        assert!(client_of(&server, &n).await.1);
    }

    assert!(client_of(&server, &s).await.1, "openssl is on TLS");
    assert!(!client_of(&server, &p).await.1, "nc is not");
    let table = server.chatctl(&["list-clients"]).await;
    assert!(table.ok().lines().next().is_some_and(|h| h.contains("TLS")));

    // /quit gets its goodbye through the pump.
    secure.send("/quit\n").await;
    secure.expect("Goodbye.").await;
    assert_eq!(secure.try_line().await, None);
}

#[tokio::test]
async fn the_tls_port_closes_silent_and_plain_text_clients_in_time() {
    use tokio::io::AsyncReadExt;
    let (server, _certs, tls) = tls_server(&[("CHATD_LIMITS__HANDSHAKE_TIMEOUT_SECS", "1")]);
    for first in [&b""[..], b"hello\r\n"] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(tls).await.expect("connect");
        stream.write_all(first).await.expect("send");
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
            .await
            .expect("closed in time");
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = String::from_utf8_lossy(&got);
        assert!(!text.contains("Welcome"), "{got:?}");
        if !first.is_empty() {
            // Plain text gets one line it can read, not TLS alert bytes.
            let port = tls.port();
            assert_eq!(
                text,
                format!(
                    "*** This is chatd's TLS port: connect with TLS, e.g. `openssl s_client \
                     -quiet -connect HOST:{port}` or `ncat --ssl HOST {port}`; nc and telnet go \
                     to the plain chat port.\r\n"
                )
            );
        }
    }
    assert!(clients(&server).await.is_empty(), "never became clients");
}

/// A connection that says nothing, from `source`, to `to`; kept open by
/// the caller.
async fn silent_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind the source address");
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .expect("connect in time")
        .expect("connect")
}

#[tokio::test]
async fn silent_tls_connections_count_against_the_limits_from_accept() {
    use tokio::io::AsyncReadExt;
    let (server, _certs, tls) = tls_server(&[
        ("CHATD_LIMITS__MAX_CLIENTS", "5"),
        ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "3"),
        ("CHATD_LIMITS__HANDSHAKE_TIMEOUT_SECS", "2"),
    ]);
    // Three connections from one address that never start their handshake
    // hold that address's share: a fourth is told, on the TLS port (in
    // plain text: it is refused before any TLS) as on the plain one. (The
    // TLS port first: its loop accepts in order, so the silent ones are
    // counted by then.)
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(silent_from("127.0.0.1", tls).await);
    }
    for port in [tls, server.chat] {
        let (mut fourth, _) = connect_from("127.0.0.1", port).await;
        assert_eq!(
            fourth.line().await,
            "*** error: too many connections from your address (max 3)"
        );
        assert_eq!(fourth.try_line().await, None);
    }
    // Two more from another address fill the server: a third address is
    // told it is full, at once.
    for _ in 0..2 {
        silent.push(silent_from("127.0.0.2", tls).await);
    }
    for port in [tls, server.chat] {
        let (mut late, _) = connect_from("127.0.0.3", port).await;
        assert_eq!(
            late.line().await,
            "*** error: server is full (5 clients), try again later"
        );
        assert_eq!(late.try_line().await, None);
    }
    // The handshake deadline closes them, and their seats are free again.
    for mut stream in silent {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
            .await
            .expect("closed at the handshake deadline");
        assert!(got.is_empty(), "{got:?}");
    }
    let (mut served, _) = connect_from("127.0.0.3", server.chat).await;
    served.welcome().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_many_addresses_cannot_exhaust_descriptors() {
    // 2,150 connections from 108 addresses (within the default rate and
    // per-address limits) open a TLS connection each and never send a
    // byte, against a 2,048-descriptor limit. They take the seats the file
    // limit allows and are refused past them; the descriptors never run
    // out, a newcomer is told at once, and the admin API answers.
    const SILENT: usize = 2150;
    const ADDRESSES: usize = 108;
    let certs = tempfile::tempdir().expect("tempdir");
    certificate(certs.path(), "tls");
    let (cert, key) = (certs.path().join("tls.crt"), certs.path().join("tls.key"));
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg("--nofile=2048:2048").arg(chatd_bin());
    let dir = TestServer::prepare(
        &mut cmd,
        None,
        &[
            ("CHATD_CHAT__TLS_LISTEN", "127.0.0.1:0"),
            ("CHATD_CHAT__TLS_CERT", cert.to_str().expect("utf-8")),
            ("CHATD_CHAT__TLS_KEY", key.to_str().expect("utf-8")),
            ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "32"),
            ("CHATD_LIMITS__CONNECT_RATE_PER_IP", "10"),
        ],
    );
    let server = TestServer::launch(cmd, dir);
    let tls: SocketAddr = server.listening["tls"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("TLS address");
    let tasks: Vec<_> = (0..SILENT)
        .map(|i| {
            let source = format!("127.0.1.{}", 1 + i % ADDRESSES);
            tokio::spawn(async move {
                let mut stream = silent_from(&source, tls).await;
                // A refusal is one line at once; a seat, silence.
                let mut first = [0u8; 128];
                let got = tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::io::AsyncReadExt::read(&mut stream, &mut first),
                )
                .await;
                let refused = matches!(got, Ok(Ok(n)) if first[..n].starts_with(b"*** error: server is full"));
                (stream, refused)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let (stream, was_refused) = task.await.expect("connection task");
        refused += usize::from(was_refused);
        held.push(stream);
    }
    let fds_at_peak = fds_of(server.pid());
    let started = Instant::now();
    let (mut newcomer, _) = connect_from("127.0.0.1", server.chat).await;
    let told = newcomer.line().await;
    let told_after = started.elapsed();
    let admin_started = Instant::now();
    let stats = server.chatctl(&["stats", "-o", "json"]).await.json();
    let admin_after = admin_started.elapsed();
    let emfile = server.logged("accept failed").len();
    eprintln!(
        "{SILENT} silent TLS connections from {ADDRESSES} addresses under a 2,048-descriptor \
         limit: {refused} refused at once, fds {fds_at_peak}/2048, {emfile} accept errors; \
         a newcomer told {told:?} after {told_after:?}; admin stats after {admin_after:?}"
    );
    assert_eq!(emfile, 0, "accept failed for want of descriptors");
    assert!(fds_at_peak < 2048, "{fds_at_peak} descriptors");
    assert!(refused > 0, "nobody refused: the limit was never reached");
    assert!(told.starts_with("*** error: server is full"), "{told:?}");
    assert_eq!(stats["clients"], 0, "{stats}");
    drop(held);
}

/// Open file descriptors of a process.
fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

#[tokio::test]
async fn one_ipv6_prefix_is_one_address_for_the_per_address_limits() {
    // The real address comes from a trusted proxy's header, which is how
    // loopback can show the limits any IPv6 source.
    let server = TestServer::with_env(&[
        ("CHATD_CHAT__TRUSTED_PROXIES", "127.0.0.0/8"),
        ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "2"),
    ]);
    let from = |source: &'static str| {
        let chat = server.chat;
        async move {
            let mut c = Client::connect(chat).await;
            c.send(&format!("PROXY TCP6 {source} ::1 4444 8080\r\n"))
                .await;
            c
        }
    };
    let mut first = from("2001:db8:1:2::1").await;
    first.welcome().await;
    let mut second = from("2001:db8:1:2::2").await;
    second.welcome().await;
    // Another address of the same /64: the same host, over its share.
    let mut third = from("2001:db8:1:2:ffff:ffff:ffff:fffe").await;
    assert_eq!(
        third.line().await,
        "*** error: too many connections from your address (max 2)"
    );
    assert_eq!(third.try_line().await, None);
    // The next /64 is another host.
    let mut neighbour = from("2001:db8:1:3::1").await;
    neighbour.welcome().await;
    // One leaving frees its prefix's place.
    first.send("/quit\r\n").await;
    first.until_eof().await;
    let mut again = from("2001:db8:1:2::3").await;
    again.welcome().await;
}

#[tokio::test]
async fn certificates_are_reloaded_without_dropping_anyone() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let (server, certs, tls) = tls_server(&[]);
    let mut first = s_client(&openssl, tls);
    let f = first.welcome().await;

    // Renewed files at the same paths, then SIGHUP.
    let renewed = certificate(certs.path(), "tls");
    server.signal(rustix::process::Signal::HUP);
    let logged = server.wait_logged("TLS certificate renewed").await;
    assert!(
        logged["subject"]
            .as_str()
            .is_some_and(|s| s.starts_with("CN=")),
        "{logged}"
    );
    assert!(logged["expires"].as_str().is_some(), "{logged}");
    // A new client gets the new certificate (s_client prints it).
    let mut shown =
        Tool::spawn(Command::new(&openssl).args(["s_client", "-connect", &tls.to_string()]));
    let body = renewed.lines().nth(1).expect("PEM body");
    shown.expect(body).await;
    shown.expect("You are now in").await;
    // The first client is still connected and chatting.
    let (mut plain, _) = server.join().await;
    first.send("still here\n").await;
    plain.expect(&format!("<{f}> still here")).await;

    // `chatctl reload` says whether the certificate changed, and which one
    // is served: nothing changed now; then a renewal over the same files.
    let same = server.chatctl(&["reload"]).await;
    assert!(same.ok().contains("applied: none"), "{same:#?}");
    assert!(
        same.ok().contains("certificate: unchanged: CN="),
        "{same:#?}"
    );
    certificate(certs.path(), "tls");
    let renewal = server.chatctl(&["reload"]).await;
    assert!(
        renewal.ok().contains("applied: chat.tls_cert"),
        "{renewal:#?}"
    );
    assert!(
        renewal.ok().contains("certificate: renewed: CN="),
        "{renewal:#?}"
    );
    // RFC 3339 (rcgen's certificates run to the start of a year).
    assert!(
        renewal.ok().contains("-01-01T00:00:00Z (serial "),
        "{renewal:#?}"
    );
    let json = server.chatctl(&["-o", "json", "reload"]).await.json();
    assert_eq!(json["certificate"]["changed"], false, "{json}");

    // A bad key: the reload is refused with one line, nobody is dropped.
    std::fs::write(certs.path().join("tls.key"), "not a key").expect("write");
    let out = server.chatctl(&["reload"]).await;
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("chat.tls_key"), "{out:#?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:#?}");
    first.send("after the bad reload\n").await;
    plain.expect(&format!("<{f}> after the bad reload")).await;
    let mut later = s_client(&openssl, tls);
    later.welcome().await;
}

#[tokio::test]
async fn a_bad_certificate_stops_startup_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    certificate(dir.path(), "good");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let good_cert = dir.path().join("good.crt");
    let good_key = dir.path().join("good.key");
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    certificate(&other, "other");
    let cases = [
        (garbage.clone(), good_key.clone(), "chat.tls_cert"),
        (good_cert.clone(), garbage.clone(), "chat.tls_key"),
        (
            good_cert.clone(),
            dir.path().join("missing.key"),
            "chat.tls_key",
        ),
        // A key that is not the certificate's.
        (good_cert.clone(), other.join("other.key"), "chat.tls_key"),
    ];
    for (cert, key, named) in cases {
        let mut cmd = std::process::Command::new(chatd_bin());
        let _dir = TestServer::prepare(
            &mut cmd,
            None,
            &[
                ("CHATD_CHAT__TLS_LISTEN", "127.0.0.1:0"),
                ("CHATD_CHAT__TLS_CERT", cert.to_str().expect("utf-8")),
                ("CHATD_CHAT__TLS_KEY", key.to_str().expect("utf-8")),
            ],
        );
        let out = cmd.output().expect("run chatd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let last = stderr.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("chatd: ") && last.contains(named),
            "{cert:?} {key:?}: {stderr}"
        );
    }
}

// --- several addresses, IPv6 ---------------------------------------------------

#[tokio::test]
async fn every_listener_serves_several_addresses_and_ipv6() {
    let certs = tempfile::tempdir().expect("tempdir");
    certificate(certs.path(), "tls");
    let cert = certs.path().join("tls.crt");
    let key = certs.path().join("tls.key");
    let server = TestServer::with_env(&[
        ("CHATD_CHAT__LISTEN", "127.0.0.1:0 [::1]:0"),
        ("CHATD_CHAT__TLS_LISTEN", "[::1]:0"),
        ("CHATD_CHAT__TLS_CERT", cert.to_str().expect("utf-8")),
        ("CHATD_CHAT__TLS_KEY", key.to_str().expect("utf-8")),
        ("CHATD_UDP__LISTEN", "127.0.0.1:0 [::1]:0"),
        ("CHATD_ADMIN__LISTEN", "[::1]:0"),
    ]);
    let all = |key: &str| -> Vec<SocketAddr> {
        server.listening[key]
            .as_str()
            .expect("addresses")
            .split_whitespace()
            .map(|a| a.parse().expect("an address"))
            .collect()
    };
    let chat = all("chat");
    assert_eq!(chat.len(), 2, "{}", server.listening);
    assert!(chat[0].is_ipv4() && chat[1].is_ipv6());
    let (mut four, f) = server.join().await;
    let mut six = Client::connect(chat[1]).await;
    let s = six.welcome().await;
    six.send("over ipv6\n").await;
    four.expect(&format!("<{s}> over ipv6")).await;
    // The admin API over ::1, and the client's IPv6 address in it.
    assert!(server.admin.expect("admin").is_ipv6());
    let (addr, _) = client_of(&server, &s).await;
    assert!(addr.starts_with("[::1]:"), "{addr}");
    assert!(client_of(&server, &f).await.0.starts_with("127.0.0.1:"));
    // UDP echo on both.
    for udp in all("udp") {
        let from = if udp.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let socket = UdpSocket::bind(from).await.expect("bind");
        socket.send_to(b"ping", udp).await.expect("send");
        let mut buf = [0u8; 16];
        let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .expect("an echo in time")
            .expect("recv");
        assert_eq!(&buf[..n], b"ping");
    }
    // TLS over ::1.
    let tls = all("tls");
    assert!(tls[0].is_ipv6());
    if let Some(openssl) = tool("openssl") {
        let mut secure = s_client(&openssl, tls[0]);
        let t = secure.welcome().await;
        assert!(
            client_of(&server, &t).await.1,
            "TLS over IPv6 is listed as TLS"
        );
    }
}

// --- socket activation ----------------------------------------------------------

#[tokio::test]
async fn socket_activation_starts_chatd_on_the_first_connection() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let tcp = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
    let udp = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    };
    // systemd-socket-activate passes no environment but what -E names, and
    // passes the sockets it was given on, before its own: the outer one
    // holds chat (TCP), the inner one adds echo (UDP) and names both, and
    // chatd gets them as from chatd.socket.
    let mut probe = std::process::Command::new("true");
    let dir = TestServer::prepare(
        &mut probe,
        None,
        // Addresses nobody could bind: they must not be used.
        &[
            ("CHATD_CHAT__LISTEN", "192.0.2.1:1"),
            ("CHATD_UDP__LISTEN", "192.0.2.1:1"),
        ],
    );
    let mut cmd = std::process::Command::new(&activate);
    cmd.arg("--listen")
        .arg(tcp.to_string())
        .arg(&activate)
        .arg("--datagram")
        .arg("--listen")
        .arg(udp.to_string())
        // As chatd.socket names them: both "chat", told apart by type.
        .arg("--fdname=chat:chat");
    for (k, v) in probe.get_envs() {
        if let Some(v) = v {
            let mut pair = k.to_os_string();
            pair.push("=");
            pair.push(v);
            cmd.arg("-E").arg(pair);
        }
    }
    cmd.arg(chatd_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());

    // The first connection and the first datagram wait in the sockets
    // until chatd starts and takes them.
    let first = std::thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            match std::net::TcpStream::connect(tcp) {
                Ok(s) => return s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("the socket was never opened: {e}"),
            }
        }
    });
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let ping = std::thread::spawn({
        let echo = echo.try_clone().expect("clone");
        move || {
            // Once the inner socket is listening, this starts chatd.
            let deadline = Instant::now() + WAIT;
            let mut buf = [0u8; 16];
            echo.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            while Instant::now() < deadline {
                let _ = echo.send_to(b"ping", udp);
                if let Ok((n, _)) = echo.recv_from(&mut buf) {
                    return buf[..n].to_vec();
                }
            }
            Vec::new()
        }
    });
    let server = TestServer::launch(cmd, dir);
    assert_eq!(server.chat, tcp, "chatd serves the socket it was given");
    assert_eq!(server.udp, Some(udp));
    let stream = first.join().expect("first connection");
    stream.set_nonblocking(true).expect("nonblocking");
    let mut client = Client::from_stream(TcpStream::from_std(stream).expect("tokio"));
    client.welcome().await;
    assert_eq!(ping.join().expect("echo"), b"ping");
    assert!(!server.logged("using the sockets systemd passed").is_empty());
}

#[tokio::test]
async fn sockets_meant_for_another_process_are_left_alone() {
    // LISTEN_PID names another process: chatd binds its own addresses.
    let server = TestServer::with_env(&[
        ("LISTEN_FDS", "1"),
        ("LISTEN_PID", "1"),
        ("LISTEN_FDNAMES", "chat"),
    ]);
    let (_alice, _) = server.join().await;
    assert!(server.logged("using the sockets systemd passed").is_empty());
}

#[tokio::test]
async fn trusted_proxies_apply_on_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("chatd.toml");
    std::fs::write(&file, "[chat]\ntrusted_proxies = []\n").expect("write");
    let server = TestServer::spawn(Some(&file), &[]);
    let header = "PROXY TCP4 198.51.100.4 127.0.0.1 6000 8080\r\n/nick early\r\n";
    let mut early = Client::connect(server.chat).await;
    early.send(header).await;
    early.expect("You are now known as early").await;
    assert!(
        client_of(&server, "early")
            .await
            .0
            .starts_with("127.0.0.1:")
    );

    std::fs::write(&file, "[chat]\ntrusted_proxies = [\"127.0.0.1\"]\n").expect("write");
    let out = server.chatctl(&["reload", "-o", "json"]).await.json();
    let applied = out["applied"].as_array().expect("applied");
    assert!(applied.iter().any(|k| k == "chat.trusted_proxies"), "{out}");
    let mut late = Client::connect(server.chat).await;
    late.send(&header.replace("early", "late")).await;
    late.expect("You are now known as late").await;
    assert_eq!(client_of(&server, "late").await.0, "198.51.100.4:6000");
    // Who was connected before stays connected.
    early.sync().await;
}

/// A TLS client cannot be handed to the new process at an upgrade (its
/// session keys live in the old one): it is told to reconnect, and the
/// others in its room see it leave, as for any other leave.
#[tokio::test]
async fn tls_clients_told_to_reconnect_at_an_upgrade_are_seen_leaving() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let certs = tempfile::tempdir().expect("tempdir");
    certificate(certs.path(), "tls");
    let (cert, key) = (certs.path().join("tls.crt"), certs.path().join("tls.key"));
    let server = TestServer::spawn_binary(
        Path::new(chatd_bin()),
        None,
        &[
            ("CHATD_CHAT__TLS_LISTEN", "127.0.0.1:0"),
            ("CHATD_CHAT__TLS_CERT", cert.to_str().expect("utf-8")),
            ("CHATD_CHAT__TLS_KEY", key.to_str().expect("utf-8")),
        ],
    );
    let tls: SocketAddr = server.listening["tls"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("TLS address");
    let (mut plain, _) = server.join().await;
    let mut secure = s_client(&openssl, tls);
    let s = secure.welcome().await;
    plain.expect(&format!("{s} joined lobby")).await;

    let done = server.chatctl(&["-o", "json", "upgrade"]).await.json();
    assert_eq!(done["tls_clients_closed"], 1, "{done}");
    secure.expect("Please reconnect").await;
    assert_eq!(
        plain.line().await,
        format!("*** {s} left lobby (1 user): reconnecting after a server upgrade")
    );
    plain.send("/who\n").await;
    assert!(plain.expect("lobby (1 user)").await.contains("(1 user)"));
}
