//! Which token chatctl sends, in the documented order.

use std::path::PathBuf;

use chatctl::token::{Token, resolve};
use chatd_proto::token::TokenLocations;

use crate::scratch_dir;

fn write(path: &PathBuf, text: &str) {
    std::fs::create_dir_all(path.parent().expect("the path has a parent")).expect("writable");
    std::fs::write(path, text).expect("writable");
}

#[test]
fn the_flag_beats_the_file_and_the_defaults() {
    let dir = scratch_dir("flag");
    let file = dir.join("given.token");
    write(&file, "from-file\n");
    let found =
        resolve(Some("from-flag"), Some(&file), std::slice::from_ref(&file)).expect("resolves");
    assert_eq!(found.map(|t| t.secret), Some("from-flag".to_owned()));
}

#[test]
fn the_token_file_beats_the_defaults_and_is_trimmed() {
    let dir = scratch_dir("file");
    let given = dir.join("given.token");
    let default = dir.join("default.token");
    write(&given, "  from-file\n");
    write(&default, "from-default");
    let found = resolve(None, Some(&given), &[default]).expect("resolves");
    assert_eq!(
        found,
        Some(Token {
            secret: "from-file".to_owned(),
            origin: given.display().to_string(),
        })
    );
}

#[test]
fn an_unreadable_token_file_is_an_error_not_a_fallback() {
    let dir = scratch_dir("unreadable");
    let default = dir.join("default.token");
    write(&default, "from-default");
    let err = resolve(None, Some(&dir.join("missing")), &[default]).expect_err("fails");
    assert_eq!(err.exit_code(), 1);
    assert!(
        err.to_string().contains("cannot read the token file"),
        "{err}"
    );
}

#[test]
fn the_first_readable_default_wins() {
    let dir = scratch_dir("defaults");
    let locations = TokenLocations {
        runtime_directory: Some(dir.join("systemd")),
        xdg_runtime_dir: Some(dir.join("xdg")),
        uid: 4242,
    };
    let mut paths = locations.read_paths();
    // Keep the test away from the machine's real /run and /tmp.
    paths.retain(|p| p.starts_with(&dir));
    assert_eq!(
        paths,
        [
            dir.join("systemd/admin.token"),
            dir.join("xdg/chatd/admin.token")
        ]
    );

    assert_eq!(
        resolve(None, None, &paths).expect("resolves"),
        None,
        "nothing there yet"
    );

    write(&paths[1], "xdg-token\n");
    let found = resolve(None, None, &paths).expect("resolves");
    assert_eq!(found.map(|t| t.secret), Some("xdg-token".to_owned()));

    write(&paths[0], "systemd-token\n");
    let found = resolve(None, None, &paths).expect("resolves");
    assert_eq!(found.map(|t| t.secret), Some("systemd-token".to_owned()));
}

#[test]
fn default_paths_are_in_the_documented_order() {
    let locations = TokenLocations {
        runtime_directory: Some("/run/svc".into()),
        xdg_runtime_dir: Some("/run/user/1000".into()),
        uid: 1000,
    };
    let paths: Vec<PathBuf> = locations.read_paths();
    assert_eq!(
        paths,
        [
            PathBuf::from("/run/svc/admin.token"),
            PathBuf::from("/run/chatd/admin.token"),
            PathBuf::from("/run/user/1000/chatd/admin.token"),
            PathBuf::from("/tmp/chatd-1000/admin.token"),
        ]
    );
}
