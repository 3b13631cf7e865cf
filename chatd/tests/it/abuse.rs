//! Attacks from one address against the default limits: each test asserts
//! that honest clients in the same room keep receiving everything, and that
//! the attacker gets one clear line or a cut — never the honest ones.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

use crate::support::*;

/// The default limits. (The test harness raises the per-address client
/// limit for its honest clients, which all come from 127.0.0.1; attackers
/// here come from other addresses, so the default is put back.)
fn defaults() -> TestServer {
    TestServer::with_env(&[
        ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "32"),
        ("CHATD_LIMITS__CONNECT_RATE_PER_IP", "10"),
    ])
}

/// Reads chat lines until `want` lines from `<nick>` senders arrived, checking
/// per-sender order (each line is `<nick> N filler`); panics on EOF or if the
/// stream stalls for [`WAIT`].
async fn read_chat(client: &mut Client, want: usize) -> HashMap<String, u32> {
    let mut next: HashMap<String, u32> = HashMap::new();
    let mut got = 0;
    while got < want {
        let line = tokio::time::timeout(WAIT, client.try_line())
            .await
            .unwrap_or_else(|_| panic!("no line for {WAIT:?} after {got} of {want}: {next:?}"));
        let Some(line) = line else {
            panic!("an honest reader was cut after {got} of {want} lines");
        };
        assert!(
            !line.contains("Disconnected"),
            "an honest reader was cut: {line}"
        );
        let Some(rest) = line.strip_prefix('<') else {
            continue;
        };
        let (nick, text) = rest.split_once("> ").expect("a chat line");
        let n: u32 = text
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("numbered");
        let expected = next.entry(nick.to_string()).or_insert(0);
        assert_eq!(n, *expected, "lines from {nick} lost or reordered");
        *expected += 1;
        got += 1;
    }
    next
}

/// An attacker's connection from `ip`: what it is sent is read and thrown
/// away in the background (an attacker that stops reading is cut, and its
/// unread lines with it, which is another test); the write half is returned.
async fn attacker(ip: &str, server: &TestServer) -> tokio::net::tcp::OwnedWriteHalf {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{ip}:0").parse().expect("addr"))
        .expect("bind");
    let stream = socket.connect(server.chat).await.expect("connect");
    let (mut r, w) = stream.into_split();
    let mut first = [0u8; 1];
    // The welcome has begun: the connection is registered.
    tokio::io::AsyncReadExt::read_exact(&mut r, &mut first)
        .await
        .expect("welcome");
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while tokio::io::AsyncReadExt::read(&mut r, &mut sink)
            .await
            .is_ok_and(|n| n > 0)
        {}
    });
    w
}

// Two threads: 120 attackers reading what they are sent are a real load
// for the test process too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_many_connections_cuts_no_reader() {
    let server = defaults();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (mut r, _) = server.join().await;
        r.sync().await;
        readers.push(r);
    }
    // 3 addresses × 20 connections, each sending its whole flood burst (20
    // lines of ~1000 bytes) in one write: 1.2 MB at every reader, more than
    // the whole outgoing queue.
    const PER_IP: usize = 20;
    const IPS: usize = 3;
    const LINES: u32 = 20;
    let mut attackers = Vec::new();
    for ip in 2..2 + IPS {
        for _ in 0..PER_IP {
            attackers.push(attacker(&format!("127.0.0.{ip}"), &server).await);
        }
    }
    let filler = "f".repeat(990);
    let burst: String = (0..LINES).map(|i| format!("{i} {filler}\n")).collect();
    let total = attackers.len() * LINES as usize;
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut r| tokio::spawn(async move { (read_chat(&mut r, total).await, r) }))
        .collect();
    let started = Instant::now();
    for a in &mut attackers {
        tokio::io::AsyncWriteExt::write_all(a, burst.as_bytes())
            .await
            .expect("send");
    }
    for r in reading {
        let (seen, mut r) = r.await.expect("reader");
        assert_eq!(seen.len(), attackers.len());
        assert!(seen.values().all(|&n| n == LINES));
        r.sync().await;
    }
    println!(
        "burst: {total} lines × 3 readers delivered in {:?}, no reader cut",
        started.elapsed()
    );
    assert!(server.logged("slow consumer").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_messages_from_many_connections_cut_no_reader() {
    let server = defaults();
    let (mut target, _) = server.join().await;
    target.send("/nick target\n").await;
    target.expect("You are now known as target").await;
    let (mut honest, _) = server.join().await;
    const PER_IP: usize = 20;
    const LINES: usize = 20;
    let mut attackers = Vec::new();
    for ip in 2..5 {
        for _ in 0..PER_IP {
            let mut a = connect_from(&format!("127.0.0.{ip}"), &server).await;
            a.welcome().await;
            attackers.push(a);
        }
    }
    // The target reads everything until the honest client's END.
    let reading = tokio::spawn(async move {
        let mut got = 0;
        loop {
            let Some(line) = target.try_line().await else {
                panic!("the target was cut after {got} messages");
            };
            if line.ends_with("> END") {
                return (target, got);
            }
            got += usize::from(line.starts_with("[pm] <"));
        }
    });
    // 60 connections × 20 private lines of ~1 KB at once: 1.2 MB, more
    // than the target's whole queue.
    let filler = "m".repeat(980);
    let burst: String = (0..LINES)
        .map(|i| format!("/msg target {i} {filler}\n"))
        .collect();
    for a in &mut attackers {
        a.send(&burst).await;
    }
    // Each sender hears, for each line, that it was delivered or that the
    // target is busy.
    let mut delivered = 0;
    let mut busy = 0;
    for a in &mut attackers {
        let mut answers = 0;
        while answers < LINES {
            let line = a.line().await;
            if line.starts_with("[pm -> target]") {
                delivered += 1;
            } else if line.contains("target is behind on reading") {
                busy += 1;
            } else {
                continue;
            }
            answers += 1;
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        honest.send("/msg target END\n").await;
        if honest.line().await.starts_with("[pm -> target]") {
            break;
        }
        assert!(Instant::now() < deadline, "the target never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut target, got) = reading.await.expect("the target read to the end");
    assert_eq!(got, delivered, "every message said delivered arrived");
    println!("private burst: {delivered} delivered, {busy} refused as busy, target not cut");
    target.sync().await;
    assert!(server.logged("slow consumer").is_empty());
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_cut_when_it_stalls() {
    // A queue so large that only the stall deadline can cut.
    let server = TestServer::with_env(&[
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
        ("CHATD_LIMITS__SLOW_CONSUMER_SECS", "1"),
        ("CHATD_LIMITS__OUTBOUND_QUEUE_BYTES", "268435456"),
    ]);
    let (mut sender, s) = server.join().await;
    let (mut reader, _) = server.join().await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stalled = socket.connect(server.chat).await.expect("connect");
    sender.sync().await;
    let line = "s".repeat(900);
    let block: String = (0..50).map(|_| format!("{line}\n")).collect();
    let expected = format!("<{s}> {line}");
    let started = Instant::now();
    while server.logged("read nothing for too long").is_empty() {
        assert!(started.elapsed() < WAIT, "the stalled client was never cut");
        sender.send(&block).await;
        for _ in 0..50 {
            reader.expect(&expected).await;
        }
    }
    println!("stall: cut after {:?}", started.elapsed());
    drop(stalled);
    reader.sync().await;
}

#[tokio::test]
async fn connection_churn_from_one_address_cuts_no_reader_and_is_rate_limited() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__CONNECT_RATE_PER_IP", "10")]);
    // 50 honest readers, from five addresses so that they fit the rate.
    let mut readers = Vec::new();
    for i in 0..50 {
        let mut r = connect_from(&format!("127.0.1.{}", i % 5 + 1), &server).await;
        r.welcome().await;
        readers.push(r);
    }
    let mut talker = connect_from("127.0.2.1", &server).await;
    let t = talker.welcome().await;
    for r in &mut readers {
        r.sync().await;
    }
    // Connect and reset in a loop from 127.0.0.9 for 3 seconds, from four
    // tasks at once.
    let chat = server.chat;
    const CHURN: Duration = Duration::from_secs(3);
    let churners: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let stop = Instant::now() + CHURN;
                let mut attempts = 0u64;
                while Instant::now() < stop {
                    let socket = TcpSocket::new_v4().expect("socket");
                    socket
                        .bind("127.0.0.9:0".parse().expect("addr"))
                        .expect("bind");
                    if let Ok(stream) = socket.connect(chat).await {
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                    }
                    attempts += 1;
                }
                attempts
            })
        })
        .collect();
    // While it runs, honest chat goes on, and honest newcomers get in.
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < CHURN {
        talker.send(&format!("{sent} still here\n")).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut newcomer = connect_from("127.0.2.2", &server).await;
    newcomer.welcome().await;
    newcomer.sync().await;
    let mut attempts = 0;
    for c in churners {
        attempts += c.await.expect("churn");
    }
    let mut notices = 0;
    for r in &mut readers {
        let mut got = 0;
        while got < sent {
            let line = r.try_line().await.expect("an honest reader was cut");
            if line.starts_with(&format!("<{t}> ")) {
                got += 1;
            } else if line.contains(" joined ") || line.contains(" left ") {
                notices += 1;
            }
        }
        r.sync().await;
    }
    let per_reader = notices / readers.len();
    println!(
        "churn: {attempts} connection attempts in {CHURN:?}; each reader saw {per_reader} notices and all {sent} lines"
    );
    // 10 notices a second per room at most, plus one summary a second.
    assert!(
        per_reader <= 11 * (CHURN.as_secs() as usize + 2),
        "{per_reader} notices per reader"
    );
    assert!(
        attempts > 100,
        "the churn did not run ({attempts} attempts)"
    );
}

#[tokio::test]
async fn connections_over_the_rate_get_one_line() {
    let server = TestServer::with_env(&[
        ("CHATD_LIMITS__CONNECT_RATE_PER_IP", "1"),
        ("CHATD_LIMITS__CONNECT_BURST_PER_IP", "3"),
    ]);
    let mut kept = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.5", &server).await;
        c.welcome().await;
        kept.push(c);
    }
    let mut over = connect_from("127.0.0.5", &server).await;
    assert_eq!(
        over.line().await,
        "*** error: too many new connections from your address, slow down"
    );
    assert_eq!(over.try_line().await, None);
    // Another address is not affected.
    let mut other = connect_from("127.0.0.6", &server).await;
    other.welcome().await;
}

#[tokio::test]
async fn a_long_history_never_cuts_a_newcomer() {
    let server = TestServer::with_env(&[
        ("CHATD_CHAT__HISTORY", "300"),
        ("CHATD_LIMITS__OUTBOUND_QUEUE_BYTES", "65536"),
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
    ]);
    let (mut filler, _) = server.join().await;
    let line = format!("{}\n", "h".repeat(1000));
    let (mut witness, _) = server.join().await;
    let watching = tokio::spawn(async move {
        for _ in 0..300 {
            witness.expect("hhhh").await;
        }
    });
    for _ in 0..300 {
        filler.send(&line).await;
    }
    watching.await.expect("the witness read every line");
    for _ in 0..3 {
        let mut newcomer = server.connect().await;
        newcomer.welcome().await;
        let first = newcomer.line().await;
        assert!(first.starts_with("*** Last "), "{first}");
        newcomer.expect("End of history.").await;
        newcomer.sync().await;
    }
}

#[tokio::test]
async fn a_line_dribbled_a_byte_at_a_time_meets_its_deadline() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__PARTIAL_LINE_TIMEOUT_SECS", "1")]);
    let (mut loris, _) = server.join().await;
    let (mut honest, _) = server.join().await;
    let started = Instant::now();
    let dribble = async {
        loop {
            loris.send("a").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = dribble => {}
        () = tokio::time::sleep(Duration::from_secs(3)) => {}
    }
    assert_eq!(
        loris.expect("Disconnected").await,
        "*** Disconnected: line not finished in time."
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    honest.expect("line not finished in time").await;
}

#[tokio::test]
async fn telnet_no_ops_do_not_keep_an_idle_client() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__IDLE_TIMEOUT_SECS", "1")]);
    let (mut idle, _) = server.join().await;
    let nop = async {
        loop {
            // IAC NOP
            idle.send_raw(&[255, 241]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = nop => {}
        () = tokio::time::sleep(Duration::from_secs(3)) => {}
    }
    assert_eq!(
        idle.expect("Disconnected").await,
        "*** Disconnected: idle for too long."
    );
}

#[tokio::test]
async fn the_file_limit_is_raised_and_clients_past_it_get_a_line() {
    // Soft limit 64, hard limit 100: chatd raises the soft one to 100 and,
    // keeping 16 for itself, serves 84 clients; the 85th is told the server
    // is full instead of meeting EMFILE.
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg("--nofile=64:100").arg(chatd_bin());
    let dir = TestServer::prepare(&mut cmd, None, &[]);
    let server = TestServer::launch(cmd, dir);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    assert!(
        open_files
            .split_whitespace()
            .filter(|w| *w == "100")
            .count()
            == 2,
        "{open_files}"
    );
    assert!(!server.logged("more than the file limit allows").is_empty());
    let mut clients = Vec::new();
    for _ in 0..84 {
        let mut c = server.connect().await;
        c.welcome().await;
        clients.push(c);
    }
    let mut over = server.connect().await;
    assert_eq!(
        over.line().await,
        "*** error: server is full (84 clients), try again later"
    );
    assert_eq!(over.try_line().await, None);
    assert!(server.logged("accept failed").is_empty());
}

#[tokio::test]
async fn another_protocol_on_the_chat_port_gets_one_line_and_never_reaches_the_room() {
    let server = TestServer::start();
    let (mut witness, _) = server.join().await;
    witness.sync().await;
    let cases: [&[u8]; 3] = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ];
    for bytes in cases {
        let mut c = server.connect().await;
        c.welcome().await;
        c.send_raw(bytes).await;
        let lines = c.until_eof().await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("*** This is a chatd chat port"),
            "{lines:?}"
        );
    }
    let seen = witness.sync().await;
    assert!(
        seen.iter()
            .all(|l| l.starts_with("*** ") && !l.contains("HTTP")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn joining_while_a_room_is_busy_delivers_each_line_once_in_order() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")]);
    let (mut sender, s) = server.join().await;
    sender.send("/join dev\n").await;
    sender.expect("You are now in dev").await;
    let (mut switcher, _) = server.join().await;
    let flood = tokio::spawn(async move {
        for block in 0..100 {
            let lines: String = (0..50).map(|i| format!("{}\n", block * 50 + i)).collect();
            sender.send(&lines).await;
            tokio::task::yield_now().await;
        }
        sender.send("done\n").await;
        sender
    });
    for _ in 0..20 {
        switcher.send("/join dev\n/join lobby\n").await;
    }
    switcher.send("/join dev\n").await;
    // Skip to the last "You are now in dev".
    let mut joins = 0;
    while joins < 21 {
        if switcher.line().await.starts_with("*** You are now in dev") {
            joins += 1;
        }
    }
    let mut last: Option<u32> = None;
    loop {
        let line = switcher.line().await;
        if line == format!("<{s}> done") {
            break;
        }
        let Some(n) = line.strip_prefix(&format!("<{s}> ")) else {
            assert!(line.starts_with("*** "), "{line}");
            continue;
        };
        let n: u32 = n.parse().expect("number");
        if let Some(prev) = last {
            assert_eq!(n, prev + 1, "a line lost or repeated");
        }
        last = Some(n);
    }
    let _ = flood.await.expect("flood");
}
