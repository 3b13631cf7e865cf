//! chatctl's tests that need no running chatd: the command line as a user
//! meets it, and the pure pieces behind it.

mod cli;
mod fake;
mod format;
mod help;
mod token;

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one chatctl run may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// The real binary, with an environment of nothing but `PATH` (and the
/// debugging variables): no `CHATCTL_*` from the shell, and the runtime
/// directories it searches for a token point where nothing exists, not at
/// the machine's.
pub fn chatctl(args: &[&str]) -> Output {
    chatctl_env(args, &[])
}

/// [`chatctl`] with `env` set on top.
pub fn chatctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    // Never created: nothing is found there.
    let home = std::env::temp_dir().join(format!("chatctl-test-{}-nowhere", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatctl"));
    cmd.args(args)
        .env_clear()
        .envs(
            ["PATH", "RUST_BACKTRACE", "LLVM_PROFILE_FILE"]
                .iter()
                .filter_map(|&name| std::env::var_os(name).map(|v| (name, v))),
        )
        .env("RUNTIME_DIRECTORY", home.join("run"))
        .env("XDG_RUNTIME_DIR", home.join("xdg"))
        .env("HOME", &home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(cmd)
}

/// Runs `cmd`, failing the test (and killing the child) after [`WAIT`].
fn output_within(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the chatctl binary runs");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chatctl") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A unique, empty scratch directory under the system's temp dir.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("chatctl-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the temp dir is writable");
    dir
}
