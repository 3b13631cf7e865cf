//! The UDP echo port.

use std::time::Duration;

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::UdpSocket;

use crate::support::*;

async fn socket(server: &TestServer) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.connect(server.udp.expect("udp enabled"))
        .await
        .expect("connect");
    s
}

async fn recv(s: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    match tokio::time::timeout(within, s.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn datagrams_come_back_unchanged() {
    let server = TestServer::start();
    let s = socket(&server).await;
    s.send(b"ping\n").await.expect("send");
    assert_eq!(recv(&s, WAIT).await.as_deref(), Some(&b"ping\n"[..]));
    let binary: Vec<u8> = (0..=255).collect();
    s.send(&binary).await.expect("send");
    assert_eq!(recv(&s, WAIT).await, Some(binary));
}

#[tokio::test]
async fn oversized_datagrams_are_dropped() {
    let server = TestServer::with_env(&[("CHATD_UDP__MAX_DATAGRAM_BYTES", "100")]);
    let s = socket(&server).await;
    s.send(&[b'x'; 101]).await.expect("send");
    s.send(b"small").await.expect("send");
    assert_eq!(
        recv(&s, WAIT).await.as_deref(),
        Some(&b"small"[..]),
        "the big one came back"
    );
}

/// A socket on `ip` (all of 127.0.0.0/8 is this host), connected to the
/// echo port.
async fn socket_on(ip: &str, server: &TestServer) -> UdpSocket {
    let s = UdpSocket::bind(format!("{ip}:0")).await.expect("bind");
    s.connect(server.udp.expect("udp enabled"))
        .await
        .expect("connect");
    s
}

/// The daemon's UDP counters: (in, out, dropped).
async fn udp_counters(metrics: SocketAddr) -> (f64, f64, f64) {
    let (_, body) = scrape(metrics, "/metrics").await;
    (
        sample(&body, "chatd_udp_in_total"),
        sample(&body, "chatd_udp_out_total"),
        sample(&body, "chatd_udp_dropped_total"),
    )
}

#[tokio::test]
async fn each_source_address_is_rate_limited() {
    // A burst of 3, then one answer per second (the lowest rate there is).
    // Each round sends 3 + 1 + 17 datagrams from one address and one from
    // another, and is over before a second has passed: no refill can add an
    // answer. A machine too loaded for that gets another round, from fresh
    // addresses.
    let server = TestServer::with_env(&[
        ("CHATD_UDP__RATE_PER_SEC", "1"),
        ("CHATD_UDP__BURST", "3"),
        ("CHATD_METRICS__LISTEN", "127.0.0.1:0"),
    ]);
    let metrics = metrics_addr(&server).await;
    for round in 0..5u8 {
        let ip = format!("127.0.0.{}", 10 + 2 * round);
        let other_ip = format!("127.0.0.{}", 11 + 2 * round);
        let a = socket_on(&ip, &server).await;
        // The same address from another port: the same budget.
        let b = socket_on(&ip, &server).await;
        // Another address: a budget of its own.
        let c = socket_on(&other_ip, &server).await;
        let (in_before, out_before, dropped_before) = udp_counters(metrics).await;

        let started = Instant::now();
        for i in 0..3u8 {
            a.send(&[i]).await.expect("send");
        }
        b.send(b"b").await.expect("send");
        for i in 3..20u8 {
            a.send(&[i]).await.expect("send");
        }
        c.send(b"c").await.expect("send");
        // The port is served in arrival order: once c's answer is here,
        // every datagram above has been answered or dropped.
        assert_eq!(
            recv(&c, WAIT).await.as_deref(),
            Some(&b"c"[..]),
            "another address was not answered"
        );
        if started.elapsed() >= Duration::from_secs(1) {
            eprintln!("round {round} took {:?}; again", started.elapsed());
            continue;
        }
        let (in_after, out_after, dropped_after) = udp_counters(metrics).await;
        assert_eq!(in_after - in_before, 22.0);
        assert_eq!(
            out_after - out_before,
            4.0,
            "answered: the burst of 3 from {ip} and 1 from {other_ip}, nothing else"
        );
        assert_eq!(dropped_after - dropped_before, 18.0);
        let mut answered = Vec::new();
        for _ in 0..3 {
            let d = recv(&a, WAIT).await.expect("an answer of the burst");
            answered.push(d[0]);
        }
        assert_eq!(answered, [0, 1, 2], "the burst is the first three");
        // All 4 answers are accounted for: b, on the same address, had
        // nothing left.
        let mut buf = [0u8; 16];
        assert!(
            b.try_recv(&mut buf).is_err(),
            "the same address on another port got its own budget"
        );
        return;
    }
    panic!("no round finished within a second; the machine is too loaded");
}
