//! The bans file loader on any file content (through a temporary state
//! directory: the loader reads `state_dir/bans.json`). Invariants: no panic;
//! a loaded list answers lookups and survives a save.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use chatd_hub::bans::{BANS_FILE, Bans};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let state = dir().path();
    std::fs::write(state.join(BANS_FILE), data).expect("write");
    let Ok(bans) = Bans::load(state) else {
        return;
    };
    let _ = bans.check(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let _ = bans.check(IpAddr::V6(Ipv6Addr::LOCALHOST));
    let active = bans.active();
    if let Some(first) = active.first() {
        // Lifting a ban saves the file; the saved file loads again.
        bans.remove(first.net).expect("remove an active ban");
        let again = Bans::load(state).expect("a saved file loads");
        assert!(again.active().len() < active.len());
    }
});
