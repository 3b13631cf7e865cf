//! `--help` snapshots: the top level and every subcommand. When the help
//! changes on purpose, re-bless with `CHATCTL_BLESS=1 cargo test -p chatctl`
//! and review the diff of `tests/it/snapshots/`.

use std::path::PathBuf;

use chatctl::cli::Cli;
use clap::CommandFactory;

use crate::{chatctl, stderr, stdout};

fn check_snapshot(name: &str, args: &[&str]) {
    let output = chatctl(args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        stderr(&output)
    );
    let actual = stdout(&output);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("CHATCTL_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("the path has a parent"))
            .expect("the snapshot dir is writable");
        std::fs::write(&path, &actual).expect("the snapshot is writable");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|err| {
        panic!(
            "no snapshot at {} ({err}); run with CHATCTL_BLESS=1",
            path.display()
        )
    });
    assert!(
        actual == expected,
        "`chatctl {}` differs from {}; if the change is intended, run with CHATCTL_BLESS=1\n\
         --- expected\n{expected}\n--- actual\n{actual}",
        args.join(" "),
        path.display()
    );
}

#[test]
fn top_level_help() {
    check_snapshot("help", &["--help"]);
}

#[test]
fn every_subcommand_help() {
    let cli = Cli::command();
    let names: Vec<String> = cli
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .filter(|name| name != "help")
        .collect();
    assert!(names.len() >= 13, "subcommands: {names:?}");
    for name in names {
        check_snapshot(&format!("help-{name}"), &[name.as_str(), "--help"]);
    }
}

#[test]
fn the_exit_codes_are_in_the_help() {
    let help = stdout(&chatctl(&["--help"]));
    for line in [
        "0  success",
        "2  usage error",
        "3  not found",
        "4  cannot reach chatd",
        "5  not authorised",
    ] {
        assert!(help.contains(line), "missing {line:?} in:\n{help}");
    }
}
