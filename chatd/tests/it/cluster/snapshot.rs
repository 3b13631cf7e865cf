//! Member snapshots larger than the NATS server's `max_payload` go in parts.

use std::time::{Duration, Instant};

use super::{Nats, node, who_until};
use crate::support::*;

/// Many clients in one room from one address, quickly.
const CROWD: [(&str, &str); 3] = [
    ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "10000"),
    ("CHATD_LIMITS__CONNECT_RATE_PER_IP", "0"),
    ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
];

#[tokio::test]
async fn a_member_snapshot_over_max_payload_arrives_whole_in_parts() {
    // 8 KiB messages at most: 600 members (about 20 KiB of snapshot) need
    // several parts.
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 8192\n").expect("write nats.conf");
    let Some(nats) = Nats::start_with(&["-c", conf.to_str().expect("utf-8 path")]) else {
        return;
    };
    const N: usize = 600;
    let a = node(&nats.url(), "node-a", &CROWD);
    let mut crowd = Vec::with_capacity(N);
    for _ in 0..N {
        crowd.push(a.join().await.0);
    }
    // B starts after: A's members reach it as A's snapshot only.
    let b = node(&nats.url(), "node-b", &CROWD);
    let (mut b1, _) = b.join().await;
    let total = N + 1;
    let seen = who_until(
        &mut b1,
        |l| l.starts_with(&format!("*** lobby ({total} users): ")),
        WAIT,
    )
    .await;
    assert!(seen.contains("guest-"), "{seen}");
    b1.send("/rooms\n").await;
    b1.expect(&format!("lobby ({total} users)")).await;
    // It went in parts, each within the server's limit.
    let deadline = Instant::now() + WAIT;
    let parts = loop {
        let sent = a.logged("cluster: member snapshot sent");
        if let Some(parts) = sent
            .iter()
            .filter_map(|v| v["parts"].as_u64())
            .find(|p| *p > 1)
        {
            break parts;
        }
        assert!(Instant::now() < deadline, "{sent:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(parts >= 5, "{parts} parts");
    drop(crowd);
}
