//! The servers under test: spawning each one in the foreground on a free
//! loopback port, waiting until it accepts, and reading its CPU time and
//! memory from /proc.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::Dialect;

/// A server the benchmark can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Chatd,
    /// The chatd binary given with `--baseline`, built from an earlier
    /// commit: runs beside this build so that both meet the same load.
    ChatdBase,
    Ngircd,
    Inspircd,
    /// The multi-user chat server of the Python socket tutorial in
    /// ../shared/seed, extracted at run time.
    Tutorial,
}

impl FromStr for Target {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "chatd" => Target::Chatd,
            "ngircd" => Target::Ngircd,
            "inspircd" => Target::Inspircd,
            "python" | "tutorial" => Target::Tutorial,
            _ => bail!("unknown target {s:?} (expected chatd, ngircd, inspircd or python)"),
        })
    }
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Chatd => "chatd",
            Target::ChatdBase => "chatd@base",
            Target::Ngircd => "ngircd",
            Target::Inspircd => "inspircd",
            Target::Tutorial => "python",
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            Target::Chatd | Target::ChatdBase => Dialect::Chatd,
            Target::Ngircd | Target::Inspircd => Dialect::Irc,
            Target::Tutorial => Dialect::Tutorial,
        }
    }

    /// How many connections may be in the handshake at once, if the target
    /// needs fewer than asked. ngIRCd listens with a fixed backlog of 10:
    /// more parallel connects overflow it, and the kernel then retries the
    /// dropped SYNs after 1, 3, 7, 15… s, which would measure the kernel's
    /// back-off instead of the server.
    pub fn max_connecting(self) -> Option<usize> {
        match self {
            Target::Ngircd => Some(8),
            _ => None,
        }
    }

    /// Why this target cannot run here, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        match self {
            Target::Chatd => None,
            Target::ChatdBase => COMPARED
                .get()
                .is_none()
                .then(|| "no --baseline binary given".to_owned()),
            Target::Ngircd => find_program("ngircd")
                .is_none()
                .then(|| "ngircd not installed (apt-get install ngircd)".to_owned()),
            Target::Inspircd => find_program("inspircd")
                .is_none()
                .then(|| "inspircd not installed (apt-get install inspircd)".to_owned()),
            Target::Tutorial => {
                if find_program("python3").is_none() {
                    Some("python3 not installed".to_owned())
                } else if !tutorial_path().exists() {
                    Some(format!("{} not found", tutorial_path().display()))
                } else {
                    None
                }
            }
        }
    }
}

/// With `--baseline`, the copies of this build and of the baseline that
/// [`Target::Chatd`] and [`Target::ChatdBase`] run; a global because
/// `Target` is a plain copyable key of the report's tables.
static COMPARED: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

/// This build's chatd, or CHATBENCH_CHATD's: CHATBENCH_CHATD and
/// CHATBENCH_CONFIG run another build with its own configuration.
fn default_chatd() -> PathBuf {
    std::env::var_os("CHATBENCH_CHATD")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_chatd").into())
        .into()
}

/// The binary `target` runs, if it is a chatd.
pub fn chatd_program(target: Target) -> Option<PathBuf> {
    match (target, COMPARED.get()) {
        (Target::Chatd, Some((this, _))) => Some(this.clone()),
        (Target::Chatd, None) => Some(default_chatd()),
        (Target::ChatdBase, Some((_, base))) => Some(base.clone()),
        _ => None,
    }
}

/// Makes `baseline` [`Target::ChatdBase`]'s binary, after checking that it
/// starts (`--version`, which it returns). Both chatd targets then run
/// fresh copies side by side in the directory returned (removed on drop):
/// RSS counts the pages of the executable in memory, and identical
/// binaries differed by 2 MiB idle when one was just written and the other
/// had lain in the page cache for a while.
pub fn set_baseline(baseline: &Path) -> anyhow::Result<(tempfile::TempDir, String)> {
    let dir = tempfile::Builder::new()
        .prefix("chatbench-builds-")
        .tempdir()?;
    let this = dir.path().join("chatd");
    let base = dir.path().join("chatd@base");
    let from = default_chatd();
    fs::copy(&from, &this).with_context(|| format!("copying {}", from.display()))?;
    fs::copy(baseline, &base).with_context(|| format!("--baseline {}", baseline.display()))?;
    let out = Command::new(&base)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("--baseline {}: cannot run it", baseline.display()))?;
    if !out.status.success() {
        bail!(
            "--baseline {}: `--version` failed ({})",
            baseline.display(),
            out.status
        );
    }
    let _ = COMPARED.set((this, base));
    Ok((dir, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn tutorial_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seed/python-socket-tutorial.fr.md")
}

const NGIRCD_CONF: &str = include_str!("../peers/ngircd.conf");
const INSPIRCD_CONF: &str = include_str!("../peers/inspircd.conf");

/// CPU time and memory of a process at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// utime + stime, in nanoseconds.
    pub cpu_ns: u64,
    /// VmRSS, in KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS), in KiB.
    pub hwm_kib: u64,
    /// Threads of the process (for chatd: the runtime's workers plus a
    /// few helpers; the C servers are single-threaded event loops).
    pub threads: u64,
}

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `target` on a free loopback port and waits until it accepts.
    ///
    /// With `pin`, the server runs on CPU 0 only (`taskset -c 0`), apart from
    /// the load generator (see `pin_self`).
    pub fn start(target: Target, pin: bool) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("chatbench-{}-", target.name()))
            .tempdir()?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.path().join("server.log");
        let mut cmd = command(target, dir.path(), port)?;
        if pin {
            let mut pinned = Command::new(find_program("taskset").context("taskset not found")?);
            pinned.arg("-c").arg(SERVER_CPU.to_string());
            pinned.arg(cmd.get_program()).args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    pinned.env(k, v);
                }
            }
            cmd = pinned;
        }
        let out = fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", target.name()))?;
        let mut server = Server {
            child,
            addr,
            log,
            _dir: dir,
        };
        server.wait_ready(target)?;
        Ok(server)
    }

    fn wait_ready(&mut self, target: Target) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before accepting connections; its log:\n{}",
                    target.name(),
                    self.log_tail()
                );
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept on {} within 20 s; its log:\n{}",
                    target.name(),
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The last lines of the server's output, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// CPU time and memory right now.
    pub fn sample(&self) -> anyhow::Result<Sample> {
        sample(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(target: Target, dir: &Path, port: u16) -> anyhow::Result<Command> {
    let fill = |template: &str| {
        template
            .replace("{{PORT}}", &port.to_string())
            .replace("{{DIR}}", &dir.display().to_string())
    };
    Ok(match target {
        Target::Chatd | Target::ChatdBase => {
            let program = chatd_program(target).context("no --baseline binary given")?;
            chatd_command(&program, dir, port)
        }
        Target::Ngircd => {
            let conf = dir.join("ngircd.conf");
            fs::write(&conf, fill(NGIRCD_CONF))?;
            let mut cmd = Command::new(find_program("ngircd").context("ngircd not found")?);
            cmd.arg("-n").arg("-f").arg(conf);
            cmd
        }
        Target::Inspircd => {
            let conf = dir.join("inspircd.conf");
            fs::write(&conf, fill(INSPIRCD_CONF))?;
            fs::write(dir.join("motd.txt"), "bench\n")?;
            let mut cmd = Command::new(find_program("inspircd").context("inspircd not found")?);
            cmd.arg("--nofork").arg("--nopid").arg("--config").arg(conf);
            if is_root() {
                cmd.arg("--runasroot");
            }
            cmd
        }
        Target::Tutorial => {
            let script = dir.join("chat_server.py");
            fs::write(&script, extract_tutorial_server(port)?)?;
            let mut cmd = Command::new("python3");
            cmd.arg(script);
            cmd
        }
    })
}

/// `program` (a chatd) with the benchmark's configuration, or
/// CHATBENCH_CONFIG's, listening on `port`.
fn chatd_command(program: &Path, dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(program);
    let config = std::env::var_os("CHATBENCH_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bench.toml"));
    cmd.arg("--config")
        .arg(config)
        .env("CHATD_CHAT__LISTEN", format!("127.0.0.1:{port}"))
        .env("CHATD_UDP__LISTEN", "127.0.0.1:0")
        .env("CHATD_ADMIN__LISTEN", "127.0.0.1:0")
        // Its generated admin token goes to the run's own directory,
        // never to the host's /run/chatd where a later chatd on the
        // same port would be taken for it.
        .env("RUNTIME_DIRECTORY", dir);
    cmd
}

/// The tutorial's `chat_server.py`, from its Markdown, with our port.
fn extract_tutorial_server(port: u16) -> anyhow::Result<String> {
    let path = tutorial_path();
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let after = text
        .split_once("### chat_server.py")
        .context("no `### chat_server.py` section in the tutorial")?
        .1;
    let code = after
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .context("no python block after `### chat_server.py`")?
        .0;
    if !code.contains("PORT = 8080") {
        bail!("the tutorial's chat server no longer sets `PORT = 8080`");
    }
    Ok(code.replace("PORT = 8080", &format!("PORT = {port}")))
}

/// The CPU the server gets with `--pin`; the load generator gets
/// [`LOAD_CPU`].
pub const SERVER_CPU: usize = 0;
pub const LOAD_CPU: usize = 1;

/// Pins this process to [`LOAD_CPU`]. Called before any thread starts, so
/// that every runtime thread inherits it.
pub fn pin_self() -> anyhow::Result<()> {
    let status = Command::new(find_program("taskset").context("taskset not found")?)
        .arg("-p")
        .arg("-c")
        .arg(LOAD_CPU.to_string())
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("taskset -p -c {LOAD_CPU} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Clock ticks per second for /proc/PID/stat times.
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

pub fn sample(pid: u32) -> anyhow::Result<Sample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain
    // spaces: state is field 3, utime 14 and stime 15.
    let after = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short /proc/PID/stat")?.parse()?)
    };
    let cpu_ticks = ticks(11)? + ticks(12)?;
    let cpu_ns = cpu_ticks * 1_000_000_000 / clock_ticks();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        cpu_ns,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        threads: kib("Threads:"),
    })
}
