//! Test helpers: the real daemon on port 0, and a client that talks to it
//! the way `nc` would.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The value of the unlabelled metric `name` on a metrics page.
pub fn metric(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Says, in one line, that a test is skipped because `why` (a missing tool,
/// no namespace); under `REQUIRE_TEST_TOOLS=1`, where everything was
/// installed (`.ci/run`), fails instead.
pub fn skip(why: &str) {
    let required = std::env::var("REQUIRE_TEST_TOOLS").is_ok_and(|v| v == "1");
    assert!(!required, "{why}, and REQUIRE_TEST_TOOLS=1");
    eprintln!("skipped: {why}");
}

pub fn chatd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_chatd")
}

/// The only variables a test's chatd or chatctl inherits from the test's
/// own environment. Everything else either binary reads (`CHATD_*`,
/// `CHATCTL_*`, `OTEL_*`, `NOTIFY_SOCKET`, `WATCHDOG_*`, `JOURNAL_STREAM`,
/// `RUNTIME_DIRECTORY`, `STATE_DIRECTORY`, `XDG_*`, `HOME`, `RUST_LOG`) is
/// dropped, so neither a developer's shell nor a CI runner running under
/// systemd changes what a test sees; tests set what they need explicitly.
const INHERITED: &[&str] = &["PATH", "RUST_BACKTRACE", "LLVM_PROFILE_FILE"];

/// The inherited variables that are set here.
fn inherited_env() -> Vec<(&'static str, OsString)> {
    INHERITED
        .iter()
        .filter_map(|&name| std::env::var_os(name).map(|v| (name, v)))
        .collect()
}

/// Clears `cmd`'s environment down to [`INHERITED`] and points every
/// directory chatd and chatctl would look in (runtime, state, home) into
/// `dir`, never at the machine's real ones.
pub fn isolate(cmd: &mut Command, dir: &Path) {
    cmd.env_clear()
        .envs(inherited_env())
        .env("RUNTIME_DIRECTORY", dir.join("run"))
        .env("XDG_RUNTIME_DIR", dir.join("xdg"))
        .env("HOME", dir.join("home"))
        // systemd's variable, so that `server.state_dir` keeps its default
        // ("") and `--print-config` shows the defaults.
        .env("STATE_DIRECTORY", dir.join("state"));
}

/// Runs `cmd` to completion, failing the test if it takes longer than
/// [`WAIT`] (the child is killed then, so a daemon that should have refused
/// to start cannot hang the suite).
pub fn output_within(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(output) => output.expect("collect the output"),
        Err(_) => {
            // The waiting thread still owns the unreaped child: the pid
            // cannot have been reused.
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            panic!("{cmd:?} did not finish within {WAIT:?}");
        }
    }
}

/// Whether this test process may create a mount namespace (root in CI).
pub fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--mount", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What one short-lived `chatd` run (`--check-config`, a refused start)
/// printed, and how it exited.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs chatd with `args` and `env` in an isolated environment, reading no
/// config file unless `args` names one (`--no-config` is added otherwise).
pub fn run_chatd(args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(chatd_bin());
    isolate(&mut cmd, dir.path());
    if !args.iter().any(|a| *a == "--config" || *a == "-c") {
        cmd.arg("--no-config");
    }
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(cmd);
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `chatd` process, killed on drop.
pub struct TestServer {
    child: Child,
    pub chat: SocketAddr,
    pub udp: Option<SocketAddr>,
    /// The admin API's TCP address, when it has one.
    pub admin: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The "listening" record: every address, space-separated per listener.
    pub listening: serde_json::Value,
    /// Holds `run/` (the generated admin token) and `state/` (bans) unless
    /// the test points them elsewhere.
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// The daemon on its defaults, on loopback port 0, with the per-address
    /// limits (clients, connection rate) lifted: every test client comes
    /// from 127.0.0.1. Tests of those limits set them back.
    pub fn start() -> TestServer {
        Self::with_env(&[])
    }

    pub fn with_env(env: &[(&str, &str)]) -> TestServer {
        Self::spawn(None, env)
    }

    pub fn spawn(config: Option<&Path>, env: &[(&str, &str)]) -> TestServer {
        let mut cmd = Command::new(chatd_bin());
        let dir = Self::prepare(&mut cmd, config, env);
        Self::launch(cmd, dir)
    }

    /// Sets the arguments and environment every test daemon needs; `env`
    /// wins. Without `config`, chatd gets `--no-config`: a test never reads
    /// the machine's /etc/chatd/chatd.toml. The returned directory holds the
    /// runtime directory (where the generated admin token goes) and the
    /// state directory.
    pub fn prepare(
        cmd: &mut Command,
        config: Option<&Path>,
        env: &[(&str, &str)],
    ) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        match config {
            Some(path) => cmd.arg("--config").arg(path),
            None => cmd.arg("--no-config"),
        };
        isolate(cmd, dir.path());
        cmd.env("CHATD_SERVER__STATE_DIR", dir.path().join("state"))
            .env("CHATD_CHAT__LISTEN", "127.0.0.1:0")
            .env("CHATD_UDP__LISTEN", "127.0.0.1:0")
            .env("CHATD_ADMIN__LISTEN", "127.0.0.1:0")
            .env("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "1000")
            .env("CHATD_LIMITS__CONNECT_RATE_PER_IP", "0")
            .env("CHATD_LOG__FORMAT", "json")
            .env("CHATD_LOG__LEVEL", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        dir
    }

    /// Starts `cmd` and waits for its "listening" log line.
    pub fn launch(mut cmd: Command, dir: tempfile::TempDir) -> TestServer {
        let mut child = spawn_busy_aware(&mut cmd);
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        // SHOW_CHATD_LOGS=1 shows the daemon's log while debugging a test.
        let echo = std::env::var_os("SHOW_CHATD_LOGS").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("chatd: {line}");
                }
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) => {
                        if v["message"] == "listening" {
                            let _ = tx.send(v.clone());
                        }
                        sink.lock().expect("log lock").push(v);
                    }
                    Err(_) => eprintln!("chatd (not json): {line}"),
                }
            }
        });
        let listening = match rx.recv_timeout(WAIT) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "chatd did not report its addresses; status {:?}",
                    child.wait()
                );
            }
        };
        // The first address of each listener; `listening` has them all.
        let first = |key: &str| {
            listening[key]
                .as_str()
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
        };
        let chat = first("chat").expect("chat address");
        let udp = first("udp");
        let admin = first("admin");
        TestServer {
            child,
            chat,
            udp,
            admin,
            logs,
            listening,
            dir,
        }
    }

    /// The runtime directory the daemon was given (`RUNTIME_DIRECTORY`).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// `http://ADDR` of the admin API.
    pub fn endpoint(&self) -> String {
        format!(
            "http://{}",
            self.admin.expect("the admin API listens on TCP")
        )
    }

    /// The process serving now: the one started, or the last one a
    /// seamless upgrade handed over to (it logs to the same stderr).
    pub fn pid(&self) -> u32 {
        self.successors().last().copied().unwrap_or(self.child.id())
    }

    /// Processes that took over from this one by seamless upgrades, oldest
    /// first. From the new process's own line, which comes before the old
    /// one's "handed over": a test that waited for it signals the right
    /// process.
    pub fn successors(&self) -> Vec<u32> {
        self.logged("upgrade: took over from the previous process")
            .iter()
            .filter_map(|v| v["pid"].as_u64())
            .map(|p| p as u32)
            .collect()
    }

    /// Starts the daemon from `binary` (a copy that a test may replace, as
    /// a package upgrade would) instead of the built one.
    pub fn spawn_binary(binary: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> TestServer {
        let mut cmd = Command::new(binary);
        let dir = Self::prepare(&mut cmd, config, env);
        Self::launch(cmd, dir)
    }

    pub async fn connect(&self) -> Client {
        Client::connect(self.chat).await
    }

    /// Connects and reads the welcome; returns the client and its nick.
    pub async fn join(&self) -> (Client, String) {
        let mut c = self.connect().await;
        let nick = c.welcome().await;
        (c, nick)
    }

    /// Log records so far whose message contains `needle`.
    pub fn logged(&self, needle: &str) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(needle)))
            .cloned()
            .collect()
    }

    /// Waits until a log record containing `needle` appears.
    /// The metrics page, scraped once over HTTP from the address chatd
    /// logged (`metrics.listen` must be set).
    pub async fn scrape_metrics(&self) -> String {
        let listening = self.wait_logged("listening").await;
        let metrics = listening["metrics"].as_str().expect("metrics address");
        let mut stream = TcpStream::connect(metrics).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("send");
        let mut body = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut body))
            .await
            .expect("scraped in time")
            .expect("read");
        body
    }

    pub async fn wait_logged(&self, needle: &str) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.logged(needle).into_iter().next() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no log record containing {needle:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `times` log records contain `needle`.
    pub async fn wait_logged_times(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.logged(needle).len();
            if seen >= times {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{seen} log records containing {needle:?} after {WAIT:?}, wanted {times}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("signal chatd");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "chatd did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Successors are not our children: stop them by pid.
        for pid in self.successors() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// A client connected from `ip` (any 127.0.0.0/8 address): per-address
/// limits see it as another host.
pub async fn connect_from(ip: &str, server: &TestServer) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{ip}:0").parse().expect("addr"))
        .expect("bind");
    Client::connect_socket(socket, server.chat).await
}

/// A chat client speaking raw lines, like `nc`.
pub struct Client {
    reader: AsyncBufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Self::from_stream(stream)
    }

    /// Connects `socket` (bound and tuned by the caller) to `addr`.
    pub async fn connect_socket(socket: tokio::net::TcpSocket, addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Self::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_nodelay(true).expect("nodelay");
        let (r, w) = stream.into_split();
        Client {
            reader: AsyncBufReader::new(r),
            writer: w,
        }
    }

    /// The reading and writing halves, for a client that reads and writes
    /// at once.
    pub fn into_parts(self) -> (AsyncBufReader<OwnedReadHalf>, OwnedWriteHalf) {
        (self.reader, self.writer)
    }

    /// This end's address (the daemon sees it as the peer).
    pub fn local_addr(&self) -> SocketAddr {
        self.writer
            .local_addr()
            .expect("a connected socket has an address")
    }

    /// Sends `text` as is (add the `\n` yourself).
    pub async fn send(&mut self, text: &str) {
        self.send_raw(text.as_bytes()).await;
    }

    /// Sends `bytes`; fails if the daemon has not taken them within
    /// [`WAIT`] (a daemon that stopped reading must not hang the test).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.writer.write_all(bytes))
            .await
            .unwrap_or_else(|_| panic!("the daemon took no {} bytes within {WAIT:?}", bytes.len()))
            .expect("send");
    }

    /// Sends `bytes`; false when the connection is gone.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.writer.write_all(bytes).await.is_ok()
    }

    /// The next line, without its `\r\n`; `None` at EOF or reset.
    pub async fn try_line(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(WAIT, self.reader.read_until(b'\n', &mut buf))
            .await
            .expect("a line in time")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        let text = String::from_utf8(buf).expect("the server sends UTF-8");
        assert!(text.ends_with("\r\n"), "server lines end in CRLF: {text:?}");
        Some(text.trim_end_matches("\r\n").to_string())
    }

    pub async fn line(&mut self) -> String {
        self.try_line().await.expect("a line, not EOF")
    }

    /// Reads lines until one contains `needle`; returns it. Fails after
    /// [`WAIT`] even if lines keep coming.
    pub async fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "no line containing {needle:?} within {WAIT:?}; saw {} lines, the last {:#?}",
                seen.len(),
                &seen[seen.len().saturating_sub(5)..]
            );
            match self.try_line().await {
                Some(l) if l.contains(needle) => return l,
                Some(l) => seen.push(l),
                None => panic!("EOF before a line containing {needle:?}; saw {seen:#?}"),
            }
        }
    }

    /// Reads the welcome block up to the room line; returns the nick.
    pub async fn welcome(&mut self) -> String {
        let first = self.line().await;
        let nick = first
            .strip_prefix("*** Welcome to ")
            .and_then(|r| r.split_once(", "))
            .and_then(|(_, r)| r.split_once('!'))
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| panic!("not a welcome line: {first:?}"));
        self.expect("You are now in").await;
        nick
    }

    /// Sends `/who` and returns every line received before its answer: a
    /// barrier proving what did (and did not) arrive before it.
    pub async fn sync(&mut self) -> Vec<String> {
        self.send("/who\n").await;
        let deadline = Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "no /who answer within {WAIT:?}; {} lines came before",
                before.len()
            );
            let l = self.line().await;
            let is_who = l
                .strip_prefix("*** ")
                .and_then(|r| r.split_once(" ("))
                .is_some_and(|(room, rest)| {
                    !room.contains(' ') && rest.contains(" user") && rest.contains("): ")
                });
            if is_who {
                return before;
            }
            before.push(l);
        }
    }

    /// Reads until EOF; returns the lines read on the way. Fails if the
    /// stream has not ended after [`WAIT`].
    pub async fn until_eof(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut lines = Vec::new();
        while let Some(l) = self.try_line().await {
            lines.push(l);
            assert!(
                Instant::now() < deadline,
                "no EOF within {WAIT:?}; {} lines so far",
                lines.len()
            );
        }
        lines
    }
}

/// The `chatctl` binary, built beside `chatd` by `cargo test --workspace`
/// (a binary of another package cannot be a dev-dependency).
pub fn chatctl_bin() -> PathBuf {
    let path = Path::new(chatd_bin()).with_file_name("chatctl");
    assert!(
        path.exists(),
        "{} is missing: run these tests with `cargo test --workspace`, which builds chatctl",
        path.display()
    );
    path
}

/// What a `chatctl` run printed, and how it exited.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "chatctl failed: {self:#?}");
        &self.stdout
    }

    /// Asserts success and parses stdout as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("chatctl printed invalid JSON ({e}): {self:#?}"))
    }
}

impl TestServer {
    /// `chatctl` set up the way a local operator has it: the endpoint in
    /// `CHATCTL_ENDPOINT`, the token found in the daemon's runtime directory.
    /// Its environment is cleared as the daemon's is ([`isolate`]): no
    /// `CHATCTL_TOKEN` from the shell, and the runtime directories it
    /// searches are the daemon's, not the machine's.
    pub fn chatctl_command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(chatctl_bin());
        cmd.args(args)
            .env_clear()
            .envs(inherited_env())
            .env(
                "CHATCTL_ENDPOINT",
                self.admin
                    .map(|a| format!("http://{a}"))
                    .unwrap_or_default(),
            )
            .env("RUNTIME_DIRECTORY", self.runtime_dir())
            .env("XDG_RUNTIME_DIR", self.dir.path().join("xdg"))
            .env("HOME", self.dir.path().join("home"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    pub async fn chatctl(&self, args: &[&str]) -> Ctl {
        self.chatctl_env(args, &[]).await
    }

    pub async fn chatctl_env(&self, args: &[&str], env: &[(&str, &str)]) -> Ctl {
        let out = tokio::time::timeout(WAIT, self.chatctl_command(args, env).output())
            .await
            .expect("chatctl finishes in time")
            .expect("run chatctl");
        Ctl {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Sends a signal and waits until the process is gone; for restarts.
    pub async fn stop(&mut self) {
        self.signal(rustix::process::Signal::TERM);
        self.wait_exit().await;
    }
}

/// One HTTP/1.1 GET of the metrics listener: (head, body).
pub async fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect to metrics in time")
        .expect("connect to metrics");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    (head.to_string(), body.to_string())
}

/// The value of the sample `name` (with its labels, if any) in `body`.
pub fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
}

/// The metrics listener's address, from the "listening" log line.
pub async fn metrics_addr(server: &TestServer) -> SocketAddr {
    let listening = server.wait_logged("listening").await;
    listening["metrics"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("metrics address in the listening line")
}

/// Starts `cmd`; a binary a test has just copied is busy (`ETXTBSY`) while
/// a process that another test forked meanwhile still holds the copy's
/// write descriptor, until that process execs: retried for a moment.
fn spawn_busy_aware(cmd: &mut Command) -> Child {
    const ETXTBSY: i32 = 26;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match cmd.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("start chatd: {e}"),
        }
    }
}
