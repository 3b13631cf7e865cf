//! The config loader on any TOML file and any environment: input before the
//! first NUL is the file, each line after it a `KEY=VALUE` pair (keys are
//! given the `CHATD_` prefix). Invariants: no panic; either a validated
//! config or an error.
#![no_main]

use std::sync::OnceLock;

use chatd_config::{Config, Source};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let (file, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let path = dir().path().join("chatd.toml");
    std::fs::write(&path, file).expect("write");
    let vars: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("CHATD_{k}"), v.to_string()))
        .collect();
    if let Ok(config) = Config::load_with_env(&Source::Explicit(path), Some(vars)) {
        // Printing the effective config must not panic either.
        let _ = config.to_toml();
    }
});
