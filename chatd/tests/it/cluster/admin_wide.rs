//! Cluster-wide admin calls that follow one client or the whole cluster:
//! `watch` with every node's events, `client` and `bans`, through the real
//! `chatctl` against real nodes on a real `nats-server`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Nats, nick_answer, node};
use crate::support::*;

/// Reads `watch -o json` lines until one satisfies `done`; returns them all.
async fn events_until(
    events: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, events.next_line())
            .await
            .unwrap_or_else(|_| panic!("no such event within {WAIT:?}; saw {seen:#?}"))
            .expect("read")
            .expect("a line");
        let event: serde_json::Value = serde_json::from_str(&line).expect("one JSON per line");
        let last = done(&event);
        seen.push(event);
        if last {
            return seen;
        }
    }
}

fn is(event: &serde_json::Value, node: &str, kind: &str) -> bool {
    event["node"] == node && event["type"] == kind
}

#[tokio::test]
async fn watch_on_one_node_shows_every_nodes_events_with_their_node_while_watched() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let mut watch = a
        .chatctl_command(&["watch", "--messages", "-o", "json"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start chatctl watch");
    let mut events = BufReader::new(watch.stdout.take().expect("piped")).lines();
    a.wait_logged("admin: watch started").await;
    // B relays from the lease the watch asked for (or, had B not been
    // subscribed yet, from its first renewal).
    b.wait_logged("admin: relaying events to watchers on other nodes")
        .await;
    assert!(
        a.logged("admin: relaying events").is_empty(),
        "a watcher's own node relays nothing for it"
    );

    let (mut b1, b1_nick) = b.join().await;
    b1.send("/nick bob\n").await;
    nick_answer(&mut b1).await.expect("bob");
    b1.send("hello from b\n").await;
    let (_a1, a1_nick) = a.join().await;
    let kicked = a.chatctl(&["kick", "bob", "--reason", "bye"]).await;
    assert!(kicked.ok().contains("on node node-b"), "{kicked:#?}");

    // Until B's kick and this node's own connect (both happened by now;
    // each node's events come in order, the two nodes' interleaved).
    let mut seen = Vec::new();
    let got =
        |seen: &[serde_json::Value], node: &str, kind: &str| seen.iter().any(|e| is(e, node, kind));
    while !(got(&seen, "node-b", "kick") && got(&seen, "node-a", "connect")) {
        seen.extend(
            events_until(&mut events, |e| {
                is(e, "node-b", "kick") || is(e, "node-a", "connect")
            })
            .await,
        );
    }
    let find = |node: &str, kind: &str| {
        seen.iter()
            .find(|e| is(e, node, kind))
            .unwrap_or_else(|| panic!("no {kind} from {node} in {seen:#?}"))
    };
    assert_eq!(find("node-b", "connect")["nick"], b1_nick.as_str());
    assert_eq!(find("node-b", "join")["room"], "lobby");
    let nick = find("node-b", "nick");
    assert_eq!(
        (&nick["old_nick"], &nick["new_nick"]),
        (&b1_nick.as_str().into(), &"bob".into())
    );
    assert_eq!(find("node-b", "message")["text"], "hello from b");
    assert_eq!(find("node-b", "kick")["reason"], "bye");
    // This node's own events are there too, with its node.
    assert_eq!(find("node-a", "connect")["nick"], a1_nick.as_str());
    // Every node's events in its own order: B's connect before its kick.
    let position = |kind: &str| seen.iter().position(|e| is(e, "node-b", kind));
    assert!(position("connect") < position("nick") && position("nick") < position("kick"));

    // Once nobody watches, B stops relaying at once (the watch withdraws
    // its lease), not only when the lease runs out.
    drop(events);
    watch.kill().await.expect("stop chatctl watch");
    let stopped = Instant::now();
    b.wait_logged("admin: no watcher on another node; events stay on this node")
        .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(9),
        "withdrawn, not expired"
    );
}

#[tokio::test]
async fn client_and_bans_through_one_node_cover_every_node_and_name_who_answered() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let mut b = node(&nats.url(), "node-b", &[]);
    let (mut b1, _) = b.join().await;
    b1.send("/nick bob\n").await;
    nick_answer(&mut b1).await.expect("bob");

    // A client on another node is found by nick, and by NODE:ID.
    let found = a.chatctl(&["client", "BOB", "-o", "json"]).await.json();
    assert_eq!(
        (&found["node"], &found["nick"], &found["id"]),
        (&"node-b".into(), &"bob".into(), &1.into()),
        "{found}"
    );
    let by_id = a
        .chatctl(&["client", "node-b:1", "-o", "json"])
        .await
        .json();
    assert_eq!(by_id["nick"], "bob", "{by_id}");
    let table = a.chatctl(&["client", "bob"]).await;
    assert!(table.ok().contains("node-b"), "{table:#?}");
    let nobody = a.chatctl(&["client", "nobody"]).await;
    assert_eq!(nobody.code, 3, "{nobody:#?}");
    assert!(
        nobody
            .stderr
            .contains("on the nodes that answered (node-a, node-b)"),
        "{nobody:#?}"
    );

    // The bans list is every node's, and says whose.
    a.chatctl(&["ban", "192.0.2.0/24", "--reason", "spam"])
        .await
        .ok();
    let bans = a.chatctl(&["bans", "-o", "json"]).await;
    let json = bans.json();
    assert_eq!(json["bans"][0]["target"], "192.0.2.0/24", "{json}");
    assert_eq!(json["bans"].as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(
        json["answered_nodes"],
        serde_json::json!(["node-a", "node-b"])
    );
    assert!(
        bans.stderr.contains("answered by 2 nodes: node-a, node-b"),
        "{bans:#?}"
    );

    // A node that does not answer is named, not waited for.
    b.signal(rustix::process::Signal::KILL);
    b.wait_exit().await;
    let started = Instant::now();
    let bans = a.chatctl(&["bans", "-o", "json"]).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(bans.json()["missing_nodes"], serde_json::json!(["node-b"]));
    assert!(
        bans.stderr
            .contains("PARTIAL: no answer in time from node-b"),
        "{bans:#?}"
    );
    let lost = a.chatctl(&["client", "bob"]).await;
    assert_eq!(lost.code, 3, "{lost:#?}");
    assert!(
        lost.stderr.contains("on the nodes that answered (node-a)")
            && lost.stderr.contains("no answer within 1000 ms from node-b"),
        "{lost:#?}"
    );
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_told_what_it_missed_of_another_node_and_goes_on() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let b = node(&nats.url(), "node-b", &quiet);
    let mut watch = a
        .chatctl_command(&["watch", "--messages", "-o", "json"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start chatctl watch");
    a.wait_logged("admin: watch started").await;
    b.wait_logged("admin: relaying events to watchers on other nodes")
        .await;
    let (mut talker, nick) = b.join().await;
    let (mut listener, _) = b.join().await;
    // Far more than the watch's pipe, HTTP/2 window and NATS subscription
    // hold, while nobody reads the watch.
    const N: usize = 20_000;
    let script: String = (0..N).map(|i| format!("line {i}\n")).collect();
    talker.send(&script).await;
    talker.send("end\n").await;
    listener.expect(&format!("<{nick}> end")).await;

    // Reading again: what was dropped is counted, then the stream goes on.
    let mut events = BufReader::new(watch.stdout.take().expect("piped")).lines();
    let seen = events_until(&mut events, |e| {
        is(e, "node-b", "message") && e["text"] == "end"
    })
    .await;
    let missed: u64 = seen
        .iter()
        .filter(|e| is(e, "node-b", "lagged"))
        .map(|e| e["missed"].as_u64().expect("missed"))
        .sum();
    let messages = seen.iter().filter(|e| is(e, "node-b", "message")).count() as u64;
    assert!(missed > 0, "no lagged event from node-b");
    assert!(
        messages < N as u64,
        "{messages} messages: nothing was dropped"
    );
    assert!(
        messages + missed >= N as u64,
        "{messages} seen + {missed} missed < {N}"
    );
    drop(events);
    watch.kill().await.expect("stop chatctl watch");
}

/// Many watch streams on one node that never read, while another node's
/// room is busy: the watched node's memory stays bounded and its own
/// members still get the busy room's lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_unread_watchers_on_one_node_hold_no_memory_and_slow_no_chat() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let b = node(&nats.url(), "node-b", &quiet);
    const WATCHERS: usize = 40;
    let watchers = crate::abuse_admin::unread_watchers(&a, WATCHERS).await;
    b.wait_logged("admin: relaying events to watchers on other nodes")
        .await;
    let (mut listener, _) = a.join().await;
    let (mut talker, nick) = b.join().await;
    listener.expect(&format!("{nick} joined")).await;
    let rss_before = a.rss_kib();
    let filler = "w".repeat(500);
    let started = Instant::now();
    for round in 0..50 {
        let burst: String = (0..100)
            .map(|i| format!("{round}-{i} {filler}\n"))
            .collect();
        talker.send(&burst).await;
        // node-a's member reads each burst as it comes.
        listener.expect(&format!("<{nick}> {round}-99 ")).await;
    }
    let elapsed = started.elapsed();
    let rss_after = a.rss_kib();
    println!(
        "{WATCHERS} unread watchers on node-a, 5000 lines × 500 B from node-b in {elapsed:?}; node-a RSS {rss_before} → {rss_after} KiB"
    );
    // One watcher's own subscription could hold 4,096 messages (2 MB of
    // these); the node's shared ring holds 1,024 events for all of them.
    assert!(
        rss_after < rss_before + 16 * 1024,
        "unread watch streams held the traffic: {rss_before} → {rss_after} KiB"
    );
    drop(watchers);
}
