//! What every receiver (a room's listener, the private messages') shares:
//! asking a sender to replay what was missed, and handing on only while no
//! upgrade has the clients frozen.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::subjects::KindOnWire;
use crate::seq::{self, Seen};
use chatd_hub::cluster_state::{Kind, Pause};

/// How long a node waits for another to replay what it missed.
pub(super) const REPLAY_DEADLINE: Duration = Duration::from_secs(1);

/// Runs `hand_on` with a stream's `seen` locked, once no upgrade has the
/// clients frozen: what a stream has handed on is then exactly what an
/// upgrade reads ([`seq::Receipts`]). `None` when an upgrade
/// committed meanwhile: the new process asks the senders for the rest.
pub(crate) async fn unless_frozen<T>(
    pause: &dyn Pause,
    seen: &std::sync::Mutex<Seen>,
    hand_on: impl FnOnce(&mut Seen) -> T,
) -> Option<T> {
    loop {
        {
            let mut seen = chatd_hub::lock::lock(seen);
            if !pause.is_frozen() {
                return Some(hand_on(&mut seen));
            }
        }
        if pause.settled().await {
            return None;
        }
    }
}

/// Asks `subject` (a node's replay service) for the batches of `room`
/// after `after` and before `before`, in order, with their sequences;
/// nothing when it does not
/// answer within [`REPLAY_DEADLINE`] (it may be gone with them).
pub(super) async fn replay(
    client: &async_nats::Client,
    subject: String,
    room: &str,
    after: u64,
    before: u64,
) -> Vec<(Kind, u64, Bytes)> {
    replay_raw(client, subject, room, after, before)
        .await
        .into_iter()
        .filter_map(|(kind, seq, batch)| Some((Kind::from_byte(kind)?, seq, batch)))
        .collect()
}

/// [`replay`] of any backlog stream (a room, or the private messages for
/// a node, [`seq::private_stream`]), with the kind bytes as kept.
pub(crate) async fn replay_raw(
    client: &async_nats::Client,
    subject: String,
    room: &str,
    after: u64,
    before: u64,
) -> Vec<(u8, u64, Bytes)> {
    let asked = client.request(subject, seq::replay_request(room, after));
    let answer = match tokio::time::timeout(REPLAY_DEADLINE, asked).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            debug!(error = %e, %room, "cluster: no replay");
            return Vec::new();
        }
        Err(_) => {
            debug!(%room, "cluster: no replay in time");
            return Vec::new();
        }
    };
    seq::decode_replay(answer.payload)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, seq, _)| *seq < before)
        .collect()
}

/// The subscription's next message, or `None` once it ends or `stop` is
/// cancelled.
pub(super) async fn next_or_stop(
    sub: &mut async_nats::Subscriber,
    stop: &CancellationToken,
) -> Option<async_nats::Message> {
    tokio::select! {
        () = stop.cancelled() => None,
        msg = sub.next() => msg,
    }
}
