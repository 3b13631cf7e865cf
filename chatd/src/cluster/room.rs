//! One room's listener: hands every batch from another node to the hub,
//! recovers what it missed, and loads the room's history.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cluster_seq::{self, Position, SEQ_HEADER, Seen, Verdict};
use crate::cluster_state::{Kind, Pause};
use crate::hub::Hub;

use super::connect::START_WAIT;
use super::history;
use super::receive::{replay, unless_frozen};
use super::subjects::NODE_HEADER;

/// What a room's subscription task needs.
pub(super) struct Listener {
    pub(super) client: async_nats::Client,
    pub(super) hub: Hub,
    pub(super) receipts: Arc<cluster_seq::Receipts>,
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

/// One room's subscription: hands every batch from another node to the
/// hub until `stop`, and loads the room's history from the stream when a
/// joining client asks (see [`history`]). Dropping the subscriber
/// unsubscribes.
pub(super) async fn listen(
    l: Listener,
    mut loads: mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
    stop: CancellationToken,
) {
    let Listener {
        client,
        hub,
        receipts,
        pause,
        node_id,
        subject,
        replay_prefix,
        room,
        history,
        per_room,
        history_load,
    } = l;
    let mut sub = match client.subscribe(format!("{subject}.*")).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(%subject, error = %e, "cluster: cannot subscribe; this room hears only this node");
            return;
        }
    };
    // A round trip: once it returns, NATS holds the subscription, and every
    // line published from now on reaches this node. Bounded, so that a
    // client waiting for the room's history never waits on a lost NATS.
    tokio::select! {
        () = stop.cancelled() => return,
        flushed = tokio::time::timeout(START_WAIT, client.flush()) => if matches!(flushed, Ok(Ok(()))) {
            debug!(%room, "cluster: subscribed");
        },
    }
    let chat_subject = format!("{subject}.chat");
    // The last position handed on per sender ([`cluster_seq`]), carried on
    // from the previous process after a seamless upgrade.
    let seen = receipts.open(&room);
    let _close = CloseReceipts(&receipts, &room, seen.clone());
    // Ids of the batches the last history load read: the same batches may
    // be waiting in the subscription (or come in a replay), and are not
    // handed on twice. An id is its batch's position, so a batch the
    // stream held counts as handed on for [`Seen`] too.
    let mut loaded: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            Some(reply) = loads.recv() => {
                if let Some(stream) = &history {
                    let (batches, ids) = history::fetch(stream, &chat_subject, per_room, history_load).await;
                    debug!(%room, batches = batches.len(), "cluster: room history loaded");
                    let batches: Vec<(Bytes, usize)> = batches
                        .into_iter()
                        .filter_map(|b| well_formed(&b).map(|lines| (b, lines)))
                        .collect();
                    hub.replace_history(&room, &batches);
                    loaded = ids;
                }
                let _ = reply.send(());
                continue;
            }
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let Some(headers) = &msg.headers else {
            continue;
        };
        let Some(from) = headers.get(NODE_HEADER).map(|f| f.as_str().to_string()) else {
            continue;
        };
        if from == *node_id {
            continue;
        }
        // `NAME.room.ROOM.chat` or `.notice`.
        let Some(kind) = msg.subject.rsplit('.').next().and_then(Kind::parse) else {
            continue;
        };
        let Some(lines) = well_formed(&msg.payload) else {
            debug!(%subject, "cluster: ignored a malformed message");
            continue;
        };
        // A message without a position (none that chatd sends) is handed
        // on as it is.
        let pos = headers
            .get(SEQ_HEADER)
            .and_then(|p| Position::parse(p.as_str()));
        let verdict = pos.map(|pos| crate::lock::lock(&seen).check(&from, pos));
        let mut missed = Vec::new();
        match (verdict, pos) {
            (Some(Verdict::Duplicate), _) => continue,
            (Some(Verdict::Gap { after }), Some(pos)) => {
                let subject = format!("{replay_prefix}{from}");
                missed = tokio::select! {
                    () = stop.cancelled() => return,
                    missed = replay(&client, subject, &room, after, pos.seq) => missed,
                };
                debug!(%room, node = %from, after, got = missed.len(), "cluster: replayed missed batches");
            }
            _ => {}
        }
        let handed = unless_frozen(&*pause, &seen, |seen| {
            for (kind, seq, batch) in missed {
                if kind == Kind::Chat
                    && pos
                        .is_some_and(|pos| loaded.remove(&history::batch_id(&from, pos.epoch, seq)))
                {
                    continue;
                }
                if let Some(lines) = well_formed(&batch) {
                    hub.deliver_remote(&room, batch, lines, kind);
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
                hub.deliver_remote(&room, msg.payload.clone(), lines, kind);
            }
        })
        .await;
        if handed.is_none() {
            return;
        }
    }
}

/// Forgets a room's receiving position when its listener ends.
pub(super) struct CloseReceipts<'a>(
    &'a cluster_seq::Receipts,
    &'a str,
    Arc<std::sync::Mutex<Seen>>,
);

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
