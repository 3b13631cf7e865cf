//! Cluster mode against real `nats-server` processes: each test starts its
//! own on a free loopback port with its own JetStream store, and real chatd
//! nodes on it.
//!
//! Where `nats-server` is missing these tests skip with one line; with
//! `REQUIRE_TEST_TOOLS=1` (as `.ci/run` sets) they fail instead.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

mod admin_wide;
mod snapshot;

/// `nats-server`, or `None` after one line saying it is missing.
fn nats_server_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    if found.is_none() {
        let required = std::env::var("REQUIRE_TEST_TOOLS").is_ok_and(|v| v == "1");
        assert!(!required, "nats-server is missing and REQUIRE_TEST_TOOLS=1");
        eprintln!("skipped: nats-server is not installed (apt-get install nats-server)");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A real `nats-server` on loopback, killed on drop. It can be killed and
/// started again on the same port and store.
struct Nats {
    bin: PathBuf,
    port: u16,
    /// nats-server's monitoring endpoint (`/varz`).
    monitor: u16,
    store: tempfile::TempDir,
    /// More arguments: credentials, TLS, routes.
    extra: Vec<String>,
    child: Option<Child>,
}

impl Nats {
    fn start() -> Option<Nats> {
        Some(Nats::on_port(nats_server_bin()?, free_port()))
    }

    /// A server started with `extra` arguments as well.
    fn start_with(extra: &[&str]) -> Option<Nats> {
        let mut nats = Nats::new(nats_server_bin()?, free_port());
        nats.extra = extra.iter().map(|a| a.to_string()).collect();
        nats.restart();
        Some(nats)
    }

    fn on_port(bin: PathBuf, port: u16) -> Nats {
        let mut nats = Nats::new(bin, port);
        nats.restart();
        nats
    }

    fn new(bin: PathBuf, port: u16) -> Nats {
        Nats {
            bin,
            port,
            monitor: free_port(),
            store: tempfile::tempdir().expect("tempdir"),
            extra: Vec::new(),
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Messages NATS has received from publishers so far (`/varz` in_msgs).
    async fn in_msgs(&self) -> u64 {
        let varz = self.monitoring("/varz").await;
        varz["in_msgs"].as_u64().expect("in_msgs")
    }

    /// A page of nats-server's monitoring endpoint, as JSON.
    async fn monitoring(&self, path: &str) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.monitor))
            .await
            .expect("connect to the monitoring port");
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut answer = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
            .await
            .expect("monitoring answer in time")
            .expect("read the monitoring answer");
        let body = answer.split_once("\r\n\r\n").expect("an HTTP answer").1;
        serde_json::from_str(body).expect("monitoring pages are JSON")
    }

    /// Whether the chatd node `node_id` is connected to this server.
    async fn serves(&self, node_id: &str) -> bool {
        let connz = self.monitoring("/connz").await;
        let name = format!("chatd {node_id}");
        connz["connections"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == name.as_str()))
    }

    /// SIGKILL: NATS vanishes without a goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A chatd node in cluster mode on `url`.
fn node(url: &str, id: &str, env: &[(&str, &str)]) -> TestServer {
    let mut all = vec![
        ("CHATD_CLUSTER__NATS_URLS", url),
        ("CHATD_CLUSTER__NODE_ID", id),
        // Subscriptions are logged at debug: tests wait for them.
        ("CHATD_LOG__LEVEL", "info,chatd_cluster=debug"),
    ];
    all.extend_from_slice(env);
    TestServer::with_env(&all)
}

/// [`node`], started so that a seamless upgrade can replace it (SIGUSR2):
/// from the built binary by path, with the test's own process tracking.
fn upgradable_node(url: &str, id: &str) -> TestServer {
    TestServer::spawn_binary(
        std::path::Path::new(chatd_bin()),
        None,
        &[
            ("CHATD_CLUSTER__NATS_URLS", url),
            ("CHATD_CLUSTER__NODE_ID", id),
            ("CHATD_LOG__LEVEL", "info,chatd_cluster=debug"),
        ],
    )
}

/// Waits until `server` holds its NATS subscription to `room`: from then on
/// every line published in `room` on another node reaches it.
async fn wait_subscribed(server: &TestServer, room: &str) {
    let deadline = Instant::now() + WAIT;
    while !server
        .logged("cluster: subscribed")
        .iter()
        .any(|v| v["room"] == room)
    {
        assert!(Instant::now() < deadline, "no subscription to {room}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads lines up to and including one containing `needle`.
async fn read_through(client: &mut Client, needle: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = client.line().await;
        let done = l.contains(needle);
        lines.push(l);
        if done {
            return lines;
        }
    }
}

/// Reads until `want` chat lines from each sender in `senders` have come
/// (and the sender's `end` marker); checks that each sender's lines arrive
/// in order and once.
async fn receive_all(client: &mut Client, senders: &[&str], want: usize) {
    let mut got: HashMap<String, Vec<usize>> = HashMap::new();
    let mut ended = 0;
    while ended < senders.len() {
        let l = client.line().await;
        let Some((nick, text)) = l
            .strip_prefix('<')
            .and_then(|r| r.split_once("> "))
            .filter(|(nick, _)| senders.contains(nick))
        else {
            continue;
        };
        if text == "end" {
            ended += 1;
            continue;
        }
        let n: usize = text
            .strip_prefix("line ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {l:?}"));
        got.entry(nick.to_string()).or_default().push(n);
    }
    for sender in senders {
        let seen = got.remove(*sender).unwrap_or_default();
        assert_eq!(
            seen,
            (0..want).collect::<Vec<_>>(),
            "lines from {sender}: every one, once, in order"
        );
    }
}

#[tokio::test]
async fn clients_on_two_nodes_share_a_room_in_order_and_once() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let b = node(&nats.url(), "node-b", &quiet);
    let (mut a1, a1_nick) = a.join().await;
    let (mut a2, _) = a.join().await;
    let (mut b1, b1_nick) = b.join().await;
    let (mut b2, _) = b.join().await;
    // Guest nicks carry the node's tag, so they cannot collide.
    assert_eq!(a1_nick, "guest-1-node-a");
    assert_eq!(b1_nick, "guest-1-node-b");
    wait_subscribed(&a, "lobby").await;
    wait_subscribed(&b, "lobby").await;

    const N: usize = 200;
    let mut from_a = String::new();
    let mut from_b = String::new();
    for i in 0..N {
        from_a.push_str(&format!("line {i}\n"));
        from_b.push_str(&format!("line {i}\n"));
    }
    from_a.push_str("end\n");
    from_b.push_str("end\n");
    // Both senders at once, in several writes each.
    let (wa, wb) = (from_a.as_bytes(), from_b.as_bytes());
    for (ca, cb) in wa.chunks(700).zip(wb.chunks(700)) {
        a1.send_raw(ca).await;
        b1.send_raw(cb).await;
    }

    let senders = [a1_nick.as_str(), b1_nick.as_str()];
    // a2 and b2 hear both (one local, one remote sender); a1 and b1 each
    // hear the other, across nodes.
    receive_all(&mut a2, &senders, N).await;
    receive_all(&mut b2, &senders, N).await;
    receive_all(&mut a1, &[b1_nick.as_str()], N).await;
    receive_all(&mut b1, &[a1_nick.as_str()], N).await;

    // Join notices travel too: a newcomer on A is announced on B.
    let (_a3, a3_nick) = a.join().await;
    b2.expect(&format!("{a3_nick} joined lobby")).await;
}

#[tokio::test]
async fn a_room_on_one_node_does_not_leak_to_the_others() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let (mut a1, _) = a.join().await;
    let (mut a2, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    wait_subscribed(&b, "lobby").await;
    a1.send("/join secret\n").await;
    a1.expect("You are now in secret").await;
    a2.send("/join secret\n").await;
    a2.expect("You are now in secret").await;
    wait_subscribed(&a, "secret").await;
    a1.send("hush\n").await;
    a2.expect("> hush").await;
    // Nothing of "secret" reaches B, which has no member there.
    let seen = b1.sync().await;
    assert!(
        seen.iter().all(|l| !l.contains("hush")),
        "a room with no member on B leaked to B: {seen:?}"
    );
    assert!(
        b.logged("cluster: subscribed")
            .iter()
            .all(|v| v["room"] != "secret"),
        "B subscribes only to rooms with members on B"
    );
}

#[tokio::test]
async fn nats_unreachable_at_start_refuses_or_serves_locally_by_config() {
    let Some(bin) = nats_server_bin() else { return };
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");

    // "refuse": the node exits with one line saying why and what to do.
    let mut cmd = Command::new(chatd_bin());
    let _dir = TestServer::prepare(
        &mut cmd,
        None,
        &[
            ("CHATD_CLUSTER__NATS_URLS", &url),
            ("CHATD_CLUSTER__NODE_ID", "node-r"),
            ("CHATD_CLUSTER__ON_UNREACHABLE", "refuse"),
        ],
    );
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run chatd"))
        .await
        .expect("join");
    assert!(!out.status.success(), "a refusing node must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("cannot reach NATS") && last.contains("on_unreachable = \"refuse\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains("\"listening\""),
        "it never served: {stderr}"
    );

    // "local" (the default): the node says so in one line and serves.
    let server = node(&url, "node-l", &[]);
    let said = server.logged("NATS unreachable at start");
    assert_eq!(said.len(), 1, "one line says which mode");
    let (mut c1, n1) = server.join().await;
    let (mut c2, _) = server.join().await;
    c1.send("still here\n").await;
    c2.expect(&format!("<{n1}> still here")).await;

    // Once NATS answers, the node joins the cluster by itself.
    let _nats = Nats::on_port(bin, port);
    server.wait_logged("cluster: connected to NATS").await;
    wait_subscribed(&server, "lobby").await;
}

#[tokio::test]
async fn lines_from_another_node_during_an_upgrade_all_arrive_in_order() {
    let Some(nats) = Nats::start() else { return };
    let url = nats.url();
    let a = upgradable_node(&url, "node-a");
    // B's user talks faster than flood control allows by default.
    let b = node(
        &url,
        "node-b",
        &[("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")],
    );
    let (mut reader, _) = a.join().await;
    let (mut talker, _) = b.join().await;
    wait_subscribed(&a, "lobby").await;
    wait_subscribed(&b, "lobby").await;

    // B's user talks steadily, a line every few milliseconds, while A is
    // replaced by a new process.
    const LINES: usize = 400;
    let talking = tokio::spawn(async move {
        for i in 1..=LINES {
            talker.send(&format!("n{i}\n")).await;
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        talker.send("done\n").await;
        talker
    });
    let mut lines = read_through(&mut reader, "> n40").await;
    a.signal(rustix::process::Signal::USR2);
    a.wait_logged("upgrade: took over").await;
    lines.extend(read_through(&mut reader, "> done").await);
    let _talker = talking.await.expect("talker");

    let got: Vec<usize> = lines
        .iter()
        .filter_map(|l| l.split_once("> n").and_then(|(_, n)| n.trim().parse().ok()))
        .collect();
    let want: Vec<usize> = (1..=LINES).collect();
    assert_eq!(
        got, want,
        "A's user must get every line of B's, once, in order"
    );
}

#[tokio::test]
async fn an_upgrade_while_nats_does_not_answer_freezes_nobody_while_it_waits() {
    // No nats-server needed: nothing listens on this port.
    let url = format!("nats://127.0.0.1:{}", free_port());
    let server = upgradable_node(&url, "node-u");
    server.wait_logged("NATS unreachable at start").await;
    let (mut c1, n1) = server.join().await;
    let (mut c2, _) = server.join().await;

    server.signal(rustix::process::Signal::USR2);
    let handed = server.wait_logged("upgrade: handed over").await;
    // The new process waits for NATS as long as the first start did (a few
    // seconds), but before the freeze: the users were stopped only while
    // they were moved.
    let frozen = handed["frozen_ms"].as_u64().expect("frozen_ms");
    assert!(frozen < 2000, "users were frozen {frozen} ms: {handed}");
    c1.send("after the upgrade\n").await;
    c2.expect(&format!("<{n1}> after the upgrade")).await;
}

/// `chatctl upgrade` gives up while the new process waits for NATS (before
/// the freeze): the upgrade goes on without its caller, which is told it is
/// still running, and hands everyone over; nobody is left frozen.
#[tokio::test]
async fn an_upgrade_whose_caller_gives_up_while_nats_does_not_answer_completes() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let server = upgradable_node(&url, "node-u");
    server.wait_logged("NATS unreachable at start").await;
    let (mut c1, n1) = server.join().await;
    let (mut c2, _) = server.join().await;

    let gave_up = server.chatctl(&["--timeout", "2s", "upgrade"]).await;
    assert_eq!(gave_up.code, 1, "{gave_up:#?}");
    assert!(gave_up.stderr.contains("still running"), "{gave_up:#?}");
    server.wait_logged("upgrade: handed over").await;
    c1.send("after the upgrade\n").await;
    c2.expect(&format!("<{n1}> after the upgrade")).await;
    let (mut c3, n3) = server.join().await;
    c3.send("newcomer\n").await;
    c1.expect(&format!("<{n3}> newcomer")).await;
}

#[tokio::test]
async fn losing_nats_keeps_local_chat_and_tells_users_once_each_way() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let (mut a1, a1_nick) = a.join().await;
    let (mut a2, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    wait_subscribed(&a, "lobby").await;
    wait_subscribed(&b, "lobby").await;
    a1.send("before\n").await;
    b1.expect("> before").await;

    nats.kill();
    for c in [&mut a1, &mut a2, &mut b1] {
        c.expect("*** Other chat nodes are unreachable").await;
    }
    // Local chat goes on; the line for other nodes is dropped, not queued.
    a1.send("during\n").await;
    a2.expect(&format!("<{a1_nick}> during")).await;

    nats.restart();
    let mut seen = Vec::new();
    for c in [&mut a1, &mut a2, &mut b1] {
        seen.push(read_through(c, "*** Other chat nodes are reachable again").await);
    }
    for lines in &seen {
        assert!(
            lines.iter().all(|l| !l.contains("unreachable")),
            "told once, not on every reconnect attempt: {lines:?}"
        );
    }
    assert!(
        seen[2].iter().all(|l| !l.contains("during")),
        "a line from while NATS was away came late: {:?}",
        seen[2]
    );
    let back = a.wait_logged("NATS is back").await;
    assert!(back["dropped_while_away"].as_u64() >= Some(1), "{back}");

    // Cross-node chat resumes once both nodes have re-subscribed; lines
    // sent before that may be lost (NATS core delivers at most once).
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    'resumed: loop {
        assert!(Instant::now() < deadline, "cross-node chat did not resume");
        a1.send(&format!("after {i}\n")).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        for l in b1.sync().await {
            if l.contains("> after ") {
                break 'resumed;
            }
        }
    }
}

#[tokio::test]
async fn one_nats_message_per_line_whatever_the_number_of_recipients() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let (mut a1, a1_nick) = a.join().await;
    let mut readers = Vec::new();
    let mut nicks = Vec::new();
    for _ in 0..5 {
        let (c, nick) = b.join().await;
        readers.push(c);
        nicks.push(nick);
    }
    wait_subscribed(&a, "lobby").await;
    wait_subscribed(&b, "lobby").await;
    // Each node's earlier messages (join notices) are through NATS before
    // the count starts: a node publishes in order, so a line from each
    // that arrives on the other proves it.
    let b_nick = &nicks[1];
    a1.send("settle a\n").await;
    readers[0].expect("> settle a").await;
    readers[1].send("settle b\n").await;
    a1.expect(&format!("<{b_nick}> settle b")).await;
    // Presence heartbeats (one per node every 2 s) may fall into a window:
    // the fewest messages over a few windows is what one line costs.
    let mut fewest = u64::MAX;
    for i in 0..4 {
        let before = nats.in_msgs().await;
        a1.send(&format!("to everyone {i}\n")).await;
        for r in &mut readers {
            r.expect(&format!("<{a1_nick}> to everyone {i}")).await;
        }
        let after = nats.in_msgs().await;
        fewest = fewest.min(after - before);
        if fewest == 1 {
            break;
        }
    }
    assert_eq!(fewest, 1, "one NATS message for five recipients");
}

#[tokio::test]
async fn admin_through_one_node_lists_kicks_and_broadcasts_on_every_node() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let (_a1, a1_nick) = a.join().await;
    let (mut b1, b1_nick) = b.join().await;
    let (mut b2, _) = b.join().await;

    // Every client of both nodes, each with its node; the note names them.
    let listed = a.chatctl(&["list-clients", "-o", "json"]).await;
    let json = listed.json();
    let mut seen: Vec<(String, String)> = json["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| {
            (
                c["node"].as_str().expect("node").to_string(),
                c["nick"].as_str().expect("nick").to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 3, "{json}");
    assert!(seen.contains(&("node-a".into(), a1_nick.clone())), "{json}");
    assert!(seen.contains(&("node-b".into(), b1_nick.clone())), "{json}");
    assert_eq!(
        json["answered_nodes"],
        serde_json::json!(["node-a", "node-b"])
    );
    assert!(
        listed
            .stderr
            .contains("answered by 2 nodes: node-a, node-b"),
        "{listed:#?}"
    );
    let table = a.chatctl(&["list-clients"]).await;
    assert!(table.ok().starts_with("NODE"), "{table:#?}");
    assert!(table.ok().contains("node-b"), "{table:#?}");

    // A broadcast through A reaches B's clients.
    let sent = a.chatctl(&["broadcast", "maintenance at noon"]).await;
    assert!(sent.ok().contains("3 clients"), "{sent:#?}");
    b1.expect("maintenance at noon").await;

    // A kick by nick through A disconnects B's client.
    let kicked = a.chatctl(&["kick", &b1_nick, "--reason", "bye"]).await;
    assert!(kicked.ok().contains("on node node-b"), "{kicked:#?}");
    let last = b1.until_eof().await;
    assert!(last.iter().any(|l| l.contains("kicked")), "{last:?}");

    // And by NODE:ID (ids are per node).
    let kicked = a.chatctl(&["kick", "node-b:2"]).await;
    assert!(kicked.ok().contains("on node node-b"), "{kicked:#?}");
    b2.until_eof().await;
    let missing = a.chatctl(&["kick", "node-a:2"]).await;
    assert_eq!(missing.code, 3, "{missing:#?}");

    // `nodes` lists both, with their clients.
    let nodes = a.chatctl(&["nodes", "-o", "json"]).await.json();
    let ids: Vec<(&str, u64)> = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["id"].as_str().expect("id"),
                n["clients"].as_u64().expect("clients"),
            )
        })
        .collect();
    assert_eq!(ids, [("node-a", 1), ("node-b", 0)], "{nodes}");

    // Rooms and stats count both nodes.
    let (_b3, _) = b.join().await;
    let rooms = a.chatctl(&["rooms", "-o", "json"]).await.json();
    assert_eq!(rooms["rooms"][0]["members"], 2, "{rooms}");
    let stats = a.chatctl(&["stats", "-o", "json"]).await.json();
    assert_eq!(stats["clients"], 2, "{stats}");
}

#[tokio::test]
async fn a_ban_through_one_node_applies_on_every_node() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let mut far = connect_from("127.0.0.9", &b).await;
    far.welcome().await;
    let banned = a.chatctl(&["ban", "127.0.0.9", "--reason", "spam"]).await;
    assert!(
        banned.ok().contains("kicked 1 connected client"),
        "{banned:#?}"
    );
    assert_eq!(far.until_eof().await, ["*** You are banned: spam"]);
    let mut again = connect_from("127.0.0.9", &b).await;
    assert_eq!(again.until_eof().await, ["*** error: you are banned: spam"]);
    // Each node keeps it in its own list.
    for n in [&a, &b] {
        let bans = n.chatctl(&["bans", "-o", "json"]).await.json();
        assert_eq!(bans["bans"][0]["target"], "127.0.0.9", "{bans}");
    }
    let lifted = a.chatctl(&["unban", "127.0.0.9"]).await;
    lifted.ok();
    let mut back = connect_from("127.0.0.9", &b).await;
    back.welcome().await;
}

#[tokio::test]
async fn a_killed_node_is_named_missing_not_waited_for() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let mut b = node(&nats.url(), "node-b", &[]);
    let (_a1, _) = a.join().await;
    let (_b1, _) = b.join().await;
    let both = a.chatctl(&["list-clients", "-o", "json"]).await.json();
    assert_eq!(
        both["answered_nodes"],
        serde_json::json!(["node-a", "node-b"])
    );

    b.signal(rustix::process::Signal::KILL);
    b.wait_exit().await;
    let started = Instant::now();
    let listed = a.chatctl(&["list-clients", "-o", "json"]).await;
    let took = started.elapsed();
    let json = listed.json();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        json["answered_nodes"],
        serde_json::json!(["node-a"]),
        "{json}"
    );
    assert_eq!(json["clients"].as_array().map(Vec::len), Some(1), "{json}");
    assert!(
        listed
            .stderr
            .contains("answered by 1 node: node-a (PARTIAL: no answer in time from node-b)"),
        "{listed:#?}"
    );
    let nodes = a.chatctl(&["nodes", "-o", "json"]).await.json();
    assert_eq!(nodes["nodes"].as_array().map(Vec::len), Some(1), "{nodes}");
}

/// Runs a node that must not start, and returns its last log line.
async fn refused_start(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(chatd_bin());
    let _dir = TestServer::prepare(&mut cmd, None, env);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run chatd"))
        .await
        .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the node must not start: {stderr}");
    assert!(
        !stderr.contains("\"listening\""),
        "it never served: {stderr}"
    );
    stderr.lines().last().unwrap_or_default().to_string()
}

/// Two nodes with `env` chat across NATS: a line from one reaches the
/// other.
async fn two_nodes_chat(url: &str, env: &[(&str, &str)]) {
    let a = node(url, "node-a", env);
    let b = node(url, "node-b", env);
    a.wait_logged("cluster mode: connected to NATS").await;
    let (mut a1, a1_nick) = a.join().await;
    let (mut b1, _) = b.join().await;
    wait_subscribed(&a, "lobby").await;
    wait_subscribed(&b, "lobby").await;
    a1.send("across\n").await;
    b1.expect(&format!("<{a1_nick}> across")).await;
}

#[tokio::test]
async fn nats_credentials_are_sent_and_a_refusal_stops_the_start() {
    let Some(nats) = Nats::start_with(&["--user", "chatd", "--pass", "s3cret"]) else {
        return;
    };
    let url = nats.url();
    two_nodes_chat(
        &url,
        &[
            ("CHATD_CLUSTER__USER", "chatd"),
            ("CHATD_CLUSTER__PASSWORD", "s3cret"),
        ],
    )
    .await;
    // A wrong password is not "unreachable": even with the default
    // on_unreachable = "local" the node stops, naming the keys to fix.
    let last = refused_start(&[
        ("CHATD_CLUSTER__NATS_URLS", &url),
        ("CHATD_CLUSTER__NODE_ID", "node-x"),
        ("CHATD_CLUSTER__USER", "chatd"),
        ("CHATD_CLUSTER__PASSWORD", "wrong"),
    ])
    .await;
    assert!(
        last.contains("refused this node") && last.contains("cluster.user and cluster.password"),
        "{last}"
    );
    assert!(
        !last.contains("wrong"),
        "the password is not logged: {last}"
    );
    let last = refused_start(&[
        ("CHATD_CLUSTER__NATS_URLS", &url),
        ("CHATD_CLUSTER__NODE_ID", "node-y"),
    ])
    .await;
    assert!(last.contains("the server wants credentials"), "{last}");

    // A token, NATS's other simple way.
    let Some(nats) = Nats::start_with(&["--auth", "t0ken"]) else {
        return;
    };
    let server = node(&nats.url(), "node-t", &[("CHATD_CLUSTER__TOKEN", "t0ken")]);
    server.wait_logged("cluster mode: connected to NATS").await;
    let last = refused_start(&[
        ("CHATD_CLUSTER__NATS_URLS", &nats.url()),
        ("CHATD_CLUSTER__NODE_ID", "node-u"),
        ("CHATD_CLUSTER__TOKEN", "other"),
    ])
    .await;
    assert!(last.contains("check cluster.token"), "{last}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`: `ca.pem`, `server.pem`/`server.key`,
/// `client.pem`/`client.key`.
fn certificates(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
    let issuer = Issuer::new(ca, ca_key);
    for (name, usage) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
    }
}

#[tokio::test]
async fn nats_over_tls_verifies_both_ends_and_a_failure_stops_the_start() {
    let certs = tempfile::tempdir().expect("tempdir");
    certificates(certs.path());
    let file = |name: &str| certs.path().join(name).display().to_string();
    let (ca, server_cert, server_key) = (file("ca.pem"), file("server.pem"), file("server.key"));
    let (client_cert, client_key) = (file("client.pem"), file("client.key"));
    let Some(nats) = Nats::start_with(&[
        "--tls",
        "--tlscert",
        &server_cert,
        "--tlskey",
        &server_key,
        "--tlsverify",
        "--tlscacert",
        &ca,
    ]) else {
        return;
    };
    let url = nats.url();
    let tls = [
        ("CHATD_CLUSTER__TLS_CA_FILE", ca.as_str()),
        ("CHATD_CLUSTER__TLS_CERT_FILE", client_cert.as_str()),
        ("CHATD_CLUSTER__TLS_KEY_FILE", client_key.as_str()),
        ("CHATD_CLUSTER__TLS_REQUIRED", "true"),
    ];
    two_nodes_chat(&url, &tls).await;
    // A node that does not trust the server's CA stops, whatever
    // on_unreachable says, and names the TLS keys.
    let last = refused_start(&[
        ("CHATD_CLUSTER__NATS_URLS", &url),
        ("CHATD_CLUSTER__NODE_ID", "node-x"),
    ])
    .await;
    assert!(
        last.contains("refused this node") && last.contains("cluster.tls_ca_file"),
        "{last}"
    );
    // TLS required, and a server without it: refused too.
    let Some(plain) = Nats::start() else { return };
    let last = refused_start(&[
        ("CHATD_CLUSTER__NATS_URLS", &plain.url()),
        ("CHATD_CLUSTER__NODE_ID", "node-y"),
        ("CHATD_CLUSTER__TLS_REQUIRED", "true"),
    ])
    .await;
    assert!(last.contains("cluster.tls_required"), "{last}");
}

/// Three `nats-server` processes routed into one NATS cluster, each with its
/// own ports and JetStream store, formed before any node connects: every
/// server sees the other two and JetStream has elected its leader, as in a
/// NATS cluster that has been running.
async fn nats_cluster() -> Option<Vec<Nats>> {
    let bin = nats_server_bin()?;
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let all = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let servers: Vec<Nats> = routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let mut nats = Nats::new(bin.clone(), free_port());
            nats.extra = [
                "--name".to_string(),
                format!("nats-{i}"),
                "--cluster_name".into(),
                "chatd-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".into(),
                all.clone(),
            ]
            .into();
            nats.restart();
            nats
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    for s in &servers {
        while s.monitoring("/routez").await["num_routes"].as_u64() < Some(2) {
            assert!(Instant::now() < deadline, "the NATS cluster did not form");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for s in &servers {
        while s.monitoring("/jsz").await["meta_cluster"]["leader"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            assert!(Instant::now() < deadline, "JetStream elected no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Some(servers)
}

#[tokio::test]
async fn killing_one_nats_server_of_three_loses_no_line() {
    let Some(mut servers) = nats_cluster().await else {
        return;
    };
    let urls = servers.iter().map(Nats::url).collect::<Vec<_>>().join(" ");
    let quiet = [
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
        // Every line of the test is kept (batches of several lines each).
        ("CHATD_CHAT__HISTORY", "1000"),
    ];
    let nodes = [
        node(&urls, "node-a", &quiet),
        node(&urls, "node-b", &quiet),
        node(&urls, "node-c", &quiet),
    ];
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    let mut probes = Vec::new();
    for n in &nodes {
        senders.push(n.join().await);
        readers.push(n.join().await.0);
        probes.push(n.join().await);
    }
    for n in &nodes {
        wait_subscribed(n, "lobby").await;
    }
    // Interest crosses NATS routes on its own time: each node's probe is
    // heard on both others before the stream starts.
    for (i, (probe, nick)) in probes.iter_mut().enumerate() {
        let deadline = Instant::now() + WAIT;
        let mut heard = [false; 3];
        heard[i] = true;
        while !heard.iter().all(|h| *h) {
            assert!(Instant::now() < deadline, "{nick} is not heard everywhere");
            probe.send("probe\n").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            for (j, reader) in readers.iter_mut().enumerate() {
                if !heard[j] {
                    heard[j] = reader
                        .sync()
                        .await
                        .iter()
                        .any(|l| l == &format!("<{nick}> probe"));
                }
            }
        }
    }
    // The nick bucket is there before the loss (the first claim makes it).
    let (mut claimer, _) = nodes[1].join().await;
    claimer.send("/nick before\n").await;
    nick_answer(&mut claimer)
        .await
        .expect("a nick before the loss");
    // The server node-a is on goes down while everyone streams.
    let mut victim = None;
    for (i, s) in servers.iter().enumerate() {
        if s.serves("node-a").await {
            victim = Some(i);
        }
    }
    let victim = victim.expect("node-a is on one of the servers");

    const N: usize = 600;
    let script: Vec<u8> = (0..N)
        .map(|i| format!("line {i}\n"))
        .chain(["end\n".to_string()])
        .collect::<String>()
        .into_bytes();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    let mut kill_tx = Some(kill_tx);
    let nicks: Vec<String> = senders.iter().map(|(_, n)| n.clone()).collect();
    let mut streams = Vec::new();
    for (k, (mut client, _)) in senders.into_iter().enumerate() {
        let script = script.clone();
        let trigger = if k == 0 { kill_tx.take() } else { None };
        streams.push(async move {
            let mut trigger = trigger;
            for (c, chunk) in script.chunks(80).enumerate() {
                client.send_raw(chunk).await;
                // Pacing, so that the stream spans the failover.
                tokio::time::sleep(Duration::from_millis(2)).await;
                if c == 20
                    && let Some(t) = trigger.take()
                {
                    let _ = t.send(());
                }
            }
            client
        });
    }
    let killer = async {
        let _ = kill_rx.await;
        servers[victim].kill();
    };
    let (_, _senders) = tokio::join!(killer, futures_util::future::join_all(streams));

    let all: Vec<&str> = nicks.iter().map(String::as_str).collect();
    for reader in &mut readers {
        receive_all(reader, &all, N).await;
    }
    // The failover was quiet: held, not announced.
    let a = &nodes[0];
    a.wait_logged("reconnected to NATS within the hold").await;
    for n in &nodes {
        assert!(
            n.logged("NATS lost").is_empty(),
            "a failover within the hold is not an outage"
        );
    }
    // Nicks, history and bans outlive the server too: given three NATS
    // servers, nodes make their streams with three replicas.
    let survivor = servers
        .iter()
        .enumerate()
        .find_map(|(i, s)| (i != victim).then_some(s))
        .expect("two servers are left");
    let wanted = ["KV_chatd_nicks", "KV_chatd_bans", "chatd_history"];
    let deadline = Instant::now() + WAIT;
    loop {
        let jsz = survivor
            .monitoring("/jsz?accounts=true&streams=true&config=true")
            .await;
        let replicas: Vec<(String, u64)> = jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| {
                Some((
                    s["config"]["name"].as_str()?.to_string(),
                    s["config"]["num_replicas"].as_u64()?,
                ))
            })
            .collect();
        if wanted
            .iter()
            .all(|w| replicas.iter().any(|(n, r)| n == w && *r == 3))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "streams and their replicas: {replicas:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And nicks are still decided by the cluster, once JetStream has moved
    // the bucket's leader off the lost server (claims meanwhile say "try
    // again", docs/OPERATIONS.md).
    async fn claim(client: &mut Client, nick: &str) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            client.send(&format!("/nick {nick}\n")).await;
            match nick_answer(client).await {
                Err(e) if e.contains("try again") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                answer => return answer,
            }
        }
    }
    claim(&mut claimer, "after")
        .await
        .expect("a nick after the loss");
    let (mut rival, _) = nodes[2].join().await;
    let refused = claim(&mut rival, "AFTER").await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("is taken")),
        "the nick is taken on another node: {refused:?}"
    );
    // node-a published again what its server had not confirmed; the
    // history stream stored each batch once all the same (`Nats-Msg-Id`).
    let nc = async_nats::connect(survivor.url())
        .await
        .expect("connect to NATS");
    let mut js = async_nats::jetstream::new(nc);
    js.set_timeout(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match js.get_stream("chatd_history").await {
            Ok(stream) => break stream,
            // JetStream may still be electing leaders after the loss (some
            // seconds).
            Err(e) => assert!(Instant::now() < deadline, "the history stream: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut ids = std::collections::HashSet::new();
    let mut stored: HashMap<String, usize> = HashMap::new();
    let mut next = 1;
    while let Ok(Ok(msg)) = tokio::time::timeout(
        WAIT,
        stream.direct_get_next_for_subject("chatd.room.lobby.chat", Some(next)),
    )
    .await
    {
        next = msg.sequence + 1;
        let id = msg.headers.get("Chatd-Id").map(|v| v.as_str().to_string());
        assert!(ids.insert(id.clone()), "batch {id:?} stored twice");
        for line in String::from_utf8_lossy(&msg.payload).split("\r\n") {
            *stored.entry(line.to_string()).or_default() += 1;
        }
    }
    let of_a = (0..N)
        .map(|i| stored.get(&format!("<{}> line {i}", nicks[0])))
        .inspect(|n| assert!(n.is_none_or(|n| *n == 1), "a line of node-a stored twice"))
        .filter(Option::is_some)
        .count();
    assert!(of_a > 0, "node-a's lines are in the history stream");
}

/// `/msg` lines from `from` up to its `end`: every one, once, in order.
async fn receive_private(client: &mut Client, from: &str, want: usize) {
    let prefix = format!("[pm] <{from}> ");
    let mut got = Vec::new();
    loop {
        let l = client.line().await;
        let Some(text) = l.strip_prefix(&prefix) else {
            continue;
        };
        if text == "end" {
            break;
        }
        if text == "probe" {
            continue;
        }
        let n: usize = text
            .strip_prefix("line ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {l:?}"));
        got.push(n);
    }
    assert_eq!(
        got,
        (0..want).collect::<Vec<_>>(),
        "private lines from {from}: every one, once, in order"
    );
}

/// Sends `/msg TO probe` from `client` until `reader` (nick `to`) hears it.
async fn probe_private(client: &mut Client, reader: &mut Client, to: &str, from: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "{to} is not reached from {from}");
        client.send(&format!("/msg {to} probe\n")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let heard = reader
            .sync()
            .await
            .iter()
            .any(|l| l == &format!("[pm] <{from}> probe"));
        if heard {
            return;
        }
    }
}

#[tokio::test]
async fn killing_one_nats_server_of_three_loses_no_private_message() {
    let Some(mut servers) = nats_cluster().await else {
        return;
    };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let urls = servers.iter().map(Nats::url).collect::<Vec<_>>().join(" ");
    let a = node(&urls, "node-a", &quiet);
    let (mut alice, alice_nick) = a.join().await;
    // node-b is on another server than node-a, and stays on it.
    let deadline = Instant::now() + WAIT;
    let mut victim = None;
    while victim.is_none() {
        assert!(Instant::now() < deadline, "node-a is on no server");
        for (i, s) in servers.iter().enumerate() {
            if s.serves("node-a").await {
                victim = Some(i);
            }
        }
    }
    let victim = victim.expect("node-a is on one of the servers");
    let others = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, s)| s.url())
        .collect::<Vec<_>>()
        .join(" ");
    let b = node(&others, "node-b", &quiet);
    let (mut bob, bob_nick) = b.join().await;
    // Each knows the other's member table (and interest crossed the routes)
    // before the stream starts.
    probe_private(&mut alice, &mut bob, &bob_nick, &alice_nick).await;
    probe_private(&mut bob, &mut alice, &alice_nick, &bob_nick).await;
    alice.sync().await;
    bob.sync().await;

    const N: usize = 300;
    let script = |to: &str| -> Vec<u8> {
        (0..N)
            .map(|i| format!("/msg {to} line {i}\n"))
            .chain([format!("/msg {to} end\n")])
            .collect::<String>()
            .into_bytes()
    };
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    let mut kill_tx = Some(kill_tx);
    let streams = [
        (&mut alice, script(&bob_nick)),
        (&mut bob, script(&alice_nick)),
    ]
    .into_iter()
    .enumerate()
    .map(|(k, (client, script))| {
        let trigger = if k == 0 { kill_tx.take() } else { None };
        async move {
            let mut trigger = trigger;
            // Sent in small chunks, paced, so that the stream spans the
            // failover both ways.
            for (c, chunk) in script.chunks(120).enumerate() {
                client.send_raw(chunk).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                if c == 20
                    && let Some(t) = trigger.take()
                {
                    let _ = t.send(());
                }
            }
        }
    })
    .collect::<Vec<_>>();
    let killer = async {
        let _ = kill_rx.await;
        servers[victim].kill();
    };
    tokio::join!(killer, futures_util::future::join_all(streams));
    receive_private(&mut bob, &alice_nick, N).await;
    receive_private(&mut alice, &bob_nick, N).await;
    a.wait_logged("reconnected to NATS within the hold").await;
}

/// `haproxy`, or `None` after one line saying it is missing.
fn haproxy_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file());
    if found.is_none() {
        let required = std::env::var("REQUIRE_TEST_TOOLS").is_ok_and(|v| v == "1");
        assert!(!required, "haproxy is missing and REQUIRE_TEST_TOOLS=1");
        eprintln!("skipped: haproxy is not installed (apt-get install haproxy)");
    }
    found
}

/// A chat connection from the loopback address `source` to `to`.
async fn connect_via(source: &str, to: std::net::SocketAddr) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind the source address");
    Client::connect_socket(socket, to).await
}

#[tokio::test]
async fn the_example_haproxy_config_spreads_clients_over_nodes_with_real_addresses() {
    let Some(haproxy) = haproxy_bin() else { return };
    let Some(nats) = Nats::start() else { return };
    let trust = [("CHATD_CHAT__TRUSTED_PROXIES", "127.0.0.1/32")];
    let nodes = [
        node(&nats.url(), "chatd-1", &trust),
        node(&nats.url(), "chatd-2", &trust),
        node(&nats.url(), "chatd-3", &trust),
    ];
    // deploy/haproxy/chatd-cluster.cfg as shipped, on loopback ports.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/haproxy/chatd-cluster.cfg"
    );
    let mut config = std::fs::read_to_string(example).expect("read the example");
    let front = free_port();
    config = config.replace("bind :8080", &format!("bind 127.0.0.1:{front}"));
    for (i, n) in nodes.iter().enumerate() {
        let shipped = format!("10.0.0.1{}:8080", i + 1);
        assert!(config.contains(&shipped), "the example names {shipped}");
        config = config.replace(&shipped, &n.chat.to_string());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, config).expect("write haproxy.cfg");
    let mut proxy = Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    struct KillOnDrop<'a>(&'a mut Child);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _proxy = KillOnDrop(&mut proxy);
    let front = std::net::SocketAddr::from(([127, 0, 0, 1], front));
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(front).is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut alice = connect_via("127.0.0.2", front).await;
    let a = alice.welcome().await;
    let mut bob = connect_via("127.0.0.3", front).await;
    let b = bob.welcome().await;
    // Any node lists both, each on its own node with its real address.
    let listed = nodes[0]
        .chatctl(&["list-clients", "-o", "json"])
        .await
        .json();
    let find = |nick: &str| {
        listed["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .find(|c| c["nick"] == nick)
            .map(|c| {
                (
                    c["node"].as_str().expect("node").to_string(),
                    c["addr"].as_str().expect("addr").to_string(),
                )
            })
            .unwrap_or_else(|| panic!("{nick} is not listed: {listed}"))
    };
    let (a_node, a_addr) = find(&a);
    let (b_node, b_addr) = find(&b);
    assert_eq!(a_addr, alice.local_addr().to_string(), "{listed}");
    assert_eq!(b_addr, bob.local_addr().to_string(), "{listed}");
    assert_ne!(a_node, b_node, "leastconn spreads them: {listed}");
    for (i, n) in nodes.iter().enumerate() {
        let id = format!("chatd-{}", i + 1);
        if id == a_node || id == b_node {
            wait_subscribed(n, "lobby").await;
        }
    }
    alice.send("hello through the balancer\n").await;
    bob.expect(&format!("<{a}> hello through the balancer"))
        .await;
}

/// Reads until the answer to a `/nick`: `Ok(())` when granted, `Err(line)`
/// when refused.
async fn nick_answer(client: &mut Client) -> Result<(), String> {
    loop {
        let l = client.line().await;
        if l.starts_with("*** You are now known as ") {
            return Ok(());
        }
        if l.starts_with("*** error: ") {
            return Err(l);
        }
    }
}

#[tokio::test]
async fn the_same_nick_asked_on_two_nodes_at_once_goes_to_exactly_one() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let b = node(&nats.url(), "node-b", &quiet);
    let (mut a1, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    // Warm up: the first claim of a node opens the bucket.
    a1.send("/nick warmA\n").await;
    nick_answer(&mut a1).await.expect("warm-up on A");
    b1.send("/nick warmB\n").await;
    nick_answer(&mut b1).await.expect("warm-up on B");
    let (mut wins_a, mut wins_b) = (0, 0);
    for round in 0..30 {
        // Other case on each node: nicks are one key whatever their case.
        let (on_a, on_b) = (format!("Racer{round}"), format!("rACER{round}"));
        let (sa, sb) = (format!("/nick {on_a}\n"), format!("/nick {on_b}\n"));
        tokio::join!(a1.send(&sa), b1.send(&sb));
        let (ra, rb) = tokio::join!(nick_answer(&mut a1), nick_answer(&mut b1));
        match (&ra, &rb) {
            (Ok(()), Err(why)) => {
                assert_eq!(why, &format!("*** error: nick \"{on_b}\" is taken"));
                wins_a += 1;
            }
            (Err(why), Ok(())) => {
                assert_eq!(why, &format!("*** error: nick \"{on_a}\" is taken"));
                wins_b += 1;
            }
            _ => panic!("round {round}: exactly one winner, got {ra:?} and {rb:?}"),
        }
    }
    eprintln!("wins: node-a {wins_a}, node-b {wins_b}");
}

#[tokio::test]
async fn a_nick_waits_for_the_cluster_without_reordering_its_lines() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let (mut a1, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    let (mut b2, _) = b.join().await;
    wait_subscribed(&a, "lobby").await;
    wait_subscribed(&b, "lobby").await;
    // The lines after a /nick, in the same write, wait for its answer and
    // then go out under the new nick, in order.
    b1.send("/nick Alice\nfirst\n/nick Bob\nsecond\n/nick alice\nthird\n")
        .await;
    let lines = read_through(&mut a1, "> third").await;
    let said: Vec<&String> = lines.iter().filter(|l| l.starts_with('<')).collect();
    assert_eq!(
        said,
        ["<Alice> first", "<Bob> second", "<alice> third"],
        "{lines:?}"
    );
    let own = read_through(&mut b1, "You are now known as alice").await;
    let answers: Vec<&String> = own.iter().filter(|l| l.contains("known as")).collect();
    assert_eq!(answers.len(), 3, "{own:?}");

    // Taken on B: refused on A, in any case; free again once its holder
    // takes another nick.
    a1.send("/nick ALICE\n").await;
    assert_eq!(
        nick_answer(&mut a1).await,
        Err("*** error: nick \"ALICE\" is taken".to_string())
    );
    b1.send("/nick carol\n").await;
    nick_answer(&mut b1).await.expect("carol");
    a1.send("/nick ALICE\n").await;
    nick_answer(&mut a1).await.expect("alice was released");
    // A holder that quits frees its nick too.
    b2.send("/nick dave\n").await;
    nick_answer(&mut b2).await.expect("dave");
    b2.send("/quit\n").await;
    b2.until_eof().await;
    let deadline = Instant::now() + WAIT;
    loop {
        a1.send("/nick Dave\n").await;
        match nick_answer(&mut a1).await {
            Ok(()) => break,
            Err(_) => assert!(Instant::now() < deadline, "dave never freed"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shorter `[cluster]` timings are honoured: with a 6 s nick expiry and a
/// 4 s member silence, a killed node's nick is free, and its user gone
/// from `/who`, well before the defaults (20 s and 6 s) would allow.
#[tokio::test]
async fn shorter_cluster_timings_free_a_killed_nodes_nick_and_members_sooner() {
    let Some(nats) = Nats::start() else { return };
    let fast = [
        ("CHATD_CLUSTER__NICK_EXPIRY_SECS", "6"),
        ("CHATD_CLUSTER__NICK_REWRITE_SECS", "2"),
        ("CHATD_CLUSTER__MEMBER_SILENCE_SECS", "4"),
    ];
    let a = node(&nats.url(), "node-a", &fast);
    let mut b = node(&nats.url(), "node-b", &fast);
    let (mut a1, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    b1.send("/nick zoe\n").await;
    nick_answer(&mut b1).await.expect("zoe");
    // Held past the expiry by the rewrites while node-b lives.
    who_until(&mut a1, |w| w.contains("zoe"), WAIT).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    a1.send("/nick zoe\n").await;
    assert!(nick_answer(&mut a1).await.is_err(), "held by node-b");

    b.signal(rustix::process::Signal::KILL);
    b.wait_exit().await;
    let killed = Instant::now();
    // Heard at most 2 s before the kill (one heartbeat), so gone within
    // 4 s of it; the default 6 s would not be.
    who_until(&mut a1, |w| !w.contains("zoe"), Duration::from_millis(5500)).await;
    // Rewritten at most 2 s before the kill: expired 6 s after that, give
    // or take JetStream's expiry timer; the default is 20 s.
    claim_within(&mut a1, "Zoe", killed, Duration::from_secs(9)).await;
}

#[tokio::test]
async fn a_killed_nodes_nicks_are_free_within_30_s() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats.url(), "node-a", &[]);
    let mut b = node(&nats.url(), "node-b", &[]);
    let (mut a1, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    b1.send("/nick zoe\n").await;
    nick_answer(&mut b1).await.expect("zoe");
    a1.send("/nick zoe\n").await;
    assert!(nick_answer(&mut a1).await.is_err(), "held by B");

    b.signal(rustix::process::Signal::KILL);
    b.wait_exit().await;
    let killed = Instant::now();
    claim_within(&mut a1, "Zoe", killed, Duration::from_secs(30)).await;
}

/// Asks for `nick` until it is granted; fails when that takes more than
/// `limit` after `killed` (when its holder's node died).
async fn claim_within(client: &mut Client, nick: &str, killed: Instant, limit: Duration) {
    loop {
        client.send(&format!("/nick {nick}\n")).await;
        if nick_answer(client).await.is_ok() {
            break;
        }
        assert!(
            killed.elapsed() < limit,
            "{nick} still taken {limit:?} after its node died"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{nick} free {:?} after the kill", killed.elapsed());
}

/// The answer to `/who` (its one line).
async fn who(client: &mut Client) -> String {
    client.send("/who\n").await;
    loop {
        let l = client.line().await;
        if l.starts_with("*** ") && l.contains(" user") && l.contains("): ") {
            return l;
        }
    }
}

/// Sends `/who` until its answer satisfies `ok`; returns it.
async fn who_until(client: &mut Client, ok: impl Fn(&str) -> bool, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let l = who(client).await;
        if ok(&l) {
            return l;
        }
        assert!(Instant::now() < deadline, "last /who: {l}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn who_rooms_counts_and_msg_span_the_nodes() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let b = node(&nats.url(), "node-b", &quiet);
    let (mut a1, _) = a.join().await;
    a1.send("/nick ann\n").await;
    nick_answer(&mut a1).await.expect("ann");
    let (mut b1, _) = b.join().await;
    b1.send("/nick bob\n").await;
    nick_answer(&mut b1).await.expect("bob");
    let (mut a2, _) = a.join().await;
    a2.send("/join dev\n").await;
    a2.expect("You are now in dev").await;

    let seen = who_until(&mut b1, |l| l == "*** lobby (2 users): ann, bob", WAIT).await;
    assert_eq!(seen, "*** lobby (2 users): ann, bob");
    // /rooms on B lists the room that has members on A only.
    b1.send("/rooms\n").await;
    b1.expect("2 rooms:").await;
    assert_eq!(b1.line().await, "***   dev (1 user)");
    assert_eq!(b1.line().await, "***   lobby (2 users)");

    // Counts in notices are cluster-wide.
    wait_subscribed(&b, "lobby").await;
    let (_a3, a3_nick) = a.join().await;
    b1.expect(&format!("{a3_nick} joined lobby (3 users)"))
        .await;

    // /msg reaches a nick on the other node, in any case, one way and back.
    b1.send("/msg ANN hello from b\n").await;
    b1.expect("[pm -> ann] hello from b").await;
    a1.expect("[pm] <bob> hello from b").await;
    a1.send("/msg bob and back\n").await;
    b1.expect("[pm] <ann> and back").await;
    a1.send("/msg nobody hi\n").await;
    a1.expect("error: no such nick \"nobody\"").await;
}

#[tokio::test]
async fn a_killed_node_leaves_who_and_counts_within_10_s_and_nobody_else_is_cut() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let mut b = node(&nats.url(), "node-b", &quiet);
    let (mut a1, a1_nick) = a.join().await;
    let (mut a2, _) = a.join().await;
    let (_b1, b1_nick) = b.join().await;
    let (_b2, _) = b.join().await;
    who_until(&mut a1, |l| l.contains("(4 users)"), WAIT).await;

    b.signal(rustix::process::Signal::KILL);
    b.wait_exit().await;
    let killed = Instant::now();
    let after = who_until(
        &mut a1,
        |l| l.contains("(2 users)"),
        Duration::from_secs(10),
    )
    .await;
    assert!(!after.contains(&b1_nick), "{after}");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "B's members still listed {:?} after the kill",
        killed.elapsed()
    );
    eprintln!("B's members gone {:?} after the kill", killed.elapsed());
    // Nobody on A was cut: they still chat.
    a1.send("still here\n").await;
    a2.expect(&format!("<{a1_nick}> still here")).await;
    a2.send("/rooms\n").await;
    a2.expect("lobby (2 users)").await;
}

#[tokio::test]
async fn a_nick_taken_on_two_nodes_while_nats_was_away_is_settled_and_the_loser_told() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let b = node(&nats.url(), "node-b", &quiet);
    let (mut a1, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    let (mut b2, _) = b.join().await;
    // The bucket exists before NATS goes.
    a1.send("/nick early\n").await;
    nick_answer(&mut a1).await.expect("early");
    b2.send("/nick held\n").await;
    nick_answer(&mut b2).await.expect("held");

    nats.kill();
    for c in [&mut a1, &mut b1] {
        c.expect("*** Other chat nodes are unreachable").await;
    }
    // Each node alone grants the same nick, and B's client takes the one
    // A's client let go: both are settled once NATS is back.
    a1.send("/nick Neo\n").await;
    nick_answer(&mut a1).await.expect("granted on A alone");
    b1.send("/nick neo\n").await;
    nick_answer(&mut b1).await.expect("granted on B alone");
    // Members come and go on B meanwhile: A learns once NATS is back.
    b2.send("/quit\n").await;
    b2.until_eof().await;
    let (_b3, b3_nick) = b.join().await;
    nats.restart();

    // Exactly one of them is renamed, and told why.
    let told = "was taken on another chat node while this one was cut off";
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut lost_a, mut lost_b) = (false, false);
    while !(lost_a || lost_b) {
        assert!(Instant::now() < deadline, "nobody was told");
        for l in a1.sync().await {
            lost_a |= l.contains(told);
        }
        for l in b1.sync().await {
            lost_b |= l.contains(told);
        }
    }
    // Settling is done on both sides once each refreshed after the return.
    tokio::time::sleep(nicks_refresh()).await;
    for l in a1.sync().await {
        lost_a |= l.contains(told);
    }
    for l in b1.sync().await {
        lost_b |= l.contains(told);
    }
    assert!(lost_a ^ lost_b, "exactly one loser: A {lost_a}, B {lost_b}");
    let now = who_until(&mut a1, |l| l.contains(&b3_nick), WAIT).await;
    assert!(!now.contains("held"), "{now}");
    let (winner, loser) = if lost_a {
        (&mut b1, &mut a1)
    } else {
        (&mut a1, &mut b1)
    };
    // The loser chats under its guest nick; the winner keeps neo.
    loser.send("/msg neo hi\n").await;
    loser.expect("[pm -> ").await;
    winner.expect("[pm] <guest-").await;
    // The nick of the client that quit during the outage is free.
    a1.send("/nick HELD\n").await;
    let deadline = Instant::now() + Duration::from_secs(25);
    while nick_answer(&mut a1).await.is_err() {
        assert!(Instant::now() < deadline, "held never freed");
        tokio::time::sleep(Duration::from_millis(500)).await;
        a1.send("/nick HELD\n").await;
    }
}

/// A little more than the nick refresh period.
fn nicks_refresh() -> Duration {
    Duration::from_secs(6)
}

/// The numbers of `<nick> n N` lines in `lines`.
fn numbered(lines: &[String], nick: &str) -> Vec<u64> {
    let prefix = format!("<{nick}> n ");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn history_is_cluster_wide_never_doubled_with_live_lines_and_outlives_every_node() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let mut a = node(&nats.url(), "node-a", &quiet);
    let mut b = node(&nats.url(), "node-b", &quiet);
    let (mut a1, a1_nick) = a.join().await;
    a1.send("/join dev\n").await;
    a1.expect("You are now in dev").await;
    a1.send("said on a\n").await;
    let (mut a2, _) = a.join().await;
    a2.send("/join dev\n").await;
    a2.expect(&format!("<{a1_nick}> said on a")).await;

    // B has nobody in dev: its first member there reads dev's history.
    let (mut b1, _) = b.join().await;
    b1.send("/join dev\n").await;
    b1.expect("You are now in dev").await;
    b1.expect("Last 1 message in dev:").await;
    assert_eq!(b1.line().await, format!("<{a1_nick}> said on a"));
    b1.expect("End of history.").await;

    // While a1 keeps talking, clients join dev on B (each time as its
    // first member there): each reads every line once, in order, history
    // then live, with no gap between them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let talker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                a1.send(&format!("n {n}\n")).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            a1.send("done\n").await;
            a1
        })
    };
    b1.send("/join elsewhere\n").await;
    b1.expect("You are now in elsewhere").await;
    for round in 0..5 {
        // b1 leaves dev empty on B, then comes back.
        let (mut c, _) = b.join().await;
        c.send("/join dev\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.send("/join lobby\n").await;
        let lines = read_through(&mut c, "You are now in lobby").await;
        let seen = numbered(&lines, &a1_nick);
        assert!(seen.len() > 5, "round {round}: {lines:?}");
        let expected: Vec<u64> = (seen[0]..seen[0] + seen.len() as u64).collect();
        assert_eq!(seen, expected, "round {round}: once each, in order, no gap");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _a1 = talker.await.expect("talker");
    let mut lines = read_through(&mut a2, "> done").await;
    lines.retain(|l| l.contains("> n "));
    let last: u64 = numbered(&lines, &a1_nick).last().copied().expect("a line");

    // Every node restarts: the history is still there, from NATS.
    drop(b1);
    a.stop().await;
    b.stop().await;
    let c = node(&nats.url(), "node-c", &[]);
    let (mut c1, _) = c.join().await;
    c1.send("/join dev\n").await;
    let lines = read_through(&mut c1, "End of history.").await;
    assert!(
        lines.iter().any(|l| l == &format!("<{a1_nick}> n {last}")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.ends_with("> done")), "{lines:?}");
}

/// Connects from `ip` until `ok` says the first line is what it should be.
async fn until_first_line(
    server: &TestServer,
    ip: &str,
    ok: impl Fn(&str) -> bool,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let mut c = connect_from(ip, server).await;
        let first = c.line().await;
        if ok(&first) {
            return;
        }
        assert!(Instant::now() < deadline, "from {ip}, still: {first}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn bans_and_unbans_made_while_nats_was_away_reach_every_node_once_it_is_back() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let a = node(&nats.url(), "node-a", &[]);
    let b = node(&nats.url(), "node-b", &[]);
    let banned = a.chatctl(&["ban", "127.0.0.8", "--reason", "before"]).await;
    banned.ok();
    let banned = |l: &str| l.starts_with("*** error: you are banned");
    let welcome = |l: &str| l.starts_with("*** Welcome");
    until_first_line(&b, "127.0.0.8", banned, WAIT).await;

    nats.kill();
    a.wait_logged("NATS lost").await;
    b.wait_logged("NATS lost").await;
    // Each node alone: A bans, B lifts the ban made before.
    a.chatctl(&["ban", "127.0.0.9", "--reason", "during"])
        .await
        .ok();
    b.chatctl(&["unban", "127.0.0.8"]).await.ok();
    until_first_line(&b, "127.0.0.9", welcome, WAIT).await;
    until_first_line(&a, "127.0.0.8", banned, WAIT).await;

    nats.restart();
    until_first_line(&b, "127.0.0.9", banned, Duration::from_secs(20)).await;
    until_first_line(&a, "127.0.0.8", welcome, Duration::from_secs(20)).await;
    // A node started later has them too.
    let c = node(&nats.url(), "node-c", &[]);
    until_first_line(&c, "127.0.0.9", banned, WAIT).await;
    until_first_line(&c, "127.0.0.8", welcome, WAIT).await;
}

#[tokio::test]
async fn a_node_upgraded_in_place_keeps_its_nicks_and_members_for_the_others() {
    let Some(nats) = Nats::start() else { return };
    let url = nats.url();
    let a = upgradable_node(&url, "node-a");
    let b = node(&url, "node-b", &[]);
    let (mut a1, _) = a.join().await;
    let (mut b1, _) = b.join().await;
    a1.send("/nick zoe\n").await;
    nick_answer(&mut a1).await.expect("zoe is free");
    read_through(&mut b1, "is now known as zoe").await;
    who_until(&mut b1, |w| w.contains("zoe"), Duration::from_secs(10)).await;

    a.signal(rustix::process::Signal::USR2);
    a.wait_logged_times("upgrade: took over", 1).await;
    // Past the old process's exit and past the bucket's expiry: zoe stays
    // held by node A all along, so B is refused every time.
    let upgraded = Instant::now();
    let mut seen = Vec::new();
    while upgraded.elapsed() < Duration::from_secs(25) {
        b1.send("/nick zoe\n").await;
        loop {
            let l = b1.line().await;
            if l.starts_with("*** You are now known as ") {
                panic!("zoe was free {:?} after A's upgrade", upgraded.elapsed());
            }
            let refused = l.starts_with("*** error: ");
            seen.push(l);
            if refused {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // Nobody on B saw zoe leave or come back, and she still talks to them.
    a1.send("still here\n").await;
    seen.extend(read_through(&mut b1, "<zoe> still here").await);
    let notices: Vec<_> = seen
        .iter()
        .filter(|l| l.starts_with("*** ") && !l.starts_with("*** error: "))
        .collect();
    assert!(notices.is_empty(), "B heard: {notices:?}");
    let w = who(&mut b1).await;
    assert!(w.contains("zoe"), "zoe is gone from B's /who: {w}");
}

/// What one user types to reach another's terminal through NATS: escapes,
/// forged server lines and direction marks in lines, actions and private
/// messages, in a room whose name is at its length limit. The user on the
/// other node sees them clean, each line under the sender's own prefix.
#[tokio::test]
async fn escapes_and_forged_lines_reach_another_node_clean() {
    let Some(nats) = Nats::start() else { return };
    let quiet = [("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")];
    let a = node(&nats.url(), "node-a", &quiet);
    let b = node(&nats.url(), "node-b", &quiet);
    let room = "r".repeat(32);
    let (mut attacker, nick) = a.join().await;
    let (mut victim, victim_nick) = b.join().await;
    for c in [&mut attacker, &mut victim] {
        c.send(&format!("/join {room}\n")).await;
        c.expect("You are now in").await;
    }
    wait_subscribed(&a, &room).await;
    wait_subscribed(&b, &room).await;
    attacker
        .send_raw(
            format!(
                "\x1b[2J\x1b[H\x1b]0;FORGED title\x07clear\n\
                 ok\r*** FORGED server line\n\
                 text \u{202e}desrever\u{202c} \u{200b}hidden\n\
                 /me \x1b[31mFORGED red\x1b[0m\n\
                 /msg {victim_nick} \x1b[2J\r*** FORGED pm\n\
                 done\n"
            )
            .as_bytes(),
        )
        .await;
    let mut seen = read_through(&mut victim, &format!("<{nick}> done")).await;
    // The private message travels on its own subject, so it may come after
    // the room's last line.
    if !seen.iter().any(|l| l.starts_with("[pm] ")) {
        seen.extend(read_through(&mut victim, "[pm] ").await);
    }
    let relayed: Vec<String> = seen
        .iter()
        .filter(|l| l.contains(&nick) || l.contains("FORGED"))
        .cloned()
        .collect();
    assert!(relayed.len() >= 5, "{seen:#?}");
    let pm: Vec<String> = relayed
        .iter()
        .filter_map(|l| l.strip_prefix("[pm] "))
        .map(str::to_string)
        .collect();
    assert_eq!(pm.len(), 1, "{relayed:#?}");
    let room_lines: Vec<String> = relayed
        .iter()
        .filter(|l| !l.starts_with("[pm] "))
        .cloned()
        .chain(pm)
        .collect();
    crate::abuse::assert_clean(&room_lines, &nick);
}
