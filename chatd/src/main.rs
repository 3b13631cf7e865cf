//! The `chatd` binary: reads arguments and config, starts logging, binds the
//! listeners, and hands them to a [`chatd::Daemon`] until a signal stops it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use chatd::Daemon;
use chatd::activation::Activated;
use chatd::reload::Reloader;
use chatd::telemetry::Telemetry;
use chatd_config::{Config, Source};

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
    // First of all: a SIGUSR2 or SIGHUP before the runtime's handlers exist
    // would end this process (their default action). `systemctl kill -s
    // USR2` typed twice reaches a new process while it takes over, and its
    // clients would go with it.
    let early = EarlySignals::catch();
    // Resolved now, so that an upgrade starts whatever file is at this path
    // then (a package upgrade replaces it), with the same arguments.
    let restart = Restart {
        exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        args: std::env::args_os().skip(1).collect(),
        handoff: chatd::handoff::take_path(),
    };
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
    match runtime.block_on(serve(config, source, telemetry, activated, restart, early)) {
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

/// SIGUSR2 and SIGHUP caught from the start of `main` until [`signals`]
/// handles them: recorded, not acted on (an upgrade or reload while this
/// process is still starting, or taking over, has nothing to act on yet).
struct EarlySignals {
    caught: Vec<(&'static str, Arc<AtomicBool>, Option<signal_hook::SigId>)>,
}

impl EarlySignals {
    fn catch() -> EarlySignals {
        use signal_hook::consts::{SIGHUP, SIGUSR2};
        let caught = [("SIGUSR2", SIGUSR2), ("SIGHUP", SIGHUP)]
            .into_iter()
            .map(|(name, signal)| {
                let flag = Arc::new(AtomicBool::new(false));
                // Failing, the signal keeps its default action (it exits).
                let id = signal_hook::flag::register(signal, flag.clone()).ok();
                (name, flag, id)
            })
            .collect();
        EarlySignals { caught }
    }

    /// Hands the signals to the runtime's handlers (installed just before)
    /// and says which ones came while starting.
    fn release(self) {
        for (name, flag, id) in self.caught {
            if let Some(id) = id {
                signal_hook::low_level::unregister(id);
            }
            if flag.load(Ordering::Relaxed) {
                warn!(
                    signal = name,
                    "received while starting: ignored; send it again"
                );
            }
        }
    }
}

/// How this process was started, for starting its successor (seamless
/// upgrade), and whether it is itself one.
struct Restart {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
    /// Set when this process takes over from a running chatd.
    handoff: Option<PathBuf>,
}

async fn serve(
    config: Config,
    source: Source,
    telemetry: Telemetry,
    activated: Activated,
    restart: Restart,
    early: EarlySignals,
) -> anyhow::Result<()> {
    let from_systemd = passed_by_systemd(&activated);
    let _state_lock = lock_state_dir(&config, restart.handoff.is_some())?;
    // Before any descriptor arrives: a successor receives one per client.
    chatd::server::raise_file_limit();
    // Taking over from a running chatd: its sockets instead of binding.
    let mut incoming = restart
        .handoff
        .as_ref()
        .map(|path| tokio::task::block_in_place(|| chatd::handoff::receive(path)))
        .transpose()?;
    let (listeners, metrics) = sockets(&config, activated, incoming.as_mut())?;
    let metrics_config = config.metrics.clone();
    let file = source
        .path()
        .map_or("built-in defaults".into(), |p| p.display().to_string());
    let state_dir = config.server.state_dir.clone();
    let shutdown = CancellationToken::new();
    let cluster_stop = CancellationToken::new();
    // Everything that can fail before serving; a successor that fails here
    // tells the old process why, and the old one serves on.
    // Kept for the next upgrade, which hands these to its successor.
    let copies = chatd::handoff::Upgrader::listener_copies(&listeners, metrics.as_ref())
        .context("copying the listeners for upgrades")?;
    let (daemon, cluster) = prepare_or_tell(
        config,
        source,
        &telemetry,
        &listeners,
        copies.len(),
        incoming.as_mut(),
        &cluster_stop,
    )
    .await?;
    let upgrader = chatd::handoff::Upgrader::new(
        (restart.exe, restart.args),
        state_dir,
        copies,
        daemon.generated_admin_token(),
        cluster.as_ref().map(chatd_cluster::Cluster::receipts),
        daemon.gate().clone(),
        shutdown.clone(),
    );
    daemon.set_upgrader(upgrader.clone());
    let addrs = describe(&listeners, metrics.as_ref())?;
    for what in from_systemd {
        info!(listener = what, "using the sockets systemd passed");
    }
    let _cluster_stop = cluster_stop.drop_guard();
    // Installed before anything says the process serves (the `listening`
    // line, READY=1): a SIGTERM right after either (a stop just after a
    // start) must already find the handler, or it would kill the process
    // without a graceful shutdown.
    let handlers = Handlers::install();
    if handlers.is_some() {
        early.release();
    }
    info!(chat = %addrs.chat, tls = %addrs.tls, udp = %addrs.udp, admin = %addrs.admin, admin_socket = %addrs.admin_socket, metrics = %addrs.metrics, config = %file, "listening");
    let (reloader, hub) = (daemon.reloader(), daemon.hub().clone());
    tokio::spawn(signals(handlers, shutdown.clone(), reloader, hub, upgrader));
    if let Some(listener) = metrics {
        let hub = daemon.hub().clone();
        tokio::spawn(chatd::metrics::serve(
            listener,
            hub,
            metrics_config,
            shutdown.clone(),
        ));
    }
    run_until_stopped(daemon, listeners, telemetry, shutdown).await;
    Ok(())
}

/// [`prepare`]; a successor then tells the old process why it failed (the
/// old one serves on), or waits for its commit.
#[allow(clippy::too_many_arguments)]
async fn prepare_or_tell(
    config: Config,
    source: Source,
    telemetry: &Telemetry,
    listeners: &chatd::Listeners,
    listener_copies: usize,
    mut incoming: Option<&mut chatd::handoff::Incoming>,
    cluster_stop: &CancellationToken,
) -> anyhow::Result<(Daemon, Option<chatd_cluster::Cluster>)> {
    let prepared = prepare(
        config,
        source,
        telemetry,
        listeners,
        listener_copies,
        incoming.as_deref_mut(),
        cluster_stop,
    )
    .await;
    match (prepared, incoming) {
        (Ok((daemon, handed, cluster)), Some(incoming)) => {
            took_over(incoming, handed)?;
            Ok((daemon, cluster))
        }
        (Ok((daemon, _, cluster)), None) => Ok((daemon, cluster)),
        (Err(e), Some(incoming)) => {
            incoming.fail(&one_line(&e));
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

/// The listeners systemd passed, by what they serve.
fn passed_by_systemd(activated: &Activated) -> Vec<&'static str> {
    let given = [
        ("chat", !activated.chat.is_empty()),
        ("tls", !activated.tls.is_empty()),
        ("udp", !activated.udp.is_empty()),
    ];
    given
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(what, _)| what)
        .collect()
}

/// A successor's start: until the old process commits, this one touches no
/// socket; then systemd is told which process is the service now.
fn took_over(incoming: &chatd::handoff::Incoming, handed: usize) -> anyhow::Result<()> {
    tokio::task::block_in_place(|| incoming.ready())?;
    chatd::notify::main_pid(std::process::id());
    info!(
        clients = handed,
        pid = std::process::id(),
        "upgrade: took over from the previous process"
    );
    Ok(())
}

/// Serves until `shutdown`, then says how this process stopped. Every
/// listener is bound: connections queue in the backlog from READY=1 on.
async fn run_until_stopped(
    daemon: Daemon,
    listeners: chatd::Listeners,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) {
    chatd::notify::ready();
    let gate = daemon.gate().clone();
    let handed_over = move || gate.committed();
    let notifier = tokio::spawn(chatd::notify::run(
        daemon.hub().clone(),
        handed_over.clone(),
        shutdown.clone(),
    ));
    daemon.run(listeners, shutdown).await;
    let _ = notifier.await;
    telemetry.shutdown().await;
    if handed_over() {
        info!("stopped: the new process serves everyone");
    } else {
        info!("stopped");
    }
}

/// One chatd per state directory: two would each keep their own bans in
/// one `bans.json`. A successor's predecessor holds the lock until it
/// exits; the successor takes it then, in the background, and holds it for
/// the rest of its life.
fn lock_state_dir(
    config: &Config,
    taking_over: bool,
) -> anyhow::Result<Option<chatd_hub::files::StateLock>> {
    if !taking_over {
        return Ok(Some(chatd_hub::files::StateLock::acquire(
            &config.server.state_dir,
        )?));
    }
    let dir = config.server.state_dir.clone();
    tokio::spawn(async move {
        match chatd_hub::files::StateLock::take_over(&dir, std::time::Duration::from_millis(100))
            .await
        {
            Ok(lock) => {
                let _lock = lock;
                std::future::pending::<()>().await;
            }
            Err(e) => warn!(error = %e, "cannot lock the state directory"),
        }
    });
    Ok(None)
}

/// The chat, UDP, admin and metrics sockets: the previous process's when
/// taking over from it, else bound (or passed by systemd) now.
fn sockets(
    config: &Config,
    activated: Activated,
    incoming: Option<&mut chatd::handoff::Incoming>,
) -> anyhow::Result<(chatd::Listeners, Option<tokio::net::TcpListener>)> {
    Ok(match incoming {
        Some(incoming) => (
            std::mem::replace(&mut incoming.listeners, chatd::Listeners::empty()),
            incoming.metrics.take(),
        ),
        None => (
            chatd::bind(config, activated)?,
            chatd::metrics::bind(config)?,
        ),
    })
}

/// Prepares the daemon on `listeners`: bans, admin tokens, the file limit,
/// cluster mode, and, after an upgrade, the clients of the previous process.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    config: Config,
    source: Source,
    telemetry: &Telemetry,
    listeners: &chatd::Listeners,
    listener_copies: usize,
    incoming: Option<&mut chatd::handoff::Incoming>,
    cluster_stop: &CancellationToken,
) -> anyhow::Result<(Daemon, usize, Option<chatd_cluster::Cluster>)> {
    let cluster = config.cluster.clone();
    let max_clients = config.limits.max_clients;
    let side = chatd::server::side_connections(&config);
    let token = incoming.as_ref().and_then(|i| i.admin_token.clone());
    let mut daemon = Daemon::with_admin_token(
        config,
        source,
        Some(telemetry.log_level()),
        listeners,
        token,
    )?;
    let files = chatd::server::raise_file_limit();
    // The listener copies kept for upgrades are descriptors like any other;
    // the admin API and metrics have theirs set aside.
    let capacity = chatd::server::client_capacity(files).saturating_sub(listener_copies + side);
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
    // reach NATS never serves. Connected before the clients are taken over,
    // so that the old process's users are not frozen while NATS answers.
    let connection = match &cluster {
        Some(cluster) => Some(chatd_cluster::connect(cluster).await?),
        None => None,
    };
    // Everything above ran while the previous process served on; it
    // freezes its connections now, and they are adopted as they arrive.
    let handed = match incoming {
        Some(incoming) => tokio::task::block_in_place(|| {
            incoming.receive_state(|received| daemon.adopt(received))
        })?,
        None => 0,
    };
    // The cluster stops once chat has drained.
    let mut running = None;
    if let (Some(cluster), Some(connection)) = (&cluster, connection) {
        let started = chatd_cluster::start(
            cluster,
            connection,
            daemon.hub().clone(),
            daemon.cluster_seams(),
            cluster_stop.clone(),
        )
        .await?;
        daemon.set_admin_bus(started.admin_bus());
        running = Some(started);
    }
    Ok((daemon, handed, running))
}

/// Every listener's addresses, space-separated, "off" for none.
struct Addrs {
    chat: String,
    tls: String,
    udp: String,
    admin: String,
    admin_socket: String,
    metrics: String,
}

fn describe(
    listeners: &chatd::Listeners,
    metrics: Option<&tokio::net::TcpListener>,
) -> anyhow::Result<Addrs> {
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
    Ok(Addrs {
        chat: list(
            listeners.chat.iter().map(|l| l.local_addr()).collect(),
            "chat listener",
        )?,
        tls: list(
            listeners.tls.iter().map(|l| l.local_addr()).collect(),
            "TLS chat listener",
        )?,
        udp: list(
            listeners.udp.iter().map(|s| s.local_addr()).collect(),
            "udp socket",
        )?,
        admin: list(
            listeners.admin.tcp.iter().map(|l| l.local_addr()).collect(),
            "admin listener",
        )?,
        admin_socket: match &listeners.admin.unix {
            Some((_, path)) => path.display().to_string(),
            None => "off".to_string(),
        },
        metrics: chatd::metrics::describe(metrics),
    })
}

/// The runtime's handlers of the signals chatd acts on.
struct Handlers {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Handlers {
    /// Installs them; each takes effect at once.
    fn install() -> Option<Handlers> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Handlers {
            int: signal(SignalKind::interrupt()).ok()?,
            term: signal(SignalKind::terminate()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
            usr2: signal(SignalKind::user_defined2()).ok()?,
        })
    }
}

/// SIGINT or SIGTERM starts a graceful shutdown; a second one exits at once.
/// SIGHUP reloads the configuration; SIGUSR2 upgrades (`chatd::handoff`).
async fn signals(
    handlers: Option<Handlers>,
    shutdown: CancellationToken,
    reloader: Reloader,
    hub: chatd_hub::hub::Hub,
    upgrader: chatd::handoff::Upgrader,
) {
    let Some(Handlers {
        mut int,
        mut term,
        mut hup,
        mut usr2,
    }) = handlers
    else {
        warn!("cannot install signal handlers; stop chatd with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => reload(&reloader).await,
            _ = usr2.recv() => {
                tokio::spawn(upgrade(upgrader.clone(), hub.clone()));
            }
            () = shutdown.cancelled() => return,
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

/// SIGUSR2: the same as the admin API's `Upgrade`; the outcome is logged.
async fn upgrade(upgrader: chatd::handoff::Upgrader, hub: chatd_hub::hub::Hub) {
    info!("SIGUSR2: upgrading");
    if let Err(e) = upgrader.upgrade(&hub).await {
        error!(error = %e, "SIGUSR2: upgrade failed; this process serves on");
    }
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
