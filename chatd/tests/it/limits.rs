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

    // When a client from the address leaves, its slot is free again, and
    // only that one slot.
    drop(a);
    server.wait_logged_times("disconnected", 1).await;
    let mut e = connect_from("127.0.0.1", &server).await;
    e.welcome().await;
    let mut f = connect_from("127.0.0.1", &server).await;
    assert_eq!(
        f.line().await,
        "*** error: too many connections from your address (max 2)"
    );
    assert_eq!(f.try_line().await, None);
    drop(b);
    server.wait_logged_times("disconnected", 2).await;
    let mut g = connect_from("127.0.0.1", &server).await;
    g.welcome().await;
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

/// The kernel's view of the daemon's end of `client`'s connection, once no
/// data is in flight: the timer it has armed (`/proc/net/tcp`'s `tr` field:
/// 0 none, 2 keepalive) and the seconds until it fires.
async fn server_side_timer(server: &TestServer, client: &Client) -> (u8, f64) {
    let local = format!(":{:04X}", server.chat.port());
    let remote = format!(":{:04X}", client.local_addr().port());
    let ticks = f64::from(rustix::param::clock_ticks_per_second() as u32);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when …
        let row = table.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 5 && f[1].ends_with(&local) && f[2].ends_with(&remote) && f[3] == "01")
                .then(|| f[5].to_string())
        });
        if let Some((timer, when)) = row.as_deref().and_then(|t| t.split_once(':')) {
            let timer: u8 = timer.parse().expect("timer kind");
            let when = u64::from_str_radix(when, 16).expect("hex clock ticks") as f64 / ticks;
            // 1 is the retransmit timer: the welcome is not acknowledged yet.
            if timer != 1 {
                return (timer, when);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon's socket for {} never settled: {row:?}",
            client.local_addr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn keepalive_probes_after_the_configured_idle_time() {
    // The daemon's end of the connection is in this network namespace, so
    // the kernel's table shows its keepalive timer counting down from
    // `limits.keepalive_secs` (the kernel's own default is 7200 s).
    let server = TestServer::with_env(&[("CHATD_LIMITS__KEEPALIVE_SECS", "42")]);
    let (alice, _) = server.join().await;
    let (timer, secs) = server_side_timer(&server, &alice).await;
    assert_eq!(timer, 2, "no keepalive timer on the daemon's socket");
    assert!(
        secs > 42.0 - WAIT.as_secs_f64() && secs <= 42.0,
        "keepalive fires in {secs} s, not within the configured 42 s"
    );

    let off = TestServer::with_env(&[("CHATD_LIMITS__KEEPALIVE_SECS", "0")]);
    let (bob, _) = off.join().await;
    let (timer, _) = server_side_timer(&off, &bob).await;
    assert_eq!(timer, 0, "keepalive_secs = 0 still arms a timer");
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
    let stalled = tokio::time::timeout(WAIT, socket.connect(server.chat))
        .await
        .expect("connect in time")
        .expect("connect");
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
        let deadline = std::time::Instant::now() + WAIT;
        while got < LINES {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader got {got} of {LINES} lines within {WAIT:?}"
            );
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
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stalled.read(&mut sink))
            .await
            .unwrap_or_else(|_| panic!("no EOF within {WAIT:?}; {total} bytes read"))
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
