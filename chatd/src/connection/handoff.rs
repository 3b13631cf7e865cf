//! Seamless upgrade: a connection's state for the new process, and serving
//! a client handed over by the old one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use super::flood::Flood;
use super::session::Session;
use super::wire::{Socket, Wire};
use super::{Chat, Connection, TLS_NOT_HANDED};
use chatd_hub::disconnect::Disconnect;
use chatd_hub::hub::{Client, Room};
use chatd_text::framing::LineFramer;
use chatd_text::rate::TokenBucket;

/// Continues serving a client handed over by the previous chatd process,
/// exactly where it stopped: the unfinished line, the flood bucket and the
/// counters carry on, and the hub has already queued what it was owed.
///
/// Spawned while the clients are still frozen, as each is adopted: the
/// task registers its socket with the runtime and builds its connection on
/// an otherwise idle worker, then waits for `commit` before it reads or
/// writes anything (until then the old process may still resume). Left to
/// after the commit, that setup delayed the last of 10,000 clients' first
/// turn by a third of a second.
pub async fn resume(
    stream: std::net::TcpStream,
    client: Arc<Client>,
    room: Arc<Room>,
    state: chatd_hub::hub::handoff::ClientState,
    chat: Chat,
    commit: CancellationToken,
) {
    let Chat { hub, gate } = chat;
    let span = info_span!("conn", client = client.id, peer = %client.peer, tls = false, nick = %client.nick());
    async move {
        // Registering only tells this process's epoll about the socket: it
        // reads and writes nothing, so the old process is not disturbed.
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                commit.cancelled().await;
                tracing::warn!(error = %e, "could not serve a client taken over from the previous process");
                hub.leave(&client, &Disconnect::Error);
                gate.client_left();
                return;
            }
        };
        // A process of an earlier version may not have bounded it; the
        // option changes nothing the old process relies on if it resumes.
        crate::sockopt::bound_unsent(&stream);
        let framer = LineFramer::import(&state.framer);
        let f = &state.flood;
        let now = Instant::now();
        let bucket = TokenBucket::resume(f.tokens, Duration::from_millis(f.age_ms), now);
        // Lines sent during the freeze wait in the socket: a backlog.
        let mut flood = Flood::new(bucket, now, false);
        flood.dropped = f.dropped;
        flood.warned = f.warned;
        let nick = client.nick();
        let wire = Wire {
            // The restored totals are history, not lines arriving now.
            lines_seen: client.outbox.totals().0,
            ..Wire::new(stream)
        };
        let session = Session {
            mid_line: framer.mid_line(),
            framer,
            flood,
            overlong: state.overlong,
            greeted: state.greeted,
            ..Session::new(client, hub, room, nick)
        };
        let conn = Connection {
            wire,
            session,
            gate,
        };
        drop(state);
        commit.cancelled().await;
        debug!("taken over from the previous process");
        conn.serve().await;
    }
    .instrument(span)
    .await
}

impl<S: Socket> Connection<S> {
    /// This connection's state for the new process, taken while parked: the
    /// outbox joins what was taken but not yet written, and stays there if
    /// the upgrade is abandoned, so serving on loses nothing either.
    pub(super) fn export(&mut self) -> crate::handoff::Export {
        use chatd_hub::hub::handoff::{ClientState, FloodState};
        let Connection { wire, session, .. } = self;
        // The socket goes to a process that knows nothing of a raised
        // low-water mark: a line under it would never be reported there.
        wire.grid_read_off();
        let _ = session.client.outbox.take(&mut wire.pending);
        let mut unsent = Vec::with_capacity(wire.pending.iter().map(Bytes::len).sum());
        for bytes in &wire.pending {
            unsent.extend_from_slice(bytes);
        }
        let (tokens, age) = session.flood.bucket.export(Instant::now());
        let state = ClientState {
            nick: session.nick.to_string(),
            room: session.room.name.to_string(),
            framer: session.framer.export(),
            flood: FloodState {
                tokens,
                age_ms: age.as_millis() as u64,
                dropped: session.flood.dropped,
                warned: session.flood.warned,
            },
            overlong: session.overlong,
            greeted: session.greeted,
            unsent,
            ..session.client.handoff_state()
        };
        let fd = if session.client.tls {
            Ok(None)
        } else {
            wire.stream.handoff_fd()
        };
        crate::handoff::Export::Client { state, fd }
    }

    /// The new process serves this client now: drop this process's copy of
    /// the socket, which closes nothing (no FIN, no reset: the new process
    /// holds the same socket), and say nothing. A TLS client, which could
    /// not be handed over, is told to reconnect.
    pub(super) async fn handed_over(self) {
        if !self.session.client.tls {
            return;
        }
        info!("TLS client not handed over: asked to reconnect");
        self.close_with(TLS_NOT_HANDED).await;
    }
}
