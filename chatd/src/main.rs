//! The `chatd` binary: reads arguments and config, starts logging, binds the
//! listeners, and hands them to a [`chatd::Daemon`] until a signal stops it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use chatd::Daemon;
use chatd::activation::Activated;
use chatd::config::{Config, Source};
use chatd::reload::Reloader;
use chatd::telemetry::Telemetry;

/// A line-based chat daemon for nc and telnet, with a UDP echo port.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (TOML). Without it, /etc/chatd/chatd.toml is read when it
    /// exists; otherwise the built-in defaults apply. CHATD_<SECTION>__<KEY>
    /// environment variables override both.
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Read no config file, not even /etc/chatd/chatd.toml: the built-in
    /// defaults and CHATD_<SECTION>__<KEY> variables only.
    #[arg(long, conflicts_with = "config")]
    no_config: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long, conflicts_with = "check_config")]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let source = match args.config {
        Some(path) => Source::Explicit(path),
        None if args.no_config => Source::NoFile,
        None => Source::Default,
    };
    let config = match Config::load(&source) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chatd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        let from = source
            .path()
            .map_or("built-in defaults".to_string(), |p| p.display().to_string());
        println!("chatd: configuration OK ({from})");
        return ExitCode::SUCCESS;
    }
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    // Before any thread starts: this reads and clears LISTEN_FDS.
    let activated = match chatd::activation::take() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chatd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.server.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chatd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        // The OTLP exporter's channel is created on the runtime.
        let _runtime = runtime.enter();
        chatd::telemetry::init(&config.log, &config.telemetry)
    };
    std::panic::set_hook(Box::new(|info| {
        error!(panic = %info, "internal error; please report it");
    }));
    match runtime.block_on(serve(config, source, telemetry, activated)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatd: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, `outer: inner`, without repeating
/// a cause the outer message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn serve(
    config: Config,
    source: Source,
    telemetry: Telemetry,
    activated: Activated,
) -> anyhow::Result<()> {
    let from_systemd = [
        ("chat", !activated.chat.is_empty()),
        ("tls", !activated.tls.is_empty()),
        ("udp", !activated.udp.is_empty()),
    ];
    let listeners = chatd::bind(&config, activated)?;
    let metrics = chatd::metrics::bind(&config)?;
    // Space-separated addresses, "off" for none.
    let list = |addrs: Vec<std::io::Result<std::net::SocketAddr>>, what: &'static str| {
        let addrs = addrs
            .into_iter()
            .map(|a| a.map(|a| a.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .context(what)?;
        anyhow::Ok(if addrs.is_empty() {
            "off".to_string()
        } else {
            addrs.join(" ")
        })
    };
    let chat = list(
        listeners.chat.iter().map(|l| l.local_addr()).collect(),
        "chat listener",
    )?;
    let tls = list(
        listeners.tls.iter().map(|l| l.local_addr()).collect(),
        "TLS chat listener",
    )?;
    let udp = list(
        listeners.udp.iter().map(|s| s.local_addr()).collect(),
        "udp socket",
    )?;
    let admin = list(
        listeners.admin.tcp.iter().map(|l| l.local_addr()).collect(),
        "admin listener",
    )?;
    for (what, given) in from_systemd {
        if given {
            info!(listener = what, "using the sockets systemd passed");
        }
    }
    let admin_socket = match &listeners.admin.unix {
        Some((_, path)) => path.display().to_string(),
        None => "off".to_string(),
    };
    let cluster = config.cluster.clone();
    let file = source
        .path()
        .map_or("built-in defaults".to_string(), |p| p.display().to_string());
    let metrics_addr = chatd::metrics::describe(metrics.as_ref());
    let max_clients = config.limits.max_clients;
    let metrics_config = config.metrics.clone();
    let daemon = Daemon::new(config, source, Some(telemetry.log_level()), &listeners)?;
    let files = chatd::server::raise_file_limit();
    let capacity = chatd::server::client_capacity(files);
    if capacity < max_clients {
        warn!(
            open_files = files,
            clients = capacity,
            "limits.max_clients = {max_clients} is more than the file limit allows; \
             clients past {capacity} are refused as if the server were full \
             (raise LimitNOFILE / ulimit -n, or lower limits.max_clients)"
        );
    }
    daemon.hub().set_fd_capacity(capacity);
    for path in daemon.generated_token_files() {
        info!(path = %path.display(), "no admin token configured: generated one for local use");
    }
    // Before "listening": with on_unreachable = "refuse", a node that cannot
    // reach NATS never serves. The cluster stops once chat has drained.
    let cluster_stop = CancellationToken::new();
    if let Some(cluster) = &cluster {
        chatd::cluster::start(cluster, daemon.hub().clone(), cluster_stop.clone()).await?;
    }
    info!(chat = %chat, tls = %tls, udp = %udp, admin = %admin, admin_socket = %admin_socket, metrics = %metrics_addr, config = %file, "listening");
    let shutdown = CancellationToken::new();
    let _cluster_stop = cluster_stop.drop_guard();
    tokio::spawn(signals(shutdown.clone(), daemon.reloader()));
    if let Some(listener) = metrics {
        tokio::spawn(chatd::metrics::serve(
            listener,
            daemon.hub().clone(),
            metrics_config,
            shutdown.clone(),
        ));
    }
    // Every listener is bound: connections queue in the backlog from here.
    chatd::notify::ready();
    let notifier = tokio::spawn(chatd::notify::run(daemon.hub().clone(), shutdown.clone()));
    daemon.run(listeners, shutdown).await;
    let _ = notifier.await;
    telemetry.shutdown().await;
    info!("stopped");
    Ok(())
}

/// SIGINT or SIGTERM starts a graceful shutdown; a second one exits at once.
/// SIGHUP reloads the configuration.
async fn signals(shutdown: CancellationToken, reloader: Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot install signal handlers; stop chatd with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => reload(&reloader).await,
        }
    }
    info!("signal received: shutting down (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    warn!("second signal: exiting now");
    std::process::exit(130);
}

/// SIGHUP: the same as the admin API's `Reload`; the outcome is logged, and
/// systemd is told when the reload starts and ends.
async fn reload(reloader: &Reloader) {
    let reloader = reloader.clone();
    chatd::notify::reloading();
    let outcome = tokio::task::spawn_blocking(move || reloader.reload()).await;
    chatd::notify::ready();
    match outcome {
        Ok(Ok(report)) => info!(
            config = %report.config_path,
            applied = ?report.applied,
            restart_required = ?report.restart_required,
            "SIGHUP: configuration reloaded"
        ),
        Ok(Err(e)) => error!(error = %e, "SIGHUP: reload refused; the running configuration stays"),
        Err(e) => error!(error = %e, "SIGHUP: reload failed"),
    }
}
