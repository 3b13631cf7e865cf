//! The chat protocol as users see it.

use crate::support::*;

#[tokio::test]
async fn a_message_reaches_everyone_else_but_not_the_sender() {
    let server = TestServer::start();
    let (mut alice, alice_nick) = server.join().await;
    let (mut bob, _) = server.join().await;
    let (mut carol, _) = server.join().await;
    alice.send("hello everyone\n").await;
    let expected = format!("<{alice_nick}> hello everyone");
    assert_eq!(bob.expect("hello").await, expected);
    assert_eq!(carol.expect("hello").await, expected);
    let before = alice.sync().await;
    assert!(
        before.iter().all(|l| !l.contains("hello everyone")),
        "echoed to sender: {before:?}"
    );
}

/// `server.client_threads = 0` serves clients on the runtime's workers
/// rather than on the client thread: the same chat, the same bursts, whole
/// and in order, with nothing read on the grid.
#[tokio::test]
async fn on_the_workers_clients_chat_as_on_the_client_thread() {
    let server = TestServer::with_env(&[
        ("CHATD_SERVER__CLIENT_THREADS", "0"),
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
        ("CHATD_METRICS__LISTEN", "127.0.0.1:0"),
    ]);
    let (mut alice, alice_nick) = server.join().await;
    let (mut bob, _) = server.join().await;
    let (mut carol, _) = server.join().await;
    alice.send("hello everyone\n").await;
    let expected = format!("<{alice_nick}> hello everyone");
    assert_eq!(bob.expect("hello").await, expected);
    assert_eq!(carol.expect("hello").await, expected);
    alice
        .send(&(0..400).map(|i| format!("line {i}\n")).collect::<String>())
        .await;
    for reader in [&mut bob, &mut carol] {
        for i in 0..400 {
            assert_eq!(reader.line().await, format!("<{alice_nick}> line {i}"));
        }
    }
    let before = alice.sync().await;
    assert!(
        before.iter().all(|l| !l.starts_with('<')),
        "echoed to sender: {before:?}"
    );
    let metrics = server.scrape_metrics().await;
    assert_eq!(metric(&metrics, "chatd_grid_reads_total"), Some(0));
}

#[tokio::test]
async fn join_and_leave_notices_carry_the_room_count() {
    let server = TestServer::start();
    let (mut alice, _) = server.join().await;
    let (mut bob, bob_nick) = server.join().await;
    assert_eq!(
        alice.line().await,
        format!("*** {bob_nick} joined lobby (2 users)")
    );
    let (_carol, carol_nick) = server.join().await;
    assert_eq!(
        alice.line().await,
        format!("*** {carol_nick} joined lobby (3 users)")
    );
    bob.send("/quit see you\n").await;
    bob.expect("*** Goodbye.").await;
    assert_eq!(bob.try_line().await, None);
    assert_eq!(
        alice.line().await,
        format!("*** {bob_nick} left lobby (2 users): quit: see you")
    );
    drop(_carol);
    assert_eq!(
        alice.line().await,
        format!("*** {carol_nick} left lobby (1 user): connection closed")
    );
}

#[tokio::test]
async fn default_nicks_are_unique_and_nick_changes_are_checked() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, b) = server.join().await;
    assert_ne!(a, b);
    assert!(a.starts_with("guest-") && b.starts_with("guest-"));
    alice.expect("joined").await;

    alice.send("/nick Alice\n").await;
    assert_eq!(alice.line().await, "*** You are now known as Alice.");
    assert_eq!(bob.line().await, format!("*** {a} is now known as Alice"));

    for (wanted, why) in [
        ("alice", "nick \"alice\" is taken"),
        ("***", "may only contain"),
        ("9lives", "must start with a letter"),
        ("guest-99", "is reserved"),
        ("server", "is reserved"),
        ("abcdefghijklmnopqrstu", "must be 1 to 20 characters"),
    ] {
        bob.send(&format!("/nick {wanted}\n")).await;
        let l = bob.line().await;
        assert!(
            l.starts_with("*** error: ") && l.contains(why),
            "{wanted}: {l}"
        );
    }
    bob.send("hi\n").await;
    assert_eq!(
        alice.expect("hi").await,
        format!("<{b}> hi"),
        "nick unchanged after refusals"
    );
}

#[tokio::test]
async fn rooms_separate_conversations() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, b) = server.join().await;
    alice.expect("joined").await;

    alice.send("/join #Dev\n").await;
    assert_eq!(alice.line().await, "*** You are now in dev (1 user).");
    assert_eq!(bob.line().await, format!("*** {a} left lobby (1 user)"));
    alice.send("only for dev\n").await;
    alice.send("/rooms\n").await;
    assert_eq!(alice.line().await, "*** 2 rooms:");
    assert_eq!(alice.line().await, "***   dev (1 user)");
    assert_eq!(alice.line().await, "***   lobby (1 user)");

    let before = bob.sync().await;
    assert!(before.is_empty(), "lobby got dev traffic: {before:?}");

    bob.send("/join dev\n").await;
    assert_eq!(alice.line().await, format!("*** {b} joined dev (2 users)"));
    bob.expect("You are now in dev (2 users).").await;
    bob.send("/who\n").await;
    let who = bob.expect("dev (2 users): ").await;
    assert!(who.contains(&a) && who.contains(&b), "{who}");

    alice.send("/join bad room\n").await;
    assert!(
        alice
            .line()
            .await
            .starts_with("*** error: usage: /join ROOM")
    );
    alice.send("/join ro*om\n").await;
    assert!(alice.line().await.contains("may only contain"));
}

#[tokio::test]
async fn private_messages_and_actions() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, b) = server.join().await;
    let (mut carol, _) = server.join().await;
    alice.expect("joined").await;
    alice.expect("joined").await;
    bob.expect("joined").await;

    alice
        .send(&format!("/msg {} psst\n", b.to_uppercase()))
        .await;
    assert_eq!(bob.line().await, format!("[pm] <{a}> psst"));
    assert_eq!(alice.line().await, format!("[pm -> {b}] psst"));
    let before = carol.sync().await;
    assert!(before.iter().all(|l| !l.contains("psst")), "{before:?}");

    alice.send("/msg nobody hi\n").await;
    assert_eq!(alice.line().await, "*** error: no such nick \"nobody\"");

    alice.send("/me waves\n").await;
    assert_eq!(bob.line().await, format!("* {a} waves"));
    assert_eq!(carol.line().await, format!("* {a} waves"));
}

#[tokio::test]
async fn history_is_replayed_to_newcomers() {
    let server = TestServer::with_env(&[("CHATD_CHAT__HISTORY", "3")]);
    let (mut alice, a) = server.join().await;
    for i in 1..=5 {
        alice.send(&format!("message {i}\n")).await;
    }
    alice.sync().await;
    let mut late = server.connect().await;
    late.expect("You are now in lobby (2 users).").await;
    assert_eq!(late.line().await, "*** Last 3 messages in lobby:");
    for i in 3..=5 {
        assert_eq!(late.line().await, format!("<{a}> message {i}"));
    }
    assert_eq!(late.line().await, "*** End of history.");
}

#[tokio::test]
async fn help_and_unknown_commands() {
    let server = TestServer::start();
    let (mut alice, _) = server.join().await;
    alice.send("/help\n").await;
    assert_eq!(alice.line().await, "*** Commands:");
    alice.expect("/quit").await;
    alice.send("/frobnicate now\n").await;
    assert_eq!(
        alice.expect("error").await,
        "*** error: unknown command /frobnicate (try /help)"
    );
    alice.send("//slash\n").await;
    let (mut bob, _) = server.join().await;
    alice.send("//still here\n").await;
    assert!(bob.expect("still here").await.ends_with("> /still here"));
}

#[tokio::test]
async fn fragmented_and_coalesced_lines() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    for piece in ["he", "llo wo", "rld\r", "\n"] {
        alice.send(piece).await;
        tokio::task::yield_now().await;
    }
    alice.send("one\ntwo\r\nthree\n").await;
    assert_eq!(bob.line().await, format!("<{a}> hello world"));
    assert_eq!(bob.line().await, format!("<{a}> one"));
    assert_eq!(bob.line().await, format!("<{a}> two"));
    assert_eq!(bob.line().await, format!("<{a}> three"));
}

#[tokio::test]
async fn look_alike_guest_and_service_nicks_are_refused() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.send("/nick alice\n").await;
    assert_eq!(
        alice.expect("known as").await,
        "*** You are now known as alice."
    );
    bob.expect(&format!("{a} is now known as alice")).await;
    for (wanted, why) in [
        ("aIice", "nick \"aIice\" is taken"),
        ("a1ice", "nick \"a1ice\" is taken"),
        ("ALlCE", "nick \"ALlCE\" is taken"),
        ("guest-bob", "is reserved"),
        ("Guest-7", "is reserved"),
        ("NickServ", "is reserved"),
        ("chanserv", "is reserved"),
        ("r00t", "is reserved"),
        ("adrnin", "is reserved"),
        ("Administrator", "is reserved"),
        ("moderator", "is reserved"),
    ] {
        bob.send(&format!("/nick {wanted}\n")).await;
        let l = bob.line().await;
        assert!(
            l.starts_with("*** error: ") && l.contains(why),
            "{wanted}: {l}"
        );
    }
    // The folded form finds the one it stands for.
    bob.send("/msg aIice psst\n").await;
    assert!(alice.expect("psst").await.ends_with("> psst"));
    assert_eq!(bob.line().await, "[pm -> alice] psst");
    bob.send("/nick carol\n").await;
    assert_eq!(bob.line().await, "*** You are now known as carol.");
}

#[tokio::test]
async fn renaming_to_the_same_nick_tells_nobody() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    alice.send(&format!("/nick {a}\n")).await;
    assert_eq!(
        alice.line().await,
        format!("*** You are already known as {a}.")
    );
    alice.send("/nick alice\n").await;
    alice.expect("You are now known as alice.").await;
    alice.send("/nick alice\n").await;
    assert_eq!(alice.line().await, "*** You are already known as alice.");
    // A change of case is a change the room sees.
    alice.send("/nick Alice\n").await;
    assert_eq!(alice.line().await, "*** You are now known as Alice.");
    let seen = bob.sync().await;
    assert_eq!(
        seen,
        vec![
            format!("*** {a} is now known as alice"),
            "*** alice is now known as Alice".to_string(),
        ]
    );
}

#[tokio::test]
async fn counts_of_one_are_singular() {
    let server = TestServer::start();
    let (mut alice, a) = server.join().await;
    alice.send("/rooms\n").await;
    assert_eq!(alice.line().await, "*** 1 room:");
    assert_eq!(alice.line().await, "***   lobby (1 user)");
    alice.send("hello\n").await;
    alice.sync().await;
    let mut late = server.connect().await;
    late.expect("You are now in lobby (2 users).").await;
    assert_eq!(late.line().await, "*** Last 1 message in lobby:");
    assert_eq!(late.line().await, format!("<{a}> hello"));

    let full = TestServer::with_env(&[("CHATD_LIMITS__MAX_CLIENTS", "1")]);
    let (_only, _) = full.join().await;
    let mut refused = full.connect().await;
    assert_eq!(
        refused.line().await,
        "*** error: server is full (1 client), try again later"
    );
}

/// While lines keep coming fast, writes to one client are held (at least
/// half a period of the room's grid after the last one: at this burst's
/// rate, a tenth of `chat.write_coalesce_ms`),
/// and the lines held back meanwhile all arrive, in order, in the next
/// write; a line after a quiet spell leaves at once.
#[tokio::test]
async fn a_busy_client_gets_lines_coalesced_not_dropped() {
    let server = TestServer::with_env(&[
        ("CHATD_CHAT__WRITE_COALESCE_MS", "100"),
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
    ]);
    let (mut alice, alice_nick) = server.join().await;
    let (mut bob, _) = server.join().await;
    alice.expect("joined").await;
    // Quiet until now: the first line is not held back.
    let first = std::time::Instant::now();
    alice.send("one\n").await;
    assert_eq!(bob.expect("one").await, format!("<{alice_nick}> one"));
    assert!(
        first.elapsed() < std::time::Duration::from_millis(80),
        "a line after a quiet spell was held back"
    );
    // A burst makes bob a busy client: 400 lines in a moment.
    alice.send(&"x\n".repeat(400)).await;
    for _ in 0..400 {
        assert_eq!(bob.line().await, format!("<{alice_nick}> x"));
    }
    let burst = std::time::Instant::now();
    alice.send("two\n").await;
    alice.send("three\n").await;
    assert_eq!(bob.line().await, format!("<{alice_nick}> two"));
    let held = burst.elapsed();
    assert_eq!(bob.line().await, format!("<{alice_nick}> three"));
    // The burst's last write happened before bob read it, so "two" left at
    // least half a period of the room's grid (see below) after that, less
    // what reading the burst took; at the burst's rate, the period is its
    // shortest, a tenth of the setting.
    assert!(
        held >= std::time::Duration::from_millis(4),
        "\"two\" arrived {held:?} after the burst: not held back"
    );
}

/// The busy members of a room are written to on one grid of
/// `chat.write_coalesce_ms`, not each a window after its own last write:
/// a member written off the grid (a write's worth of private lines at once)
/// is back on the room's ticks within two periods, so that one timer tick
/// writes to the whole room.
#[tokio::test]
async fn busy_members_of_a_room_are_written_on_the_same_ticks() {
    use std::time::{Duration, Instant};
    const PERIOD: Duration = Duration::from_millis(100);
    let server = TestServer::with_env(&[
        ("CHATD_CHAT__WRITE_COALESCE_MS", "100"),
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
    ]);
    let (alice, _) = server.join().await;
    let (mut bob, _) = server.join().await;
    let (mut carol, carol_nick) = server.join().await;
    let (mut dave, _) = server.join().await;
    dave.send("/join side\n").await;
    dave.expect("You are now in side").await;
    bob.expect("left lobby").await;
    carol.expect("left lobby").await;

    /// Reads until alice's last line; returns when each write arrived (a
    /// line more than 10 ms after the one before starts a new write) and
    /// tells `writes` as they come.
    async fn writes_to(
        mut client: Client,
        writes: tokio::sync::mpsc::UnboundedSender<Instant>,
    ) -> Vec<Instant> {
        let mut starts = Vec::new();
        let mut last: Option<Instant> = None;
        loop {
            let line = client.line().await;
            let now = Instant::now();
            if last.is_none_or(|l| now - l > Duration::from_millis(10)) {
                starts.push(now);
                let _ = writes.send(now);
            }
            last = Some(now);
            if line.ends_with("> end") {
                return starts;
            }
        }
    }
    let (bob_tx, mut bob_writes) = tokio::sync::mpsc::unbounded_channel();
    let (carol_tx, _carol_writes) = tokio::sync::mpsc::unbounded_channel();
    let bob_task = tokio::spawn(writes_to(bob, bob_tx));
    let carol_task = tokio::spawn(writes_to(carol, carol_tx));

    // Alice keeps bob and carol busy: 1,500 lines/s, 15 per 10 ms, for 3 s
    // (about 2.5 KB a period: under a write's worth, so held to the grid).
    let (_alice_reads, mut alice) = alice.into_parts();
    let started = Instant::now();
    let stream = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for i in 0..300 {
            tick.tick().await;
            let lines: String = (0..15).map(|j| format!("m{i}-{j}\n")).collect();
            alice.write_all(lines.as_bytes()).await.expect("send");
        }
        alice.write_all(b"end\n").await.expect("send");
        alice
    });

    // Half a period after one of bob's writes, a write's worth of private
    // lines goes to carol at once, off the grid.
    tokio::time::sleep(Duration::from_millis(800)).await;
    while bob_writes.try_recv().is_ok() {}
    tokio::time::timeout(PERIOD * 2, bob_writes.recv())
        .await
        .expect("bob is written to every period");
    tokio::time::sleep(PERIOD / 2).await;
    let pm: String = (0..25)
        .map(|_| format!("/msg {carol_nick} {}\n", "x".repeat(400)))
        .collect();
    dave.send(&pm).await;
    let off_grid = Instant::now();

    let _alice = stream.await.expect("alice's stream");
    let bob_starts = bob_task.await.expect("bob's reader");
    let carol_starts = carol_task.await.expect("carol's reader");
    let end = started + Duration::from_secs(3);
    let checked: Vec<Duration> = carol_starts
        .iter()
        .filter(|&&t| t > off_grid + PERIOD * 3 && t < end - PERIOD / 2)
        .map(|&t| {
            bob_starts
                .iter()
                .map(|&b| if b > t { b - t } else { t - b })
                .min()
                .expect("bob was written to")
        })
        .collect();
    assert!(
        checked.len() >= 3,
        "too few writes to compare: {} after {:?}",
        checked.len(),
        off_grid - started
    );
    // Written on separate ticks, every one of them would be 30 ms or more
    // from bob's; one reader stalled mid-write may read a write in two.
    let on_tick = checked
        .iter()
        .filter(|d| **d < Duration::from_millis(20))
        .count();
    assert!(
        on_tick * 4 >= checked.len() * 3,
        "carol's writes are not on bob's ticks: {checked:?} apart"
    );
}

/// With a thread of their own for the clients (`server.client_threads =
/// 1`), the senders of a busy room are read on the room's grid rather than
/// at each line: the `grid_reads` counter says they were. Every line still
/// reaches every other member whole and in order, and none stays behind
/// the senders' raised low-water mark once they stop.
#[tokio::test]
async fn on_the_client_thread_busy_senders_are_read_on_the_grid_and_lose_nothing() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    const SENDERS: usize = 4;
    const LISTENERS: usize = 2;
    const LINES: usize = 800;
    let server = TestServer::with_env(&[
        ("CHATD_SERVER__CLIENT_THREADS", "1"),
        ("CHATD_CHAT__WRITE_COALESCE_MS", "20"),
        ("CHATD_LIMITS__FLOOD_LINES_PER_SEC", "0"),
        ("CHATD_METRICS__LISTEN", "127.0.0.1:0"),
    ]);
    let mut clients = Vec::new();
    for _ in 0..SENDERS + LISTENERS {
        clients.push(server.join().await);
    }
    let nicks: Vec<String> = clients.iter().map(|(_, nick)| nick.clone()).collect();

    // Each member reads until it has every line of every other sender, and
    // checks each sender's lines arrive whole and in order.
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (me, (client, _)) in clients.into_iter().enumerate() {
        let (mut reader, writer) = client.into_parts();
        writers.push(writer);
        let nicks = nicks.clone();
        readers.push(tokio::spawn(async move {
            let mut next = [0usize; SENDERS];
            let expected: usize = (0..SENDERS).filter(|&s| s != me).map(|_| LINES).sum();
            let mut got = 0;
            let mut line = String::new();
            while got < expected {
                line.clear();
                let n = tokio::time::timeout(WAIT, reader.read_line(&mut line))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("member {me}: stuck after {got} of {expected} lines")
                    })
                    .expect("read");
                assert!(n > 0, "member {me}: closed after {got} lines");
                let text = line.trim_end_matches("\r\n");
                let Some(sender) =
                    (0..SENDERS).find(|&s| text.starts_with(&format!("<{}> ", nicks[s])))
                else {
                    continue;
                };
                assert_ne!(sender, me, "member {me}: its own line came back");
                assert_eq!(
                    text,
                    format!("<{}> s{sender}-{}", nicks[sender], next[sender]),
                    "member {me}: a line of sender {sender} is missing, garbled or out of order"
                );
                next[sender] += 1;
                got += 1;
            }
        }));
    }

    // Four senders, one line per write every millisecond, as `nc` would:
    // 4,000 lines a second into the room, so every member is busy.
    let mut senders = Vec::new();
    // The listeners' halves stay open: dropping one closes its client.
    let listening_writers = writers.split_off(SENDERS);
    for (sender, mut writer) in writers.into_iter().enumerate() {
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
            for i in 0..LINES {
                tick.tick().await;
                writer
                    .write_all(format!("s{sender}-{i}\n").as_bytes())
                    .await
                    .expect("send");
            }
            writer
        }));
    }
    let mut kept = Vec::new();
    for sender in senders {
        kept.push(sender.await.expect("sender"));
    }
    for reader in readers {
        reader.await.expect("every line reached every member");
    }

    let body = server.scrape_metrics().await;
    let reads = metric(&body, "chatd_grid_reads_total")
        .unwrap_or_else(|| panic!("no grid_reads counter in {body}"));
    assert!(
        reads >= 20,
        "senders were read on the grid only {reads} times"
    );
    drop((kept, listening_writers));
}
