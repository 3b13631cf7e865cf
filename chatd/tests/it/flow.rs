//! Flow control as a reader meets it: a member who keeps reading at a
//! modest pace in a room that carries more than he reads is never cut, and
//! the senders wait for him; one who reads far less is cut as a slow
//! consumer. Whether a reader keeps up must not depend on how large the
//! kernel lets chatd's send buffers grow (`net.ipv4.tcp_wmem`), so the
//! same story runs with the machine's settings and, in network namespaces
//! of their own (root only), with a small and a large send buffer. And the
//! same reader under a flood of private messages, with a friend of his
//! writing to him meanwhile.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// The room's offered load: one sender at 520 KB/s.
const ROOM_RATE: f64 = 520_000.0;
/// The honest reader's pace, well above chatd's "still reading" rate.
const HONEST_RATE: f64 = 150_000.0;
/// A reader far below that rate.
const SLOW_RATE: f64 = 20_000.0;
/// The readers' receive buffers.
const READER_RCVBUF: u32 = 128 * 1024;
/// How long the honest reader reads.
const RUN: Duration = Duration::from_secs(20);
/// How long the flood of private messages lasts, and how long their target
/// reads after it.
const FLOOD: Duration = Duration::from_secs(15);
const DRAIN: Duration = Duration::from_secs(8);

/// Reads `stream` at `rate` bytes per second for `run`, in reads of at most
/// 1 KiB every 10 ms, the way `nc` piped into a slow program reads: it
/// takes only what the program has consumed. Returns what it read.
async fn paced_reader(mut stream: TcpStream, rate: f64, run: Duration) -> Vec<u8> {
    let start = Instant::now();
    let mut read = Vec::new();
    let mut buf = [0u8; 1024];
    while start.elapsed() < run {
        let allowed = (rate * start.elapsed().as_secs_f64()) as usize;
        if read.len() >= allowed {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let want = (allowed - read.len()).min(buf.len());
        let left = run.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf[..want])).await {
            Ok(Ok(n)) if n > 0 => read.extend_from_slice(&buf[..n]),
            // Cut, and everything chatd had written before read; or the
            // run is over.
            _ => break,
        }
    }
    read
}

/// Whether chatd has logged that it cut the client at `peer` (this end's
/// address) as a slow consumer. The client itself sees it later: its
/// kernel still holds the bytes written before.
fn cut(server: &TestServer, peer: std::net::SocketAddr) -> bool {
    disconnects(server, peer).iter().any(|v| {
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("slow consumer"))
    })
}

/// What chatd logged when it disconnected the client at `peer`.
fn disconnects(server: &TestServer, peer: std::net::SocketAddr) -> Vec<serde_json::Value> {
    server
        .logged("disconnected")
        .into_iter()
        .filter(|v| v["span"]["peer"].as_str() == Some(&peer.to_string()))
        .collect()
}

/// Connects, reads the welcome, and hands over the bare socket. `rcvbuf`:
/// the receive buffer this client's kernel keeps, when not the default.
async fn member(server: &TestServer, rcvbuf: Option<u32>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes).expect("rcvbuf");
    }
    let mut stream = socket.connect(server.chat).await.expect("connect");
    let mut welcome = Vec::new();
    while !welcome.ends_with(b"\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("the welcome in time")
            .expect("read");
        assert_eq!(n, 1, "EOF before the welcome");
        welcome.push(byte[0]);
    }
    stream
}

/// Sends lines of about 1 KB at [`ROOM_RATE`] until `stop`, reading (and
/// dropping) whatever it is sent. A pause by chatd shows as a write that
/// waits; the sender then catches up, as a client with a backlog would.
async fn sender(stream: TcpStream, stop: Duration) -> std::io::Result<usize> {
    stream.set_nodelay(true).expect("nodelay");
    let (mut r, mut w) = stream.into_split();
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while r.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    let filler = "s".repeat(990);
    let start = Instant::now();
    let mut sent = 0usize;
    let mut n = 0u64;
    while start.elapsed() < stop {
        let due = (ROOM_RATE * start.elapsed().as_secs_f64()) as usize;
        let mut block = String::new();
        while sent + block.len() < due {
            block.push_str(&format!("{n} {filler}\n"));
            n += 1;
        }
        if block.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        w.write_all(block.as_bytes()).await?;
        sent += block.len();
    }
    Ok(sent)
}

/// The story: one sender at 520 KB/s, a member reading 150 KB/s and one
/// reading 20 KB/s. `label` names the kernel settings in the output.
async fn a_reader_above_the_rate_is_waited_for(server: &TestServer, label: &str) {
    // The readers' kernels keep 128 KiB for them: chatd sees what they read
    // within seconds, not after tens of megabytes (a receive buffer left
    // to itself may grow to tcp_rmem's maximum, 32 MB on some machines).
    let honest = member(server, Some(READER_RCVBUF)).await;
    let slow = member(server, Some(READER_RCVBUF)).await;
    let sending = member(server, None).await;
    let (honest_at, slow_at, sender_at) = (local(&honest), local(&slow), local(&sending));
    let started = Instant::now();
    let slow = tokio::spawn(paced_reader(slow, SLOW_RATE, RUN));
    let honest = tokio::spawn(paced_reader(honest, HONEST_RATE, RUN));
    let sent = tokio::spawn(sender(sending, RUN));
    let (mut honest_cut, mut slow_cut) = (None, None);
    while started.elapsed() < RUN {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if honest_cut.is_none() && cut(server, honest_at) {
            honest_cut = Some(started.elapsed());
        }
        if slow_cut.is_none() && cut(server, slow_at) {
            slow_cut = Some(started.elapsed());
        }
    }
    let honest = honest.await.expect("honest reader").len();
    let slow = slow.await.expect("slow reader").len();
    let sent = sent.await.expect("sender").unwrap_or_else(|e| {
        panic!(
            "{label}: chatd took the sender's lines ({e}); it logged: {:?}",
            disconnects(server, sender_at)
        )
    });
    let metrics = server.scrape_metrics().await;
    let pauses = metric(&metrics, "chatd_flow_control_pauses_total").unwrap_or(0);
    println!(
        "{label}: sent {sent} B in {RUN:?}; the 150 KB/s reader read {honest} B, cut after \
         {honest_cut:?}; the 20 KB/s reader read {slow} B, cut after {slow_cut:?}; {pauses} pauses",
    );
    assert_eq!(
        honest_cut, None,
        "{label}: a reader taking 150 KB/s was cut as a slow consumer"
    );
    assert!(
        slow_cut.is_some(),
        "{label}: a reader taking 20 KB/s of a 520 KB/s room was never cut"
    );
    assert!(
        pauses > 0,
        "{label}: the senders never waited for the reader"
    );
    assert!(
        honest as f64 > 0.9 * HONEST_RATE * RUN.as_secs_f64(),
        "{label}: the 150 KB/s reader went short"
    );
}

fn local(stream: &TcpStream) -> std::net::SocketAddr {
    stream
        .local_addr()
        .expect("a connected socket has an address")
}

/// The filed attack on private messages: 32 connections from one address,
/// each under the flood limit, send `/msg` lines of 1 KB to a member who
/// reads 120 KB/s, while a friend of his sends him 56 messages. He is
/// never cut, the flooders are told he is busy, and every message his
/// friend was told went through reached him.
#[tokio::test]
async fn a_private_message_flood_does_not_cut_a_reader_above_the_rate() {
    let server = TestServer::with_env(&[("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "32")]);
    let mut victim = member(&server, Some(READER_RCVBUF)).await;
    victim.write_all(b"/nick victim\n").await.expect("send");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("You are now known as victim") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(WAIT, victim.read(&mut buf))
            .await
            .expect("the rename in time")
            .expect("read");
        assert!(n > 0, "EOF before the rename");
        seen.extend_from_slice(&buf[..n]);
    }
    let victim_at = local(&victim);
    let (friend, friend_nick) = server.join().await;
    let started = Instant::now();
    let reading = tokio::spawn(paced_reader(victim, 120_000.0, FLOOD + DRAIN));
    let mut flooders = Vec::new();
    for _ in 0..32 {
        let mut flooder = connect_from("127.0.0.2", &server).await;
        flooder.welcome().await;
        flooders.push(tokio::spawn(flood_privately(flooder, FLOOD)));
    }
    // The friend writes at his own pace, answered or not.
    let (mut answers, mut to_victim) = friend.into_parts();
    tokio::spawn(async move {
        for i in 0..56 {
            to_victim
                .write_all(format!("/msg victim hello {i}\n").as_bytes())
                .await
                .expect("send");
            tokio::time::sleep(FLOOD / 60).await;
        }
        to_victim
    });
    let (mut delivered, mut busy) = (0, 0);
    let mut line = String::new();
    while delivered + busy < 56 {
        line.clear();
        let n = tokio::time::timeout(WAIT, AsyncBufReadExt::read_line(&mut answers, &mut line))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of 56 answered after {:?}",
                    delivered + busy,
                    started.elapsed()
                )
            })
            .expect("read");
        assert!(n > 0, "the friend was cut");
        delivered += usize::from(line.starts_with("[pm -> victim]"));
        busy += usize::from(line.contains("victim is behind on reading"));
        assert!(
            !cut(&server, victim_at),
            "the 120 KB/s reader was cut after {:?}",
            started.elapsed()
        );
    }
    let answered = started.elapsed();
    let mut flood = (0, 0);
    for f in flooders {
        let (sent, refused) = f.await.expect("flooder");
        flood = (flood.0 + sent, flood.1 + refused);
    }
    let read = reading.await.expect("the victim");
    let got = String::from_utf8_lossy(&read)
        .lines()
        .filter(|l| l.starts_with(&format!("[pm] <{friend_nick}> hello")))
        .count();
    println!(
        "/msg flood: {} lines from 32 connections, {} refused as busy; the friend's 56, all \
         answered within {answered:?}: {delivered} delivered, {busy} refused as busy; the victim \
         read {} B and got {got}",
        flood.0,
        flood.1,
        read.len()
    );
    assert!(!cut(&server, victim_at), "the 120 KB/s reader was cut");
    assert_eq!(got, delivered, "every message said delivered arrived");
}

/// Sends `/msg victim` lines of 1 KB at 8 a second (under the flood
/// limit) for `run`; returns (lines sent, refused as busy).
async fn flood_privately(flooder: Client, run: Duration) -> (usize, usize) {
    let (mut r, mut w) = flooder.into_parts();
    let refused = tokio::spawn(async move {
        let mut refused = 0;
        let mut line = String::new();
        while r.read_line(&mut line).await.is_ok_and(|n| n > 0) {
            refused += usize::from(line.contains("behind on reading"));
            line.clear();
        }
        refused
    });
    let filler = "m".repeat(980);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < run {
        let line = format!("/msg victim {sent} {filler}\n");
        if w.write_all(line.as_bytes()).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    drop(w);
    let refused = tokio::time::timeout(WAIT, refused)
        .await
        .ok()
        .and_then(Result::ok);
    (sent, refused.unwrap_or(0))
}

/// Flood control off, so that one sender carries the room; metrics on, to
/// count the senders' pauses.
const ENV: &[(&str, &str)] = &[
    ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
    ("CHATD_METRICS__LISTEN", "127.0.0.1:0"),
];

#[tokio::test]
async fn a_reader_above_the_rate_is_waited_for_with_the_machines_send_buffers() {
    let server = TestServer::with_env(ENV);
    a_reader_above_the_rate_is_waited_for(&server, "this machine's tcp_wmem").await;
}

#[test]
fn a_reader_above_the_rate_is_waited_for_with_small_send_buffers() {
    in_network_namespace("4096 8192 32768", "small tcp_wmem");
}

#[test]
fn a_reader_above_the_rate_is_waited_for_with_large_send_buffers() {
    in_network_namespace("4096 4194304 4194304", "large tcp_wmem");
}

/// Runs the story against a chatd in a network namespace of its own whose
/// `net.ipv4.tcp_wmem` is `wmem`; the test's clients join that namespace.
/// Skips with one line where no network namespace can be made (not root),
/// unless `REQUIRE_TEST_TOOLS=1`.
fn in_network_namespace(wmem: &str, label: &str) {
    if !can_unshare_network() {
        skip("cannot make a network namespace here (needs root, unshare and ip)");
        return;
    }
    let script = format!(
        "set -e
         ip link set lo up
         echo '{wmem}' > /proc/sys/net/ipv4/tcp_wmem
         exec \"$0\" \"$@\""
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "sh", "-c", &script, chatd_bin()]);
    let dir = TestServer::prepare(&mut cmd, None, ENV);
    let server = TestServer::launch(cmd, dir);
    let ns = std::fs::File::open(format!("/proc/{}/ns/net", server.pid()))
        .expect("chatd's network namespace");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Only this thread moves: its sockets, and chatd, share the
                // namespace; the rest of the test process stays where it was.
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .expect("join chatd's network namespace");
                let settings =
                    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").expect("tcp_wmem");
                assert_eq!(
                    settings.split_whitespace().collect::<Vec<_>>(),
                    wmem.split_whitespace().collect::<Vec<_>>()
                );
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(a_reader_above_the_rate_is_waited_for(&server, label));
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
}

/// Whether this process may make a network namespace and bring its
/// loopback up (root in CI).
fn can_unshare_network() -> bool {
    Command::new("unshare")
        .args(["--net", "ip", "link", "set", "lo", "up"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
