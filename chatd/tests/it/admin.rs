//! The admin API end to end: the real `chatctl` against the real daemon,
//! checked both by what chatctl prints and by what chat clients see.
//!
//! These tests need the `chatctl` binary: run them with
//! `cargo test --workspace`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use rustix::process::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

const ADMIN_TOKEN: &str = "ops-token-0123456789abcdef";
const READ_TOKEN: &str = "read-token-0123456789abcdef";

/// A daemon with one admin and one read-only token.
fn with_tokens(dir: &Path) -> TestServer {
    let config = dir.join("chatd.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\ntokens = [\n  {{ name = \"ops\", token = \"{ADMIN_TOKEN}\", role = \"admin\" }},\n  {{ name = \"monitoring\", token = \"{READ_TOKEN}\", role = \"read\" }},\n]\n"
        ),
    )
    .expect("write config");
    TestServer::spawn(Some(&config), &[])
}

#[tokio::test]
async fn list_clients_client_rooms_and_stats() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, b) = server.join().await;
    alice.expect("joined").await;
    bob.send("/join dev\n").await;
    bob.expect("You are now in dev").await;
    alice.send("hello\n").await;
    alice.sync().await;

    let table = server.chatctl(&["list-clients"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("NICK"),
        "{table:#?}"
    );
    assert_eq!(lines.len(), 3, "{table:#?}");
    assert!(
        lines[1].contains(&a) && lines[1].contains("lobby"),
        "{table:#?}"
    );
    assert!(
        lines[2].contains(&b) && lines[2].contains("dev"),
        "{table:#?}"
    );

    let json = server
        .chatctl(&["ls", "--room", "dev", "-o", "json"])
        .await
        .json();
    let clients = json["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 1, "{json}");
    assert_eq!(clients[0]["nick"], b.as_str());
    assert_eq!(clients[0]["room"], "dev");
    assert!(
        clients[0]["addr"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:"))
    );

    let json = server
        .chatctl(&["ls", "--filter", &a, "-o", "json"])
        .await
        .json();
    assert_eq!(json["clients"][0]["nick"], a.as_str(), "{json}");
    // "hello" and the `/who` of `sync`.
    assert_eq!(json["clients"][0]["lines_in"], 2, "{json}");

    let shown = server.chatctl(&["client", &a]).await;
    assert!(
        shown.ok().contains(&format!("nick:         {a}")),
        "{shown:#?}"
    );
    let json = server.chatctl(&["client", &a, "-o", "json"]).await.json();
    assert_eq!(json["room"], "lobby");
    let missing = server.chatctl(&["client", "nobody"]).await;
    assert_eq!(missing.code, 3, "{missing:#?}");

    let rooms = server.chatctl(&["rooms"]).await;
    let out = rooms.ok();
    assert!(out.starts_with("ROOM"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("dev") && l.contains(" 1 ")),
        "{out}"
    );
    let json = server.chatctl(&["rooms", "-o", "json"]).await.json();
    let names: Vec<&str> = json["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["dev", "lobby"]);
    assert_eq!(json["rooms"][1]["messages"], 1, "{json}");

    let stats = server.chatctl(&["stats"]).await;
    assert!(
        stats.ok().contains("clients:        2 (peak 2)"),
        "{stats:#?}"
    );
    let json = server.chatctl(&["stats", "-o", "json"]).await.json();
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(json["clients"], 2);
    assert_eq!(json["rooms"], 2);
    assert_eq!(json["totals"]["connections"], 2);
    assert!(
        json["totals"]["bytes_out"].as_u64().is_some_and(|n| n > 0),
        "{json}"
    );
}

#[tokio::test]
async fn kick_shows_the_reason_then_closes() {
    let server = TestServer::start();
    let (mut alice, _) = server.join().await;
    let (mut bob, b) = server.join().await;
    alice.expect("joined").await;

    let kicked = server.chatctl(&["kick", &b, "--reason", "spam"]).await;
    assert!(
        kicked.ok().starts_with(&format!("kicked {b} (id ")),
        "{kicked:#?}"
    );
    assert_eq!(bob.until_eof().await, ["*** You were kicked: spam"]);
    let left = alice.expect("left lobby").await;
    assert!(left.ends_with("kicked: spam"), "{left}");

    let (_carol, c) = server.join().await;
    let json = server.chatctl(&["kick", &c, "-o", "json"]).await.json();
    assert_eq!(json["kicked"]["nick"], c.as_str());
    let gone = server.chatctl(&["kick", &b]).await;
    assert_eq!(gone.code, 3, "{gone:#?}");
    let log = server.wait_logged("admin: kick").await;
    assert_eq!(log["by"], "generated", "{log}");
}

#[tokio::test]
async fn broadcast_reaches_everyone_or_one_room() {
    let server = TestServer::start();
    let (mut alice, _) = server.join().await;
    let (mut bob, _) = server.join().await;
    bob.send("/join dev\n").await;
    bob.expect("You are now in dev").await;

    let sent = server.chatctl(&["broadcast", "maintenance at 10:00"]).await;
    assert_eq!(sent.ok(), "delivered to 2 clients\n");
    for c in [&mut alice, &mut bob] {
        c.expect("*** NOTICE: maintenance at 10:00").await;
    }

    let json = server
        .chatctl(&["broadcast", "--room", "dev", "deploy done", "-o", "json"])
        .await
        .json();
    assert_eq!(json["delivered"], 1);
    bob.expect("*** NOTICE: deploy done").await;
    let before = alice.sync().await;
    assert!(
        !before.iter().any(|l| l.contains("deploy done")),
        "{before:?}"
    );

    let nowhere = server
        .chatctl(&["broadcast", "--room", "nowhere", "hi"])
        .await;
    assert_eq!(nowhere.code, 3, "{nowhere:#?}");
}

#[tokio::test]
async fn ban_kicks_refuses_and_survives_a_restart() {
    let state = tempfile::tempdir().expect("tempdir");
    let state_dir = state.path().to_str().expect("utf-8").to_string();
    let env = [("CHATD_SERVER__STATE_DIR", state_dir.as_str())];
    let mut server = TestServer::with_env(&env);
    let (mut alice, _) = server.join().await;

    let banned = server
        .chatctl(&["ban", "127.0.0.0/8", "--for", "1h", "--reason", "flood"])
        .await;
    let said = banned.ok();
    assert!(
        said.starts_with("banned 127.0.0.0/8 (expires in ")
            && said.ends_with("); kicked 1 connected client\n"),
        "{banned:#?}"
    );
    assert_eq!(alice.until_eof().await, ["*** You are banned: flood"]);
    let mut again = server.connect().await;
    assert_eq!(
        again.until_eof().await,
        ["*** error: you are banned: flood"]
    );

    let json = server.chatctl(&["bans", "-o", "json"]).await.json();
    assert_eq!(json["bans"][0]["target"], "127.0.0.0/8", "{json}");
    assert_eq!(json["bans"][0]["reason"], "flood");
    assert!(json["bans"][0]["expires_at"].is_string(), "{json}");
    let mode = std::fs::metadata(state.path().join("bans.json"))
        .expect("bans file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let log = server.wait_logged("admin: ban").await;
    assert_eq!(log["by"], "generated", "{log}");
    assert_eq!(log["ban"], "127.0.0.0/8", "{log}");
    assert_eq!(log["kicked"], 1, "{log}");

    server.stop().await;
    let server = TestServer::with_env(&env);
    let mut refused = server.connect().await;
    assert_eq!(
        refused.until_eof().await,
        ["*** error: you are banned: flood"]
    );
    let table = server.chatctl(&["bans"]).await;
    assert!(
        table
            .ok()
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("127.0.0.0/8")),
        "{table:#?}"
    );

    let lifted = server.chatctl(&["unban", "127.0.0.0/8"]).await;
    assert_eq!(lifted.ok(), "unbanned 127.0.0.0/8\n");
    let (_welcome, _) = server.join().await;
    let log = server.wait_logged("admin: unban").await;
    assert_eq!(log["ban"], "127.0.0.0/8", "{log}");
    let twice = server
        .chatctl(&["unban", "127.0.0.0/8", "-o", "json"])
        .await;
    assert_eq!(twice.code, 3, "{twice:#?}");
    // A usage error, caught before anything is sent.
    let bad = server.chatctl(&["ban", "not-an-address"]).await;
    assert_eq!(bad.code, 2, "{bad:#?}");
    assert!(bad.stderr.contains("expected an IP address"), "{bad:#?}");
}

#[tokio::test]
async fn watch_streams_joins_and_optionally_messages() {
    let server = TestServer::start();
    let mut watch = server
        .chatctl_command(&["watch", "--messages", "-o", "json"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start chatctl watch");
    let mut events = BufReader::new(watch.stdout.take().expect("piped")).lines();
    server.wait_logged("admin: watch started").await;

    let (mut alice, a) = server.join().await;
    alice.send("hi there\n").await;
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no message event within {WAIT:?}; saw {seen:?}"
        );
        let line = tokio::time::timeout(WAIT, events.next_line())
            .await
            .expect("an event in time")
            .expect("read")
            .expect("a line");
        let event: serde_json::Value = serde_json::from_str(&line).expect("one JSON per line");
        assert!(event["at"].is_string(), "{event}");
        let kind = event["type"].as_str().unwrap_or_default().to_string();
        seen.push(kind.clone());
        if kind == "join" {
            assert_eq!(event["nick"], a.as_str());
            assert_eq!(event["room"], "lobby");
        }
        if kind == "message" {
            assert_eq!(event["text"], "hi there", "{event}");
            assert_eq!(event["room"], "lobby");
            break;
        }
    }
    assert_eq!(seen, ["connect", "join", "message"]);
    drop(watch);

    let mut table = server
        .chatctl_command(&["watch"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start chatctl watch");
    let mut lines = BufReader::new(table.stdout.take().expect("piped")).lines();
    let started = server.logged("admin: watch started").len();
    server
        .wait_logged_times("admin: watch started", started + 1)
        .await;
    alice.send("not shown\n").await;
    alice.send("/quit bye\n").await;
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("an event in time")
        .expect("read")
        .expect("a line");
    assert!(line.contains("part"), "{line}");
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("an event in time")
        .expect("read")
        .expect("a line");
    assert!(
        line.contains("disconnect") && line.contains(&a) && line.contains("bye"),
        "{line}"
    );
    let _ = table.kill().await;
}

#[tokio::test]
async fn reload_applies_limits_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("chatd.toml");
    std::fs::write(&config, "[limits]\nmax_clients = 100\n").expect("write");
    let server = TestServer::spawn(Some(&config), &[]);
    let (_alice, _) = server.join().await;

    std::fs::write(
        &config,
        "[limits]\nmax_clients = 1\n[chat]\nbacklog = 100\n",
    )
    .expect("write");
    let json = server.chatctl(&["reload", "-o", "json"]).await.json();
    assert_eq!(json["config_path"], config.to_str().expect("utf-8"));
    assert_eq!(json["applied"], serde_json::json!(["limits.max_clients"]));
    assert_eq!(
        json["restart_required"],
        serde_json::json!(["chat.backlog"])
    );
    let mut full = server.connect().await;
    assert_eq!(
        full.until_eof().await,
        ["*** error: server is full (1 client), try again later"]
    );

    std::fs::write(&config, "[limits]\nmax_clients = -1\n").expect("write");
    let bad = server.chatctl(&["reload"]).await;
    assert_eq!(bad.code, 1, "{bad:#?}");
    assert!(bad.stderr.contains("limits.max_clients"), "{bad:#?}");
    let mut still_full = server.connect().await;
    assert!(still_full.line().await.contains("server is full"));

    // SIGHUP does the same.
    std::fs::write(&config, "[limits]\nmax_clients = 5\n").expect("write");
    server.signal(Signal::HUP);
    let log = server.wait_logged("SIGHUP: configuration reloaded").await;
    assert_eq!(log["applied"], "[\"limits.max_clients\"]", "{log}");
    let (_bob, _) = server.join().await;
    let table = server.chatctl(&["reload"]).await;
    assert_eq!(
        table.ok(),
        format!(
            "reloaded {}\napplied: none\nneed a restart: none\n",
            config.display()
        )
    );
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = with_tokens(dir.path());
    let (_alice, a) = server.join().await;

    // No token at all: the daemon generated none, and none was given.
    let none = server.chatctl(&["ls"]).await;
    assert_eq!(none.code, 5, "{none:#?}");
    let wrong = server
        .chatctl(&["ls", "--token", "wrong-token-0123456789"])
        .await;
    assert_eq!(wrong.code, 5, "{wrong:#?}");

    let read = server.chatctl(&["ls", "--token", READ_TOKEN]).await;
    assert!(read.ok().contains(&a));
    let denied = server
        .chatctl_env(&["kick", &a], &[("CHATCTL_TOKEN", READ_TOKEN)])
        .await;
    assert_eq!(denied.code, 5, "{denied:#?}");
    assert!(denied.stderr.contains("read role"), "{denied:#?}");

    let file = dir.path().join("ops.token");
    std::fs::write(&file, format!("{ADMIN_TOKEN}\n")).expect("write");
    let kicked = server
        .chatctl(&["kick", &a, "--token-file", file.to_str().expect("utf-8")])
        .await;
    kicked.ok();
    let log = server.wait_logged("admin: kick").await;
    assert_eq!(log["by"], "ops", "{log}");
    assert_eq!(log["nick"], a.as_str(), "{log}");
    assert!(
        !server
            .logged("")
            .iter()
            .any(|l| l.to_string().contains(ADMIN_TOKEN)),
        "a token reached the log"
    );

    // Health needs no token.
    let health = server.chatctl(&["health"]).await;
    assert_eq!(health.ok(), "SERVING\n");
}

#[tokio::test]
async fn zero_config_writes_a_private_token_that_chatctl_finds() {
    let server = TestServer::start();
    let admin = server.admin.expect("admin address");
    let token = server
        .runtime_dir()
        .join(format!("admin-127.0.0.1-{}.token", admin.port()));
    let mode = std::fs::metadata(&token)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(server.runtime_dir())
        .expect("runtime dir")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let text = std::fs::read_to_string(&token).expect("read");
    let (secret, recorded) = text.split_once('\n').expect("two lines");
    assert!(secret.trim().len() >= 32, "{text:?}");
    assert_eq!(recorded.trim(), format!("address {admin}"));
    let logged = server.wait_logged("generated one for local use").await;
    assert_eq!(logged["path"], token.to_str().expect("utf-8"));

    let (_alice, a) = server.join().await;
    let (_bob, b) = server.join().await;
    // No flags: endpoint from CHATCTL_ENDPOINT, token from the runtime dir.
    let out = server.chatctl(&["list-clients"]).await;
    let text = out.ok();
    assert!(text.contains(&a) && text.contains(&b), "{text}");
}

#[tokio::test]
async fn the_unix_socket_is_private_and_serves_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    let path = socket.to_str().expect("utf-8");
    let server =
        TestServer::with_env(&[("CHATD_ADMIN__SOCKET", path), ("CHATD_ADMIN__LISTEN", "")]);
    assert_eq!(server.admin, None);
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (_alice, a) = server.join().await;
    let endpoint = format!("unix:{path}");
    let out = server
        .chatctl_env(&["ls"], &[("CHATCTL_ENDPOINT", &endpoint)])
        .await;
    assert!(out.ok().contains(&a), "{out:#?}");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start();
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers without a token")
        .into_inner();
    let reply = replies
        .message()
        .await
        .expect("a reply")
        .expect("not the end");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "chatd.admin.v1.Admin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"
        ]
    );
}

#[tokio::test]
async fn health_turns_not_serving_when_shutdown_begins() {
    let mut server = TestServer::start();
    let json = server.chatctl(&["health", "-o", "json"]).await.json();
    assert_eq!(json["status"], "SERVING");
    // A client that neither reads nor closes keeps the daemon in its
    // shutdown phase for a moment (chatd waits for its EOF).
    let (_lingering, _) = server.join().await;
    server.signal(Signal::TERM);
    server.wait_logged("health is NOT_SERVING").await;
    let health = server.chatctl(&["health"]).await;
    assert!(
        (health.code == 1 && health.stdout == "NOT_SERVING\n") || health.code == 4,
        "{health:#?}"
    );
    assert_eq!(server.wait_exit().await.code(), Some(0));
}

#[tokio::test]
async fn a_public_admin_address_without_a_token_refuses_to_start() {
    let out = run_chatd(
        &[],
        &[
            ("CHATD_ADMIN__LISTEN", "0.0.0.0:0"),
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
            ("CHATD_UDP__ENABLED", "false"),
        ],
    );
    let stderr = out.stderr;
    assert_eq!(out.code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:0")
            && stderr.contains("admin.tokens")
            && stderr.contains("loopback"),
        "{stderr}"
    );
}

#[tokio::test]
async fn admin_address_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = run_chatd(
        &[],
        &[
            ("CHATD_ADMIN__LISTEN", &addr),
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
            ("CHATD_UDP__ENABLED", "false"),
        ],
    );
    let stderr = out.stderr;
    assert_eq!(out.code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&addr) && last.contains("admin.listen") && last.contains("in use"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_tcp_listener_can_require_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed certificate");
    let cert_path = dir.path().join("admin.crt");
    let key_path = dir.path().join("admin.key");
    std::fs::write(&cert_path, key.cert.pem()).expect("write");
    std::fs::write(&key_path, key.signing_key.serialize_pem()).expect("write");
    let server = TestServer::with_env(&[
        ("CHATD_ADMIN__TLS_CERT", cert_path.to_str().expect("utf-8")),
        ("CHATD_ADMIN__TLS_KEY", key_path.to_str().expect("utf-8")),
    ]);
    let (_alice, a) = server.join().await;
    let port = server.admin.expect("admin address").port();
    let https = format!("https://localhost:{port}");
    let ca = cert_path.to_str().expect("utf-8");
    let out = server
        .chatctl_env(&["ls", "--ca-cert", ca], &[("CHATCTL_ENDPOINT", &https)])
        .await;
    assert!(out.ok().contains(&a), "{out:#?}");
    // Plain HTTP/2 is not answered.
    let plain = server.chatctl(&["ls"]).await;
    assert_ne!(plain.code, 0, "{plain:#?}");

    // A key that does not parse stops startup with one line.
    std::fs::write(&key_path, "not a key").expect("write");
    let out = run_chatd(
        &[],
        &[
            ("CHATD_ADMIN__LISTEN", "127.0.0.1:0"),
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
            ("CHATD_UDP__ENABLED", "false"),
            ("CHATD_ADMIN__TLS_CERT", cert_path.to_str().expect("utf-8")),
            ("CHATD_ADMIN__TLS_KEY", key_path.to_str().expect("utf-8")),
        ],
    );
    let stderr = out.stderr;
    assert_eq!(out.code, 1, "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l.contains("admin.tls_key")),
        "{stderr}"
    );
}

/// Runs chatd with `env` on loopback port 0, expecting it to refuse to
/// start within [`WAIT`]; returns its stderr.
async fn refused_start(dir: &Path, env: &[(&str, &std::ffi::OsStr)]) -> String {
    let mut cmd = tokio::process::Command::new(chatd_bin());
    cmd.env("CHATD_ADMIN__LISTEN", "127.0.0.1:0")
        .env("CHATD_CHAT__LISTEN", "127.0.0.1:0")
        .env("CHATD_UDP__ENABLED", "false")
        .env("RUNTIME_DIRECTORY", dir.join("run"))
        .env("CHATD_SERVER__STATE_DIR", dir.join("state"))
        .env("CHATD_LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("chatd refuses to start, and exits, in time")
        .expect("run chatd");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

#[tokio::test]
async fn two_instances_on_one_host_keep_their_own_tokens() {
    let shared = tempfile::tempdir().expect("tempdir");
    let run = shared.path().join("run");
    let run = run.to_str().expect("utf-8");
    let first = TestServer::with_env(&[("RUNTIME_DIRECTORY", run)]);
    let mut second = TestServer::with_env(&[("RUNTIME_DIRECTORY", run)]);
    async fn ctl(server: &TestServer, run: &str) -> Ctl {
        let endpoint = server.endpoint();
        server
            .chatctl_env(
                &["stats"],
                &[("RUNTIME_DIRECTORY", run), ("CHATCTL_ENDPOINT", &endpoint)],
            )
            .await
    }
    ctl(&first, run).await.ok();
    ctl(&second, run).await.ok();
    second.stop().await;
    // The first operator is not locked out by the second instance.
    ctl(&first, run).await.ok();
}

#[tokio::test]
async fn a_discovered_token_is_not_sent_to_another_endpoint() {
    let local = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let other = with_tokens(dir.path());
    // The local instance's token sits where chatctl looks, but the endpoint
    // is another instance: chatctl must send nothing.
    let out = local
        .chatctl_env(&["stats"], &[("CHATCTL_ENDPOINT", &other.endpoint())])
        .await;
    assert_eq!(out.code, 5, "{out:#?}");
    other
        .wait_logged("admin call without a token refused")
        .await;
    assert!(
        other.logged("unknown token").is_empty(),
        "a token was sent to another endpoint"
    );
    // `localhost` is the same endpoint as 127.0.0.1.
    let port = local.admin.expect("admin address").port();
    let localhost = format!("http://localhost:{port}");
    local
        .chatctl_env(&["stats"], &[("CHATCTL_ENDPOINT", &localhost)])
        .await
        .ok();
}

#[tokio::test]
async fn chatctl_pointed_at_the_chat_port_says_so_and_exits_4() {
    let server = TestServer::with_env(&[("CHATD_METRICS__LISTEN", "127.0.0.1:0")]);
    let chat = format!("http://{}", server.chat);
    let out = server
        .chatctl_env(&["ls"], &[("CHATCTL_ENDPOINT", &chat)])
        .await;
    assert_eq!(out.code, 4, "{out:#?}");
    assert!(
        out.stderr.contains("not a chatd admin endpoint") && out.stderr.contains("admin.listen"),
        "{out:#?}"
    );
    assert_eq!(out.stdout, "");
    // Another service's port (an HTTP/1 server) is the same class: exit 4.
    let listening = server.wait_logged("listening").await;
    let metrics = format!("http://{}", listening["metrics"].as_str().expect("metrics"));
    let out = server
        .chatctl_env(&["ls"], &[("CHATCTL_ENDPOINT", &metrics)])
        .await;
    assert_eq!(out.code, 4, "{out:#?}");
}

#[tokio::test]
async fn oversized_admin_text_is_refused_naming_the_limit() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let big = "x".repeat(100 * 1024);
    let out = server.chatctl(&["broadcast", &big]).await;
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.contains("chatd refused the request: ")
            && out.stderr.contains("limit is 1024 bytes"),
        "{out:#?}"
    );
    let reason = "r".repeat(2000);
    let out = server.chatctl(&["kick", &a, "--reason", &reason]).await;
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("limit is 256 bytes"), "{out:#?}");
    let out = server
        .chatctl(&["ban", "192.0.2.1", "--reason", &reason])
        .await;
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stderr.contains("limit is 256 bytes"), "{out:#?}");
    // Alice is still there and saw nothing of it.
    assert!(
        alice.sync().await.iter().all(|l| !l.contains("xxx")),
        "a refused broadcast was delivered"
    );
}

#[tokio::test]
async fn admin_text_reaches_the_audit_log_cleaned() {
    let server = TestServer::start();
    let (_alice, a) = server.join().await;
    let dirty = "hi\r\nadmin: kick by=\"root\"\u{1b}]0;owned\u{7} there";
    server.chatctl(&["broadcast", dirty]).await.ok();
    server.chatctl(&["kick", &a, "--reason", dirty]).await.ok();
    for (message, field) in [("admin: broadcast", "text"), ("admin: kick", "reason")] {
        let record = server.wait_logged(message).await;
        let text = record[field].as_str().expect("a text field");
        assert!(
            !text.chars().any(char::is_control) && !text.contains("owned"),
            "{message}: {text:?}"
        );
    }
}

#[tokio::test]
async fn ban_reasons_from_the_file_are_cleaned_for_banned_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::write(
        state.join("bans.json"),
        r#"{"bans": [{"target": "127.0.0.1", "reason": "spam\r\n*** forged\u001b]0;owned\u0007 line", "created_at": "2025-01-01T00:00:00Z"}]}"#,
    )
    .expect("write bans");
    let server =
        TestServer::with_env(&[("CHATD_SERVER__STATE_DIR", state.to_str().expect("utf-8"))]);
    let mut client = server.connect().await;
    let lines = client.until_eof().await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("*** error: you are banned: spam")
            && !lines[0].chars().any(char::is_control)
            && !lines[0].contains("owned"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_misspelt_ban_field_or_a_dangling_bans_file_stops_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::write(
        state.join("bans.json"),
        r#"{"bans": [{"target": "203.0.113.9", "created_at": "2025-01-01T00:00:00Z", "expire_at": "2025-01-01T01:00:00Z"}]}"#,
    )
    .expect("write bans");
    let stderr = refused_start(dir.path(), &[]).await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("bans.json")
            && stderr.contains("ban #1")
            && stderr.contains("203.0.113.9")
            && stderr.contains("expire_at"),
        "{stderr}"
    );

    std::fs::remove_file(state.join("bans.json")).expect("remove");
    std::os::unix::fs::symlink(dir.path().join("nowhere.json"), state.join("bans.json"))
        .expect("link");
    let stderr = refused_start(dir.path(), &[]).await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("bans.json") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[tokio::test]
async fn directories_others_control_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    // A state directory anyone may write to, with a bans file planted in it.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::write(state.join("bans.json"), r#"{"bans": []}"#).expect("plant");
    let stderr = refused_start(dir.path(), &[]).await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("server.state_dir") && stderr.contains("writable by it alone"),
        "{stderr}"
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");

    // A token directory that is a link someone else made: not followed.
    // (Making a link owned by another user needs root.)
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let real = dir.path().join("real");
    std::fs::create_dir(&real).expect("dir");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("link");
    std::os::unix::fs::lchown(&link, Some(54321), Some(54321)).expect("lchown");
    let stderr = refused_start(dir.path(), &[("RUNTIME_DIRECTORY", link.as_os_str())]).await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("symbolic link owned by uid 54321"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&real).expect("read").count(), 0);
}

#[tokio::test]
async fn made_up_paths_do_not_grow_metric_labels_or_the_log() {
    use tonic::codegen::http;
    use tower::{Service, ServiceExt};

    let server = TestServer::with_env(&[("CHATD_METRICS__LISTEN", "127.0.0.1:0")]);
    let mut channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let long = "p".repeat(4000);
    for i in 0..300 {
        let path = if i == 0 {
            format!("/{long}/x")
        } else {
            format!("/bogus{i}.Service/Method{i}")
        };
        let request = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::empty())
            .expect("request");
        let response =
            tokio::time::timeout(WAIT, channel.ready().await.expect("ready").call(request))
                .await
                .expect("answered in time")
                .expect("an HTTP answer");
        assert_eq!(response.headers()["grpc-status"], "16", "UNAUTHENTICATED");
    }
    let body = server.scrape_metrics().await;
    let labels: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("chatd_admin_rpcs_total{"))
        .collect();
    assert_eq!(
        labels,
        ["chatd_admin_rpcs_total{method=\"unknown\",status=\"UNAUTHENTICATED\"} 300"],
        "{body}"
    );
    let refusals = server.logged("without a token refused");
    assert!(
        !refusals.is_empty() && refusals.len() < 30,
        "{} refusals logged",
        refusals.len()
    );
    assert!(
        refusals
            .iter()
            .all(|r| r["path"].as_str().is_some_and(|p| p.len() <= 96)),
        "{refusals:?}"
    );
}

/// Reads from `stream` until EOF or `within`; true at EOF (or reset).
async fn closed_within(stream: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn admin_connections_are_limited() {
    let server = TestServer::with_env(&[
        ("CHATD_ADMIN__MAX_CONNECTIONS", "3"),
        ("CHATD_ADMIN__HANDSHAKE_TIMEOUT_SECS", "60"),
    ]);
    let admin = server.admin.expect("admin address");
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            tokio::net::TcpStream::connect(admin)
                .await
                .expect("connect"),
        );
    }
    // Past the limit, the connection quiet for longest makes room: the
    // oldest idle one is closed, the new one is served.
    let mut extra = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    assert!(
        closed_within(&mut idle[0], WAIT).await,
        "the oldest idle connection stays open"
    );
    assert!(!closed_within(&mut extra, std::time::Duration::from_millis(200)).await);
    // However many idle connections there are, the operator gets in.
    for _ in 0..10 {
        idle.push(
            tokio::net::TcpStream::connect(admin)
                .await
                .expect("connect"),
        );
    }
    let out = server.chatctl(&["health"]).await;
    assert_eq!(out.code, 0, "{out:#?}");
}

#[tokio::test]
async fn idle_admin_connections_are_closed_but_a_watch_is_not() {
    let server = TestServer::with_env(&[
        ("CHATD_ADMIN__HANDSHAKE_TIMEOUT_SECS", "1"),
        ("CHATD_ADMIN__IDLE_TIMEOUT_SECS", "1"),
    ]);
    let admin = server.admin.expect("admin address");
    let mut silent = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    assert!(
        closed_within(&mut silent, WAIT).await,
        "a silent connection stays open"
    );

    // A watch in progress keeps its connection however quiet it is.
    let mut watch = server
        .chatctl_command(&["watch"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start watch");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    server.wait_logged("admin: watch started").await;
    // Quiet for well past the idle timeout, then an event.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (_second, b) = server.join().await;
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("an event in time")
            .expect("read")
            .expect("the watch is still running");
        if line.contains(&b) {
            break;
        }
    }
    let _ = watch.kill().await;
}

#[tokio::test]
async fn tls_that_cannot_be_set_up_never_serves_plaintext() {
    // A certificate with the key of another: TLS cannot work with these.
    let dir = tempfile::tempdir().expect("tempdir");
    let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert_path = dir.path().join("admin.crt");
    let key_path = dir.path().join("admin.key");
    std::fs::write(&cert_path, one.cert.pem()).expect("write");
    std::fs::write(&key_path, other.signing_key.serialize_pem()).expect("write");
    let stderr = refused_start(
        dir.path(),
        &[
            ("CHATD_ADMIN__TLS_CERT", cert_path.as_os_str()),
            ("CHATD_ADMIN__TLS_KEY", key_path.as_os_str()),
        ],
    )
    .await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("admin.tls_cert"), "{stderr}");
}

#[tokio::test]
async fn a_client_addressed_on_another_node_is_not_this_nodes_client() {
    // A single node: its clients have ids, but no node is named `web2`.
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let id = server.chatctl(&["client", &a, "-o", "json"]).await.json()["id"]
        .as_u64()
        .expect("an id");
    let huge = "n".repeat(100_000);
    for node in ["web2", "ünïcødé", "a\u{1b}[2Jb", &huge] {
        let addressed = format!("{node}:{id}");
        let looked_up = server.chatctl(&["client", &addressed]).await;
        assert_ne!(looked_up.code, 0, "{node:.20}: {looked_up:#?}");
        assert!(!looked_up.stdout.contains(&a), "{looked_up:#?}");
        let kicked = server.chatctl(&["kick", &addressed]).await;
        assert_ne!(kicked.code, 0, "{node:.20}: {kicked:#?}");
        assert!(
            kicked.stderr.len() < 1024,
            "the refusal echoes the node whole: {} bytes",
            kicked.stderr.len()
        );
    }
    // Alice was never the one addressed: still here, still chatting.
    alice.send("/who\n").await;
    alice.expect(&a).await;
    // Her own node, unnamed, is where her id means her.
    server.chatctl(&["client", &id.to_string()]).await.ok();
}

/// The generated token's files go with the process that wrote them: a
/// clean stop removes them, and a start removes those a killed chatd left
/// for an address nothing serves, keeping one whose address still answers.
#[tokio::test]
async fn token_files_are_removed_on_exit_and_stale_ones_at_start() {
    let run = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let stale_addr = closed.local_addr().expect("addr");
    drop(closed);
    let live = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let live_addr = live.local_addr().expect("addr");
    let plant = |addr: std::net::SocketAddr| {
        let path = run
            .path()
            .join(format!("admin-{}-{}.token", addr.ip(), addr.port()));
        std::fs::write(&path, format!("secret\naddress {addr}\n")).expect("plant");
        path
    };
    let stale = plant(stale_addr);
    let kept = plant(live_addr);

    let runtime = run.path().to_str().expect("utf-8");
    let mut server = TestServer::with_env(&[("RUNTIME_DIRECTORY", runtime)]);
    assert!(!stale.exists(), "the stale token file is removed at start");
    assert!(kept.exists(), "a token file whose address answers is kept");
    let admin: std::net::SocketAddr = server.endpoint()["http://".len()..]
        .parse()
        .expect("admin address");
    let ours = run
        .path()
        .join(format!("admin-{}-{}.token", admin.ip(), admin.port()));
    assert!(ours.exists(), "chatd wrote its token for chatctl");
    server.stop().await;
    assert!(!ours.exists(), "a clean stop removes the token file");
    assert!(kept.exists());
}

/// chatctl's answers say what happened in words, with the documented exit
/// codes: a bad ban target is a usage error (2) caught before anything is
/// sent; a refusal reads as one, not as a gRPC code's name; an https://
/// endpoint on the plain admin port is told to use http:// (4); an unknown
/// health service is "not found" (3).
#[tokio::test]
async fn chatctl_answers_in_words_with_the_documented_exit_codes() {
    let server = TestServer::start();
    let bad = server.chatctl(&["ban", "not-an-ip"]).await;
    assert_eq!(bad.code, 2, "{bad:#?}");
    assert!(bad.stderr.contains("expected an IP address"), "{bad:#?}");

    let huge = "x".repeat(5000);
    let refused = server.chatctl(&["broadcast", &huge]).await;
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(
        refused.stderr.contains("chatd refused the request: "),
        "{refused:#?}"
    );
    assert!(!refused.stderr.contains("InvalidArgument"), "{refused:#?}");

    let https = server.endpoint().replacen("http://", "https://", 1);
    let tls = server.chatctl(&["--endpoint", &https, "stats"]).await;
    assert_eq!(tls.code, 4, "{tls:#?}");
    assert!(tls.stderr.contains("does not speak TLS"), "{tls:#?}");
    assert!(tls.stderr.contains("use http://"), "{tls:#?}");
    assert!(!tls.stderr.contains("InvalidContentType"), "{tls:#?}");

    let nosuch = server.chatctl(&["health", "--service", "nosuch"]).await;
    assert_eq!(nosuch.code, 3, "{nosuch:#?}");
    assert!(nosuch.stderr.contains("not found"), "{nosuch:#?}");
}

/// The README's `list-clients` sample has the columns chatctl prints.
#[tokio::test]
async fn the_readme_shows_list_clients_as_chatctl_prints_it() {
    let server = TestServer::start();
    let (_alice, _) = server.join().await;
    let table = server.chatctl(&["list-clients"]).await;
    let header = table
        .ok()
        .lines()
        .next()
        .expect("a header")
        .trim_end()
        .to_string();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    assert!(
        readme.lines().any(|l| l.trim_end() == header),
        "README.md lacks the header `{header}`"
    );
}
