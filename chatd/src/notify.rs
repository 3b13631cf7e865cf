//! The service manager's notify protocol (`sd_notify(3)`), for systemd's
//! `Type=notify`: `READY=1` once every listener is bound, `STATUS=` with a
//! one-line summary, `RELOADING=1` around a reload, `STOPPING=1` at shutdown,
//! and `WATCHDOG=1` while the daemon is demonstrably alive.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset, so chatd behaves
//! the same outside systemd. A failed send is logged once and otherwise
//! ignored: the service manager's view must never stop the chat.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use chatd_hub::hub::Hub;
use chatd_text::protocol::count;

/// How often `STATUS=` is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Whether a service manager is listening.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(what: &'static str, states: &[NotifyState]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states)
        && !WARNED.swap(true, Relaxed)
    {
        warn!(error = %e, notification = what, "cannot notify the service manager");
    }
}

/// Every listener is bound and chat is being served (again).
pub fn ready() {
    send("ready", &[NotifyState::Ready]);
}

/// A configuration reload has begun; [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(_) => send("reloading", &[NotifyState::Reloading]),
    }
}

/// A graceful shutdown has begun.
pub fn stopping() {
    send("stopping", &[NotifyState::Stopping]);
}

/// The one-line summary `systemctl status` shows.
pub fn status(text: &str) {
    send("status", &[NotifyState::Status(text)]);
}

/// Refreshes `STATUS=` and, when the unit sets `WatchdogSec=`, sends
/// `WATCHDOG=1` at half that period; sends `STOPPING=1` when `shutdown` is
/// cancelled.
///
/// Each ping is earned: a probe task is spawned on the runtime and takes the
/// hub's state lock (through [`Hub::snapshot`]); only when it comes back is
/// `WATCHDOG=1` sent. A deadlocked hub or a starved runtime therefore stops
/// the pings, and systemd restarts the daemon.
pub async fn run(hub: Hub, handed_over: impl Fn() -> bool, shutdown: CancellationToken) {
    if !enabled() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let every = every.max(Duration::from_millis(10));
    debug!(
        watchdog_ms = watchdog.map(|w| w.as_millis() as u64),
        "notifying the service manager"
    );
    loop {
        let probe = tokio::spawn({
            let hub = hub.clone();
            async move { hub.snapshot() }
        });
        let snapshot = tokio::select! {
            () = shutdown.cancelled() => break,
            done = probe => match done {
                Ok(snapshot) => snapshot,
                // The probe panicked: the hub is not healthy; stay silent.
                Err(_) => return,
            },
        };
        let line = format!(
            "{}, {}, {} relayed",
            count(snapshot.clients, "client", "clients"),
            count(snapshot.rooms, "room", "rooms"),
            count(snapshot.counters.lines_relayed, "line", "lines"),
        );
        if watchdog.is_some() {
            send(
                "watchdog",
                &[NotifyState::Watchdog, NotifyState::Status(&line)],
            );
        } else {
            status(&line);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    // After a seamless upgrade the new process is the service: saying
    // STOPPING now would stop it.
    if !handed_over() {
        stopping();
    }
}

/// The service's main process is now `pid` (a seamless upgrade handed over
/// to it): systemd follows that process from here.
pub fn main_pid(pid: u32) {
    send("main pid", &[NotifyState::MainPid(pid)]);
}
