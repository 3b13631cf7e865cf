//! Test helpers: the real daemon on port 0, and a client that talks to it
//! the way `nc` would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn chatd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_chatd")
}

/// A running `chatd` process, killed on drop.
pub struct TestServer {
    child: Child,
    pub chat: SocketAddr,
    pub udp: Option<SocketAddr>,
    /// The admin API's TCP address, when it has one.
    pub admin: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
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

    /// Sets the environment every test daemon needs; `env` wins. The
    /// returned directory holds the runtime directory (where the generated
    /// admin token goes) and the state directory.
    pub fn prepare(
        cmd: &mut Command,
        config: Option<&Path>,
        env: &[(&str, &str)],
    ) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(path) = config {
            cmd.arg("--config").arg(path);
        }
        cmd.env("RUNTIME_DIRECTORY", dir.path().join("run"))
            .env("XDG_RUNTIME_DIR", dir.path().join("xdg"))
            .env("CHATD_SERVER__STATE_DIR", dir.path().join("state"))
            .env_remove("STATE_DIRECTORY")
            .env("CHATD_CHAT__LISTEN", "127.0.0.1:0")
            .env("CHATD_UDP__LISTEN", "127.0.0.1:0")
            .env("CHATD_ADMIN__LISTEN", "127.0.0.1:0")
            .env("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "1000")
            .env("CHATD_LIMITS__CONNECT_RATE_PER_IP", "0")
            .env("CHATD_LOG__FORMAT", "json")
            .env("CHATD_LOG__LEVEL", "info")
            .env_remove("RUST_LOG");
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
        let mut child = cmd.spawn().expect("start chatd");
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
        let chat = listening["chat"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("chat address");
        let udp = listening["udp"].as_str().and_then(|s| s.parse().ok());
        let admin = listening["admin"].as_str().and_then(|s| s.parse().ok());
        TestServer {
            child,
            chat,
            udp,
            admin,
            logs,
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

    pub fn pid(&self) -> u32 {
        self.child.id()
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
    }
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

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_nodelay(true).expect("nodelay");
        let (r, w) = stream.into_split();
        Client {
            reader: AsyncBufReader::new(r),
            writer: w,
        }
    }

    /// Sends `text` as is (add the `\n` yourself).
    pub async fn send(&mut self, text: &str) {
        self.send_raw(text.as_bytes()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("send");
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

    /// Reads lines until one contains `needle`; returns it.
    pub async fn expect(&mut self, needle: &str) -> String {
        let mut seen = Vec::new();
        loop {
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
        let mut before = Vec::new();
        loop {
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

    /// Reads until EOF; returns the lines read on the way.
    pub async fn until_eof(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(l) = self.try_line().await {
            lines.push(l);
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
    pub fn chatctl_command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(chatctl_bin());
        cmd.args(args)
            .env_remove("CHATCTL_TOKEN")
            .env_remove("CHATCTL_TOKEN_FILE")
            .env(
                "CHATCTL_ENDPOINT",
                self.admin
                    .map(|a| format!("http://{a}"))
                    .unwrap_or_default(),
            )
            .env("RUNTIME_DIRECTORY", self.runtime_dir())
            .env("XDG_RUNTIME_DIR", self.dir.path().join("xdg"))
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
