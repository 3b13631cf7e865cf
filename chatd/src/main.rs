//! The `chatd` binary: reads arguments and config, starts logging, binds the
//! listeners, and hands them to [`chatd::run`] until a signal stops it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use chatd::config::{Config, Source};

/// A line-based chat daemon for nc and telnet, with a UDP echo port.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (TOML). Without it, /etc/chatd/chatd.toml is read when it
    /// exists; otherwise the built-in defaults apply. CHATD_<SECTION>__<KEY>
    /// environment variables override both.
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
    match runtime.block_on(serve(config, source, telemetry)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: Config,
    source: Source,
    telemetry: chatd::telemetry::Telemetry,
) -> anyhow::Result<()> {
    let listeners = chatd::bind(&config)?;
    let metrics = chatd::metrics::bind(&config)?;
    let chat = listeners.chat.local_addr().context("chat listener")?;
    let udp = match &listeners.udp {
        Some(s) => s.local_addr().context("udp socket")?.to_string(),
        None => "off".to_string(),
    };
    let file = source
        .path()
        .map_or("built-in defaults".to_string(), |p| p.display().to_string());
    let metrics_addr = chatd::metrics::describe(metrics.as_ref());
    info!(chat = %chat, udp = %udp, metrics = %metrics_addr, config = %file, "listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let grace = config.server.shutdown_timeout;
    let hub = chatd::hub::Hub::new(config);
    if let Some(listener) = metrics {
        tokio::spawn(chatd::metrics::serve(
            listener,
            hub.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(reloads(hub.clone(), source));
    // Every listener is bound: connections queue in the backlog from here.
    chatd::notify::ready();
    let notifier = tokio::spawn(chatd::notify::run(hub.clone(), shutdown.clone()));
    chatd::server::serve(listeners, hub, shutdown, grace).await;
    let _ = notifier.await;
    telemetry.shutdown().await;
    info!("stopped");
    Ok(())
}

/// SIGHUP re-reads the configuration file and applies what can change at
/// run time (limits, history, motd…); addresses, logging and tracing
/// settings take a restart. A bad file leaves the running settings alone.
async fn reloads(hub: chatd::hub::Hub, source: Source) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install the SIGHUP handler; reloading is off");
        return;
    };
    while hup.recv().await.is_some() {
        chatd::notify::reloading();
        match Config::load(&source) {
            Ok(config) => {
                hub.set_config(config);
                info!("configuration reloaded");
            }
            Err(e) => warn!(error = %e, "configuration not reloaded; keeping the running one"),
        }
        chatd::notify::ready();
    }
}

/// SIGINT or SIGTERM starts a graceful shutdown; a second one exits at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        warn!("cannot install signal handlers; stop chatd with SIGKILL");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
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
