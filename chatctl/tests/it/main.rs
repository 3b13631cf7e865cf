//! chatctl's tests that need no running chatd: the command line as a user
//! meets it, and the pure pieces behind it.

mod cli;
mod fake;
mod format;
mod help;
mod token;

use std::process::{Command, Output};

/// The real binary, with the environment that would change its behaviour
/// removed.
pub fn chatctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatctl"))
        .args(args)
        .env_remove("CHATCTL_ENDPOINT")
        .env_remove("CHATCTL_TOKEN")
        .env_remove("CHATCTL_TOKEN_FILE")
        .output()
        .expect("the chatctl binary runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A unique, empty scratch directory under the system's temp dir.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("chatctl-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the temp dir is writable");
    dir
}
