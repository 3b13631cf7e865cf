//! Cluster-wide room history: a JetStream stream `NAME_history` over the
//! rooms' chat subjects (`NAME.room.*.chat`) keeps the last `chat.history`
//! batches of each room, whichever node published them, on NATS's disk.
//!
//! A node loads a room's history when the room gains its first member on
//! it (the joining client waits, see [`chatd_hub::hub::Hub::request_join`]):
//! the room's subscription is in place first, then the stored batches are
//! read one by one (direct get, by subject), and they replace the room's
//! history on this node. Live batches that arrive meanwhile wait in the
//! subscription and are handed on after it, skipping those the stored
//! ones already hold: every batch carries an id (`Chatd-Id`, its sender's
//! position: node, epoch and sequence, see [`crate::seq`]), which
//! the stream keeps with it. The same id goes in `Nats-Msg-Id`, so a batch
//! published again after a reconnect is stored once; and a batch replayed
//! to fill a gap is skipped by the same id when the stream held it. So a joining client reads
//! each line once, either in the history or live — the same rule as on one
//! node ("Joins are ordered by the room's member lock"), with the room's
//! subscription in the place of the publisher.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tracing::{debug, info, warn};

use super::subjects;

/// The header carrying a chat batch's id: `NODE-EPOCH-SEQ` ([`batch_id`]).
pub const ID_HEADER: &str = "Chatd-Id";

/// A chat batch's id: its sender and its position in the sender's stream
/// (`Chatd-Seq`), so that a batch published again or replayed keeps it.
pub fn batch_id(node: &str, epoch: u64, seq: u64) -> String {
    format!("{node}-{epoch}-{seq}")
}
/// How long one request to JetStream may take.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes (or opens, and brings to `per_room` batches a room) the history
/// stream `NAME_history` over `NAME.room.*.chat`, with `replicas` (one
/// where JetStream cannot place more).
pub async fn open_stream(
    js: &jetstream::Context,
    name: &str,
    per_room: usize,
    replicas: usize,
) -> Option<stream::Stream> {
    let config = stream::Config {
        name: subjects::history_stream(name),
        subjects: vec![subjects::history_subjects(name)],
        max_messages_per_subject: i64::try_from(per_room).unwrap_or(i64::MAX),
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        num_replicas: replicas,
        ..Default::default()
    };
    let made =
        tokio::time::timeout(OP_TIMEOUT, super::stream::create_stream(js, config.clone())).await;
    let stream = match made {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            debug!(error = %e, "cluster: cannot create the history stream; updating it");
            let mut updated =
                tokio::time::timeout(OP_TIMEOUT, js.update_stream(config.clone())).await;
            if matches!(updated, Ok(Err(_))) && config.num_replicas > 1 {
                // Kept with the replicas it has where they cannot change.
                let one = stream::Config {
                    num_replicas: 1,
                    ..config.clone()
                };
                updated = tokio::time::timeout(OP_TIMEOUT, js.update_stream(one)).await;
            }
            match updated {
                Ok(Ok(_)) => tokio::time::timeout(OP_TIMEOUT, js.get_stream(&config.name))
                    .await
                    .ok()
                    .and_then(Result::ok),
                Ok(Err(e)) => {
                    debug!(error = %e, "cluster: cannot update the history stream");
                    None
                }
                Err(_) => None,
            }
        }
        Err(_) => None,
    };
    match &stream {
        Some(_) => {
            info!(stream = %config.name, per_room, "cluster: room history is kept in JetStream")
        }
        None => warn!(
            stream = %config.name,
            "cluster: the history stream is unavailable (is JetStream enabled, nats-server -js?); history is per node"
        ),
    }
    stream
}

/// The batches stored for `subject`, oldest first, with their ids; at most
/// `max` (the stream keeps no more per room). Stops early at the deadline
/// or on an error: a partial history is better than none. `within`
/// (`cluster.history_load_ms`) is how long reading may take before the
/// joining client gets what was read (and the node's own history for the
/// rest).
pub async fn fetch(
    stream: &stream::Stream,
    subject: &str,
    max: usize,
    within: Duration,
) -> (Vec<Bytes>, HashSet<String>) {
    let mut batches = Vec::new();
    let mut ids = HashSet::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut next = 1;
    while batches.len() < max {
        let got = tokio::time::timeout_at(
            deadline,
            stream.direct_get_next_for_subject(subject, Some(next)),
        )
        .await;
        let msg = match got {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
            Ok(Err(e)) => {
                debug!(error = %e, subject, "cluster: cannot read the room's history");
                break;
            }
            Err(_) => {
                debug!(subject, "cluster: reading the room's history timed out");
                break;
            }
        };
        next = msg.sequence + 1;
        if let Some(id) = msg.headers.get(ID_HEADER) {
            ids.insert(id.as_str().to_string());
        }
        batches.push(msg.payload);
    }
    (batches, ids)
}
