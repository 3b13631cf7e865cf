//! Hub types → protobuf messages.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatd_proto::admin::v1 as pb;
use pb::event::Kind;
use prost::Message;

use chatd_hub::bans::Ban;
use chatd_hub::cluster_state::Relayed;
use chatd_hub::disconnect::Disconnect;
use chatd_hub::hub::{ClientInfo, Event, RoomInfo};
use chatd_hub::stats::StatsSnapshot;

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn from_ms(ms: u64) -> prost_types::Timestamp {
    timestamp(UNIX_EPOCH + Duration::from_millis(ms))
}

pub fn client(c: ClientInfo) -> pb::Client {
    pb::Client {
        id: c.id,
        nick: c.nick,
        peer_addr: c.peer.to_string(),
        room: c.room,
        connected_at: Some(from_ms(c.connected_at_ms)),
        last_active_at: Some(from_ms(c.last_active_ms)),
        lines_in: c.lines_in,
        lines_out: c.lines_out,
        bytes_in: c.bytes_in,
        bytes_out: c.bytes_out,
        queue_bytes: c.queued_bytes,
        tls: c.tls,
        node: String::new(),
    }
}

pub fn room(r: RoomInfo) -> pb::Room {
    pb::Room {
        name: r.name,
        members: r.members as u64,
        messages: r.messages,
    }
}

pub fn stats(s: StatsSnapshot) -> pb::GetStatsResponse {
    let started = SystemTime::now()
        .checked_sub(s.uptime)
        .unwrap_or(UNIX_EPOCH);
    pb::GetStatsResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: Some(timestamp(started)),
        uptime: prost_types::Duration::try_from(s.uptime).ok(),
        clients: s.clients,
        peak_clients: s.counters.peak_clients,
        rooms: s.rooms,
        totals: Some(pb::Totals {
            connections: s.counters.connections,
            lines_in: s.counters.lines_in,
            lines_out: s.counters.deliveries,
            bytes_in: s.counters.bytes_in,
            bytes_out: s.counters.bytes_out,
            kicks: s.counters.kicks,
            slow_consumer_disconnects: s.counters.slow_consumer_disconnects,
            flood_disconnects: s.counters.flood_disconnects,
            udp_datagrams_in: s.counters.udp_in,
            udp_datagrams_out: s.counters.udp_out,
            udp_datagrams_dropped: s.counters.udp_dropped,
        }),
        ..Default::default()
    }
}

pub fn ban(b: &Ban) -> pb::BanEntry {
    pb::BanEntry {
        target: b.target(),
        reason: b.reason.clone(),
        created_at: Some(timestamp(b.created_at)),
        expires_at: b.expires_at.map(timestamp),
    }
}

fn reason(d: &Disconnect) -> (pb::DisconnectReason, String) {
    use pb::DisconnectReason as R;
    match d {
        Disconnect::Quit(text) => (R::Quit, text.clone().unwrap_or_default()),
        Disconnect::Closed => (R::Closed, String::new()),
        Disconnect::Error => (R::Closed, d.to_string()),
        Disconnect::Kicked(why) => (R::Kicked, why.clone()),
        Disconnect::Banned(why) => (R::Banned, why.clone()),
        Disconnect::Handoff => (R::Closed, d.to_string()),
        Disconnect::SlowConsumer => (R::SlowConsumer, String::new()),
        Disconnect::Flood => (R::Flood, String::new()),
        Disconnect::Idle => (R::Idle, String::new()),
        Disconnect::PartialLine => (R::Idle, d.to_string()),
        Disconnect::WrongProtocol => (R::Closed, d.to_string()),
        Disconnect::OverlongLines => (R::LineTooLong, String::new()),
        Disconnect::Shutdown => (R::Shutdown, String::new()),
    }
}

/// A hub event as the protocol's; `at` is when it is converted, which is
/// within a moment of when it happened.
pub fn event(e: Event) -> pb::Event {
    let kind = match e {
        Event::Connect { id, nick, peer } => Kind::Connected(pb::Connected {
            client_id: id,
            nick: nick.to_string(),
            peer_addr: peer.to_string(),
        }),
        Event::Disconnect {
            id,
            nick,
            reason: r,
        } => {
            let (reason, detail) = reason(&r);
            Kind::Disconnected(pb::Disconnected {
                client_id: id,
                nick: nick.to_string(),
                reason: reason.into(),
                detail,
            })
        }
        Event::Nick { id, old, new } => Kind::NickChanged(pb::NickChanged {
            client_id: id,
            old_nick: old.to_string(),
            new_nick: new.to_string(),
        }),
        Event::Join { id, nick, room } => Kind::Joined(pb::Joined {
            client_id: id,
            nick: nick.to_string(),
            room: room.to_string(),
        }),
        Event::Part { id, nick, room } => Kind::Parted(pb::Parted {
            client_id: id,
            nick: nick.to_string(),
            room: room.to_string(),
        }),
        Event::Kick { id, nick, reason } => Kind::Kicked(pb::Kicked {
            client_id: id,
            nick: nick.to_string(),
            reason,
        }),
        Event::Broadcast {
            room,
            text,
            reached,
        } => Kind::Broadcast(pb::Broadcasted {
            text,
            room: room.unwrap_or_default(),
            delivered: reached as u64,
        }),
        Event::Message {
            id,
            nick,
            room,
            to,
            text,
            action,
        } => Kind::Message(pb::Message {
            client_id: id,
            nick: nick.to_string(),
            room: room.map(|r| r.to_string()).unwrap_or_default(),
            to_nick: to.map(|t| t.to_string()).unwrap_or_default(),
            text,
            action,
        }),
        Event::Ban { ban: b, kicked } => Kind::Banned(pb::Banned {
            ban: Some(ban(&b)),
            kicked: kicked as u64,
        }),
        Event::Unban { target } => Kind::Unbanned(pb::Unbanned { target }),
    };
    pb::Event {
        at: Some(timestamp(SystemTime::now())),
        kind: Some(kind),
        node: String::new(),
    }
}

pub fn lagged(missed: u64) -> pb::Event {
    pb::Event {
        at: Some(timestamp(SystemTime::now())),
        kind: Some(Kind::Lagged(pb::Lagged { missed })),
        node: String::new(),
    }
}

/// Several nodes' figures as one: counts and totals summed, `rooms` the
/// distinct rooms, start and uptime the longest-running node's.
pub fn sum_stats(
    nodes: Vec<pb::GetStatsResponse>,
    rooms: u64,
    answered_nodes: Vec<String>,
) -> pb::GetStatsResponse {
    let mut sum = pb::GetStatsResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        rooms,
        totals: Some(pb::Totals::default()),
        answered_nodes,
        ..Default::default()
    };
    for s in nodes {
        sum.clients += s.clients;
        sum.peak_clients += s.peak_clients;
        let longer = match (&sum.uptime, &s.uptime) {
            (None, _) => true,
            (Some(a), Some(b)) => (b.seconds, b.nanos) > (a.seconds, a.nanos),
            (Some(_), None) => false,
        };
        if longer {
            sum.uptime = s.uptime;
            sum.started_at = s.started_at;
        }
        if let (Some(t), Some(n)) = (sum.totals.as_mut(), s.totals) {
            t.connections += n.connections;
            t.lines_in += n.lines_in;
            t.lines_out += n.lines_out;
            t.bytes_in += n.bytes_in;
            t.bytes_out += n.bytes_out;
            t.kicks += n.kicks;
            t.slow_consumer_disconnects += n.slow_consumer_disconnects;
            t.flood_disconnects += n.flood_disconnects;
            t.udp_datagrams_in += n.udp_datagrams_in;
            t.udp_datagrams_out += n.udp_datagrams_out;
            t.udp_datagrams_dropped += n.udp_datagrams_dropped;
        }
    }
    sum
}

/// Another node's relayed item as the watch hands it out; `None` for bytes
/// that are no event.
pub fn relayed(relayed: Relayed) -> Option<pb::Event> {
    match relayed {
        Relayed::Event { payload, .. } => pb::Event::decode(payload).ok(),
        Relayed::Lagged { node, missed } => Some(pb::Event {
            node,
            ..lagged(missed)
        }),
    }
}
