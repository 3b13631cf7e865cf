//! The old process's side of the freeze: how every task that touches a
//! socket (accept loops, UDP echo, each connection) learns that a handoff
//! has begun, stops at a clean point, and learns how it ended.
//!
//! Steps, driven by [`crate::handoff::Upgrader`]: **freeze** (accept loops
//! and UDP stop waiting on their sockets; each connection stops before its
//! next read and parks), **collect** (every parked connection, once all of
//! them are parked so that no more lines are published, moves its outbox
//! into its state and hands it over with a copy of its socket), then
//! **resume** (the new process failed: everyone continues exactly where it
//! stopped) or **commit** (the new process serves: everyone drops its
//! socket, closing nothing).
//!
//! Collecting is paced by permits ([`Gate::release`]): a connection exports
//! (and copies its socket) only with one, and the upgrader hands a chunk's
//! permits back only once it has sent that chunk and closed its copies. So
//! at most a fixed number of copies exist at once, and the process never
//! needs much more than one descriptor per client, however many there are.
//! No permit exists before every connection has parked.
//!
//! "Every connection" includes those still in the front door (accepted,
//! not yet registered in the hub: a plain client on its way in, a trusted
//! proxy's connection whose PROXY header is still arriving). Each counts
//! as an *arrival* from the moment its accept loop accepts it
//! ([`Gate::arrive`]) until it registers or gives up; one frozen before it
//! registers parks like a connection and hands over its bare socket. The
//! freeze also waits for every accept loop to stop ([`Gate::door_opened`]):
//! after that no arrival can appear, so the count it waits for is final.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, Semaphore, mpsc, watch};

use super::state::WaitingState;
use chatd_hub::hub::Hub;
use chatd_hub::hub::handoff::ClientState;

/// One parked connection's contribution. A copy of a socket that could
/// not be made (out of descriptors) abandons the upgrade: nobody is
/// dropped for it.
#[derive(Debug)]
pub enum Export {
    /// A client: its state and, for a plain TCP client, a copy of its
    /// socket. A TLS client has none: its session keys live in this
    /// process's rustls state and cannot be exported, so it is told to
    /// reconnect at commit.
    Client {
        state: ClientState,
        fd: io::Result<Option<OwnedFd>>,
    },
    /// A connection still in the front door, and a copy of its socket.
    Waiting {
        state: WaitingState,
        fd: io::Result<OwnedFd>,
    },
}

/// Where the handoff stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Running,
    /// From the freeze to the outcome; connections export while frozen,
    /// each when it gets a permit.
    Frozen,
    Committed,
}

/// How a freeze ended, for the tasks that waited it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Carry on serving.
    Resumed,
    /// The new process has everything: stop without closing anything.
    Committed,
}

#[derive(Debug)]
pub struct Gate {
    hub: Hub,
    /// The hot path's cheap look: set from freeze to resume.
    frozen: AtomicBool,
    step: watch::Sender<Step>,
    parked: AtomicUsize,
    parked_changed: Notify,
    /// Connections in the front door that park at a freeze (module doc).
    arrivals: AtomicUsize,
    /// Accept loops not stopped by a freeze.
    doors: AtomicUsize,
    /// How many parked connections [`Gate::wait_parked`] waits for.
    want: AtomicUsize,
    /// Exports allowed now, while collecting (see the module doc).
    permits: Semaphore,
    /// When the freeze began ([`chatd_hub::clock::now_ms`]), for the stall it
    /// is to every client (see [`crate::stall`]).
    frozen_at_ms: std::sync::atomic::AtomicU64,
    /// Freezes so far, to tell a release for an earlier one.
    freezes: std::sync::atomic::AtomicU64,
    exports: Mutex<Option<mpsc::UnboundedSender<Export>>>,
}

impl Gate {
    /// The gate of `hub`'s clients: a freeze also closes the hub to new
    /// registrations, so that the count of clients it waits for is final.
    pub fn new(hub: Hub) -> Gate {
        Gate {
            hub,
            frozen: AtomicBool::new(false),
            step: watch::Sender::new(Step::Running),
            parked: AtomicUsize::new(0),
            parked_changed: Notify::new(),
            arrivals: AtomicUsize::new(0),
            doors: AtomicUsize::new(0),
            want: AtomicUsize::new(usize::MAX),
            permits: Semaphore::new(0),
            freezes: std::sync::atomic::AtomicU64::new(0),
            frozen_at_ms: std::sync::atomic::AtomicU64::new(0),
            exports: Mutex::new(None),
        }
    }

    /// Whether a connection must stop before its next read.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Resolves once a freeze begins (at once if one is on). For the
    /// `select!` of tasks that wait on a socket.
    pub async fn frozen(&self) {
        let mut rx = self.step.subscribe();
        let _ = rx.wait_for(|s| *s != Step::Running).await;
    }

    /// Waits out a freeze.
    pub async fn settled(&self) -> Outcome {
        let mut rx = self.step.subscribe();
        let mut outcome = Outcome::Resumed;
        let _ = rx
            .wait_for(|s| match s {
                Step::Running => true,
                Step::Committed => {
                    outcome = Outcome::Committed;
                    true
                }
                _ => false,
            })
            .await;
        outcome
    }

    /// A connection's part: parks, hands over `export()` when asked (once
    /// every connection is parked), and returns how the handoff ended.
    /// `export` also runs when the handoff is abandoned before collecting;
    /// it must leave the connection able to continue.
    pub async fn park(&self, export: impl FnOnce() -> Export) -> Outcome {
        let mut rx = self.step.subscribe();
        // SeqCst here and in `wait_parked`: either this park sees the count
        // the waiter wants, or the waiter sees this park.
        let parked = self.parked.fetch_add(1, Ordering::SeqCst) + 1;
        if parked >= self.want.load(Ordering::SeqCst) {
            self.parked_changed.notify_waiters();
        }
        let mut export = Some(export);
        let outcome = loop {
            let step = *rx.borrow_and_update();
            match step {
                Step::Running => break Outcome::Resumed,
                Step::Committed => break Outcome::Committed,
                Step::Frozen if export.is_some() => {
                    // Wait for a permit (none until everyone has parked and
                    // collecting begins), or for the handoff to end first.
                    let permit = tokio::select! {
                        changed = rx.changed() => match changed {
                            Ok(()) => continue,
                            Err(_) => break Outcome::Resumed,
                        },
                        permit = self.permits.acquire() => permit,
                    };
                    if let Ok(permit) = permit {
                        permit.forget();
                        let sender = chatd_hub::lock::lock(&self.exports).clone();
                        if let (Some(sender), Some(export)) = (sender, export.take()) {
                            let _ = sender.send(export());
                        }
                    }
                    continue;
                }
                Step::Frozen => {}
            }
            if rx.changed().await.is_err() {
                break Outcome::Resumed;
            }
        };
        if self.parked.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.parked_changed.notify_waiters();
        }
        outcome
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Waits until every accept loop has stopped and at least `want()`
    /// connections (the hub's clients) plus every arrival are parked;
    /// re-counted whenever a client leaves the hub (one that was already
    /// closing leaves without parking) or an arrival leaves the front door.
    /// Only the park that may complete the count wakes this waiter.
    pub async fn wait_parked(&self, want: impl Fn() -> usize) {
        loop {
            let changed = self.parked_changed.notified();
            // Parked first, then what is wanted: everyone parked was
            // counted (a client or an arrival) before it parked, so it is
            // in `want` too, and a late arrival only makes this wait more.
            let parked = self.parked.load(Ordering::SeqCst);
            let doors = self.doors.load(Ordering::SeqCst);
            let want = want() + self.arrivals.load(Ordering::SeqCst);
            self.want.store(want, Ordering::SeqCst);
            if doors == 0 && parked >= want {
                self.want.store(usize::MAX, Ordering::SeqCst);
                return;
            }
            if doors == 0 && self.parked.load(Ordering::SeqCst) >= want {
                // Parked meanwhile: count again rather than sleep.
                continue;
            }
            changed.await;
        }
    }

    /// Connections in the front door now.
    pub fn arrivals(&self) -> usize {
        self.arrivals.load(Ordering::SeqCst)
    }

    /// An accept loop took a connection that would park at a freeze (see
    /// the module doc). Called by the accept loop itself, before it looks
    /// for a freeze again.
    pub fn arrive(&self) {
        self.arrivals.fetch_add(1, Ordering::SeqCst);
    }

    /// An arrival registered in the hub, or gave up.
    pub fn arrival_left(&self) {
        self.arrivals.fetch_sub(1, Ordering::SeqCst);
        self.client_left();
    }

    /// An accept loop starts, or resumes after a freeze.
    pub fn door_opened(&self) {
        self.doors.fetch_add(1, Ordering::SeqCst);
    }

    /// An accept loop stopped (for a freeze, or for good): it will not
    /// take another connection before [`Gate::door_opened`].
    pub fn door_closed(&self) {
        self.doors.fetch_sub(1, Ordering::SeqCst);
        self.client_left();
    }

    /// Waits until no connection is parked (after a resume).
    pub async fn wait_unparked(&self) {
        loop {
            let changed = self.parked_changed.notified();
            if self.parked() == 0 {
                return;
            }
            changed.await;
        }
    }

    /// A client left the hub: a freeze waiting for everyone to park must
    /// count again.
    pub fn client_left(&self) {
        if self.is_frozen() {
            self.parked_changed.notify_waiters();
        }
    }

    /// Lets `n` more parked connections export (see the module doc), if
    /// the freeze `freeze` (from [`Gate::freeze`]) is still on: a sender
    /// that outlived an abandoned handoff must not let a later freeze's
    /// connections export before they have all parked.
    pub(super) fn release(&self, freeze: u64, n: usize) {
        if self.is_frozen() && self.freezes.load(Ordering::Acquire) == freeze {
            self.permits.add_permits(n);
        }
    }

    /// Returns this freeze's number, for [`Gate::release`].
    pub(super) fn freeze(&self) -> u64 {
        // Left over from an abandoned handoff: none may be used now.
        self.permits.forget_permits(usize::MAX);
        let freeze = self.freezes.fetch_add(1, Ordering::AcqRel) + 1;
        self.hub.set_upgrading(true);
        self.frozen_at_ms
            .store(chatd_hub::clock::now_ms(), Ordering::Relaxed);
        self.frozen.store(true, Ordering::Release);
        self.step.send_replace(Step::Frozen);
        freeze
    }

    pub(super) fn collect(&self) -> mpsc::UnboundedReceiver<Export> {
        let (tx, rx) = mpsc::unbounded_channel();
        *chatd_hub::lock::lock(&self.exports) = Some(tx);
        rx
    }

    pub(super) fn resume(&self) {
        *chatd_hub::lock::lock(&self.exports) = None;
        self.want.store(usize::MAX, Ordering::SeqCst);
        self.permits.forget_permits(usize::MAX);
        self.frozen.store(false, Ordering::Release);
        self.hub.set_upgrading(false);
        crate::stall::record(
            self.frozen_at_ms.load(Ordering::Relaxed),
            chatd_hub::clock::now_ms(),
        );
        self.step.send_replace(Step::Running);
    }

    pub(super) fn commit(&self) {
        *chatd_hub::lock::lock(&self.exports) = None;
        self.permits.forget_permits(usize::MAX);
        self.step.send_replace(Step::Committed);
    }

    /// Whether this process has handed everything to a new one: it must
    /// then remove nothing the new one uses (the admin socket file).
    pub fn committed(&self) -> bool {
        *self.step.borrow() == Step::Committed
    }
}

/// The freeze as the cluster waits it out (a room's lines received during
/// a freeze are handed on only once it ends, and not at all after a commit).
impl chatd_hub::cluster_state::Pause for Gate {
    fn is_frozen(&self) -> bool {
        Gate::is_frozen(self)
    }

    fn settled(&self) -> chatd_hub::cluster_state::BoxFuture<'_, bool> {
        Box::pin(async move { Gate::settled(self).await == Outcome::Committed })
    }

    fn committed(&self) -> bool {
        Gate::committed(self)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn export() -> Export {
        let v1 = include_str!("../../tests/fixtures/handoff-state-v1.json");
        let state = crate::handoff::state::decode(v1.as_bytes()).expect("fixture");
        Export::Client {
            state: state.clients[0].clone(),
            fd: Ok(None),
        }
    }

    #[tokio::test]
    async fn a_parked_connection_exports_only_with_a_permit_of_this_freeze() {
        let gate = Arc::new(Gate::new(chatd_hub::hub::Hub::new(
            chatd_config::RawConfig::default()
                .validate()
                .expect("defaults"),
        )));
        let abandoned = gate.freeze();
        gate.resume();
        let freeze = gate.freeze();
        let mut exports = gate.collect();
        let parked = tokio::spawn({
            let gate = gate.clone();
            async move { gate.park(export).await }
        });
        tokio::time::timeout(Duration::from_secs(5), gate.wait_parked(|| 1))
            .await
            .expect("parked");
        // A release meant for the abandoned freeze lets nobody export.
        gate.release(abandoned, 1);
        let early = tokio::time::timeout(Duration::from_millis(100), exports.recv()).await;
        assert!(early.is_err(), "exported without a permit of this freeze");
        gate.release(freeze, 1);
        let got = tokio::time::timeout(Duration::from_secs(5), exports.recv())
            .await
            .expect("exported in time");
        let Some(Export::Client { state, .. }) = got else {
            panic!("a client's export");
        };
        assert_eq!(state.nick, "alice");
        gate.commit();
        assert_eq!(parked.await.expect("task"), Outcome::Committed);
    }

    fn waiting() -> Export {
        Export::Waiting {
            state: crate::handoff::WaitingState {
                peer: "127.0.0.1:4000".parse().expect("addr"),
                proxy_header: Some(b"PROXY TCP4 ".to_vec()),
                tls: false,
                age_ms: 0,
            },
            fd: Err(std::io::Error::other("none in this test")),
        }
    }

    /// Not done within a moment: the wait must still be pending.
    async fn still_waiting(wait: &mut tokio::task::JoinHandle<()>) {
        let early = tokio::time::timeout(Duration::from_millis(100), &mut *wait).await;
        assert!(early.is_err(), "the freeze stopped waiting too early");
    }

    #[tokio::test]
    async fn a_freeze_waits_for_every_accept_loop_and_every_connection_in_the_front_door() {
        let gate = Arc::new(Gate::new(chatd_hub::hub::Hub::new(
            chatd_config::RawConfig::default()
                .validate()
                .expect("defaults"),
        )));
        gate.door_opened();
        gate.arrive();
        gate.freeze();
        let mut wait = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_parked(|| 0).await }
        });
        // An accept loop still running could take one more connection.
        still_waiting(&mut wait).await;
        gate.door_closed();
        // One connection in the front door has not parked.
        still_waiting(&mut wait).await;
        let parked = tokio::spawn({
            let gate = gate.clone();
            async move { gate.park(waiting).await }
        });
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("done once everyone parked")
            .expect("task");
        gate.resume();
        assert_eq!(parked.await.expect("task"), Outcome::Resumed);
        // Resumed, it registers: no longer in the front door.
        gate.arrival_left();
        // One that leaves the front door instead of parking counts too.
        gate.arrive();
        gate.freeze();
        let wait = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_parked(|| 0).await }
        });
        gate.arrival_left();
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("done once it left")
            .expect("task");
        gate.resume();
    }

    /// The id clash: a client registered after the state's `next_id` was
    /// read got an id the new process handed out again. Nobody registers
    /// during a freeze; the next id sent after collection is final.
    #[test]
    fn nobody_registers_during_a_freeze() {
        let hub = chatd_hub::hub::Hub::new(
            chatd_config::RawConfig::default()
                .validate()
                .expect("defaults"),
        );
        let peer: std::net::SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let first = hub.connect(peer).expect("registered").id;
        let gate = Gate::new(hub.clone());
        gate.freeze();
        let next = hub.next_client_id();
        assert!(matches!(
            hub.connect(peer),
            Err(chatd_hub::hub::Refusal::Upgrading)
        ));
        assert_eq!(hub.next_client_id(), next, "an id was taken in the freeze");
        gate.resume();
        let after = hub.connect(peer).expect("registered after a resume").id;
        assert!(after > first && after >= next);
    }
}
