//! Every limit, exercised over real sockets.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

use crate::support::*;

#[tokio::test]
async fn an_over_long_line_is_refused_and_repeated_abuse_disconnects() {
    let server = TestServer::with_env(&[
        ("CHATD_LIMITS__MAX_LINE_BYTES", "64"),
        ("CHATD_LIMITS__MAX_OVERLONG_LINES", "3"),
    ]);
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    alice.send(&format!("{}\n", "x".repeat(100))).await;
    let err = alice.line().await;
    assert!(
        err.starts_with("*** error: line too long (max 64 bytes)"),
        "{err}"
    );
    // The rest of the line was discarded, the next one is fine.
    alice
        .send(&format!("{}tail\nshort\n", "y".repeat(200)))
        .await;
    alice.expect("line too long").await;
    assert_eq!(bob.line().await, format!("<{a}> short"));
    alice.send(&format!("{}\n", "z".repeat(65))).await;
    assert_eq!(
        alice.line().await,
        "*** Disconnected: too many over-long lines."
    );
    assert_eq!(alice.try_line().await, None);
    bob.expect("left lobby (1 user): too many over-long lines")
        .await;
}

#[tokio::test]
async fn a_line_without_newline_cannot_grow_memory() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__MAX_LINE_BYTES", "1024")]);
    let (mut alice, _) = server.join().await;
    let before = server.rss_kib();
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..(32 * 1024 * 1024 / chunk.len()) {
        alice.send_raw(&chunk).await;
    }
    alice.send("\nafter\n").await;
    let err = alice.line().await;
    assert!(err.contains("line too long"), "{err}");
    alice.sync().await;
    let grown = server.rss_kib().saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "32 MiB without a newline grew RSS by {grown} KiB"
    );
}

#[tokio::test]
async fn the_server_refuses_clients_beyond_max_clients() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__MAX_CLIENTS", "2")]);
    let (_a, _) = server.join().await;
    let (_b, _) = server.join().await;
    let mut c = server.connect().await;
    assert_eq!(
        c.line().await,
        "*** error: server is full (2 clients), try again later"
    );
    assert_eq!(c.try_line().await, None);
    drop(_a);
    // The freed slot is usable once the daemon has seen the close.
    server.wait_logged("disconnected").await;
    let (_d, _) = server.join().await;
}

#[tokio::test]
async fn the_server_refuses_too_many_clients_from_one_address() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "2")]);
    let mut a = connect_from("127.0.0.1", &server).await;
    a.welcome().await;
    let mut b = connect_from("127.0.0.1", &server).await;
    b.welcome().await;
    let mut c = connect_from("127.0.0.1", &server).await;
    assert_eq!(
        c.line().await,
        "*** error: too many connections from your address (max 2)"
    );
    assert_eq!(c.try_line().await, None);
    // Another address is not affected.
    let mut d = connect_from("127.0.0.2", &server).await;
    d.welcome().await;
}

#[tokio::test]
async fn flood_control_drops_then_disconnects() {
    let server = TestServer::with_env(&[
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "1"),
        ("CHATD_LIMITS__FLOOD_BURST", "5"),
        ("CHATD_LIMITS__FLOOD_MAX_DROPPED", "10"),
    ]);
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    let burst: String = (1..=8).map(|i| format!("line {i}\n")).collect();
    alice.send(&burst).await;
    assert_eq!(
        alice.line().await,
        "*** error: flood control: you are sending too fast, lines are being dropped"
    );
    for i in 1..=5 {
        assert_eq!(bob.line().await, format!("<{a}> line {i}"));
    }
    let more: String = (9..=30).map(|i| format!("line {i}\n")).collect();
    alice.send(&more).await;
    let rest = alice.until_eof().await;
    assert_eq!(
        rest.last().map(String::as_str),
        Some("*** Disconnected: flooding."),
        "{rest:?}"
    );
    let seen = bob.expect("left lobby").await;
    assert!(seen.ends_with("flooding"), "{seen}");
}

#[tokio::test]
async fn idle_clients_are_disconnected() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__IDLE_TIMEOUT_SECS", "1")]);
    let (mut alice, _) = server.join().await;
    let started = std::time::Instant::now();
    assert_eq!(alice.line().await, "*** Disconnected: idle for too long.");
    assert_eq!(alice.try_line().await, None);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn keepalive_is_enabled_on_client_sockets() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__KEEPALIVE_SECS", "42")]);
    let (_alice, _) = server.join().await;
    // The daemon's side of the connection: /proc/net/tcp shows the timer.
    let port = format!("{:04X}", server.chat.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let ours: Vec<&str> = table
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|local| local.ends_with(&port))
        })
        .filter(|l| l.split_whitespace().nth(3) == Some("01"))
        .collect();
    assert!(!ours.is_empty(), "no established socket on the chat port");
    // Field 5 is "timer:when"; timer 2 is the keepalive timer.
    assert!(
        ours.iter().any(|l| l
            .split_whitespace()
            .nth(5)
            .is_some_and(|t| t.starts_with("02:"))),
        "no keepalive timer: {ours:?}"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_without_slowing_the_others() {
    let server = TestServer::with_env(&[
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
        ("CHATD_LIMITS__OUTBOUND_QUEUE_BYTES", "1048576"),
    ]);
    let (mut sender, s) = server.join().await;
    let (mut reader, _) = server.join().await;
    // The stalled client asks for a small receive buffer so the kernel
    // absorbs little on its behalf.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stalled = socket.connect(server.chat).await.expect("connect");
    sender.expect("joined").await;
    sender.expect("joined").await;
    reader.sync().await;
    let baseline = server.rss_kib();

    const LINES: usize = 100_000;
    const BLOCK: usize = 100;
    let payload = "p".repeat(400);
    let expected_line = format!("<{s}> {payload}");
    // The reader reports progress so the sender keeps at most ~85 kB in
    // flight, well under the 1 MiB queue: a reader that keeps up must never
    // be taken for a slow one.
    let (progress, mut received) = tokio::sync::watch::channel(0usize);
    let read_all = tokio::spawn(async move {
        let mut got = 0;
        while got < LINES {
            let l = reader.line().await;
            if l.starts_with('<') {
                assert_eq!(l, expected_line);
                got += 1;
                if got % BLOCK == 0 {
                    let _ = progress.send(got);
                }
            }
        }
        reader
    });
    let mut block = String::new();
    for _ in 0..BLOCK {
        block.push_str(&payload);
        block.push('\n');
    }
    for sent in (BLOCK..=LINES).step_by(BLOCK) {
        sender.send(&block).await;
        tokio::time::timeout(WAIT, received.wait_for(|&got| sent - got <= 2 * BLOCK))
            .await
            .expect("the reader keeps receiving while another client stalls")
            .expect("reader alive");
    }
    let _reader = read_all
        .await
        .expect("the reading client got every line, in order");
    let grown = server.rss_kib().saturating_sub(baseline);
    // 40 MB were owed to the stalled client; it may cost at most its queue.
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    let cut = server.wait_logged("slow consumer").await;
    assert!(cut.to_string().contains("disconnecting"), "{cut}");

    // The stalled client, reading at last, finds the stream ended.
    let mut stalled = stalled;
    let mut sink = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match tokio::time::timeout(WAIT, stalled.read(&mut sink))
            .await
            .expect("EOF in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(
        total < 40_000_000,
        "the stalled client was never cut ({total} bytes)"
    );
}
