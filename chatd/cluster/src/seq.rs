//! Positions in each node's stream of room messages, so that losing one
//! NATS server of a cluster loses no chat line.
//!
//! NATS core forgets a message its server had not passed on when it died,
//! and a node that moves to another server misses what is published before
//! its subscriptions are in place there. So every message a node publishes
//! carries a [`Position`]: the node's epoch (random per start), its
//! sequence number (one counter per node), and the sequence of the node's
//! previous message in the same room. The sender keeps what it published
//! in a bounded [`Backlog`]:
//!
//! - what its server has not confirmed yet (a marker published to the node
//!   itself came back after it) is published again after a reconnect;
//! - another node that sees a message whose `prev` it never got asks the
//!   sender for the missing ones (`NAME.replay.NODE`) before handing the
//!   message on; one it already has ([`Seen`]) it drops.
//!
//! Private messages (`/msg` to a client of another node) ride the same
//! backlog: each destination node is a stream of its own
//! ([`private_stream`], kind [`PRIVATE_KIND`]), published on
//! `NAME.pm.NODE` with the same header, so that they too are published
//! again after a reconnect, replayed on a gap and dropped when repeated.
//!
//! Across a seamless upgrade, [`Receipts`] carries every stream's [`Seen`]
//! to the new process, which then asks for what arrived meanwhile.
//!
//! Pure: no NATS, no sockets; `cluster` does the talking.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use serde::{Deserialize, Serialize};

/// One stream's receiving position (a room, or this node's private
/// messages): per sending node, its epoch and the last sequence handed on.
/// Carried to the new process by a seamless upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReceipts {
    pub stream: String,
    pub senders: Vec<SenderReceipt>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderReceipt {
    pub node: String,
    pub epoch: u64,
    pub seq: u64,
}

/// The header carrying a message's [`Position`]: `EPOCH SEQ PREV`.
pub const SEQ_HEADER: &str = "Chatd-Seq";

/// Where a message stands in its sender's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Random per start of the sender: a restarted node counts afresh.
    pub epoch: u64,
    /// The sender's counter, over all rooms; starts at 1.
    pub seq: u64,
    /// The sender's previous message in the same room (for a private
    /// message: to the same node); 0 when unknown
    /// (the first one, or after the sender gave up on an outage).
    pub prev: u64,
}

impl Position {
    pub fn header(&self) -> String {
        format!("{} {} {}", self.epoch, self.seq, self.prev)
    }

    pub fn parse(s: &str) -> Option<Position> {
        let mut parts = s.split(' ').map(|p| p.parse::<u64>().ok());
        let (Some(Some(epoch)), Some(Some(seq)), Some(Some(prev)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        (seq > prev).then_some(Position { epoch, seq, prev })
    }
}

/// The backlog's kind byte of a private message (rooms use
/// `cluster::Kind`'s bytes, 0 and 1).
pub const PRIVATE_KIND: u8 = 2;

/// The backlog key of the private messages for `node`: never a room name
/// (rooms have no `.`), and without a space, as a replay request needs.
pub fn private_stream(node: &str) -> String {
    format!("pm.{node}")
}

/// What a receiving room does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next one from its sender (or the first seen): hand it on.
    Deliver,
    /// Already handed on (a message published again after a reconnect).
    Duplicate,
    /// Messages of this room between `after` and the message were missed:
    /// ask the sender for them first.
    Gap { after: u64 },
}

/// Senders remembered per room; more means someone is making names up, and
/// forgetting them all only costs a missed gap check.
const MAX_SENDERS: usize = 1024;

/// One room's receiving side: the last position handed on per sender.
#[derive(Debug, Default)]
pub struct Seen {
    last: HashMap<String, (u64, u64)>,
}

impl Seen {
    pub fn check(&self, node: &str, pos: Position) -> Verdict {
        match self.last.get(node) {
            Some(&(epoch, last)) if epoch == pos.epoch => {
                if pos.seq <= last {
                    Verdict::Duplicate
                } else if pos.prev > last {
                    Verdict::Gap { after: last }
                } else {
                    Verdict::Deliver
                }
            }
            _ => Verdict::Deliver,
        }
    }

    /// `pos` was handed on.
    pub fn record(&mut self, node: &str, pos: Position) {
        if self.last.len() >= MAX_SENDERS && !self.last.contains_key(node) {
            self.last.clear();
        }
        self.last.insert(node.to_string(), (pos.epoch, pos.seq));
    }

    /// What was handed on, per sender, for the next process.
    pub fn export(&self) -> Vec<SenderReceipt> {
        self.last
            .iter()
            .map(|(node, &(epoch, seq))| SenderReceipt {
                node: node.clone(),
                epoch,
                seq,
            })
            .collect()
    }

    /// Carries on from what the previous process handed on: a message whose
    /// `prev` is past these is a gap, asked for before it is handed on.
    pub fn import(senders: &[SenderReceipt]) -> Seen {
        Seen {
            last: senders
                .iter()
                .take(MAX_SENDERS)
                .map(|s| (s.node.clone(), (s.epoch, s.seq)))
                .collect(),
        }
    }
}

/// Every subscribed stream's [`Seen`], shared by the task that receives
/// the stream and a seamless upgrade, which reads them all once the
/// clients are frozen (`crate::handoff`). A receiving task hands a
/// message on only while holding its stream's lock and seeing no freeze,
/// so what the upgrade reads is exactly what reached the frozen clients.
#[derive(Debug, Default)]
pub struct Receipts {
    streams: Mutex<HashMap<String, Arc<Mutex<Seen>>>>,
    /// From the previous process, until the stream is subscribed again.
    inherited: Mutex<HashMap<String, Seen>>,
}

impl Receipts {
    pub fn inheriting(from: &[StreamReceipts]) -> Receipts {
        Receipts {
            streams: Mutex::default(),
            inherited: Mutex::new(
                from.iter()
                    .map(|s| (s.stream.clone(), Seen::import(&s.senders)))
                    .collect(),
            ),
        }
    }

    /// The receiving side of `stream`, carrying on from the previous
    /// process if it received it.
    pub fn open(&self, stream: &str) -> Arc<Mutex<Seen>> {
        let seen = chatd_hub::lock::lock(&self.inherited)
            .remove(stream)
            .unwrap_or_default();
        let seen = Arc::new(Mutex::new(seen));
        chatd_hub::lock::lock(&self.streams).insert(stream.to_string(), seen.clone());
        seen
    }

    /// `stream` is no longer received (by `seen`, as [`Receipts::open`]
    /// gave it: a later subscription of the same stream keeps its own).
    pub fn close(&self, stream: &str, seen: &Arc<Mutex<Seen>>) {
        let mut streams = chatd_hub::lock::lock(&self.streams);
        if streams.get(stream).is_some_and(|s| Arc::ptr_eq(s, seen)) {
            streams.remove(stream);
        }
    }

    /// Every stream's position, waiting for any message being handed on.
    pub fn export(&self) -> Vec<StreamReceipts> {
        let streams: Vec<(String, Arc<Mutex<Seen>>)> = chatd_hub::lock::lock(&self.streams)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out: Vec<StreamReceipts> = streams
            .into_iter()
            .map(|(stream, seen)| StreamReceipts {
                senders: chatd_hub::lock::lock(&seen).export(),
                stream,
            })
            .collect();
        for (stream, seen) in chatd_hub::lock::lock(&self.inherited).iter() {
            if !out.iter().any(|s| s.stream == *stream) {
                out.push(StreamReceipts {
                    stream: stream.clone(),
                    senders: seen.export(),
                });
            }
        }
        out.retain(|s| !s.senders.is_empty());
        out
    }
}

/// One published (or to be published) message.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub prev: u64,
    pub room: Arc<str>,
    /// The cluster's message kind, as a byte (`cluster::Kind`).
    pub kind: u8,
    pub payload: Bytes,
}

/// The sender's side: the messages it published lately, what its server
/// confirmed, and each room's last sequence.
#[derive(Debug)]
pub struct Backlog {
    epoch: u64,
    entries: VecDeque<Entry>,
    capacity: usize,
    next: u64,
    confirmed: u64,
    /// The last sequence per room with local members (pruned by
    /// [`Backlog::forget_room`]).
    last_in_room: HashMap<Arc<str>, u64>,
}

impl Backlog {
    pub fn new(epoch: u64, capacity: usize) -> Backlog {
        Backlog {
            epoch,
            entries: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            next: 1,
            confirmed: 0,
            last_in_room: HashMap::new(),
        }
    }

    /// Gives the message its position and keeps it; the oldest entry goes
    /// when full. Returns the position and whether an unconfirmed entry had
    /// to go (a line that may now be lost).
    pub fn push(&mut self, room: &Arc<str>, kind: u8, payload: Bytes) -> (Position, bool) {
        let seq = self.next;
        self.next += 1;
        let prev = self.last_in_room.insert(room.clone(), seq).unwrap_or(0);
        let mut lost = false;
        if self.entries.len() >= self.capacity
            && let Some(old) = self.entries.pop_front()
        {
            lost = old.seq > self.confirmed;
        }
        self.entries.push_back(Entry {
            seq,
            prev,
            room: room.clone(),
            kind,
            payload,
        });
        let pos = Position {
            epoch: self.epoch,
            seq,
            prev,
        };
        (pos, lost)
    }

    /// The last sequence given out (0 before the first).
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    /// The server has everything up to `seq`.
    pub fn confirm(&mut self, seq: u64) {
        self.confirmed = self.confirmed.max(seq.min(self.last()));
    }

    /// What the server has not confirmed, oldest first, with positions.
    pub fn unconfirmed(&self) -> Vec<(Position, Entry)> {
        self.entries
            .iter()
            .filter(|e| e.seq > self.confirmed)
            .map(|e| {
                let pos = Position {
                    epoch: self.epoch,
                    seq: e.seq,
                    prev: e.prev,
                };
                (pos, e.clone())
            })
            .collect()
    }

    /// Gives up on what was not confirmed (NATS stayed away too long):
    /// drops it, so that no one receives it late, and forgets each room's
    /// last sequence, so that the next messages claim no gap. Returns how
    /// many were dropped.
    pub fn abandon(&mut self) -> usize {
        let confirmed = self.confirmed;
        let before = self.entries.len();
        self.entries.retain(|e| e.seq <= confirmed);
        self.last_in_room.clear();
        self.confirmed = self.last();
        before - self.entries.len()
    }

    /// The room has no local member any more.
    pub fn forget_room(&mut self, room: &str) {
        self.last_in_room.remove(room);
    }

    /// The messages of `room` after `after`, encoded for a replay answer,
    /// at most `max_bytes` of payload.
    pub fn replay(&self, room: &str, after: u64, max_bytes: usize) -> Bytes {
        let mut out = BytesMut::new();
        for e in self
            .entries
            .iter()
            .filter(|e| e.seq > after && &*e.room == room)
        {
            if out.len() + e.payload.len() > max_bytes {
                break;
            }
            out.put_u8(e.kind);
            out.put_u64(e.seq);
            out.put_u32(u32::try_from(e.payload.len()).unwrap_or(u32::MAX));
            out.put_slice(&e.payload);
        }
        out.freeze()
    }
}

/// A replay answer's messages: kind byte, sequence and payload each.
/// `None` when it is not one (another program on the subject).
pub fn decode_replay(mut bytes: Bytes) -> Option<Vec<(u8, u64, Bytes)>> {
    let mut out = Vec::new();
    while bytes.has_remaining() {
        if bytes.remaining() < 13 {
            return None;
        }
        let kind = bytes.get_u8();
        let seq = bytes.get_u64();
        let len = usize::try_from(bytes.get_u32()).ok()?;
        if bytes.remaining() < len {
            return None;
        }
        out.push((kind, seq, bytes.split_to(len)));
    }
    Some(out)
}

/// The request for a replay: `ROOM AFTER`.
pub fn replay_request(room: &str, after: u64) -> Bytes {
    Bytes::from(format!("{room} {after}"))
}

pub fn parse_replay_request(payload: &[u8]) -> Option<(&str, u64)> {
    let (room, after) = std::str::from_utf8(payload).ok()?.split_once(' ')?;
    Some((room, after.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn positions_round_trip_and_reject_garbage() {
        let p = Position {
            epoch: 7,
            seq: 12,
            prev: 9,
        };
        assert_eq!(Position::parse(&p.header()), Some(p));
        for bad in ["", "1 2", "1 2 3 4", "a 2 1", "1 2 2", "1 -2 0"] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_receiver_delivers_in_order_drops_repeats_and_sees_gaps() {
        let mut seen = Seen::default();
        let at = |seq, prev| Position {
            epoch: 1,
            seq,
            prev,
        };
        assert_eq!(seen.check("a", at(5, 3)), Verdict::Deliver, "first seen");
        seen.record("a", at(5, 3));
        assert_eq!(seen.check("a", at(8, 5)), Verdict::Deliver);
        seen.record("a", at(8, 5));
        assert_eq!(seen.check("a", at(8, 5)), Verdict::Duplicate);
        assert_eq!(seen.check("a", at(6, 5)), Verdict::Duplicate);
        assert_eq!(seen.check("a", at(12, 10)), Verdict::Gap { after: 8 });
        assert_eq!(seen.check("a", at(12, 0)), Verdict::Deliver, "no claim");
        let restarted = Position {
            epoch: 2,
            seq: 1,
            prev: 0,
        };
        assert_eq!(seen.check("a", restarted), Verdict::Deliver);
        assert_eq!(seen.check("b", at(1, 0)), Verdict::Deliver);
    }

    #[test]
    fn the_backlog_republishes_the_unconfirmed_and_replays_a_room() {
        let mut b = Backlog::new(3, 4);
        let (lobby, other) = (room("lobby"), room("other"));
        let (p1, _) = b.push(&lobby, 0, Bytes::from_static(b"<a> 1\r\n"));
        let (p2, _) = b.push(&other, 0, Bytes::from_static(b"<a> x\r\n"));
        let (p3, _) = b.push(&lobby, 1, Bytes::from_static(b"*** n\r\n"));
        assert_eq!((p1.seq, p1.prev, p2.prev, p3.prev), (1, 0, 0, 1));
        b.confirm(1);
        let again: Vec<u64> = b.unconfirmed().iter().map(|(p, _)| p.seq).collect();
        assert_eq!(again, [2, 3]);
        let replay = decode_replay(b.replay("lobby", 0, 1 << 20)).expect("decodes");
        assert_eq!(replay.len(), 2);
        assert_eq!((replay[1].0, replay[1].1), (1, 3));
        assert_eq!(&replay[1].2[..], b"*** n\r\n");
        assert!(
            decode_replay(b.replay("lobby", 3, 1 << 20))
                .expect("decodes")
                .is_empty()
        );
        // Full: the oldest goes; an unconfirmed one going is reported.
        b.push(&lobby, 0, Bytes::from_static(b"<a> 4\r\n"));
        let (_, lost) = b.push(&lobby, 0, Bytes::from_static(b"<a> 5\r\n"));
        assert!(!lost, "seq 1 was confirmed");
        let (_, lost) = b.push(&lobby, 0, Bytes::from_static(b"<a> 6\r\n"));
        assert!(lost, "seq 2 was not");
        // Giving up: nothing is republished or replayed, no gap is claimed.
        assert_eq!(b.abandon(), 4);
        assert!(b.unconfirmed().is_empty());
        assert!(
            decode_replay(b.replay("lobby", 0, 1 << 20))
                .expect("decodes")
                .is_empty()
        );
        let (p, _) = b.push(&lobby, 0, Bytes::from_static(b"<a> 7\r\n"));
        assert_eq!(p.prev, 0);
    }

    #[test]
    fn private_messages_are_a_stream_per_node_beside_the_rooms() {
        let key = private_stream("node-b");
        assert!(
            chatd_text::protocol::normalize_room(&key).is_err(),
            "never a room"
        );
        assert_eq!(
            parse_replay_request(&replay_request(&key, 7)),
            Some((key.as_str(), 7))
        );
        let mut b = Backlog::new(1, 8);
        let (to_b, to_c, lobby) = (Arc::from(key.as_str()), room("pm.node-c"), room("lobby"));
        let (p1, _) = b.push(&to_b, PRIVATE_KIND, Bytes::from_static(b"{}"));
        b.push(&lobby, 0, Bytes::from_static(b"<a> x\r\n"));
        b.push(&to_c, PRIVATE_KIND, Bytes::from_static(b"{}"));
        let (p4, _) = b.push(&to_b, PRIVATE_KIND, Bytes::from_static(b"{\"n\":2}"));
        assert_eq!((p1.prev, p4.prev), (0, 1), "chained per destination");
        let replay = decode_replay(b.replay(&key, 1, 1 << 20)).expect("decodes");
        assert_eq!(replay.len(), 1);
        assert_eq!((replay[0].0, replay[0].1), (PRIVATE_KIND, 4));
    }

    #[test]
    fn replay_messages_are_checked() {
        assert_eq!(decode_replay(Bytes::new()), Some(vec![]));
        assert_eq!(decode_replay(Bytes::from_static(b"short")), None);
        let mut long = BytesMut::new();
        long.put_u8(0);
        long.put_u64(1);
        long.put_u32(100);
        long.put_slice(b"<a> x\r\n");
        assert_eq!(decode_replay(long.freeze()), None);
        assert_eq!(parse_replay_request(b"lobby 42"), Some(("lobby", 42)));
        assert_eq!(parse_replay_request(b"lobby x"), None);
        assert_eq!(&replay_request("lobby", 42)[..], b"lobby 42");
    }

    #[test]
    fn receipts_carry_a_streams_position_to_the_next_process() {
        let pos = |seq, prev| Position {
            epoch: 7,
            seq,
            prev,
        };
        let old = Receipts::default();
        let lobby = old.open("lobby");
        lock_seen(&lobby).record("web2", pos(5, 3));
        let exported = old.export();
        assert_eq!(exported.len(), 1);

        // The new process carries on: 6 is next, 8 after 7 is a gap.
        let new = Receipts::inheriting(&exported);
        let lobby = new.open("lobby");
        assert_eq!(lock_seen(&lobby).check("web2", pos(6, 5)), Verdict::Deliver);
        assert_eq!(
            lock_seen(&lobby).check("web2", pos(5, 3)),
            Verdict::Duplicate
        );
        assert_eq!(
            lock_seen(&lobby).check("web2", pos(8, 7)),
            Verdict::Gap { after: 5 }
        );
        // Inherited but not subscribed again yet: still handed on.
        assert_eq!(Receipts::inheriting(&exported).export(), exported);
        // A stream no longer received is forgotten.
        new.close("lobby", &lobby);
        assert!(new.export().is_empty());
    }

    fn lock_seen(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
        chatd_hub::lock::lock(seen)
    }
}
