//! Which token chatctl sends, in the documented order, and only to the
//! endpoint a discovered token was issued for.

use std::path::PathBuf;

use chatctl::connect::EndpointAddr;
use chatctl::token::{Token, resolve};
use chatd_proto::AdminAddr;
use chatd_proto::token::{TokenLocations, token_file_text};

use crate::scratch_dir;

fn write(path: &PathBuf, text: &str) {
    std::fs::create_dir_all(path.parent().expect("the path has a parent")).expect("writable");
    std::fs::write(path, text).expect("writable");
}

fn endpoint(text: &str) -> EndpointAddr {
    EndpointAddr::parse(text).expect("a valid endpoint")
}

fn local() -> EndpointAddr {
    endpoint("http://127.0.0.1:50051")
}

#[test]
fn the_flag_beats_the_file_and_the_defaults() {
    let dir = scratch_dir("flag");
    let file = dir.join("given.token");
    write(&file, "from-file\n");
    let found = resolve(Some("from-flag"), Some(&file), &[dir], &local()).expect("resolves");
    assert_eq!(found.map(|t| t.secret), Some("from-flag".to_owned()));
}

#[test]
fn the_token_file_beats_the_defaults_and_its_first_line_is_the_token() {
    let dir = scratch_dir("file");
    let given = dir.join("given.token");
    write(&given, "  from-file\naddress 127.0.0.1:1\n");
    let addr = AdminAddr::Tcp("127.0.0.1:50051".parse().expect("addr"));
    write(
        &dir.join(addr.file_name()),
        &token_file_text("from-default", &addr),
    );
    let found = resolve(None, Some(&given), &[dir], &local()).expect("resolves");
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
    let err = resolve(None, Some(&dir.join("missing")), &[dir], &local()).expect_err("fails");
    assert_eq!(err.exit_code(), 1);
    assert!(
        err.to_string().contains("cannot read the token file"),
        "{err}"
    );
}

#[test]
fn a_discovered_token_goes_only_to_the_endpoint_it_was_issued_for() {
    let dir = scratch_dir("issued");
    let addr = AdminAddr::Tcp("127.0.0.1:50051".parse().expect("addr"));
    write(
        &dir.join(addr.file_name()),
        &token_file_text("local", &addr),
    );
    let dirs = [dir.clone()];
    let secret = |e: &str| {
        resolve(None, None, &dirs, &endpoint(e))
            .expect("resolves")
            .map(|t| t.secret)
    };
    assert_eq!(secret("http://127.0.0.1:50051").as_deref(), Some("local"));
    assert_eq!(secret("https://localhost:50051").as_deref(), Some("local"));
    assert_eq!(secret("http://127.0.0.1:50052"), None);
    assert_eq!(secret("http://127.0.0.2:50051"), None);
    assert_eq!(secret("http://other.example:50051"), None);
    assert_eq!(secret("http://[::1]:50051"), None);

    // A file under the right name that records another address is not used.
    let v6 = AdminAddr::Tcp("[::1]:50051".parse().expect("addr"));
    write(&dir.join(v6.file_name()), &token_file_text("moved", &addr));
    assert_eq!(secret("http://[::1]:50051"), None);
}

#[test]
fn the_first_directory_with_a_token_for_the_endpoint_wins() {
    let dir = scratch_dir("defaults");
    let locations = TokenLocations {
        runtime_directory: Some(dir.join("systemd")),
        xdg_runtime_dir: Some(dir.join("xdg")),
        uid: 4242,
    };
    let mut dirs = locations.read_dirs();
    // Keep the test away from the machine's real /run and /tmp.
    dirs.retain(|p| p.starts_with(&dir));
    assert_eq!(dirs, [dir.join("systemd"), dir.join("xdg/chatd")]);
    assert_eq!(
        resolve(None, None, &dirs, &local()).expect("resolves"),
        None,
        "nothing there yet"
    );
    let addr = AdminAddr::Tcp("127.0.0.1:50051".parse().expect("addr"));
    write(
        &dirs[1].join(addr.file_name()),
        &token_file_text("xdg-token", &addr),
    );
    let found = resolve(None, None, &dirs, &local()).expect("resolves");
    assert_eq!(found.map(|t| t.secret), Some("xdg-token".to_owned()));
    write(
        &dirs[0].join(addr.file_name()),
        &token_file_text("systemd-token", &addr),
    );
    let found = resolve(None, None, &dirs, &local()).expect("resolves");
    assert_eq!(found.map(|t| t.secret), Some("systemd-token".to_owned()));
}

#[test]
fn default_dirs_are_in_the_documented_order() {
    let locations = TokenLocations {
        runtime_directory: Some("/run/svc".into()),
        xdg_runtime_dir: Some("/run/user/1000".into()),
        uid: 1000,
    };
    assert_eq!(
        locations.read_dirs(),
        [
            PathBuf::from("/run/svc"),
            PathBuf::from("/run/chatd"),
            PathBuf::from("/run/user/1000/chatd"),
            PathBuf::from("/tmp/chatd-1000"),
        ]
    );
}
