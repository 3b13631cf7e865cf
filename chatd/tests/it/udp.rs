//! The UDP echo port.

use std::time::Duration;

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

#[tokio::test]
async fn each_source_is_rate_limited() {
    let server =
        TestServer::with_env(&[("CHATD_UDP__RATE_PER_SEC", "1"), ("CHATD_UDP__BURST", "3")]);
    let s = socket(&server).await;
    for i in 0..20u8 {
        s.send(&[i]).await.expect("send");
    }
    let mut answered = Vec::new();
    while let Some(d) = recv(&s, Duration::from_millis(500)).await {
        answered.push(d[0]);
    }
    assert!((3..=4).contains(&answered.len()), "answered {answered:?}");
    assert_eq!(&answered[..3], &[0, 1, 2]);
    // Another source has its own budget.
    let other = socket(&server).await;
    other.send(b"me too").await.expect("send");
    // Same IP, so the same budget: nothing comes back yet.
    assert_eq!(recv(&other, Duration::from_millis(300)).await, None);
}
