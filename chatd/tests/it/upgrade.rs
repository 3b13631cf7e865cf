//! Seamless upgrades: the running daemon hands its listeners, every client
//! socket and every client's state to the binary now at its path
//! (`chatctl upgrade`, SIGUSR2). The daemon runs from a copy in a directory
//! of the test's own, which a test replaces the way a package upgrade
//! would: with a good build, a missing file, or a script that fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;

use crate::support::{Client, TestServer, WAIT, chatd_bin, connect_from, metric, skip};

/// Lifts the limits a busy test would meet: flood control (the senders
/// talk fast), the notice budget (200 joins) and the stall deadline (one
/// client stops reading on purpose).
const BUSY: &[(&str, &str)] = &[
    ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "10000"),
    ("CHATD_LIMITS__FLOOD_BURST", "10000"),
    ("CHATD_LIMITS__ROOM_NOTICES_PER_SEC", "10000"),
    ("CHATD_LIMITS__SLOW_CONSUMER_SECS", "600"),
];

/// The chatd binary, copied where the test may replace it.
struct Binary {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Binary {
    fn copy() -> Binary {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chatd");
        std::fs::copy(chatd_bin(), &path).expect("copy chatd");
        Binary { _dir: dir, path }
    }

    /// Replaces the file (a new inode, as a package manager does: the
    /// running process keeps its own).
    fn replace(&self, from: &Path) {
        std::fs::remove_file(&self.path).expect("remove the binary");
        std::fs::copy(from, &self.path).expect("copy the new binary");
    }

    fn replace_with_script(&self, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::remove_file(&self.path).expect("remove the binary");
        std::fs::write(&self.path, script).expect("write the script");
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755))
            .expect("make it executable");
    }
}

/// Reads lines until every sender in `senders` has sent its last line
/// (`K-end-N`); fails on EOF or after `deadline`.
async fn read_until_ends(
    reader: &mut tokio::io::BufReader<OwnedReadHalf>,
    senders: usize,
    deadline: Duration,
) -> Vec<String> {
    let until = Instant::now() + deadline;
    let mut lines = Vec::new();
    let mut ends = 0;
    while ends < senders {
        let mut buf = Vec::new();
        let left = until.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, reader.read_until(b'\n', &mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{ends} of {senders} senders finished within {deadline:?}; last lines {:#?}",
                    &lines[lines.len().saturating_sub(5)..]
                )
            })
            .expect("read");
        assert!(
            n > 0,
            "connection closed; last lines {:#?}",
            &lines[lines.len().saturating_sub(5)..]
        );
        let line = String::from_utf8(buf).expect("UTF-8");
        let line = line.trim_end_matches("\r\n").to_string();
        if line.contains("-end-") {
            ends += 1;
        }
        lines.push(line);
    }
    lines
}

/// Checks that `lines` hold every line of each sender exactly once and in
/// order, `K-I` for I from 0 to its end line's count; returns the lines
/// that are not such chat lines.
fn check_order(lines: &[String], totals: &HashMap<usize, usize>, me: Option<usize>) -> Vec<String> {
    let mut next: HashMap<usize, usize> = HashMap::new();
    let mut other = Vec::new();
    for line in lines {
        let Some(text) = line.split_once("> ").map(|(_, t)| t) else {
            other.push(line.clone());
            continue;
        };
        let mut parts = text.split(['-', ' ']);
        let (Some(k), Some(i)) = (parts.next(), parts.next()) else {
            other.push(line.clone());
            continue;
        };
        let (Ok(k), i) = (k.parse::<usize>(), i) else {
            other.push(line.clone());
            continue;
        };
        let seen = next.entry(k).or_default();
        if i == "end" {
            assert_eq!(
                *seen, totals[&k],
                "sender {k}: lines missing before its end"
            );
            continue;
        }
        let i: usize = i
            .parse()
            .unwrap_or_else(|_| panic!("not a sequence number: {line:?}"));
        assert_eq!(
            i, *seen,
            "sender {k}: line {i} where {} was due ({line:?})",
            *seen
        );
        *seen += 1;
    }
    for (&k, &total) in totals {
        if Some(k) != me {
            assert_eq!(
                next.get(&k).copied().unwrap_or(0),
                total,
                "sender {k}: lines lost"
            );
        }
    }
    other
}

const SENDERS: usize = 10;
const LINES: usize = 100;
/// The sender number of the client that fills the backed-up client's
/// queue before the upgrade.
const BLASTER: usize = SENDERS;
const NOTICE: &str = "Server upgraded, carry on.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_chatting_through_an_upgrade_lose_nothing() {
    let _ = rlimit::increase_nofile_limit(4096);
    let binary = Binary::copy();
    let mut env = BUSY.to_vec();
    env.push(("CHATD_SERVER__UPGRADE_NOTICE", NOTICE));
    let mut server = TestServer::spawn_binary(&binary.path, None, &env);
    let old_pid = server.pid();

    // 200 clients: senders 0-9 and the blaster (10), a typist, one whose
    // output backs up (a tiny receive buffer, and it stops reading), two in
    // room "side", and listeners.
    let typist = 11;
    let backed = 12;
    let side = [13, 14];
    let mut clients = Vec::new();
    for i in 0..200 {
        let mut c = if i == backed {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_recv_buffer_size(2048).expect("small buffer");
            Client::connect_socket(socket, server.chat).await
        } else {
            server.connect().await
        };
        c.welcome().await;
        clients.push(c);
    }
    let nick = |i: usize| match i {
        i if i <= BLASTER => format!("s{i}"),
        11 => "typist".to_string(),
        12 => "backed".to_string(),
        13 => "side0".to_string(),
        14 => "side1".to_string(),
        i => format!("l{i}"),
    };
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&format!("/nick {}\n", nick(i))).await;
        c.expect(&format!("You are now known as {}", nick(i))).await;
    }
    for &i in &side {
        clients[i].send("/join side\n").await;
        clients[i].expect("You are now in side").await;
    }
    // Every notice so far is read: from here, any `***` line but the
    // upgrade notice is a failure.
    for c in clients.iter_mut() {
        c.sync().await;
    }
    let banned = server
        .chatctl(&["ban", "192.0.2.7", "--reason", "spam"])
        .await;
    banned.ok();
    let s0_before = server.chatctl(&["-o", "json", "client", "s0"]).await.json();

    let (mut readers_of, mut writers_of): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .map(|c| {
            let (r, w) = c.into_parts();
            (Some(r), Some(w))
        })
        .unzip();
    let lobby: Vec<usize> = (0..200).filter(|i| !side.contains(i)).collect();

    // Fill the backed-up client's queue: the blaster talks until chatd
    // holds bytes for it that its socket would not take.
    let pad = "x".repeat(400);
    let mut blasted = 0;
    let mut readers = HashMap::new();
    // Everyone in the lobby but the backed-up client reads from now on.
    let (go_backed, backed_go) = tokio::sync::oneshot::channel::<()>();
    let mut backed_go = Some(backed_go);
    for &i in &lobby {
        let mut reader = readers_of[i].take().expect("a reader");
        let me = (i <= BLASTER).then_some(i);
        let senders = if me.is_some() { SENDERS } else { SENDERS + 1 };
        let wait = if i == backed { backed_go.take() } else { None };
        readers.insert(
            i,
            tokio::spawn(async move {
                if let Some(wait) = wait {
                    let _ = wait.await;
                }
                let lines = read_until_ends(&mut reader, senders, Duration::from_secs(90)).await;
                (lines, reader)
            }),
        );
    }
    let deadline = Instant::now() + WAIT * 3;
    loop {
        for _ in 0..20 {
            let line = format!("{BLASTER}-{blasted} {pad}\n");
            writers_of[BLASTER]
                .as_mut()
                .expect("the blaster")
                .write_all(line.as_bytes())
                .await
                .expect("blast");
            blasted += 1;
        }
        let queued = server
            .chatctl(&["-o", "json", "client", "backed"])
            .await
            .json()["queue_bytes"]
            .as_u64()
            .unwrap_or(0);
        if queued > 16 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backed-up client's queue never filled"
        );
    }
    writers_of[BLASTER]
        .as_mut()
        .expect("the blaster")
        .write_all(format!("{BLASTER}-end-{blasted}\n").as_bytes())
        .await
        .expect("blast end");

    // Half a line typed before the upgrade.
    let mut typing = writers_of[typist].take().expect("the typist");
    typing.write_all(b"half a li").await.expect("type");

    // Ten senders at a steady rate, before, during and after the upgrade.
    let mut senders = Vec::new();
    for (k, writer) in writers_of.iter_mut().enumerate().take(SENDERS) {
        let mut writer = writer.take().expect("a sender");
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(30));
            for i in 0..LINES {
                tick.tick().await;
                writer
                    .write_all(format!("{k}-{i}\n").as_bytes())
                    .await
                    .expect("send");
            }
            writer
                .write_all(format!("{k}-end-{LINES}\n").as_bytes())
                .await
                .expect("send");
            writer
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let upgraded = server.chatctl(&["upgrade"]).await;
    let said = upgraded.ok().to_string();
    assert!(said.contains("upgraded in"), "{said}");
    assert!(said.contains("serves 200 clients"), "{said}");
    typing.write_all(b"ne\n").await.expect("finish the line");
    let _ = go_backed.send(());

    let mut writers = Vec::new();
    for s in senders {
        writers.push(s.await.expect("sender"));
    }
    let mut totals: HashMap<usize, usize> = (0..SENDERS).map(|k| (k, LINES)).collect();
    totals.insert(BLASTER, blasted);
    for (i, reader) in readers {
        let (lines, mut reader) = reader.await.expect("reader");
        let me = (i <= BLASTER).then_some(i);
        let other = check_order(&lines, &totals, me);
        let notices: Vec<&String> = other.iter().filter(|l| l.starts_with("*** ")).collect();
        assert_eq!(
            notices,
            vec![&format!("*** {NOTICE}")],
            "client {i}: the upgrade notice once, no other server line"
        );
        let typed: Vec<&String> = other.iter().filter(|l| l.contains("half a line")).collect();
        if i != typist {
            // It may come after this client's last end line; read on.
            if typed.is_empty() {
                let mut line = String::new();
                tokio::time::timeout(WAIT, reader.read_line(&mut line))
                    .await
                    .expect("the typist's line in time")
                    .expect("read");
                assert_eq!(line, "<typist> half a line\r\n", "client {i}");
            } else {
                assert_eq!(typed, vec!["<typist> half a line"], "client {i}");
            }
        }
    }

    // The new process serves; the old one is gone.
    let new_pid = server.pid();
    assert_ne!(new_pid, old_pid);
    assert!(
        server.wait_exit().await.success(),
        "the old process exits cleanly"
    );
    // Same client, same id, counters carried on.
    let s0_after = server.chatctl(&["-o", "json", "client", "s0"]).await.json();
    assert_eq!(s0_after["id"], s0_before["id"]);
    assert_eq!(s0_after["room"], "lobby");
    assert!(s0_after["lines_in"].as_u64() > s0_before["lines_in"].as_u64());
    // Rooms, nicks, bans, history.
    let side_who = server
        .chatctl(&["-o", "json", "list-clients", "--room", "side"])
        .await
        .json();
    let mut side_nicks: Vec<&str> = side_who["clients"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["nick"].as_str())
        .collect();
    side_nicks.sort();
    assert_eq!(side_nicks, ["side0", "side1"]);
    let all = server.chatctl(&["-o", "json", "list-clients"]).await.json();
    assert_eq!(all["clients"].as_array().expect("a list").len(), 200);
    assert!(server.chatctl(&["bans"]).await.ok().contains("192.0.2.7"));
    let (mut late, _) = server.join().await;
    // The room's history came along: its last lines are from the end of
    // the test.
    let mut history = Vec::new();
    loop {
        let line = late.line().await;
        if line.contains("End of history") {
            break;
        }
        history.push(line);
    }
    assert!(
        history
            .iter()
            .any(|l| l.contains("-end-") || l.contains("half a line")),
        "{history:#?}"
    );
    // A nick is still taken.
    late.send("/nick s1\n").await;
    late.expect("is taken").await;
    // UDP echo.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    udp.send_to(b"ping", server.udp.expect("udp address"))
        .await
        .expect("send");
    let mut buf = [0u8; 16];
    let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .expect("an echo in time")
        .expect("echo");
    assert_eq!(&buf[..n], b"ping");
    drop((writers, writers_of, typing));
}

/// Two clients talking, one of them halfway through a line.
async fn pair(server: &TestServer) -> (Client, Client) {
    let (mut a, _) = server.join().await;
    let (mut b, _) = server.join().await;
    a.send("/nick anna\n").await;
    a.expect("You are now known as anna").await;
    b.send("/nick ben\n").await;
    b.expect("You are now known as ben").await;
    a.sync().await;
    b.sync().await;
    a.send_raw(b"half a li").await;
    (a, b)
}

/// After a failed upgrade the same process serves both clients exactly
/// where they were: the half line completes, nobody left or rejoined.
async fn still_served(server: &TestServer, pid: u32, a: &mut Client, b: &mut Client) {
    assert_eq!(server.pid(), pid, "no other process took over");
    a.send("ne\n").await;
    assert_eq!(b.line().await, "<anna> half a line");
    b.send("and on\n").await;
    assert_eq!(a.line().await, "<ben> and on");
    let before = a.sync().await;
    assert!(before.is_empty(), "nothing else reached anna: {before:?}");
}

#[tokio::test]
async fn a_missing_binary_leaves_everyone_with_the_old_process_and_a_retry_works() {
    let binary = Binary::copy();
    let server = TestServer::spawn_binary(&binary.path, None, BUSY);
    let pid = server.pid();
    let (mut a, mut b) = pair(&server).await;
    std::fs::remove_file(&binary.path).expect("remove the binary");
    let failed = server.chatctl(&["upgrade"]).await;
    assert_eq!(failed.code, 1, "{failed:#?}");
    assert!(failed.stderr.contains("cannot start"), "{failed:#?}");
    assert!(failed.stderr.contains("No such file"), "{failed:#?}");
    still_served(&server, pid, &mut a, &mut b).await;

    // The file is back: the next upgrade goes through.
    std::fs::copy(chatd_bin(), &binary.path).expect("copy chatd back");
    let done = server.chatctl(&["-o", "json", "upgrade"]).await.json();
    assert_eq!(done["clients"], 2);
    assert_ne!(done["new_pid"].as_u64(), Some(u64::from(pid)));
    a.send("after\n").await;
    assert_eq!(b.line().await, "<anna> after");
}

#[tokio::test]
async fn a_binary_that_fails_reports_its_error_and_changes_nothing() {
    let binary = Binary::copy();
    let server = TestServer::spawn_binary(&binary.path, None, BUSY);
    let pid = server.pid();
    let (mut a, mut b) = pair(&server).await;
    binary.replace_with_script("#!/bin/sh\necho 'chatd: this build is broken' >&2\nexit 1\n");
    let failed = server.chatctl(&["upgrade"]).await;
    assert_eq!(failed.code, 1, "{failed:#?}");
    assert!(
        failed
            .stderr
            .contains("the new process failed: chatd: this build is broken"),
        "{failed:#?}"
    );
    still_served(&server, pid, &mut a, &mut b).await;
}

#[tokio::test]
async fn a_bad_config_keeps_the_old_process_serving() {
    let binary = Binary::copy();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("chatd.toml");
    std::fs::write(&config, "[server]\nname = \"chatd\"\n").expect("config");
    let server = TestServer::spawn_binary(&binary.path, Some(&config), BUSY);
    let pid = server.pid();
    let (mut a, mut b) = pair(&server).await;
    std::fs::write(&config, "[limits]\nmax_clients = 0\n").expect("break the config");
    let failed = server.chatctl(&["upgrade"]).await;
    assert_eq!(failed.code, 1, "{failed:#?}");
    assert!(failed.stderr.contains("limits.max_clients"), "{failed:#?}");
    still_served(&server, pid, &mut a, &mut b).await;
}

#[tokio::test]
async fn two_upgrades_in_a_row_by_sigusr2_are_invisible() {
    let binary = Binary::copy();
    let server = TestServer::spawn_binary(&binary.path, None, BUSY);
    let first = server.pid();
    let (mut a, mut b) = pair(&server).await;
    b.send("before\n").await;
    assert_eq!(a.line().await, "<ben> before");
    let totals = |json: serde_json::Value| json["totals"].clone();
    let before = totals(server.chatctl(&["stats", "-o", "json"]).await.json());
    server.signal(rustix::process::Signal::USR2);
    server.wait_logged_times("upgrade: took over", 1).await;
    let second = server.pid();
    // Server-wide counters carry on from the previous process.
    let after = totals(server.chatctl(&["stats", "-o", "json"]).await.json());
    for key in [
        "connections",
        "lines_in",
        "lines_out",
        "bytes_in",
        "bytes_out",
    ] {
        let (was, is) = (before[key].as_u64(), after[key].as_u64());
        assert!(
            was.is_some_and(|was| was > 0 && is >= Some(was)),
            "{key}: {was:?} before the upgrade, {is:?} after"
        );
    }
    assert_eq!(after["connections"], before["connections"], "{after}");
    // A newly built binary replaces the file between the two.
    binary.replace(Path::new(chatd_bin()));
    a.send("ne\n").await;
    assert_eq!(b.line().await, "<anna> half a line");
    b.send_raw(b"typed across ").await;
    server.signal(rustix::process::Signal::USR2);
    server.wait_logged_times("upgrade: took over", 2).await;
    let third = server.pid();
    assert!(first != second && second != third && first != third);
    b.send("two upgrades\n").await;
    assert_eq!(a.line().await, "<ben> typed across two upgrades");
    // No notice (none configured), no leave or join: the next lines are
    // the answers to these syncs.
    assert!(a.sync().await.is_empty());
    assert!(b.sync().await.is_empty());
    let who = server.chatctl(&["-o", "json", "list-clients"]).await.json();
    let mut nicks: Vec<&str> = who["clients"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["nick"].as_str())
        .collect();
    nicks.sort();
    assert_eq!(nicks, ["anna", "ben"]);
}

/// Thousands of clients under a file limit that leaves room for far fewer
/// than one more descriptor each: the old process copies sockets a chunk
/// at a time and closes each chunk's copies once sent, so the upgrade goes
/// through without a copy of every client's socket at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_needs_no_second_descriptor_per_client() {
    const CLIENTS: usize = 2500;
    let _ = rlimit::increase_nofile_limit(8192);
    let binary = Binary::copy();
    let mut env = BUSY.to_vec();
    env.extend([
        ("CHATD_LIMITS__MAX_CLIENTS", "10000"),
        ("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "10000"),
        ("CHATD_LIMITS__CONNECT_RATE_PER_IP", "0"),
    ]);
    let server = TestServer::spawn_binary(&binary.path, None, &env);
    let (mut a, _) = server.join().await;
    let (mut b, _) = server.join().await;
    for (c, nick) in [(&mut a, "anna"), (&mut b, "ben")] {
        c.send(&format!("/nick {nick}\n")).await;
        c.expect(&format!("You are now known as {nick}")).await;
        c.send("/join side\n").await;
        c.expect("You are now in side").await;
    }
    a.sync().await;
    b.sync().await;
    let mut crowd = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut c = server.connect().await;
        c.welcome().await;
        crowd.push(c);
    }
    // Room for the clients and one chunk pair of copies, not for a second
    // descriptor per client.
    let limit = (CLIENTS + 1200) as u64;
    let pid = rustix::process::Pid::from_raw(server.pid() as i32).expect("pid");
    let rlimit = rustix::process::Rlimit {
        current: Some(limit),
        maximum: Some(limit),
    };
    rustix::process::prlimit(Some(pid), rustix::process::Resource::Nofile, rlimit)
        .expect("lower chatd's file limit");
    let upgraded = server.chatctl(&["upgrade"]).await;
    let said = upgraded.ok().to_string();
    assert!(
        said.contains(&format!("serves {} clients", CLIENTS + 2)),
        "{said}"
    );
    a.send("still here\n").await;
    assert_eq!(b.line().await, "<anna> still here");
    let stats = server.chatctl(&["stats", "-o", "json"]).await.json();
    assert_eq!(stats["clients"], CLIENTS as u64 + 2, "{stats}");
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // `PID (COMM) STATE PPID …`; COMM may hold spaces, so after the
            // last ')'.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// `systemctl kill -s USR2 chatd` (docs/OPERATIONS.md) signals every
/// process of the service: typed twice in a row, the second reaches the new
/// process while it is still taking over. The upgrade goes through once,
/// and nobody is lost.
#[tokio::test]
async fn sigusr2_twice_in_a_row_to_every_chatd_process_upgrades_once() {
    let binary = Binary::copy();
    let server = TestServer::spawn_binary(&binary.path, None, BUSY);
    let old = server.pid();
    let (mut a, mut b) = pair(&server).await;
    server.signal(rustix::process::Signal::USR2);
    let deadline = Instant::now() + WAIT;
    // The new process, once it runs its own code: its runtime's threads
    // have started (it is loading its config, or taking over).
    let threads = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("Threads:"))?;
                line.split_whitespace().nth(1)?.parse::<u32>().ok()
            })
            .unwrap_or(0)
    };
    let new = loop {
        if let Some(&child) = children(old).iter().find(|&&c| threads(c) > 1) {
            break child;
        }
        assert!(Instant::now() < deadline, "no new process started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    for pid in [old, new] {
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::USR2);
        }
    }
    server.wait_logged_times("upgrade: took over", 1).await;
    assert_eq!(server.pid(), new, "the process started first took over");
    let told = server.wait_logged("received while starting").await;
    assert_eq!(told["signal"], "SIGUSR2", "{told}");
    a.send("ne\n").await;
    assert_eq!(b.line().await, "<anna> half a line");
    b.send("still here\n").await;
    assert_eq!(a.line().await, "<ben> still here");
    assert!(a.sync().await.is_empty());
    assert_eq!(server.logged("upgrade: took over").len(), 1);
    // The state directory is the new process's once the old one is gone.
    let lock = server.dir.path().join("state/chatd.lock");
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != new.to_string() {
        assert!(
            Instant::now() < deadline,
            "the new process never took the state directory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = server.dir.path().join("state");
    let second = crate::support::run_chatd(
        &[],
        &[
            ("CHATD_SERVER__STATE_DIR", state.to_str().expect("utf-8")),
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
            ("CHATD_UDP__LISTEN", "127.0.0.1:0"),
            ("CHATD_ADMIN__LISTEN", "127.0.0.1:0"),
        ],
    );
    assert!(
        second
            .stderr
            .contains(&format!("in use by another chatd (pid {new})")),
        "{}",
        second.stderr
    );
}

/// A connection from the load balancer whose PROXY header has not all
/// arrived when an upgrade begins (a retransmission, a slow network) is
/// not a client yet: it is handed over with the part of the header read so
/// far, and the new process, once the header completes, serves it (it used
/// to stay with the old process, which refused it: "server is shutting
/// down").
#[tokio::test]
async fn a_client_whose_proxy_header_is_unfinished_at_an_upgrade_is_served_by_the_new_process() {
    let binary = Binary::copy();
    let mut env = BUSY.to_vec();
    env.push(("CHATD_CHAT__TRUSTED_PROXIES", "127.0.0.1/32"));
    let server = TestServer::spawn_binary(&binary.path, None, &env);
    let mut direct = connect_from("127.0.0.2", &server).await;
    direct.welcome().await;
    let mut proxied = Vec::new();
    for i in 1..=10 {
        let mut c = server.connect().await;
        c.send_raw(format!("PROXY TCP4 10.9.0.{i} 127.0.0.1 4000 8080").as_bytes())
            .await;
        proxied.push(c);
    }
    let done = server.chatctl(&["-o", "json", "upgrade"]).await.json();
    assert_eq!(done["clients"], 1, "{done}");
    for c in &mut proxied {
        c.send_raw(b"\r\n").await;
        let first = c.try_line().await;
        assert!(
            first
                .as_deref()
                .is_some_and(|l| l.starts_with("*** Welcome")),
            "a proxied client was not served: {first:?}"
        );
    }
}

/// A load balancer's connections whose PROXY headers complete one after
/// another throughout an upgrade of a busy server, the freeze included:
/// whichever process reads each header welcomes the client. (Before
/// connections in the front door were part of the freeze, most were
/// refused by the old process: "server is shutting down".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_clients_completing_their_headers_throughout_an_upgrade_are_all_welcomed() {
    let binary = Binary::copy();
    let mut env = BUSY.to_vec();
    env.push(("CHATD_CHAT__TRUSTED_PROXIES", "127.0.0.1/32"));
    let server = TestServer::spawn_binary(&binary.path, None, &env);
    let header = |net: u8, i: usize| {
        format!(
            "PROXY TCP4 10.{net}.{}.{} 127.0.0.1 4000 8080",
            i / 250,
            i % 250 + 1
        )
    };
    // Enough clients that the freeze lasts a while.
    let mut crowd = Vec::new();
    for i in 0..300 {
        let mut c = server.connect().await;
        c.send_raw(format!("{}\r\n", header(8, i)).as_bytes()).await;
        c.welcome().await;
        crowd.push(c);
    }
    let mut late = Vec::new();
    for i in 0..200 {
        let mut c = server.connect().await;
        c.send_raw(header(9, i).as_bytes()).await;
        late.push(c);
    }
    let finishing = tokio::spawn(async move {
        for c in &mut late {
            c.send_raw(b"\r\n").await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        late
    });
    let done = server.chatctl(&["-o", "json", "upgrade"]).await.json();
    assert!(done["clients"].as_u64() >= Some(300), "{done}");
    let mut late = finishing.await.expect("finishing");
    for (i, c) in late.iter_mut().enumerate() {
        let first = c.try_line().await;
        assert!(
            first
                .as_deref()
                .is_some_and(|l| l.starts_with("*** Welcome")),
            "proxied client {i} was not served: {first:?}"
        );
    }
}

/// The handoff peer's side in Python, for the scripts that stand in for a
/// new chatd: the imports, the connection to the old process (from
/// `HANDOFF_FROM_CHATD`), and `frame()` (one JSON message, its descriptors
/// received and kept) and `send(msg)`.
const HANDOFF_PEER: &str = r#"import json, os, socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["HANDOFF_FROM_CHATD"])
def exactly(n):
    got = b""
    while len(got) < n:
        data, _, _, _ = s.recvmsg(n - len(got), socket.CMSG_SPACE(4 * 1024))
        if not data:
            sys.exit(1)
        got += data
    return got
def frame():
    return json.loads(exactly(struct.unpack(">I", exactly(4))[0]))
def send(msg):
    body = json.dumps(msg).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
"#;

/// Stands in for a new chatd that fails once the old one has frozen: it
/// takes the listeners, says it is prepared, waits for the state (sent
/// once everyone is parked) and gives up.
fn fails_after_the_freeze() -> String {
    format!(
        r#"#!/usr/bin/python3
{HANDOFF_PEER}frame()  # Hello
frame()  # Prepare, with the listeners
send("Prepared")
frame()  # State: everyone is parked
send({{"Failed": {{"error": "this build cannot take over"}}}})
print("this build cannot take over", file=sys.stderr, flush=True)
s.recv(1)  # exits once the old process has read why
"#
    )
}

/// A new process that fails after the freeze leaves a connection that was
/// in the front door as it was: its PROXY header, half read before the
/// freeze, completes after it, and the old process welcomes it.
#[tokio::test]
async fn a_failure_after_the_freeze_leaves_a_connection_in_the_front_door_as_it_was() {
    if !Path::new("/usr/bin/python3").exists() {
        skip("/usr/bin/python3 is missing");
        return;
    }
    let binary = Binary::copy();
    let mut env = BUSY.to_vec();
    env.push(("CHATD_CHAT__TRUSTED_PROXIES", "127.0.0.1/32"));
    let server = TestServer::spawn_binary(&binary.path, None, &env);
    let pid = server.pid();
    let mut direct = connect_from("127.0.0.2", &server).await;
    direct.welcome().await;
    let mut proxied = server.connect().await;
    proxied
        .send_raw(b"PROXY TCP4 10.9.0.1 127.0.0.1 4000 8080")
        .await;
    binary.replace_with_script(&fails_after_the_freeze());
    let failed = server.chatctl(&["upgrade"]).await;
    assert_eq!(failed.code, 1, "{failed:#?}");
    assert!(
        failed.stderr.contains("this build cannot take over"),
        "{failed:#?}"
    );
    assert_eq!(server.pid(), pid, "no other process took over");
    proxied.send_raw(b"\r\n").await;
    let nick = proxied.welcome().await;
    proxied.send("made it\n").await;
    direct.expect(&format!("<{nick}> made it")).await;
}

/// Bytes split at the worst places by an upgrade: in a telnet
/// subnegotiation, inside a UTF-8 character, inside a character telnet cut
/// with a command, and a line dribbled a byte at a time throughout. Each
/// line arrives whole, as if nothing happened.
#[tokio::test]
async fn lines_cut_mid_telnet_mid_character_and_dribbled_survive_an_upgrade() {
    let binary = Binary::copy();
    let server = TestServer::spawn_binary(&binary.path, None, BUSY);
    let (mut reader, _) = server.join().await;
    let mut named = Vec::new();
    for nick in ["tel", "utf", "tick", "drip"] {
        let (mut c, _) = server.join().await;
        c.send(&format!("/nick {nick}\n")).await;
        c.expect("You are now known as").await;
        named.push(c);
    }
    let [mut tel, mut utf, mut tick, mut drip] = <[Client; 4]>::try_from(named).ok().expect("four");
    reader.sync().await;
    tel.send_raw(b"hi \xff\xfa\x18").await;
    utf.send_raw(b"caf\xc3").await;
    // ✓ (e2 9c 93) as telnet sends it: 0x9C becomes IAC BRK.
    tick.send_raw(b"ok \xe2").await;
    let dribble = tokio::spawn(async move {
        for b in b"slow and steady\n" {
            drip.send_raw(&[*b]).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drip
    });
    server.signal(rustix::process::Signal::USR2);
    server.wait_logged_times("upgrade: took over", 1).await;
    tel.send_raw(b"\x01\xff\xf0there\n").await;
    utf.send_raw(b"\xa9!\n").await;
    tick.send_raw(b"\xff\xf3\xff\xfd\x06\x93\n").await;
    let _drip = dribble.await.expect("dribbler");
    let mut lines = Vec::new();
    while lines.len() < 4 {
        lines.push(reader.line().await);
    }
    lines.sort();
    assert_eq!(
        lines,
        [
            "<drip> slow and steady",
            "<tel> hi there",
            "<tick> ok ✓",
            "<utf> café!"
        ]
    );
}

/// Clients connecting one after another while an upgrade runs, the freeze
/// included: each is welcomed, by whichever process, and can talk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_throughout_an_upgrade_are_all_welcomed() {
    let binary = Binary::copy();
    let server = TestServer::spawn_binary(&binary.path, None, BUSY);
    // Enough clients that the freeze lasts a while.
    let mut crowd = Vec::new();
    for _ in 0..300 {
        crowd.push(server.join().await.0);
    }
    let chat = server.chat;
    let connecting = tokio::spawn(async move {
        let mut arrived = Vec::new();
        for _ in 0..150 {
            arrived.push(Client::connect(chat).await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        arrived
    });
    let done = server.chatctl(&["-o", "json", "upgrade"]).await.json();
    assert!(done["clients"].as_u64() >= Some(300), "{done}");
    let mut arrived = connecting.await.expect("connecting");
    for c in &mut arrived {
        c.welcome().await;
    }
    let (mut last, nick) = server.join().await;
    last.send("hello\n").await;
    for c in arrived.iter_mut().take(5) {
        c.expect(&format!("<{nick}> hello")).await;
    }
    // Every client is listed once, under an id of its own: none that
    // registered in the old process during the upgrade was given an id
    // the new process handed out again (which overwrote the adopted one).
    let json = server.chatctl(&["ls", "-o", "json"]).await.json();
    let listed = json["clients"].as_array().expect("clients");
    let mut ids: Vec<u64> = listed.iter().filter_map(|c| c["id"].as_u64()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(listed.len(), 300 + 150 + 1, "every client listed");
    assert_eq!(ids.len(), listed.len(), "ids are unique");
}

/// On the client thread, a busy sender is read on its room's grid, with
/// its socket's low-water mark raised; the new process knows nothing of
/// that mark, so the old one lowers it before handing the socket over: a
/// short line sent after the upgrade still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_read_on_the_grid_is_heard_after_an_upgrade() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let binary = Binary::copy();
    let mut env = BUSY.to_vec();
    env.push(("CHATD_SERVER__CLIENT_THREADS", "1"));
    env.push(("CHATD_CHAT__WRITE_COALESCE_MS", "20"));
    env.push(("CHATD_METRICS__LISTEN", "127.0.0.1:0"));
    let server = TestServer::spawn_binary(&binary.path, None, &env);
    let (listener, _) = server.join().await;
    let mut senders = Vec::new();
    for nick in ["one", "two", "three"] {
        let (mut c, _) = server.join().await;
        c.send(&format!("/nick {nick}\n")).await;
        c.expect("You are now known as").await;
        senders.push(c.into_parts());
    }
    let (mut reader, _listener_writer) = listener.into_parts();
    // Three senders, a line each every millisecond for 400 ms: every member
    // is busy, and the senders are read on the grid.
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (r, w) in senders {
        readers.push(r);
        writers.push(w);
    }
    let mut sending = Vec::new();
    for (k, mut w) in writers.into_iter().enumerate() {
        sending.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            for i in 0..400 {
                tick.tick().await;
                w.write_all(format!("x{k}-{i}\n").as_bytes())
                    .await
                    .expect("send");
            }
            w
        }));
    }
    let mut writers = Vec::new();
    for s in sending {
        writers.push(s.await.expect("sender"));
    }
    // Everything sent so far reaches the listener.
    let mut line = String::new();
    let mut seen = 0;
    while seen < 1200 {
        line.clear();
        tokio::time::timeout(WAIT, reader.read_line(&mut line))
            .await
            .expect("a line in time")
            .expect("read");
        if line.contains("> x") {
            seen += 1;
        }
    }
    let body = server.scrape_metrics().await;
    assert!(
        metric(&body, "chatd_grid_reads_total").is_some_and(|n| n > 0),
        "the senders were never read on the grid: {body}"
    );
    server.signal(rustix::process::Signal::USR2);
    server.wait_logged_times("upgrade: took over", 1).await;
    // One short line from each sender, far under the mark.
    for (k, w) in writers.iter_mut().enumerate() {
        w.write_all(format!("after{k}\n").as_bytes())
            .await
            .expect("send");
    }
    let mut after = Vec::new();
    while after.len() < 3 {
        line.clear();
        tokio::time::timeout(WAIT, reader.read_line(&mut line))
            .await
            .expect("the lines sent after the upgrade arrive")
            .expect("read");
        if line.contains("> after") {
            after.push(line.trim_end().to_string());
        }
    }
    after.sort();
    assert_eq!(after, ["<one> after0", "<three> after2", "<two> after1"]);
    drop(readers);
}

/// A new process that takes its time at `point` (`start`: before it even
/// reaches the old process; `freeze`: once every client is parked; `adoption`:
/// once it has every client), after writing its pid to `pidfile`.
fn stalls_at(point: &str, pidfile: &Path) -> String {
    format!(
        r#"#!/usr/bin/python3
import os, time
open({pidfile:?}, "w").write(str(os.getpid()))
if "{point}" == "start":
    time.sleep(3600)
{HANDOFF_PEER}frame()  # Hello
frame()  # Prepare, with the listeners
send("Prepared")
frame()  # State: everyone is parked
if "{point}" == "freeze":
    time.sleep(3600)
while frame() != "End":
    pass
time.sleep(3600)  # adoption: holds every client, never says Ready
"#,
        pidfile = pidfile.display().to_string(),
    )
}

/// Waits until the process `pid` is gone: not running, not a zombie.
async fn gone(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "process {pid} was left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `chatctl upgrade` gives up (its `--timeout`) while the new process stalls
/// at `point`: the upgrade runs on to its own deadline, the call answers
/// that it is still running, a second upgrade is refused meanwhile, and
/// then the old process serves both clients exactly where they were, with
/// the stalled process stopped and reaped.
async fn a_cancelled_upgrade_rolls_back_by_itself(point: &str) {
    if !Path::new("/usr/bin/python3").exists() {
        skip("/usr/bin/python3 is missing");
        return;
    }
    let binary = Binary::copy();
    let mut env = BUSY.to_vec();
    env.push(("CHATD_SERVER__UPGRADE_TIMEOUT_SECS", "4"));
    let server = TestServer::spawn_binary(&binary.path, None, &env);
    let pid = server.pid();
    let (mut a, mut b) = pair(&server).await;
    let pidfile = binary.path.with_file_name("successor.pid");
    binary.replace_with_script(&stalls_at(point, &pidfile));

    let cancelled = server.chatctl(&["--timeout", "1500ms", "upgrade"]).await;
    assert_eq!(cancelled.code, 1, "{cancelled:#?}");
    assert!(cancelled.stderr.contains("still running"), "{cancelled:#?}");
    let second = server.chatctl(&["upgrade"]).await;
    assert_eq!(second.code, 1, "{second:#?}");
    assert!(second.stderr.contains("already in progress"), "{second:#?}");

    let failed = server.wait_logged("upgrade failed; serving on").await;
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not become ready within 4s")),
        "{failed}"
    );
    still_served(&server, pid, &mut a, &mut b).await;
    let successor: u32 = std::fs::read_to_string(&pidfile)
        .expect("the new process started")
        .parse()
        .expect("its pid");
    gone(successor).await;
    // A newcomer is welcomed by the same process.
    let (mut c, c_nick) = server.join().await;
    c.send("and me\n").await;
    a.expect(&format!("<{c_nick}> and me")).await;
}

#[tokio::test]
async fn an_upgrade_cancelled_before_the_new_process_reaches_us_rolls_back() {
    a_cancelled_upgrade_rolls_back_by_itself("start").await;
}

#[tokio::test]
async fn an_upgrade_cancelled_during_the_freeze_rolls_back() {
    a_cancelled_upgrade_rolls_back_by_itself("freeze").await;
}

#[tokio::test]
async fn an_upgrade_cancelled_during_the_adoption_rolls_back() {
    a_cancelled_upgrade_rolls_back_by_itself("adoption").await;
}
