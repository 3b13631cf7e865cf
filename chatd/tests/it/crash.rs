//! Crash and restart: SIGKILL at the worst moments, then start again at once
//! on the same ports; and a state directory with no space left.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::support::*;

/// Environment for a daemon on fixed addresses with its state in `state`.
fn pinned(state: &Path, ports: Option<&TestServer>) -> Vec<(String, String)> {
    let mut env = vec![(
        "CHATD_SERVER__STATE_DIR".to_string(),
        state.to_str().expect("utf-8").to_string(),
    )];
    if let Some(s) = ports {
        env.push(("CHATD_CHAT__LISTEN".into(), s.chat.to_string()));
        env.push((
            "CHATD_ADMIN__LISTEN".into(),
            s.admin.expect("admin").to_string(),
        ));
        env.push(("CHATD_UDP__LISTEN".into(), s.udp.expect("udp").to_string()));
    }
    env
}

fn start(env: &[(String, String)]) -> TestServer {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::with_env(&env)
}

/// Files in the state directory other than the bans file: a partial or
/// temporary file a crash left behind.
fn leftovers(state: &Path) -> Vec<String> {
    std::fs::read_dir(state)
        .expect("state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().to_string())
        // The lock file stays by design: the lock is the kernel's, on it.
        .filter(|n| n != "bans.json" && n != "chatd.lock")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_traffic_and_ban_writes_keeps_every_ban_and_rebinds_at_once() {
    let state = tempfile::tempdir().expect("tempdir");
    let server = start(&pinned(state.path(), None));
    // Heavy traffic: four talkers sending as fast as the flood limit lets
    // them, and a reader.
    let mut talkers = Vec::new();
    for _ in 0..4 {
        let (c, _) = server.join().await;
        talkers.push(c);
    }
    let (mut reader, _) = server.join().await;
    let traffic: Vec<_> = talkers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for i in 0.. {
                    let burst: String = (0..10).map(|j| format!("{i}-{j} traffic\n")).collect();
                    if !c.try_send(burst.as_bytes()).await {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    reader.expect("traffic").await;
    // Bans written one after another through the real chatctl; the daemon
    // is killed after the tenth is confirmed, with more in flight.
    let (confirmed_tx, mut confirmed_rx) = tokio::sync::mpsc::unbounded_channel();
    let commands: Vec<_> = (1..=30)
        .map(|i| {
            server.chatctl_command(
                &["ban", &format!("192.0.2.{i}"), "--reason", "crash test"],
                &[],
            )
        })
        .collect();
    let banning = tokio::spawn(async move {
        for (i, mut cmd) in commands.into_iter().enumerate() {
            let ok = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ok {
                let _ = confirmed_tx.send(i + 1);
            }
        }
    });
    let mut confirmed = Vec::new();
    while confirmed.len() < 10 {
        confirmed.push(
            tokio::time::timeout(WAIT, confirmed_rx.recv())
                .await
                .expect("a ban in time")
                .expect("banning"),
        );
    }
    server.signal(Signal::KILL);
    let killed = Instant::now();
    tokio::time::timeout(WAIT * 3, banning)
        .await
        .expect("chatctl gives up on a dead daemon")
        .expect("banning");
    while let Ok(i) = confirmed_rx.try_recv() {
        confirmed.push(i);
    }
    for t in traffic {
        t.abort();
    }
    assert!(reader.until_eof().await.len() < 100_000);

    // Start again at once on the same ports.
    let mut server = server;
    server.wait_exit().await;
    let again = start(&pinned(state.path(), Some(&server)));
    let restarted = killed.elapsed();
    assert_eq!(again.chat, server.chat, "the chat port rebinds");
    assert_eq!(
        leftovers(state.path()),
        Vec::<String>::new(),
        "partial file left"
    );
    let json = again.chatctl(&["bans", "-o", "json"]).await.json();
    let listed: Vec<String> = json["bans"]
        .as_array()
        .expect("bans")
        .iter()
        .map(|b| b["target"].as_str().unwrap_or_default().to_string())
        .collect();
    for i in &confirmed {
        assert!(
            listed.contains(&format!("192.0.2.{i}")),
            "confirmed ban 192.0.2.{i} lost: {listed:?}"
        );
    }
    // Clients reconnect and talk.
    let (mut a, _) = again.join().await;
    let (mut b, b_nick) = again.join().await;
    b.send("back again\n").await;
    assert_eq!(
        a.expect("back again").await,
        format!("<{b_nick}> back again")
    );
    println!(
        "crash: killed after {} confirmed bans ({} listed after restart), serving again {restarted:?} after the kill",
        confirmed.len(),
        listed.len()
    );
}

#[tokio::test]
async fn sigkill_during_a_reload_restarts_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("chatd.toml");
    let text = "[chat]\nhistory = 7\n[limits]\nflood_burst = 30\n";
    std::fs::write(&config, text).expect("write");
    let state = dir.path().join("state");
    let env = pinned(&state, None);
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut server = TestServer::spawn(Some(&config), &env_ref);
    let mut timings = Vec::new();
    for round in 0..3 {
        let (mut c, _) = server.join().await;
        c.send("before the reload\n").await;
        server.signal(Signal::HUP);
        // Kill at once, and a little later, while the reload may be running.
        tokio::time::sleep(Duration::from_millis(round * 5)).await;
        server.signal(Signal::KILL);
        server.wait_exit().await;
        let t = Instant::now();
        let env = pinned(&state, Some(&server));
        let env_ref: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let next = TestServer::spawn(Some(&config), &env_ref);
        timings.push(t.elapsed());
        assert_eq!(next.chat, server.chat);
        server = next;
        assert_eq!(std::fs::read_to_string(&config).expect("config"), text);
        let (mut a, _) = server.join().await;
        a.sync().await;
    }
    println!("reload crash: 3 kills during SIGHUP, restarts took {timings:?}");
}

#[tokio::test]
async fn a_full_state_disk_refuses_a_ban_clearly_and_chat_goes_on() {
    let can_unshare = Command::new("unshare")
        .args(["--mount", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !can_unshare {
        eprintln!("skipped: cannot create a mount namespace here (needs root)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    // A 64 KiB tmpfs over the state directory, filled before chatd starts,
    // in a mount namespace of chatd's own.
    let script = format!(
        "mount -t tmpfs -o size=64k,mode=0700 tmpfs '{s}' && \
         (dd if=/dev/zero of='{s}/fill' bs=4k 2>/dev/null; true) && exec '{}'",
        chatd_bin(),
        s = state.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let state_str = state.to_str().expect("utf-8").to_string();
    let run = TestServer::prepare(&mut cmd, None, &[("CHATD_SERVER__STATE_DIR", &state_str)]);
    let server = TestServer::launch(cmd, run);
    let (mut alice, _) = server.join().await;
    let (mut bob, bob_nick) = server.join().await;
    let refused = server
        .chatctl(&["ban", "192.0.2.7", "--reason", "disk"])
        .await;
    assert_ne!(
        refused.code, 0,
        "a ban that cannot be saved is refused: {refused:#?}"
    );
    assert!(
        refused.stderr.to_lowercase().contains("space")
            || refused.stderr.to_lowercase().contains("disk"),
        "the error says the disk is full: {}",
        refused.stderr
    );
    let bans = server.chatctl(&["bans", "-o", "json"]).await.json();
    assert_eq!(bans["bans"].as_array().map(Vec::len), Some(0), "{bans}");
    bob.send("still talking\n").await;
    assert_eq!(
        alice.expect("still talking").await,
        format!("<{bob_nick}> still talking")
    );
    println!("full disk: ban refused with: {}", refused.stderr.trim());
}
