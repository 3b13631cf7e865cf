//! Loading and validation, section by section.

use std::time::Duration;

use super::cluster::validate_cluster;
use super::*;

fn with_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // Never the machine's /etc/chatd/chatd.toml: these tests must not
    // depend on what is installed.
    Config::load_with_env(&Source::NoFile, Some(env))
}

#[test]
fn defaults_are_valid() {
    let c = RawConfig::default().validate().expect("defaults validate");
    assert_eq!(c.chat.listen.len(), 1);
    assert_eq!(c.chat.listen[0].port(), 8080);
    assert!(c.chat.tls_listen.is_empty() && c.chat.trusted_proxies.is_empty());
    assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.ipv6_prefix_len, 64);
    assert_eq!(c.chat.default_room, "lobby");
    assert!(c.limits.flood.is_some());
}

#[test]
fn cluster_is_off_by_default_and_validated() {
    let c = RawConfig::default().validate().expect("defaults validate");
    assert!(c.cluster.is_none(), "no nats_urls: cluster mode off");
    let c = with_env(&[
        (
            "CHATD_CLUSTER__NATS_URLS",
            "nats://127.0.0.1:4222 127.0.0.1:4223",
        ),
        ("CHATD_CLUSTER__NODE_ID", "node-a"),
        ("CHATD_CLUSTER__ON_UNREACHABLE", "refuse"),
    ])
    .expect("valid");
    let cluster = c.cluster.expect("cluster mode on");
    assert_eq!(cluster.nats_urls.len(), 2);
    assert_eq!(cluster.node_id, "node-a");
    assert_eq!(cluster.name, "chatd");
    assert_eq!(cluster.on_unreachable, OnUnreachable::Refuse);

    let err = with_env(&[
        ("CHATD_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222"),
        ("CHATD_CLUSTER__ON_UNREACHABLE", "wait"),
    ])
    .expect_err("unknown mode");
    let text = err.to_string();
    assert!(
        text.contains("cluster.on_unreachable")
            && text.contains("\"wait\"")
            && text.contains("\"refuse\""),
        "{text}"
    );
    let err = with_env(&[
        ("CHATD_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222"),
        ("CHATD_CLUSTER__NODE_ID", "a.b"),
    ])
    .expect_err("a dot would split the subject");
    assert!(err.to_string().contains("cluster.node_id"), "{err}");
    let err = with_env(&[("CHATD_CLUSTER__NAME", "chat.d")]).expect_err("bad prefix");
    assert!(err.to_string().contains("cluster.name"), "{err}");
}

#[test]
fn cluster_node_id_defaults_to_the_host_name() {
    let raw = RawCluster {
        nats_urls: vec!["nats://127.0.0.1:4222".into()],
        ..RawCluster::default()
    };
    let c = validate_cluster(&raw, || "web-1".into())
        .expect("valid")
        .expect("on");
    assert_eq!(c.node_id, "web-1");
    let err = validate_cluster(&raw, || "web.example.org".into()).expect_err("dots");
    assert!(err.to_string().contains("the host name"), "{err}");
}

#[test]
fn nats_credentials_and_tls_are_checked_at_start() {
    let on = |raw: RawCluster| {
        validate_cluster(
            &RawCluster {
                nats_urls: vec!["nats://127.0.0.1:4222".into()],
                ..raw
            },
            || "web-1".into(),
        )
    };
    let c = on(RawCluster::default()).expect("valid").expect("on");
    assert_eq!((c.auth, c.tls), (NatsAuth::None, NatsTls::default()));
    let c = on(RawCluster {
        user: "chatd".into(),
        password: "s3cret".into(),
        ..RawCluster::default()
    })
    .expect("valid")
    .expect("on");
    assert!(matches!(c.auth, NatsAuth::UserPassword { ref user, .. } if user == "chatd"));
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "debug output hides it"
    );
    let err = on(RawCluster {
        user: "chatd".into(),
        ..RawCluster::default()
    })
    .expect_err("a user alone");
    assert!(err.to_string().contains("cluster.password"), "{err}");
    let err = on(RawCluster {
        user: "chatd".into(),
        password: "p".into(),
        token: "t".into(),
        ..RawCluster::default()
    })
    .expect_err("two ways");
    assert!(
        err.to_string().contains("one of cluster.creds_file"),
        "{err}"
    );
    // A file that cannot be read stops the start, naming its key.
    for key in ["creds_file", "tls_ca_file", "tls_cert_file"] {
        let mut raw = RawCluster::default();
        let missing = "/nonexistent/chatd-test.pem".to_string();
        match key {
            "creds_file" => raw.creds_file = missing,
            "tls_ca_file" => raw.tls_ca_file = missing,
            _ => {
                raw.tls_cert_file = missing.clone();
                raw.tls_key_file = missing;
            }
        }
        let err = on(raw).expect_err("missing file");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read `cluster.{key}`")),
            "{err}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("cert.pem");
    std::fs::write(&pem, "").expect("write");
    let err = on(RawCluster {
        tls_cert_file: pem.display().to_string(),
        ..RawCluster::default()
    })
    .expect_err("a certificate without its key");
    assert!(err.to_string().contains("cluster.tls_key_file"), "{err}");
}

#[test]
fn printed_config_hides_nats_secrets() {
    let c = with_env(&[
        ("CHATD_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222"),
        ("CHATD_CLUSTER__TOKEN", "t0ps3cret"),
    ])
    .expect("valid");
    assert_eq!(
        c.cluster.as_ref().map(|c| &c.auth),
        Some(&NatsAuth::Token(Secret("t0ps3cret".into())))
    );
    let printed = c.to_toml();
    assert!(!printed.contains("t0ps3cret"), "{printed}");
    assert!(printed.contains("token = \"<redacted>\""), "{printed}");
}

#[test]
fn env_overrides_split_on_double_underscore() {
    let c = with_env(&[
        ("CHATD_CHAT__LISTEN", "127.0.0.1:0"),
        ("CHATD_LIMITS__MAX_LINE_BYTES", "200"),
    ])
    .expect("valid");
    assert_eq!(c.chat.listen, ["127.0.0.1:0".parse().expect("addr")]);
    assert_eq!(c.limits.max_line_bytes, 200);
}

/// Checks that `result` is a refusal whose message names each of `needles`.
fn refused(result: Result<Config, ConfigError>, needles: &[&str]) {
    let e = result.expect_err("refused").to_string();
    for needle in needles {
        assert!(e.contains(needle), "{e}\n(should name {needle})");
    }
}

#[test]
fn out_of_range_numbers_name_key_value_and_what_is_allowed() {
    for (var, value, key, allowed) in [
        (
            "LIMITS__MAX_LINE_BYTES",
            "-5",
            "limits.max_line_bytes",
            "64..=65536",
        ),
        (
            "LIMITS__HANDSHAKE_TIMEOUT_SECS",
            "0",
            "limits.handshake_timeout_secs",
            "1..=300",
        ),
        (
            "LIMITS__IPV6_PREFIX_LEN",
            "16",
            "limits.ipv6_prefix_len",
            "32..=128",
        ),
        (
            "SERVER__WORKER_THREADS",
            "-1",
            "server.worker_threads",
            "0..=1024",
        ),
        (
            "SERVER__CLIENT_THREADS",
            "2",
            "server.client_threads",
            "0..=1",
        ),
        (
            "CHAT__WRITE_COALESCE_MS",
            "101",
            "chat.write_coalesce_ms",
            "0..=100",
        ),
    ] {
        let var = format!("CHATD_{var}");
        refused(with_env(&[(&var, value)]), &[key, value, allowed]);
    }
}

#[test]
fn a_bad_address_names_key_value_and_the_form() {
    refused(
        with_env(&[("CHATD_CHAT__LISTEN", "nowhere")]),
        &["chat.listen", "nowhere", "IP:PORT"],
    );
}

#[test]
fn listen_takes_one_address_or_a_list() {
    let c = admin("[chat]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\n").expect("valid");
    assert_eq!(c.chat.listen.len(), 2);
    assert!(c.chat.listen[1].is_ipv6());
    let c = with_env(&[
        ("CHATD_CHAT__LISTEN", "127.0.0.1:0 [::1]:0"),
        ("CHATD_UDP__LISTEN", "[::1]:0"),
        ("CHATD_ADMIN__LISTEN", "127.0.0.1:0 [::1]:0"),
    ])
    .expect("valid");
    assert_eq!(c.chat.listen.len(), 2);
    assert_eq!(c.udp.expect("on").listen.len(), 1);
    assert_eq!(c.admin.expect("on").listen.len(), 2);
    refused(
        admin("[chat]\nlisten = []\n"),
        &["chat.listen", "at least one"],
    );
    refused(
        admin("[admin]\nlisten = [\"127.0.0.1:50051\", \"[::]:50051\"]\n"),
        &["[::]:50051", "admin.tokens"],
    );
}

#[test]
fn tls_listen_needs_a_certificate_and_proxies_are_cidrs() {
    refused(
        admin("[chat]\ntls_listen = \"127.0.0.1:0\"\n"),
        &["chat.tls_cert", "chat.tls_listen"],
    );
    refused(admin("[chat]\ntls_cert = \"/x.pem\"\n"), &["chat.tls_key"]);
    let c = admin("[chat]\ntrusted_proxies = [\"10.1.2.3/8\", \"192.0.2.1\", \"fd00::/8\"]\n")
        .expect("valid");
    let nets: Vec<String> = c
        .chat
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]);
    refused(
        admin("[chat]\ntrusted_proxies = [\"haproxy\"]\n"),
        &["chat.trusted_proxies", "\"haproxy\""],
    );
}

#[test]
fn worker_threads_default_to_one_per_cpu() {
    let c = RawConfig::default().validate().expect("defaults validate");
    assert_eq!(c.server.worker_threads, None);
    let c = with_env(&[("CHATD_SERVER__WORKER_THREADS", "1")]).expect("1 is fine");
    assert_eq!(c.server.worker_threads, Some(1));
}

#[test]
fn write_coalescing_is_in_milliseconds_and_zero_turns_it_off() {
    let c = RawConfig::default().validate().expect("defaults validate");
    assert_eq!(c.chat.write_coalesce, Duration::from_millis(9));
    let c = with_env(&[("CHATD_CHAT__WRITE_COALESCE_MS", "0")]).expect("0 turns it off");
    assert!(c.chat.write_coalesce.is_zero());
}

fn admin(toml_text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(toml_text).expect("valid TOML");
    raw.validate()
}

#[test]
fn admin_tokens_roles_and_tls_are_checked() {
    let c = admin(
            "[admin]\ntokens = [{ name = \"ops\", token = \"0123456789abcdef\" }, { name = \"mon\", token = \"fedcba9876543210\", role = \"read\" }]\n",
        )
        .expect("valid");
    let a = c.admin.expect("enabled by default");
    assert_eq!(a.tokens.len(), 2);
    assert_eq!(a.tokens[0].role, Role::Admin);
    assert_eq!(a.tokens[1].role, Role::Read);
    assert!(!format!("{:?}", a.tokens).contains("0123456789abcdef"));

    let e = admin("[admin]\ntokens = [{ name = \"ops\", token = \"short\" }]\n")
        .expect_err("too short")
        .to_string();
    assert!(
        e.contains("admin.tokens.token") && !e.contains("short"),
        "{e}"
    );
    refused(
        admin(
            "[admin]\ntokens = [{ name = \"ops\", token = \"0123456789abcdef\", role = \"root\" }]\n",
        ),
        &["admin.tokens.role", "\"read\""],
    );
    refused(
        admin("[admin]\ntls_cert = \"/etc/chatd/admin.crt\"\n"),
        &["admin.tls_key"],
    );
    assert!(
        admin("[admin]\nenabled = false\nlisten = \"\"\n")
            .expect("valid")
            .admin
            .is_none()
    );
}

#[test]
fn a_public_admin_address_needs_a_token() {
    refused(
        admin("[admin]\nlisten = \"0.0.0.0:50051\"\n"),
        &["0.0.0.0:50051", "admin.tokens"],
    );
    admin("[admin]\nlisten = \"0.0.0.0:50051\"\ntokens = [{ name = \"ops\", token = \"0123456789abcdef\" }]\n")
            .expect("a token makes it acceptable");
    admin("[admin]\nlisten = \"[::1]:50051\"\n").expect("loopback needs none");
}

#[test]
fn the_state_dir_follows_systemd_root_and_xdg() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| std::ffi::OsString::from(v))
        }
    };
    assert_eq!(
        default_state_dir(env(&[("STATE_DIRECTORY", "/var/lib/x:/var/lib/y")]), true),
        PathBuf::from("/var/lib/x")
    );
    assert_eq!(
        default_state_dir(env(&[("HOME", "/home/u")]), true),
        PathBuf::from("/var/lib/chatd")
    );
    assert_eq!(
        default_state_dir(env(&[("XDG_STATE_HOME", "/s"), ("HOME", "/home/u")]), false),
        PathBuf::from("/s/chatd")
    );
    assert_eq!(
        default_state_dir(env(&[("HOME", "/home/u")]), false),
        PathBuf::from("/home/u/.local/state/chatd")
    );
}

#[test]
fn operations_keys_validate() {
    let c = with_env(&[
        ("CHATD_LOG__TARGET", "journald"),
        ("CHATD_TELEMETRY__OTLP_ENDPOINT", "http://127.0.0.1:4317"),
        ("CHATD_METRICS__LISTEN", "127.0.0.1:9100"),
    ])
    .expect("valid");
    assert_eq!(c.log.target, LogTarget::Journald);
    assert_eq!(
        c.telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4317")
    );
    assert_eq!(c.metrics.listen.map(|a| a.port()), Some(9100));
    let d = with_env(&[]).expect("defaults");
    assert_eq!(d.log.target, LogTarget::Auto);
    assert!(d.telemetry.otlp_endpoint.is_none() && d.metrics.listen.is_none());

    for (key, value, needle) in [
        ("CHATD_LOG__TARGET", "syslog", "log.target"),
        (
            "CHATD_TELEMETRY__OTLP_ENDPOINT",
            "collector:4317",
            "telemetry.otlp_endpoint",
        ),
        ("CHATD_METRICS__LISTEN", "localhost:9100", "metrics.listen"),
    ] {
        let e = with_env(&[(key, value)]).expect_err("rejected").to_string();
        assert!(e.contains(needle) && e.contains(value), "{e}");
    }
}

#[test]
fn unknown_keys_are_rejected() {
    refused(
        with_env(&[("CHATD_LIMITS__MAX_LINES", "5")]),
        &["max_lines"],
    );
}

#[test]
fn cluster_timings_default_and_are_bounded() {
    let on = ("CHATD_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222");
    let c = with_env(&[on]).expect("defaults validate");
    let t = c.cluster.expect("cluster mode on").timings;
    assert_eq!(t, ClusterTimings::default());
    assert_eq!(t.nick_expiry, Duration::from_secs(20));
    assert_eq!(t.nick_rewrite, Duration::from_secs(5));
    assert_eq!(t.member_silence, Duration::from_secs(6));
    assert_eq!(t.history_load, Duration::from_millis(2000));

    let c = with_env(&[
        on,
        ("CHATD_CLUSTER__NICK_EXPIRY_SECS", "6"),
        ("CHATD_CLUSTER__NICK_REWRITE_SECS", "2"),
        ("CHATD_CLUSTER__MEMBER_SILENCE_SECS", "4"),
        ("CHATD_CLUSTER__HISTORY_LOAD_MS", "500"),
    ])
    .expect("the lowest allowed");
    let t = c.cluster.expect("cluster mode on").timings;
    assert_eq!(
        (
            t.nick_expiry,
            t.nick_rewrite,
            t.member_silence,
            t.history_load
        ),
        (
            Duration::from_secs(6),
            Duration::from_secs(2),
            Duration::from_secs(4),
            Duration::from_millis(500)
        )
    );
    with_env(&[
        on,
        ("CHATD_CLUSTER__NICK_EXPIRY_SECS", "30"),
        ("CHATD_CLUSTER__NICK_REWRITE_SECS", "10"),
        ("CHATD_CLUSTER__MEMBER_SILENCE_SECS", "10"),
    ])
    .expect("the highest allowed");

    // Each refusal names the key, the value and what is allowed.
    for (key, value, allowed) in [
        ("NICK_EXPIRY_SECS", "31", "at most 30"),
        (
            "NICK_EXPIRY_SECS",
            "14",
            "at least 3 × cluster.nick_rewrite_secs (5)",
        ),
        ("NICK_REWRITE_SECS", "0", "1..=10"),
        ("NICK_REWRITE_SECS", "11", "1..=10"),
        ("MEMBER_SILENCE_SECS", "3", "4..=10"),
        ("MEMBER_SILENCE_SECS", "11", "4..=10"),
        ("HISTORY_LOAD_MS", "0", "100..=30000"),
    ] {
        let env = format!("CHATD_CLUSTER__{key}");
        let err = with_env(&[on, (&env, value)]).expect_err(&format!("{key} = {value}"));
        let text = err.to_string();
        assert!(
            text.contains(&format!("cluster.{}", key.to_ascii_lowercase()))
                && text.contains(&format!(": {value} —"))
                && text.contains(allowed),
            "{text}"
        );
    }
    // A rewrite of 8 s asks for an expiry of 24 s or more.
    let err = with_env(&[on, ("CHATD_CLUSTER__NICK_REWRITE_SECS", "8")])
        .expect_err("the default expiry is under 3 × 8");
    assert!(
        err.to_string().contains("`cluster.nick_expiry_secs`: 20"),
        "{err}"
    );
    // Checked with cluster mode off too.
    with_env(&[("CHATD_CLUSTER__MEMBER_SILENCE_SECS", "1")]).expect_err("off, still checked");
}
