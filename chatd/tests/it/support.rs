//! Test helpers: the real daemon on port 0, and a client that talks to it
//! the way `nc` would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
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
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl TestServer {
    /// The daemon on its defaults, on loopback port 0, with the per-address
    /// limit raised (every test client comes from 127.0.0.1).
    pub fn start() -> TestServer {
        Self::with_env(&[])
    }

    pub fn with_env(env: &[(&str, &str)]) -> TestServer {
        Self::spawn(None, env)
    }

    pub fn spawn(config: Option<&Path>, env: &[(&str, &str)]) -> TestServer {
        let mut cmd = Command::new(chatd_bin());
        Self::prepare(&mut cmd, config, env);
        Self::launch(cmd)
    }

    /// Sets the environment every test daemon needs; `env` wins.
    pub fn prepare(cmd: &mut Command, config: Option<&Path>, env: &[(&str, &str)]) {
        if let Some(path) = config {
            cmd.arg("--config").arg(path);
        }
        cmd.env("CHATD_CHAT__LISTEN", "127.0.0.1:0")
            .env("CHATD_UDP__LISTEN", "127.0.0.1:0")
            .env("CHATD_ADMIN__LISTEN", "127.0.0.1:0")
            .env("CHATD_LIMITS__MAX_CLIENTS_PER_IP", "1000")
            .env("CHATD_LOG__FORMAT", "json")
            .env("CHATD_LOG__LEVEL", "info")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
    }

    /// Starts `cmd` and waits for its "listening" log line.
    pub fn launch(mut cmd: Command) -> TestServer {
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
        TestServer {
            child,
            chat,
            udp,
            logs,
        }
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
