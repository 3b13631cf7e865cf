//! One room's listener: hands every batch from another node to the hub,
//! recovers what it missed, and loads the room's history.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::subjects::KindOnWire;
use crate::seq::{self, Position, SEQ_HEADER, Seen, Verdict};
use chatd_hub::cluster_state::{Kind, Pause};
use chatd_hub::hub::Hub;

use super::connect::START_WAIT;
use super::history;
use super::receive::{replay, unless_frozen};
use super::subjects::NODE_HEADER;

/// What a room's subscription task needs.
pub(super) struct Listener {
    pub(super) client: async_nats::Client,
    pub(super) hub: Hub,
    pub(super) receipts: Arc<seq::Receipts>,
    pub(super) pause: Arc<dyn Pause>,
    pub(super) node_id: Arc<str>,
    /// `NAME.room.ROOM`; chat batches on `.chat`, notices on `.notice`.
    pub(super) subject: String,
    pub(super) replay_prefix: String,
    pub(super) room: Arc<str>,
    pub(super) history: Option<async_nats::jetstream::stream::Stream>,
    pub(super) per_room: usize,
    pub(super) history_load: Duration,
}

/// Ids of the batches the last history load read: the same batches may be
/// waiting in the subscription (or come in a replay), and are not handed
/// on twice. An id is its batch's position, so a batch the stream held
/// counts as handed on for [`Seen`] too.
type Loaded = std::collections::HashSet<String>;

/// One room's subscription: hands every batch from another node to the
/// hub until `stop`, and loads the room's history from the stream when a
/// joining client asks (see [`history`]). Dropping the subscriber
/// unsubscribes.
pub(super) async fn listen(
    l: Listener,
    mut loads: mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
    stop: CancellationToken,
) {
    let Some(mut sub) = l.subscribe(&stop).await else {
        return;
    };
    // The last position handed on per sender ([`seq`]), carried on
    // from the previous process after a seamless upgrade.
    let seen = l.receipts.open(&l.room);
    let _close = CloseReceipts(&l.receipts, &l.room, seen.clone());
    let mut loaded = Loaded::new();
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            Some(reply) = loads.recv() => {
                l.load_history(&mut loaded).await;
                let _ = reply.send(());
                continue;
            }
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        if !l.receive(msg, &seen, &mut loaded, &stop).await {
            return;
        }
    }
}

impl Listener {
    /// Subscribes to the room's subjects; `None` when NATS refuses or
    /// `stop` comes first.
    async fn subscribe(&self, stop: &CancellationToken) -> Option<async_nats::Subscriber> {
        let subject = &self.subject;
        let sub = match self.client.subscribe(format!("{subject}.*")).await {
            Ok(sub) => sub,
            Err(e) => {
                warn!(%subject, error = %e, "cluster: cannot subscribe; this room hears only this node");
                return None;
            }
        };
        // A round trip: once it returns, NATS holds the subscription, and every
        // line published from now on reaches this node. Bounded, so that a
        // client waiting for the room's history never waits on a lost NATS.
        let room = &self.room;
        tokio::select! {
            () = stop.cancelled() => return None,
            flushed = tokio::time::timeout(START_WAIT, self.client.flush()) => if matches!(flushed, Ok(Ok(()))) {
                debug!(%room, "cluster: subscribed");
            },
        }
        Some(sub)
    }

    /// Loads the room's history from the stream into the hub, and keeps
    /// the ids of what it loaded in `loaded`.
    async fn load_history(&self, loaded: &mut Loaded) {
        let Some(stream) = &self.history else {
            return;
        };
        let chat_subject = format!("{}.chat", self.subject);
        let (batches, ids) =
            history::fetch(stream, &chat_subject, self.per_room, self.history_load).await;
        let room = &self.room;
        debug!(%room, batches = batches.len(), "cluster: room history loaded");
        let batches: Vec<(Bytes, usize)> = batches
            .into_iter()
            .filter_map(|b| well_formed(&b).map(|lines| (b, lines)))
            .collect();
        self.hub.replace_history(room, &batches);
        *loaded = ids;
    }

    /// Hands one message from the room's subjects on, with what its
    /// sender's numbers say was missed before it. `false` when the
    /// listener is to end (stopped, or an upgrade committed).
    async fn receive(
        &self,
        msg: async_nats::Message,
        seen: &std::sync::Mutex<Seen>,
        loaded: &mut Loaded,
        stop: &CancellationToken,
    ) -> bool {
        let Some(headers) = &msg.headers else {
            return true;
        };
        let Some(from) = headers.get(NODE_HEADER).map(|f| f.as_str().to_string()) else {
            return true;
        };
        if from == *self.node_id {
            return true;
        }
        // `NAME.room.ROOM.chat` or `.notice`.
        let Some(kind) = msg.subject.rsplit('.').next().and_then(Kind::parse) else {
            return true;
        };
        let Some(lines) = well_formed(&msg.payload) else {
            let subject = &self.subject;
            debug!(%subject, "cluster: ignored a malformed message");
            return true;
        };
        // A message without a position (none that chatd sends) is handed
        // on as it is.
        let pos = headers
            .get(SEQ_HEADER)
            .and_then(|p| Position::parse(p.as_str()));
        let verdict = pos.map(|pos| chatd_hub::lock::lock(seen).check(&from, pos));
        let mut missed = Vec::new();
        match (verdict, pos) {
            (Some(Verdict::Duplicate), _) => return true,
            (Some(Verdict::Gap { after }), Some(pos)) => {
                match self.missed(&from, after, pos.seq, stop).await {
                    Some(got) => missed = got,
                    None => return false,
                }
            }
            _ => {}
        }
        let (hub, room) = (&self.hub, &self.room);
        let handed = unless_frozen(&*self.pause, seen, |seen| {
            for (kind, seq, batch) in missed {
                if kind == Kind::Chat
                    && pos
                        .is_some_and(|pos| loaded.remove(&history::batch_id(&from, pos.epoch, seq)))
                {
                    continue;
                }
                if let Some(lines) = well_formed(&batch) {
                    hub.deliver_remote(room, batch, lines, kind);
                }
            }
            if let Some(pos) = pos {
                seen.record(&from, pos);
            }
            let in_history = kind == Kind::Chat
                && !loaded.is_empty()
                && headers
                    .get(history::ID_HEADER)
                    .is_some_and(|id| loaded.remove(id.as_str()));
            if !in_history {
                hub.deliver_remote(room, msg.payload.clone(), lines, kind);
            }
        })
        .await;
        handed.is_some()
    }

    /// The batches of `from` after `after` and before `before`, asked of
    /// it again; `None` once the listener stops.
    async fn missed(
        &self,
        from: &str,
        after: u64,
        before: u64,
        stop: &CancellationToken,
    ) -> Option<Vec<(Kind, u64, Bytes)>> {
        let subject = format!("{}{from}", self.replay_prefix);
        let room = &self.room;
        let missed = tokio::select! {
            () = stop.cancelled() => return None,
            missed = replay(&self.client, subject, room, after, before) => missed,
        };
        debug!(%room, node = %from, after, got = missed.len(), "cluster: replayed missed batches");
        Some(missed)
    }
}

/// Forgets a room's receiving position when its listener ends.
pub(super) struct CloseReceipts<'a>(&'a seq::Receipts, &'a str, Arc<std::sync::Mutex<Seen>>);

impl Drop for CloseReceipts<'_> {
    fn drop(&mut self) {
        self.0.close(self.1, &self.2);
    }
}

/// The number of lines in `payload` when it is what a chatd node publishes:
/// whole `\r\n`-ended lines, each starting with a prefix chatd writes
/// (`<`, `*`, `[`), valid UTF-8 with no other control character. Anything else on the
/// subject is not passed on to users.
pub fn well_formed(payload: &[u8]) -> Option<usize> {
    let body = payload.strip_suffix(b"\n")?;
    let mut lines = 0;
    for line in body.split(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\r")?;
        let clean = matches!(text.first(), Some(b'<' | b'*' | b'['))
            && std::str::from_utf8(text).is_ok_and(|t| !t.chars().any(char::is_control));
        if !clean {
            return None;
        }
        lines += 1;
    }
    Some(lines)
}
