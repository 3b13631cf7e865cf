//! Seamless upgrade: a connection's state for the new process, and serving
//! a client handed over by the old one.

use super::*;
use tokio_util::sync::CancellationToken;

/// What a TLS client reads when the process serving it hands over to a new
/// one: its session cannot follow (the keys live in this process's rustls
/// state), so it must reconnect.
pub(super) const TLS_NOT_HANDED: &str =
    "Server upgrade: TLS sessions cannot be carried over. Please reconnect.";

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
    state: crate::handoff::ClientState,
    hub: Hub,
    commit: CancellationToken,
) {
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
                return;
            }
        };
        let framer = LineFramer::import(&state.framer);
        let f = &state.flood;
        let flood = Flood {
            bucket: TokenBucket::resume(f.tokens, Duration::from_millis(f.age_ms), Instant::now()),
            dropped: f.dropped,
            warned: f.warned,
        };
        let nick = client.nick();
        let lines_seen = client.outbox.totals().0;
        let conn = Connection {
            mid_line: framer.mid_line(),
            framer,
            flood,
            overlong: state.overlong,
            greeted: state.greeted,
            // The restored totals are history, not lines arriving now.
            lines_seen,
            ..Connection::new(stream, hub, client, room, nick)
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
        use crate::handoff::state::{ClientState, FloodState};
        let _ = self.client.outbox.take(&mut self.pending);
        let mut unsent = Vec::with_capacity(self.pending.iter().map(Bytes::len).sum());
        for bytes in &self.pending {
            unsent.extend_from_slice(bytes);
        }
        let (tokens, age) = self.flood.bucket.export(Instant::now());
        let state = ClientState {
            nick: self.nick.to_string(),
            room: self.room.name.to_string(),
            framer: self.framer.export(),
            flood: FloodState {
                tokens,
                age_ms: age.as_millis() as u64,
                dropped: self.flood.dropped,
                warned: self.flood.warned,
            },
            overlong: self.overlong,
            greeted: self.greeted,
            unsent,
            ..self.client.handoff_state()
        };
        let fd = if self.client.tls {
            Ok(None)
        } else {
            self.stream.handoff_fd()
        };
        crate::handoff::Export { state, fd }
    }

    /// The new process serves this client now: drop this process's copy of
    /// the socket, which closes nothing (no FIN, no reset: the new process
    /// holds the same socket), and say nothing. A TLS client, which could
    /// not be handed over, is told to reconnect.
    pub(super) async fn handed_over(self) {
        if !self.client.tls {
            return;
        }
        info!("TLS client not handed over: asked to reconnect");
        self.close_with(TLS_NOT_HANDED).await;
    }
}
