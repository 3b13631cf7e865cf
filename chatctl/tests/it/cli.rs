//! The binary's behaviour at its edges: exit codes and their messages.

use std::net::TcpListener;

use chatctl::cli::ClientRef;
use chatctl::connect::EndpointAddr;

use crate::{chatctl, chatctl_env, scratch_dir, stderr, stdout};

/// A local port that nothing listens on: bound, then closed.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0 works");
    let port = listener
        .local_addr()
        .expect("a bound socket has an address")
        .port();
    drop(listener);
    port
}

#[test]
fn nothing_listening_on_tcp_exits_4_naming_the_endpoint() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let output = chatctl(&["stats", "--endpoint", &endpoint, "--token", "t"]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&format!("cannot reach chatd at {endpoint}")),
        "{err}"
    );
    assert!(err.contains("is chatd running?"), "{err}");
    assert_eq!(stdout(&output), "", "errors stay off stdout");
}

#[test]
fn a_missing_unix_socket_exits_4() {
    let socket = scratch_dir("nosocket").join("admin.sock");
    let endpoint = format!("unix:{}", socket.display());
    let output = chatctl(&["-o", "json", "ls", "--endpoint", &endpoint, "--token", "t"]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("cannot reach chatd at {endpoint}")));
    assert_eq!(stdout(&output), "");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["no-such-command"][..],
        &["kick"],
        &["stats", "--endpoint", "ftp://example.org"],
        &["stats", "--timeout", "soon"],
        &["ban", "10.0.0.1", "--for", "a while"],
        &["-o", "yaml", "stats"],
    ] {
        let output = chatctl(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn a_token_file_on_the_command_line_beats_the_environment() {
    let missing = scratch_dir("tokenfile").join("missing.token");
    let output = chatctl_env(
        &["stats", "--token-file", missing.to_str().expect("utf-8")],
        &[("CHATCTL_TOKEN", "from-env")],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot read the token file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn ca_cert_needs_https() {
    let output = chatctl(&["stats", "--ca-cert", "/dev/null", "--token", "t"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[test]
fn completions_need_no_daemon() {
    let output = chatctl(&["completions", "bash", "--endpoint", "unix:/nonexistent"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("chatctl"));
}

#[test]
fn client_refs() {
    assert_eq!("42".parse(), Ok(ClientRef::Id(42)));
    assert_eq!("guest-3".parse(), Ok(ClientRef::Nick("guest-3".into())));
    assert!("".parse::<ClientRef>().is_err());
    assert!("99999999999999999999999".parse::<ClientRef>().is_err());
}

#[test]
fn endpoints() {
    assert!(matches!(
        EndpointAddr::parse("http://127.0.0.1:50051"),
        Ok(EndpointAddr::Url { .. })
    ));
    assert!(matches!(
        EndpointAddr::parse("https://chat.example:443"),
        Ok(EndpointAddr::Url { .. })
    ));
    assert_eq!(
        EndpointAddr::parse("unix:/run/chatd/admin.sock"),
        Ok(EndpointAddr::Unix("/run/chatd/admin.sock".into()))
    );
    assert_eq!(
        EndpointAddr::parse("unix:///run/chatd/admin.sock"),
        Ok(EndpointAddr::Unix("/run/chatd/admin.sock".into()))
    );
    for bad in ["", "unix:", "127.0.0.1:50051", "ftp://x", "http://"] {
        assert!(EndpointAddr::parse(bad).is_err(), "{bad:?} was accepted");
    }
}

/// A listener that accepts and never says a word (a hung process, another
/// kind of server) is reported as unreachable (4) once `--timeout` has
/// passed, not later and not as an answer from chatd.
#[test]
fn a_listener_that_never_answers_exits_4_within_the_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    let started = std::time::Instant::now();
    let output = chatctl(&[
        "stats",
        "--endpoint",
        &endpoint,
        "--token",
        "t",
        "--timeout",
        "2s",
    ]);
    let took = started.elapsed();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!("cannot reach chatd at {endpoint}")),
        "{err}"
    );
    assert!(err.contains("nothing answered within 2s"), "{err}");
    // The timeout, plus the time to start a process on a busy machine; the
    // old behaviour (the call's timeout, then a probe's) took 4 s.
    assert!(
        took < std::time::Duration::from_millis(3500),
        "took {took:?}: {err}"
    );

    // The same on a UNIX socket.
    let path = scratch_dir("silent").join("admin.sock");
    let _ = std::fs::remove_file(&path);
    let _silent = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let endpoint = format!("unix:{}", path.display());
    let output = chatctl(&[
        "stats",
        "--endpoint",
        &endpoint,
        "--token",
        "t",
        "--timeout",
        "1s",
    ]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
}
