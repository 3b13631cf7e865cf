//! The hub's operations, without sockets: what the admin API builds on.

use std::collections::VecDeque;

use super::*;
use chatd_config::RawConfig;

fn hub() -> Hub {
    Hub::new(RawConfig::default().validate().expect("defaults"))
}

fn peer(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 40000 + u16::from(n)))
}

/// Everything queued for `client`, as text.
fn drain(client: &Client) -> String {
    let mut q = VecDeque::new();
    client.outbox.take(&mut q);
    let n: usize = q.iter().map(|b| b.len()).sum();
    client.outbox.written(n, usize::MAX);
    q.iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

#[test]
fn publish_reaches_every_other_member_once() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    let b = hub.connect(peer(2)).expect("b");
    let c = hub.connect(peer(3)).expect("c");
    let room = hub.join(&a, "lobby");
    hub.join(&b, "lobby");
    hub.join(&c, "elsewhere");
    drain(&a);
    drain(&b);
    drain(&c);
    let reached = hub
        .publish(
            &room,
            a.id,
            Bytes::from_static(b"<a> one\r\n<a> two\r\n"),
            2,
        )
        .reached;
    assert_eq!(reached, 1);
    assert_eq!(drain(&b), "<a> one\r\n<a> two\r\n");
    assert_eq!(drain(&a), "");
    assert_eq!(drain(&c), "");
    let stats = hub.snapshot();
    assert_eq!(
        (stats.counters.lines_relayed, stats.counters.deliveries),
        (2, 2)
    );
}

#[test]
fn clients_can_be_listed_filtered_and_found() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    let b = hub.connect(peer(2)).expect("b");
    hub.join(&a, "lobby");
    hub.join(&b, "dev");
    hub.rename(&a, "Alice").expect("rename");
    let all = hub.clients(None, None);
    assert_eq!(
        all.iter().map(|c| c.nick.as_str()).collect::<Vec<_>>(),
        ["Alice", &*b.nick()]
    );
    assert_eq!(hub.clients(Some("#DEV"), None).len(), 1);
    assert_eq!(hub.clients(None, Some("alic")).len(), 1);
    assert_eq!(hub.clients(None, Some("127.0.0.2")).len(), 1);
    assert_eq!(
        hub.client(&Target::parse("alice")).expect("by nick").id,
        a.id
    );
    assert_eq!(
        hub.client(&Target::parse(&b.id.to_string()))
            .expect("by id")
            .room,
        "dev"
    );
    assert!(matches!(
        hub.client(&Target::parse("nobody")),
        Err(HubError::NoSuchClient(_))
    ));
}

#[test]
fn kick_closes_the_client_with_its_reason() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    hub.join(&a, "lobby");
    let info = hub
        .kick(&Target::parse(&a.nick()), "spam\x1b[2J")
        .expect("kick");
    assert_eq!(info.id, a.id);
    let mut q = VecDeque::new();
    assert_eq!(
        a.outbox.take(&mut q),
        Some(Disconnect::Kicked("spam".into()))
    );
    assert_eq!(hub.snapshot().counters.kicks, 1);
    assert!(hub.kick(&Target::Id(999), "x").is_err());
}

#[test]
fn broadcast_reaches_everyone_or_one_room() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    let b = hub.connect(peer(2)).expect("b");
    hub.join(&a, "lobby");
    hub.join(&b, "dev");
    drain(&a);
    drain(&b);
    assert_eq!(hub.broadcast(None, "maintenance at 10:00"), Ok(2));
    assert_eq!(drain(&a), "*** NOTICE: maintenance at 10:00\r\n");
    assert_eq!(hub.broadcast(Some("dev"), "dev only"), Ok(1));
    assert_eq!(
        drain(&b),
        "*** NOTICE: maintenance at 10:00\r\n*** NOTICE: dev only\r\n"
    );
    assert_eq!(drain(&a), "");
    assert!(matches!(
        hub.broadcast(Some("nope"), "x"),
        Err(HubError::NoSuchRoom(_))
    ));
}

#[test]
fn leaving_frees_nick_room_and_address_slot() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    hub.join(&a, "dev");
    hub.rename(&a, "alice").expect("rename");
    hub.leave(&a, &Disconnect::Closed);
    assert!(
        hub.rooms().iter().all(|r| r.name != "dev"),
        "empty room removed"
    );
    let b = hub.connect(peer(1)).expect("b");
    hub.rename(&b, "alice").expect("nick free again");
    let s = hub.snapshot();
    assert_eq!(
        (s.clients, s.counters.connections, s.counters.peak_clients),
        (1, 2, 1)
    );
}

#[test]
fn history_keeps_the_last_lines_of_each_batch() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    let room = hub.join(&a, "lobby");
    let batch: String = (0..30).map(|i| format!("<a> {i}\r\n")).collect();
    hub.publish(&room, a.id, Bytes::from(batch), 30);
    let b = hub.connect(peer(2)).expect("b");
    hub.join(&b, "lobby");
    let seen = drain(&b);
    assert!(
        seen.contains("*** Last 20 messages in lobby:\r\n<a> 10\r\n"),
        "{seen}"
    );
    assert!(
        seen.ends_with("<a> 29\r\n*** End of history.\r\n"),
        "{seen}"
    );
    assert_eq!(hub.rooms()[0].messages, 30);
}

#[test]
fn history_replay_is_capped_to_what_fits_the_queue() {
    let mut raw = RawConfig::default();
    raw.chat.history = 1000;
    raw.limits.outbound_queue_bytes = 16 * 1024;
    let hub = Hub::new(raw.validate().expect("config"));
    let a = hub.connect(peer(1)).expect("a");
    let room = hub.join(&a, "lobby");
    let line = format!("<a> {}\r\n", "x".repeat(1000));
    for _ in 0..300 {
        hub.publish(&room, a.id, Bytes::from(line.clone()), 1);
    }
    let b = hub.connect(peer(2)).expect("b");
    hub.join(&b, "lobby");
    let seen = drain(&b);
    // A quarter of 16 KiB holds 4 lines of ~1 KB: the newest ones.
    assert!(seen.contains("*** Last 4 messages in lobby:"), "{seen}");
    assert!(seen.ends_with("*** End of history.\r\n"), "{seen}");
    let mut q = VecDeque::new();
    assert_eq!(b.outbox.take(&mut q), None, "the newcomer is not cut");
}

#[test]
fn joining_delivers_room_line_then_history_then_live_lines_once() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    let b = hub.connect(peer(2)).expect("b");
    let room = hub.join(&a, "dev");
    hub.join(&b, "lobby");
    let publisher = {
        let hub = hub.clone();
        let a = a.clone();
        std::thread::spawn(move || {
            for i in 0..2000 {
                let line = format!("<a> {i}\r\n");
                hub.publish(&room, a.id, Bytes::from(line), 1);
            }
        })
    };
    // Switch rooms while lines flow.
    for _ in 0..50 {
        hub.join(&b, "dev");
        hub.join(&b, "lobby");
    }
    hub.join(&b, "dev");
    publisher.join().expect("publisher");
    let seen = drain(&b);
    // Check the last visit to dev: room line, history, live, each once.
    let last = seen.rfind("*** You are now in dev").expect("joined dev");
    let visit = &seen[last..];
    let mut numbers = Vec::new();
    let mut lines = visit.split("\r\n").filter(|l| !l.is_empty());
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("*** You are now in dev"))
    );
    for l in lines {
        if let Some(n) = l.strip_prefix("<a> ") {
            numbers.push(n.parse::<u32>().expect("number"));
        } else {
            assert!(l.starts_with("*** "), "unexpected {l:?}");
        }
    }
    assert!(!numbers.is_empty());
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "a gap or a repeat: {numbers:?}");
    }
    assert_eq!(*numbers.last().expect("some"), 1999);
}

/// A second node as the hub sees it through the seam: `bob` in `lobby`
/// there, nick claims answered later, every other call recorded.
#[derive(Debug, Default)]
struct Elsewhere {
    calls: Mutex<Vec<String>>,
    claims: Mutex<Vec<tokio::sync::oneshot::Sender<Claim>>>,
}

impl Elsewhere {
    fn record(&self, call: String) {
        lock(&self.calls).push(call);
    }

    fn took(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.calls))
    }
}

impl ClusterState for Elsewhere {
    fn node_id(&self) -> &str {
        "a"
    }
    fn guest_nick(&self, id: ClientId) -> String {
        format!("guest-{id}-a")
    }
    fn claim_nick(&self, nick: &str, client: ClientId) -> Reply<Claim> {
        self.record(format!("claim {nick} {client}"));
        let (reply, answer) = tokio::sync::oneshot::channel();
        lock(&self.claims).push(reply);
        Reply::Later(answer)
    }
    fn hold_nick(&self, nick: &str, client: ClientId) {
        self.record(format!("hold {nick} {client}"));
    }
    fn release_nick(&self, nick: &str, client: ClientId) {
        self.record(format!("release {nick} {client}"));
    }
    fn member_set(&self, id: ClientId, nick: &str, room: &str) {
        self.record(format!("set {id} {nick} {room}"));
    }
    fn member_gone(&self, id: ClientId) {
        self.record(format!("gone {id}"));
    }
    fn member_seq(&self) -> u64 {
        0
    }
    fn interest_changed(&self) {
        self.record("interest".into());
    }
    fn remote_count(&self, room: &str) -> usize {
        usize::from(room == "lobby")
    }
    fn remote_nicks(&self, room: &str, _max: usize) -> (Vec<Arc<str>>, usize) {
        match room {
            "lobby" => (vec!["bob".into()], 1),
            _ => (Vec::new(), 0),
        }
    }
    fn remote_rooms(&self) -> HashMap<Arc<str>, usize> {
        HashMap::from([(Arc::from("lobby"), 1)])
    }
    fn offer(&self, room: &Arc<str>, batch: &Bytes, kind: Kind) {
        let text = String::from_utf8_lossy(batch);
        self.record(format!("offer {room} {kind:?} {}", text.trim_end()));
    }
    fn send_private(
        &self,
        from: ClientId,
        from_nick: &str,
        to: &str,
        text: &str,
    ) -> Option<Arc<str>> {
        (protocol::fold(to) == "bob").then(|| {
            self.record(format!("pm {from} {from_nick} bob {text}"));
            Arc::from("bob")
        })
    }
    fn load_history(&self, room: &str) -> Reply<()> {
        self.record(format!("history {room}"));
        Reply::Now(())
    }
}

#[test]
fn the_hub_asks_its_cluster_state_for_everything_beyond_this_node() {
    let hub = hub();
    let elsewhere = Arc::new(Elsewhere::default());
    hub.attach_cluster(elsewhere.clone());
    let a = hub.connect(peer(1)).expect("a");
    assert_eq!(a.nick().as_ref(), "guest-1-a");
    let JoinRequest::Done(room) = hub.request_join(&a, "lobby") else {
        panic!("history here at once");
    };
    assert_eq!(
        elsewhere.took(),
        [
            "history lobby",
            "interest",
            "set 1 guest-1-a lobby",
            "offer lobby Notice *** guest-1-a joined lobby (2 users)"
        ]
    );
    assert!(drain(&a).starts_with("*** You are now in lobby (2 users).\r\n"));
    assert_eq!(hub.who(&room), "lobby (2 users): bob, guest-1-a");
    let rooms = hub.all_rooms();
    assert_eq!((rooms[0].name.as_str(), rooms[0].members), ("lobby", 2));

    hub.publish(&room, a.id, Bytes::from_static(b"<guest-1-a> hi\r\n"), 1);
    assert_eq!(elsewhere.took(), ["offer lobby Chat <guest-1-a> hi"]);

    assert!(matches!(hub.private(&a, "Bob", "hello"), Ok(None)));
    assert_eq!(elsewhere.took(), ["pm 1 guest-1-a bob hello"]);
    assert_eq!(drain(&a), "[pm -> bob] hello\r\n");
    assert!(matches!(
        hub.private(&a, "carol", "hello"),
        Err(PrivateError::Failed(why)) if why == "no such nick \"carol\""
    ));

    // The answer comes later: the nick is the client's only once granted.
    let NickRequest::Wait(mut answer) = hub.request_nick(&a, "alice") else {
        panic!("the cluster decides");
    };
    assert_eq!(elsewhere.took(), ["claim alice 1"]);
    assert!(answer.try_recv().is_err());
    assert_eq!(a.nick().as_ref(), "guest-1-a");
    let reply = lock(&elsewhere.claims).pop().expect("a claim");
    reply.send(Claim::Granted).expect("waiting");
    assert_eq!(answer.try_recv(), Ok(Claim::Granted));
    assert_eq!(hub.rename(&a, "alice").as_deref(), Ok("alice"));
    assert_eq!(
        elsewhere.took(),
        [
            "set 1 alice lobby",
            "offer lobby Notice *** guest-1-a is now known as alice"
        ]
    );

    // Bob is still in the room, on the other node: he hears the leave.
    hub.leave(&a, &Disconnect::Closed);
    assert_eq!(
        elsewhere.took(),
        [
            "interest",
            "release alice 1",
            "gone 1",
            "offer lobby Notice *** alice left lobby (1 user): connection closed"
        ]
    );
}

#[test]
fn a_hub_without_a_cluster_is_a_single_node() {
    let hub = hub();
    let a = hub.connect(peer(1)).expect("a");
    assert_eq!(a.nick().as_ref(), "guest-1");
    assert_eq!(hub.cluster().node_id(), "");
    assert!(matches!(
        hub.request_nick(&a, "alice"),
        NickRequest::Done(Ok(nick)) if &*nick == "alice"
    ));
    assert!(matches!(
        hub.request_join(&a, "den"),
        JoinRequest::Done(room) if &*room.name == "den"
    ));
}

fn hub_with_limits(max_clients: i64, per_ip: i64) -> Hub {
    let mut raw = RawConfig::default();
    raw.limits.max_clients = max_clients;
    raw.limits.max_clients_per_ip = per_ip;
    Hub::new(raw.validate().expect("valid"))
}

fn v6(s: &str) -> IpAddr {
    s.parse().expect("address")
}

#[test]
fn seats_count_from_accept_and_pass_to_the_client() {
    let hub = hub_with_limits(3, 2);
    let a = peer(1).ip();
    let door = hub.seat(Some(a)).expect("first seat");
    let mut second = hub.seat(Some(a)).expect("second seat");
    assert_eq!(hub.seat(Some(a)).err(), Some(Refusal::PerIp(2)));
    // A trusted proxy's connection counts in the total only, until its
    // header names the client.
    let mut proxied = hub.seat(None).expect("a proxy's seat");
    assert_eq!(hub.seat(Some(peer(2).ip())).err(), Some(Refusal::Full(3)));
    assert_eq!(proxied.settle(a), Err(Refusal::PerIp(2)));
    drop(proxied);
    // Registering keeps the seat: the address's share stays taken.
    let client = hub
        .register(&mut second, peer(1), false)
        .expect("registers");
    drop(second);
    drop(door);
    let third = hub.seat(Some(a)).expect("the door's seat is free again");
    assert_eq!(hub.seat(Some(a)).err(), Some(Refusal::PerIp(2)));
    hub.leave(&client, &Disconnect::Quit(None));
    let fourth = hub.seat(Some(a)).expect("the client's seat is free again");
    drop((third, fourth));
    assert_eq!(lock(&hub.shared.state).seats, 0);
    assert!(lock(&hub.shared.state).per_ip.is_empty());
}

#[test]
fn one_ipv6_prefix_holds_one_share() {
    let hub = hub_with_limits(100, 1);
    let first = hub.seat(Some(v6("2001:db8:1:2::1"))).expect("first");
    assert_eq!(
        hub.seat(Some(v6("2001:db8:1:2:ffff::9"))).err(),
        Some(Refusal::PerIp(1))
    );
    let other = hub.seat(Some(v6("2001:db8:1:3::1"))).expect("another /64");
    drop((first, other));
}

#[test]
fn a_tls_pump_needs_room_under_the_file_limit() {
    let hub = hub_with_limits(100, 100);
    hub.set_fd_capacity(4);
    let mut tls = hub.seat(Some(peer(1).ip())).expect("a seat");
    tls.add_files(TLS_PUMP_FILES).expect("room for its pump");
    let mut second = hub.seat(Some(peer(2).ip())).expect("one descriptor left");
    assert_eq!(second.add_files(TLS_PUMP_FILES), Err(Refusal::Full(4)));
    assert_eq!(hub.seat(Some(peer(3).ip())).err(), Some(Refusal::Full(4)));
    drop(tls);
    second
        .add_files(TLS_PUMP_FILES)
        .expect("room once the first left");
}
