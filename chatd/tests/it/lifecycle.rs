//! Starting, configuring and stopping the daemon.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use rustix::process::Signal;

use crate::support::*;

fn chatd(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let run = run_chatd(args, env);
    (run.code, run.stdout, run.stderr)
}

#[tokio::test]
async fn sigterm_tells_every_client_and_exits_zero() {
    let mut server = TestServer::start();
    let (mut alice, _) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    server.signal(Signal::TERM);
    assert_eq!(
        alice.until_eof().await,
        vec!["*** Server is shutting down."]
    );
    assert_eq!(bob.until_eof().await, vec!["*** Server is shutting down."]);
    let status = server.wait_exit().await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn shutdown_flushes_what_clients_are_owed() {
    let mut server = TestServer::with_env(&[("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0")]);
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    let block: String = (0..500).map(|i| format!("line {i}\n")).collect();
    alice.send(&block).await;
    alice.sync().await;
    server.signal(Signal::INT);
    let lines = bob.until_eof().await;
    let said: Vec<&String> = lines.iter().filter(|l| l.starts_with('<')).collect();
    assert_eq!(said.len(), 500);
    assert_eq!(said[499], &format!("<{a}> line 499"));
    assert_eq!(
        lines.last().map(String::as_str),
        Some("*** Server is shutting down.")
    );
    assert_eq!(server.wait_exit().await.code(), Some(0));
}

#[tokio::test]
async fn bad_config_values_stop_startup_with_one_clear_line() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "CHATD_LIMITS__MAX_LINE_BYTES",
            "-5",
            &["limits.max_line_bytes", "-5", "64..=65536"],
        ),
        (
            "CHATD_CHAT__LISTEN",
            "localhost",
            &["chat.listen", "localhost", "IP:PORT"],
        ),
        (
            "CHATD_LOG__FORMAT",
            "xml",
            &["log.format", "xml", "\"text\" or \"json\""],
        ),
        (
            "CHATD_LIMITS__MAX_CLIENTS",
            "lots",
            &["max_clients", "lots"],
        ),
        ("CHATD_LIMITS__NOPE", "1", &["nope"]),
        // EnvFilter reads these as target names: all logging would be off.
        (
            "CHATD_LOG__LEVEL",
            "inf",
            &["log.level", "\"inf\"", "debug"],
        ),
        (
            "CHATD_LOG__LEVEL",
            "verbose",
            &["log.level", "verbose", "trace"],
        ),
        (
            "CHATD_LOG__LEVEL",
            "info,chatd=loud",
            &["log.level", "loud"],
        ),
    ];
    for (key, value, needles) in cases {
        let (code, _, stderr) = chatd(&["--check-config"], &[(key, value)]);
        assert_eq!(code, 1, "{key}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for n in *needles {
            assert!(stderr.contains(n), "{key}={value}: {stderr:?} lacks {n:?}");
        }
    }
}

#[tokio::test]
async fn config_file_unknown_keys_and_missing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chatd.toml");
    std::fs::write(&path, "[limits]\nmax_line_byte = 100\n").expect("write");
    let (code, _, stderr) = chatd(
        &["--check-config", "--config", path.to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("max_line_byte") && stderr.contains("max_line_bytes"),
        "{stderr}"
    );

    let (code, _, stderr) = chatd(&["--config", "/nonexistent/chatd.toml"], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/chatd.toml"), "{stderr}");

    std::fs::write(
        &path,
        "[server]\nname = \"test-net\"\n[limits]\nmax_line_bytes = 100\n",
    )
    .expect("write");
    let (code, stdout, _) = chatd(
        &["--check-config", "--config", path.to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("configuration OK"), "{stdout}");
    let (code, stdout, _) = chatd(
        &["--print-config", "--config", path.to_str().expect("utf-8")],
        &[("CHATD_CHAT__HISTORY", "7")],
    );
    assert_eq!(code, 0);
    let printed: toml::Table = stdout.parse().expect("printed config is TOML");
    assert_eq!(printed["server"]["name"].as_str(), Some("test-net"));
    assert_eq!(printed["limits"]["max_line_bytes"].as_integer(), Some(100));
    assert_eq!(printed["chat"]["history"].as_integer(), Some(7));
    assert_eq!(printed["chat"]["listen"].as_str(), Some("0.0.0.0:8080"));
}

#[tokio::test]
async fn the_committed_example_config_is_valid_and_complete() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/chatd.toml");
    let (code, _, stderr) = chatd(&["--check-config", "--config", path], &[]);
    assert_eq!(code, 0, "{stderr}");
    // Every key chatd knows appears in the example with its default.
    let (_, defaults, _) = chatd(&["--print-config", "--config", "/dev/null"], &[]);
    let example: toml::Table = std::fs::read_to_string(path)
        .expect("read")
        .parse()
        .expect("toml");
    let defaults: toml::Table = defaults.parse().expect("toml");
    assert_eq!(
        example, defaults,
        "config/chatd.toml differs from the built-in defaults"
    );
}

#[tokio::test]
async fn address_in_use_is_one_clear_line() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, _, stderr) = chatd(
        &[],
        &[
            ("CHATD_CHAT__LISTEN", &addr),
            ("CHATD_UDP__LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(code, 1);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&addr) && last.contains("chat.listen") && last.contains("in use"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[tokio::test]
async fn a_connection_while_out_of_descriptors_is_told_at_once_and_the_loop_survives() {
    use rustix::process::{Pid, Resource, Rlimit, prlimit};
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    // Out of descriptors for a reason its seats cannot see (here, the limit
    // lowered under the running process): its lowest free descriptor is
    // the limit, so the next accept fails with EMFILE.
    let pid = Pid::from_raw(server.pid() as i32).expect("pid");
    let open: std::collections::HashSet<u64> =
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .expect("proc fd")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
    let lowest_free = (0..).find(|fd| !open.contains(fd)).expect("a free fd");
    let hard = rustix::process::getrlimit(Resource::Nofile).maximum;
    let lowered = Rlimit {
        current: Some(lowest_free),
        maximum: hard,
    };
    let before = prlimit(Some(pid), Resource::Nofile, lowered).expect("lower the limit");
    let mut late = server.connect().await;
    let line = late.line().await;
    assert!(line.starts_with("*** error: server is full"), "{line:?}");
    assert_eq!(late.try_line().await, None);
    server.wait_logged("out of file descriptors").await;
    // Clients already in are served meanwhile.
    alice.send("still alive\n").await;
    assert_eq!(
        bob.expect("still alive").await,
        format!("<{a}> still alive")
    );
    // Once descriptors are there again, new clients are served.
    prlimit(Some(pid), Resource::Nofile, before).expect("restore the limit");
    let (mut carol, _) = server.join().await;
    carol.send("me too\n").await;
    bob.expect("me too").await;
}

#[tokio::test]
async fn print_config_never_shows_token_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chatd.toml");
    std::fs::write(
        &path,
        "[[admin.tokens]]\nname = \"ops\"\ntoken = \"s3cret-s3cret-s3cret-s3cret\"\nrole = \"admin\"\n",
    )
    .expect("write");
    let (code, stdout, stderr) = chatd(
        &["--print-config", "--config", path.to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("s3cret"), "{stdout}");
    let printed: toml::Table = stdout.parse().expect("printed config is TOML");
    assert_eq!(printed["admin"]["tokens"][0]["name"].as_str(), Some("ops"));
    assert_eq!(
        printed["admin"]["tokens"][0]["token"].as_str(),
        Some("<redacted>")
    );
}

/// chatd logging in text form to a pipe (as under a supervisor that is not
/// systemd, or `2> file`), its lines read as they come.
struct TextLog {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl TextLog {
    fn start() -> TextLog {
        let mut cmd = Command::new(chatd_bin());
        let dir = TestServer::prepare(
            &mut cmd,
            None,
            &[
                ("CHATD_LOG__FORMAT", "text"),
                ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
            ],
        );
        let mut child = cmd.spawn().expect("start chatd");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        TextLog {
            child,
            lines,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// The next line containing `needle`.
    fn next(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no log line with {needle:?}; saw {:#?}", self.seen));
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }
}

impl Drop for TextLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Off a terminal the text log has no colour codes, and a connection's
/// lines name its current nick once, however often it changed (the default
/// formatter appended every new value).
#[tokio::test]
async fn the_text_log_is_plain_and_names_the_current_nick_once() {
    let mut log = TextLog::start();
    let listening = log.next("listening");
    let chat: std::net::SocketAddr = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("chat="))
        .and_then(|a| a.split(' ').next()?.trim_matches('"').parse().ok())
        .expect("chat address");
    let mut client = Client::connect(chat).await;
    client.welcome().await;
    for i in 0..50 {
        client.send(&format!("/nick name{i}\n")).await;
        client.expect("You are now known as").await;
    }
    client.send("/join after\n").await;
    client.expect("You are now in after").await;
    let joined = log.next("joined room=after");
    assert_eq!(joined.matches("nick=").count(), 1, "{joined}");
    assert!(joined.contains("nick=name49"), "{joined}");
    assert!(joined.len() < 400, "{} bytes: {joined}", joined.len());
    assert!(
        !log.seen.iter().any(|l| l.contains('\x1b')),
        "{:?}",
        log.seen
    );
}

/// `unshare … sh -c SCRIPT sh PROGRAM`: PROGRAM (and the arguments added to
/// the command later) run in a private mount namespace where /etc is an
/// overlay holding `broken` as /etc/chatd/chatd.toml. The machine's /etc is
/// not touched.
fn with_system_config(dir: &Path, broken: &str, program: &str) -> Command {
    std::fs::create_dir_all(dir).expect("mkdir");
    let file = dir.join("system.toml");
    std::fs::write(&file, broken).expect("write");
    let overlay = dir.join("overlay");
    std::fs::create_dir(&overlay).expect("mkdir");
    let script = format!(
        "set -e
         mount -t tmpfs tmpfs '{o}'
         mkdir '{o}/upper' '{o}/work'
         mount -t overlay overlay -o lowerdir=/etc,upperdir='{o}/upper',workdir='{o}/work' /etc
         mkdir -p /etc/chatd
         cp '{f}' /etc/chatd/chatd.toml
         exec \"$@\"",
        o = overlay.display(),
        f = file.display(),
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(program);
    cmd
}

#[tokio::test]
async fn test_daemons_never_read_the_system_config_file() {
    // The README's install step puts a config at /etc/chatd/chatd.toml, and
    // chatd reads it when no --config is given. Here that file is broken;
    // the suite's daemons must not notice.
    if !can_unshare() {
        eprintln!("skipped: cannot create a mount namespace here (needs root)");
        return;
    }
    let broken = "[limits]\nmax_line_bytes = \"lots\"\nthis is not TOML\n";
    let dir = tempfile::tempdir().expect("tempdir");

    // The file is where chatd looks by default: without --no-config, chatd
    // reads it and refuses to start.
    let mut cmd = with_system_config(&dir.path().join("a"), broken, chatd_bin());
    isolate(&mut cmd, dir.path());
    cmd.arg("--check-config");
    let out = output_within(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("this is not TOML"), "{stderr}");

    // --no-config skips it.
    let mut cmd = with_system_config(&dir.path().join("b"), broken, chatd_bin());
    isolate(&mut cmd, dir.path());
    cmd.args(["--no-config", "--check-config"]);
    let out = output_within(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("built-in defaults"), "{stdout}");

    // The same machine, the way every test starts chatd.
    let mut cmd = with_system_config(&dir.path().join("c"), broken, chatd_bin());
    let env = TestServer::prepare(&mut cmd, None, &[]);
    let server = TestServer::launch(cmd, env);
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.send("hello\n").await;
    assert_eq!(bob.expect("hello").await, format!("<{a}> hello"));
    let listening = server.wait_logged("listening").await;
    assert_eq!(listening["config"], "built-in defaults", "{listening}");
}

/// A second chatd started by mistake on a running one's state directory
/// (other ports) would keep bans of its own in the same `bans.json`, each
/// write losing the other's: it refuses to start, naming the directory and
/// the process that uses it; the first serves on, its bans kept.
#[tokio::test]
async fn a_second_chatd_on_the_same_state_dir_refuses_to_start() {
    let first = TestServer::start();
    first.chatctl(&["ban", "192.0.2.1"]).await.ok();
    let state = first.dir.path().join("state");
    let state = state.to_str().expect("utf-8");
    let second = run_chatd(
        &[],
        &[
            ("CHATD_SERVER__STATE_DIR", state),
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
            ("CHATD_UDP__LISTEN", "127.0.0.1:0"),
            ("CHATD_ADMIN__LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(second.code, 1, "{}", second.stderr);
    assert!(
        second.stderr.contains(state)
            && second
                .stderr
                .contains(&format!("in use by another chatd (pid {})", first.pid())),
        "{}",
        second.stderr
    );
    let bans = std::fs::read_to_string(first.dir.path().join("state/bans.json")).expect("bans");
    assert!(bans.contains("192.0.2.1"), "{bans}");
    first.chatctl(&["bans"]).await.ok();
}

/// chatd on its own ports with `state` as its state directory, run to its
/// end (a refusal, here).
fn on_state_dir(state: &Path) -> Run {
    run_chatd(
        &[],
        &[
            ("CHATD_SERVER__STATE_DIR", state.to_str().expect("utf-8")),
            ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
            ("CHATD_UDP__ENABLED", "false"),
            ("CHATD_ADMIN__LISTEN", "127.0.0.1:0"),
        ],
    )
}

/// A state directory someone else controls (as the fallback under a shared
/// `/tmp` could be, made in advance by another user) is refused before
/// chatd creates anything in it: no lock file of ours lands there.
#[tokio::test]
async fn a_state_dir_someone_else_controls_is_refused_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("chatd-state");
    std::fs::create_dir(&state).expect("state dir");
    if rustix::process::geteuid().is_root() {
        // Another user's directory, as a planted fallback would be.
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).expect("chown");
    } else {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let run = on_state_dir(&state);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("refusing"), "{}", run.stderr);
    let left: Vec<_> = std::fs::read_dir(&state)
        .expect("read the state dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        left.is_empty(),
        "chatd created {left:?} in a directory it refused"
    );
}

/// A lock file held by a process that wrote escape sequences into it: the
/// refusal names no pid rather than sending those bytes to the operator's
/// terminal.
#[tokio::test]
async fn a_planted_lock_file_reaches_the_terminal_clean() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let lock = state.join("chatd.lock");
    std::fs::write(&lock, "\x1b]0;owned\x07\x1b[2J\x1b[31m4242\n").expect("plant");
    let held = std::fs::File::open(&lock).expect("open the lock");
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .expect("hold the lock");
    let run = on_state_dir(&state);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("in use by another chatd (pid unknown)"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains('\x1b') && !run.stderr.contains('\x07'),
        "raw bytes from the file reached the terminal: {:?}",
        run.stderr
    );
}
