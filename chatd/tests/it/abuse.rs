//! Attacks from one address against the default limits: each test asserts
//! that honest clients in the same room keep receiving everything, and that
//! the attacker gets one clear line or a cut — never the honest ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

use crate::support::*;

/// The default limits. (The test harness raises the per-address client
/// limit for its honest clients, which all come from 127.0.0.1; attackers
/// here come from other addresses, so the default is put back.)
fn defaults() -> TestServer {
    defaults_and(&[])
}

/// [`defaults`], with `more` set as well.
fn defaults_and(more: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "32"),
        ("CHATD_LIMITS__CONNECT_RATE_PER_IP", "10"),
    ];
    env.extend_from_slice(more);
    TestServer::with_env(&env)
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
    burst_from_many_connections(defaults()).await;
}

/// The same burst on a chatd with one worker thread: a reader's connection
/// waits behind the senders' for its turn to write, its lines piling up
/// meanwhile. That wait is chatd's, not the reader's: it must not count as
/// the reader having stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_busy_chatd_cuts_no_reader() {
    burst_from_many_connections(defaults_and(&[("CHATD_SERVER__WORKER_THREADS", "1")])).await;
}

async fn burst_from_many_connections(server: TestServer) {
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

/// The other side of the partial-line deadline: a client whose every
/// write finishes a line and starts the next (as a busy sender is read
/// after a pause, in chunks that end anywhere) is never mid-line for long,
/// and is not cut.
#[tokio::test]
async fn a_sender_whose_reads_all_end_mid_line_is_not_taken_for_a_dribbler() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__PARTIAL_LINE_TIMEOUT_SECS", "1")]);
    let (mut sender, _) = server.join().await;
    let (mut reader, _) = server.join().await;
    sender.send("line 0 begins").await;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(3) {
        sender
            .send(&format!(" and ends\nline {} begins", n + 1))
            .await;
        reader.expect(&format!("line {n} begins and ends")).await;
        n += 1;
        // Within the flood limit (10 lines a second).
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    assert!(server.logged("line not finished in time").is_empty());
    println!(
        "mid-line writes: {n} lines in {:?}, not cut",
        started.elapsed()
    );
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
    // keeping 16 for itself, 8 for busy rooms' write clocks, 3 for the
    // copies of its listeners (chat, UDP, admin) that an upgrade hands over
    // and 64 for the admin API's connections, serves 9 clients; the 10th is
    // told the server is full instead of meeting EMFILE.
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
    for _ in 0..9 {
        let mut c = server.connect().await;
        c.welcome().await;
        clients.push(c);
    }
    let mut over = server.connect().await;
    assert_eq!(
        over.line().await,
        "*** error: server is full (9 clients), try again later"
    );
    assert_eq!(over.try_line().await, None);
    assert!(server.logged("accept failed").is_empty());
}

/// What a crowd of connections got: their first line (or `None`: EOF or
/// nothing within the deadline), and how long after connecting.
struct Crowd {
    firsts: Vec<(Option<String>, Duration)>,
    /// The connections, still open.
    held: Vec<tokio::io::BufReader<tokio::net::TcpStream>>,
}

impl Crowd {
    /// Opens `n` connections to `to` at once and reads the first line of
    /// each, waiting up to `deadline` for it.
    async fn gather(to: std::net::SocketAddr, n: usize, deadline: Duration) -> Crowd {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    let started = Instant::now();
                    let stream = tokio::net::TcpStream::connect(to).await.expect("connect");
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    let read = tokio::time::timeout(
                        deadline,
                        tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut line),
                    )
                    .await;
                    let first =
                        matches!(read, Ok(Ok(n)) if n > 0).then(|| line.trim_end().to_string());
                    (first, started.elapsed(), stream)
                })
            })
            .collect();
        let mut crowd = Crowd {
            firsts: Vec::new(),
            held: Vec::new(),
        };
        for task in tasks {
            let (first, took, client) = task.await.expect("connection task");
            crowd.firsts.push((first, took));
            crowd.held.push(client);
        }
        crowd
    }

    fn count(&self, prefix: &str) -> usize {
        self.firsts
            .iter()
            .filter(|(l, _)| l.as_deref().is_some_and(|l| l.starts_with(prefix)))
            .count()
    }

    /// Median and largest delay of the first lines starting with `prefix`.
    fn delays(&self, prefix: &str) -> (Duration, Duration) {
        let mut took: Vec<Duration> = self
            .firsts
            .iter()
            .filter(|(l, _)| l.as_deref().is_some_and(|l| l.starts_with(prefix)))
            .map(|(_, t)| *t)
            .collect();
        took.sort();
        let median = took.get(took.len() / 2).copied().unwrap_or_default();
        (median, took.last().copied().unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_past_the_file_limit_is_refused_at_once_without_an_accept_error() {
    // 1,500 connect at once to a chatd under a 1,024-descriptor limit,
    // which serves 821 clients (1,024 less 128 for refusals and its files,
    // 8 write clocks, 3 listener copies and 64 admin connections). Every other
    // connection is told at once that the server is full; not one accept
    // meets EMFILE, since refusals hold no descriptor.
    const CROWD: usize = 1500;
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg("--nofile=1024:1024").arg(chatd_bin());
    let dir = TestServer::prepare(&mut cmd, None, &[]);
    let server = TestServer::launch(cmd, dir);
    let crowd = Crowd::gather(server.chat, CROWD, Duration::from_secs(30)).await;
    let fds_held = fds(server.pid());
    let served = crowd.count("*** Welcome");
    let full = crowd.count("*** error: server is full (821 clients)");
    let (median, max) = crowd.delays("*** error:");
    let emfile = server.logged("accept failed").len();
    let out_of_files = server.logged("out of file descriptors").len();
    eprintln!(
        "{CROWD} connecting under a 1,024-descriptor limit: {served} served, {full} refused \
         (first line after {median:?} median, {max:?} max), {} without a line; \
         {emfile} accept errors, {out_of_files} refusals with the spare; fds {fds_held}",
        CROWD - served - full,
    );
    assert_eq!((served, full), (821, CROWD - 821));
    assert_eq!((emfile, out_of_files), (0, 0));
    assert!(max < WAIT, "a refusal took {max:?}");
    // The admin API is served at the limit.
    let stats = server.chatctl(&["stats", "-o", "json"]).await.json();
    assert_eq!(stats["clients"], 821, "{stats}");
    drop(crowd);
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

// ---------------------------------------------------------------------------
// Attacks measured while an honest pair talks: each test below prints its
// figures (docs/RELIABILITY.md collects them) and asserts that the honest
// listener got every probe line, in order, with a bounded delay.

/// Nick of the probe's speaker.
const SPEAKER: &str = "probespk";

/// The longest a probe line may take to reach the listener during an
/// attack, on a shared two-core machine.
const PROBE_BOUND: Duration = Duration::from_secs(2);

/// The fewest probe lines a measurement takes.
const MIN_PROBES: usize = 10;

/// An honest pair in the lobby: a speaker sending a numbered line every
/// 150 ms (under the flood limit) and a listener timing each one's arrival.
/// The listener reads everything sent to the room, so it also checks that
/// every line it gets is UTF-8 ending in CRLF (`Client::try_line`).
pub struct Probe {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::Mutex<Vec<Instant>>>,
    sender: tokio::task::JoinHandle<u32>,
    reader: tokio::task::JoinHandle<(Vec<Duration>, Vec<String>, Client)>,
}

/// What the probe measured.
pub struct Figures {
    pub lines: usize,
    pub p99: Duration,
    pub max: Duration,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "honest p99 {:?}, max {:?} over {} lines",
            self.p99, self.max, self.lines
        )
    }
}

impl Probe {
    pub async fn start(server: &TestServer) -> Probe {
        let (mut listener, _) = server.join().await;
        listener.sync().await;
        let stream = tokio::net::TcpStream::connect(server.chat)
            .await
            .expect("connect");
        let (mut r, mut w) = stream.into_split();
        tokio::spawn(async move {
            let mut sink = vec![0u8; 16 * 1024];
            while tokio::io::AsyncReadExt::read(&mut r, &mut sink)
                .await
                .is_ok_and(|n| n > 0)
            {}
        });
        use tokio::io::AsyncWriteExt;
        w.write_all(format!("/nick {SPEAKER}\n").as_bytes())
            .await
            .expect("nick");
        // The listener sees the rename: the speaker is in the room under its
        // name before the first probe line.
        listener.expect(SPEAKER).await;
        let sent: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (sent, stop) = (sent.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seq = 0u32;
                let mut tick = tokio::time::interval(Duration::from_millis(150));
                while !stop.load(Relaxed) {
                    tick.tick().await;
                    sent.lock().expect("lock").push(Instant::now());
                    w.write_all(format!("{seq} probe\n").as_bytes())
                        .await
                        .expect("the speaker can always send");
                    seq += 1;
                }
                w.write_all(format!("{seq} end\n").as_bytes())
                    .await
                    .expect("send");
                // Keep the connection open until the listener has it all.
                tokio::time::sleep(WAIT).await;
                drop(w);
                seq
            })
        };
        let reader = tokio::spawn({
            let sent = sent.clone();
            async move {
                let prefix = format!("<{SPEAKER}> ");
                let mut latencies = Vec::new();
                let mut others = Vec::new();
                loop {
                    let line = listener
                        .try_line()
                        .await
                        .expect("the honest listener is never cut");
                    let Some(text) = line.strip_prefix(&prefix) else {
                        others.push(line);
                        continue;
                    };
                    let (n, what) = text.split_once(' ').expect("numbered");
                    let n: usize = n.parse().expect("numbered");
                    assert_eq!(n, latencies.len(), "probe lines lost or reordered");
                    if what == "end" {
                        return (latencies, others, listener);
                    }
                    let at = sent.lock().expect("lock")[n];
                    latencies.push(at.elapsed());
                }
            }
        });
        Probe {
            stop,
            sent,
            sender,
            reader,
        }
    }

    /// Stops the speaker, waits for the listener to get every line, and
    /// asserts the delay bound. Returns the figures, the other lines the
    /// listener saw, and the listener.
    pub async fn finish(self) -> (Figures, Vec<String>, Client) {
        // At least ten lines (1.5 s), so that a short attack and the
        // recovery after it are both measured.
        let deadline = Instant::now() + WAIT;
        while self.sent.lock().expect("lock").len() < MIN_PROBES && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.store(true, Relaxed);
        let (mut latencies, others, listener) = tokio::time::timeout(WAIT * 2, self.reader)
            .await
            .expect("the listener got the last probe line in time")
            .expect("listener");
        self.sender.abort();
        latencies.sort();
        assert!(!latencies.is_empty(), "no probe line went through");
        let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
        let figures = Figures {
            lines: latencies.len(),
            p99,
            max: *latencies.last().expect("not empty"),
        };
        assert!(
            figures.p99 <= PROBE_BOUND,
            "honest delay over {PROBE_BOUND:?}: {figures}"
        );
        (figures, others, listener)
    }
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// Waits until the daemon's descriptors are back to at most `baseline`.
pub async fn fds_return_to(server: &TestServer, baseline: usize) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = fds(server.pid());
        if now <= baseline || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a refused connection to its end: the bytes sent before the close.
async fn read_to_end(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(stream, &mut got))
        .await
        .expect("the refusal ends in time");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_storm_past_the_global_and_per_address_limits_leaks_no_fd() {
    let server = TestServer::with_env(&[
        ("CHATD_LIMITS__MAX_CLIENTS", "100"),
        ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "32"),
    ]);
    let probe = Probe::start(&server).await;
    let fds_before = fds(server.pid());
    let rss_before = server.rss_kib();
    // Five addresses × 40 connections: 200 against 32 per address and 100
    // in all (2 taken by the probe).
    let started = Instant::now();
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for ip in 2..7 {
        for _ in 0..40 {
            let socket = TcpSocket::new_v4().expect("socket");
            socket
                .bind(format!("127.0.0.{ip}:0").parse().expect("addr"))
                .expect("bind");
            let t = Instant::now();
            let mut stream = socket.connect(server.chat).await.expect("connect");
            let mut first = [0u8; 64];
            let n =
                tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut stream, &mut first))
                    .await
                    .expect("a first line in time")
                    .unwrap_or(0);
            let text = String::from_utf8_lossy(&first[..n]).to_string();
            if text.starts_with("*** Welcome") {
                held.push(stream);
            } else {
                let rest = read_to_end(&mut stream).await;
                refused.push((
                    t.elapsed(),
                    format!("{text}{}", String::from_utf8_lossy(&rest)),
                ));
            }
        }
    }
    let storm = started.elapsed();
    let fds_peak = fds(server.pid());
    assert_eq!(
        held.len(),
        98,
        "the global limit holds, with 2 probe clients"
    );
    assert_eq!(refused.len(), 102);
    assert!(
        refused.iter().all(|(_, t)| t.starts_with("*** ")),
        "every refused connection gets one server line: {:?}",
        refused.iter().find(|(_, t)| !t.starts_with("*** "))
    );
    let mut times: Vec<Duration> = refused.iter().map(|(t, _)| *t).collect();
    times.sort();
    let refuse_p99 = times[times.len() * 99 / 100 - 1];
    drop(held);
    let fds_after = fds_return_to(&server, fds_before).await;
    let (figures, _, _listener) = probe.finish().await;
    println!(
        "storm: 200 connections in {storm:?}, 98 held, 102 refused (p99 time to refuse {refuse_p99:?}); \
         fds {fds_before} → {fds_peak} → {fds_after}; RSS {rss_before} → {} KiB; {figures}",
        server.rss_kib()
    );
    assert!(
        fds_after <= fds_before,
        "descriptors leaked: {fds_before} → {fds_after}"
    );
    // Recovered: a new client from a storming address is served.
    let mut again = connect_from("127.0.0.2", &server).await;
    again.welcome().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_flood_is_dropped_then_cut_and_the_room_never_sees_it() {
    let server = defaults();
    let probe = Probe::start(&server).await;
    let rss_before = server.rss_kib();
    // Ten flooders from ten addresses, one after another, each sending
    // 10,000 lines in one write: far past the burst and the dropped-line
    // allowance.
    let flood: String = (0..10_000).map(|i| format!("{i} flood\n")).collect();
    let mut nicks = Vec::new();
    let mut cut_after = Vec::new();
    for ip in 2..12 {
        let mut flooder = connect_from(&format!("127.0.0.{ip}"), &server).await;
        nicks.push(flooder.welcome().await);
        let started = Instant::now();
        flooder.send(&flood).await;
        let seen = flooder.until_eof().await;
        cut_after.push(started.elapsed());
        assert!(
            seen.iter().any(|l| l.contains("flood")),
            "the flooder is told why: {seen:?}"
        );
    }
    cut_after.sort();
    let (figures, others, _listener) = probe.finish().await;
    let relayed = others
        .iter()
        .filter(|l| nicks.iter().any(|n| l.starts_with(&format!("<{n}> "))))
        .count();
    println!(
        "line flood: 10 × 10000 lines, {relayed} relayed, each flooder cut within {:?}; \
         RSS {rss_before} → {} KiB; {figures}",
        cut_after.last().expect("ten"),
        server.rss_kib()
    );
    assert!(relayed <= 10 * 40, "{relayed} flood lines reached the room");
}

/// A speaker at 6.7 lines/s, under the 10/s limit, while chatd is stopped
/// for a few seconds (SIGSTOP, as a paused machine or a debugger would stop
/// it): the lines waiting in its socket when chatd resumes arrived at an
/// honest pace, and all reach the room; the speaker is neither warned nor
/// cut. (With `flood_max_dropped` at 10, counting them as read cut the
/// speaker.) A paste right after is still a flood.
#[tokio::test]
async fn an_honest_speaker_is_no_flooder_after_chatd_stalls() {
    let server = defaults_and(&[("CHATD_LIMITS__FLOOD_MAX_DROPPED", "10")]);
    let (mut speaker, nick) = server.join().await;
    let (mut listener, _) = server.join().await;
    speaker.sync().await;
    const LINES: usize = 60;
    let pid = server.pid();
    let stop = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
        tokio::time::sleep(Duration::from_secs(6)).await;
        rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    };
    let speak = async {
        let mut tick = tokio::time::interval(Duration::from_millis(150));
        for i in 0..LINES {
            tick.tick().await;
            speaker.send(&format!("steady {i}\n")).await;
        }
        speaker
    };
    let (_, mut speaker) = tokio::join!(stop, speak);
    for i in 0..LINES {
        assert_eq!(listener.line().await, format!("<{nick}> steady {i}"));
    }
    let told = speaker.sync().await;
    assert!(told.is_empty(), "the speaker was told: {told:?}");

    // Live again: a paste of 100 lines meets the plain bucket.
    let paste: String = (0..100).map(|i| format!("paste {i}\n")).collect();
    speaker.send(&paste).await;
    assert!(
        speaker.expect("flood control").await.contains("too fast"),
        "a paste after the stall is still a flood"
    );
}

/// Every line a listener got from `nick` is that nick's prefix and clean
/// text: no control character, no escape, no invisible mark, no second
/// line; and no server line was forged.
pub(crate) fn assert_clean(lines: &[String], nick: &str) {
    for line in lines {
        assert!(
            !line.chars().any(|c| c.is_control()
                || ('\u{200b}'..='\u{200f}').contains(&c)
                || ('\u{202a}'..='\u{202e}').contains(&c)),
            "unclean line relayed: {line:?}"
        );
        assert!(
            !(line.starts_with("*** ") && line.contains("FORGED")),
            "a forged server line got through: {line:?}"
        );
        if !line.starts_with("*** ") {
            assert!(
                line.starts_with(&format!("<{nick}> ")) || line.starts_with(&format!("* {nick} ")),
                "a line that is neither the attacker's nor the server's: {line:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_escapes_and_forged_lines_reach_the_room_clean() {
    let server = defaults();
    let probe = Probe::start(&server).await;
    let rss_before = server.rss_kib();
    let mut attacker = connect_from("127.0.0.2", &server).await;
    let nick = attacker.welcome().await;
    let started = Instant::now();
    // Binary garbage (a fixed pseudo-random stream, newlines included),
    // NULs, invalid UTF-8, escapes, forged prefixes, direction marks.
    let mut garbage = Vec::new();
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..4000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        garbage.push(x as u8);
    }
    garbage.push(b'\n');
    // In 20-line bursts a second apart: within the flood limit.
    let lines: Vec<Vec<u8>> = garbage
        .split(|&b| b == b'\n')
        .map(|l| l.to_vec())
        .chain([
            b"nul\0in\0the\0middle".to_vec(),
            b"\xff\xfe\xc3\x28 invalid \xe2\x82".to_vec(),
            b"\x1b[2J\x1b[H\x1b]0;FORGED title\x07clear screen".to_vec(),
            b"\r*** FORGED alice has left".to_vec(),
            b"ok\r\n*** FORGED server line".to_vec(),
            "text \u{202e}desrever\u{202c} \u{200b}hidden"
                .as_bytes()
                .to_vec(),
            format!("padding{}*** FORGED wrapped", " ".repeat(200)).into_bytes(),
        ])
        .collect();
    for chunk in lines.chunks(15) {
        let mut burst = Vec::new();
        for l in chunk {
            burst.extend_from_slice(l);
            burst.push(b'\n');
        }
        attacker.send_raw(&burst).await;
        attacker.sync().await;
        tokio::time::sleep(Duration::from_millis(1600)).await;
    }
    // One megabyte without a newline: one over-long line, nothing buffered.
    let rss_mid = server.rss_kib();
    attacker.send_raw(&vec![b'A'; 1 << 20]).await;
    attacker.send("\nafter the megabyte\n").await;
    attacker.expect("too long").await;
    // Telnet: Ctrl-C (interrupt + timing mark) drops the typed line.
    attacker
        .send_raw(b"typed but interrupted\xff\xf4\xff\xfd\x06\nafter ctrl-c\n")
        .await;
    let elapsed = started.elapsed();
    let (figures, others, mut listener) = probe.finish().await;
    let from_attacker: Vec<String> = others
        .iter()
        .filter(|l| l.contains(&nick) || l.contains("FORGED"))
        .cloned()
        .collect();
    assert_clean(&from_attacker, &nick);
    assert!(others.iter().any(|l| l.ends_with("after the megabyte")));
    assert!(!others.iter().any(|l| l.contains("interrupted")));
    // The listener's stream stayed in step: it still answers.
    let tail = listener.sync().await;
    assert_clean(
        &tail
            .iter()
            .filter(|l| l.contains(&nick))
            .cloned()
            .collect::<Vec<_>>(),
        &nick,
    );
    let rss_after = server.rss_kib();
    println!(
        "garbage: {} lines of garbage, escapes and forgeries + 1 MiB without newline + Ctrl-C in {elapsed:?}, \
         {} relayed clean; RSS {rss_before} → {rss_mid} → {rss_after} KiB; {figures}",
        lines.len(),
        from_attacker.len()
    );
    assert!(
        rss_after < rss_mid + 4096,
        "a megabyte without newline was buffered: {rss_mid} → {rss_after} KiB"
    );
}

#[tokio::test]
async fn look_alike_nicks_are_refused() {
    let server = TestServer::start();
    let mut honest = server.connect().await;
    honest.welcome().await;
    honest.send("/nick alice\n").await;
    honest.expect("alice").await;
    let mut attacker = connect_from("127.0.0.2", &server).await;
    attacker.welcome().await;
    for fake in [
        "Alice",
        "ALICE",
        "a1ice",
        "aIice",
        "alicе",
        "alice\u{200b}",
        "al\u{200d}ice",
        "*alice",
        "alice ",
        "ａlice",
    ] {
        attacker.send(&format!("/nick {fake}\n")).await;
        let answer = attacker.line().await;
        assert!(
            answer.starts_with("*** error:"),
            "{fake:?} was accepted: {answer}"
        );
    }
    let who = attacker.sync().await;
    assert!(who.is_empty(), "{who:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_is_rate_limited_and_replies_are_never_larger_than_requests() {
    let server = TestServer::start();
    let probe = Probe::start(&server).await;
    let udp = server.udp.expect("udp enabled");
    let flooder = tokio::net::UdpSocket::bind("127.0.0.2:0")
        .await
        .expect("bind");
    flooder.connect(udp).await.expect("connect");
    let rss_before = server.rss_kib();
    // Sizes: empty, small, at the limit, just over it, and huge.
    let sizes = [0usize, 1, 100, 1024, 1025, 8192, 65_000];
    let mut sent = 0usize;
    let mut sent_bytes = 0usize;
    let started = Instant::now();
    for i in 0..5000 {
        let size = sizes[i % sizes.len()];
        let mut d = vec![b'u'; size];
        if size >= 4 {
            d[..4].copy_from_slice(&(i as u32).to_be_bytes());
        }
        if flooder.send(&d).await.is_ok() {
            sent += 1;
            sent_bytes += size;
        }
    }
    let mut replies = Vec::new();
    let mut buf = vec![0u8; 70_000];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), flooder.recv(&mut buf)).await
    {
        replies.push(buf[..n].to_vec());
    }
    let flood_time = started.elapsed();
    let reply_bytes: usize = replies.iter().map(Vec::len).sum();
    // Every reply is a request sent back unchanged; oversized ones get none.
    assert!(
        replies.iter().all(|r| r.len() <= 1024
            && sizes.contains(&r.len())
            && r.iter().skip(4).all(|&b| b == b'u')),
        "a reply that is no request, or larger than the datagram limit"
    );
    assert!(reply_bytes <= sent_bytes, "more bytes out than in");
    // Rate limited: the burst (20) plus the rate for the time it took.
    let allowed = 20 + 10 * (flood_time.as_secs() as usize + 1);
    assert!(
        replies.len() <= allowed,
        "{} replies, at most {allowed} allowed",
        replies.len()
    );
    // Another address is still served during and after the flood.
    let other = tokio::net::UdpSocket::bind("127.0.0.3:0")
        .await
        .expect("bind");
    other.connect(udp).await.expect("connect");
    other.send(b"still here").await.expect("send");
    let n = tokio::time::timeout(WAIT, other.recv(&mut buf))
        .await
        .expect("an echo for another address")
        .expect("recv");
    assert_eq!(&buf[..n], b"still here");
    let (figures, _, _listener) = probe.finish().await;
    println!(
        "udp flood: {sent} datagrams ({sent_bytes} bytes) in {flood_time:?}, {} replies ({reply_bytes} bytes); \
         RSS {rss_before} → {} KiB; {figures}",
        replies.len(),
        server.rss_kib()
    );
}
