//! One benchmark client: connect and register in a room in the target's
//! dialect, send stamped lines, and account for every line received.
//!
//! A payload is `b<sender>:<seq>:<nanos>` padded with dots to the payload size,
//! where `nanos` is the send time in nanoseconds since the benchmark started,
//! so each receiver measures latency without any clock exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

/// The instant every payload stamp is relative to.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since [`EPOCH`].
pub fn now_nanos() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// How a target expects clients to talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// chatd's plain line protocol (docs/PROTOCOL.md).
    Chatd,
    /// IRC: NICK/USER, JOIN, PRIVMSG.
    Irc,
    /// The tutorial's Python server: raw chunks relayed with an address prefix.
    Tutorial,
}

impl Dialect {
    /// The name of room `index` out of `rooms`.
    pub fn room_name(self, index: usize, rooms: usize) -> String {
        match (self, rooms) {
            (Dialect::Chatd, 1) => "lobby".to_owned(),
            (Dialect::Chatd, _) => format!("bench{index}"),
            (Dialect::Irc, 1) => "#bench".to_owned(),
            (Dialect::Irc, _) => format!("#bench{index}"),
            (Dialect::Tutorial, _) => String::new(),
        }
    }

    fn line_prefix(self, room: &str) -> Vec<u8> {
        match self {
            Dialect::Irc => format!("PRIVMSG {room} :").into_bytes(),
            Dialect::Chatd | Dialect::Tutorial => Vec::new(),
        }
    }

    fn line_end(self) -> &'static [u8] {
        match self {
            Dialect::Irc => b"\r\n",
            Dialect::Chatd | Dialect::Tutorial => b"\n",
        }
    }
}

/// Appends a stamped payload of at least `size` bytes.
pub fn encode_payload(out: &mut Vec<u8>, sender: u32, seq: u32, nanos: u64, size: usize) {
    use std::io::Write;
    let start = out.len();
    // Writing to a Vec cannot fail.
    let _ = write!(out, "b{sender}:{seq}:{nanos}");
    let written = out.len() - start;
    if written < size {
        out.resize(start + size, b'.');
    }
}

/// Parses a payload written by [`encode_payload`] with `size`:
/// `(sender, seq, nanos)`. A payload of any other length, or with anything
/// but dots after the stamp, is not one the benchmark sent.
pub fn parse_payload(p: &[u8], size: usize) -> Option<(u32, u32, u64)> {
    let rest = p.strip_prefix(b"b")?;
    let (sender, rest) = parse_number(rest)?;
    let rest = rest.strip_prefix(b":")?;
    let (seq, rest) = parse_number(rest)?;
    let rest = rest.strip_prefix(b":")?;
    let (nanos, rest) = parse_number(rest)?;
    if !rest.iter().all(|&b| b == b'.') {
        return None;
    }
    // Padding makes every payload exactly `size` long, unless the stamp
    // alone is longer (then there is no padding at all).
    if p.len() != size && !(p.len() > size && rest.is_empty()) {
        return None;
    }
    Some((u32::try_from(sender).ok()?, u32::try_from(seq).ok()?, nanos))
}

fn parse_number(s: &[u8]) -> Option<(u64, &[u8])> {
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let mut n = 0u64;
    for &b in &s[..digits] {
        n = n * 10 + u64::from(b - b'0');
    }
    Some((n, &s[digits..]))
}

/// What one received line is.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A relayed message: the sender's nick where the dialect names it, and
    /// where a payload should be.
    Message(Option<&'a [u8]>, &'a [u8]),
    /// An IRC PING; the slice is its argument, to echo in a PONG.
    Ping(&'a [u8]),
    /// Anything else (notices, numerics, joins).
    Other,
}

/// Classifies one line (without its line ending) in `dialect`.
pub fn classify(dialect: Dialect, line: &[u8]) -> Event<'_> {
    match dialect {
        Dialect::Chatd => {
            // `<nick> text`; nicks cannot contain '>'.
            if line.first() == Some(&b'<')
                && let Some(i) = memchr::memmem::find(line, b"> ")
            {
                return Event::Message(Some(&line[1..i]), &line[i + 2..]);
            }
            Event::Other
        }
        Dialect::Irc => {
            if let Some(arg) = line.strip_prefix(b"PING") {
                return Event::Ping(arg);
            }
            // `:nick!user@host PRIVMSG #room :payload`
            let Some(rest) = line.strip_prefix(b":") else {
                return Event::Other;
            };
            let Some(space) = memchr::memchr(b' ', rest) else {
                return Event::Other;
            };
            let Some(args) = rest[space + 1..].strip_prefix(b"PRIVMSG ") else {
                return Event::Other;
            };
            let source = &rest[..space];
            let nick = &source[..memchr::memchr(b'!', source).unwrap_or(source.len())];
            match memchr::memmem::find(args, b" :") {
                Some(i) => Event::Message(Some(nick), &args[i + 2..]),
                None => Event::Other,
            }
        }
        Dialect::Tutorial => {
            // `[ip:port] chunk`, possibly glued to unterminated system notices
            // that came before it: the payload follows the last "] ".
            match memchr::memmem::rfind(line, b"] b") {
                Some(i) => Event::Message(None, &line[i + 2..]),
                None if line.first() == Some(&b'b') => Event::Message(None, line),
                None => Event::Other,
            }
        }
    }
}

/// The IRC command (or numeric) of a line: `:prefix CMD args` or `CMD args`.
fn irc_command(line: &[u8]) -> &[u8] {
    let rest = match line.strip_prefix(b":") {
        Some(r) => match memchr::memchr(b' ', r) {
            Some(i) => &r[i + 1..],
            None => return b"",
        },
        None => line,
    };
    let end = memchr::memchr(b' ', rest).unwrap_or(rest.len());
    &rest[..end]
}

/// State shared by every client of one run.
pub struct Shared {
    pub senders: usize,
    pub messages: u32,
    /// Payload bytes per line.
    pub size: usize,
    /// Rooms the clients are spread over (client `i` is in room `i % rooms`).
    pub rooms: usize,
    /// At most this many lines per sender `write` (as fast as possible).
    pub lines_per_write: u32,
    /// `write` calls made by all senders so far.
    pub writes: AtomicU64,
    /// Unique deliveries so far, for completion.
    pub unique: AtomicU64,
    /// When the last delivery was seen, in [`now_nanos`].
    pub last_delivery: AtomicU64,
    /// Latency histograms in nanoseconds, sharded to keep locks short.
    pub latency: Vec<StdMutex<Histogram<u64>>>,
    pub stop: CancellationToken,
    /// Lines written by all senders so far.
    pub sent: AtomicU64,
    /// Deliveries each line is owed, on average.
    pub fanout: f64,
    /// Closed loop: senders pause while more than this many lines (summed
    /// over all senders) are not yet delivered everywhere. 0 = open loop.
    pub window: u64,
    /// Signalled whenever deliveries are recorded.
    pub progress: Notify,
}

const SHARDS: usize = 16;

impl Shared {
    pub fn new(
        (senders, messages, size, rooms): (usize, u32, usize, usize),
        lines_per_write: u32,
        fanout: f64,
        window: u64,
    ) -> anyhow::Result<Arc<Self>> {
        let latency = (0..SHARDS)
            .map(|_| Histogram::new_with_bounds(1, 600_000_000_000, 3).map(StdMutex::new))
            .collect::<Result<Vec<_>, _>>()
            .context("creating latency histograms")?;
        Ok(Arc::new(Shared {
            senders,
            messages,
            size,
            rooms: rooms.max(1),
            lines_per_write: lines_per_write.max(1),
            writes: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            last_delivery: AtomicU64::new(0),
            latency,
            stop: CancellationToken::new(),
            sent: AtomicU64::new(0),
            fanout,
            window,
            progress: Notify::new(),
        }))
    }

    /// Waits until fewer than `window` lines are in flight.
    async fn wait_for_window(&self) {
        if self.window == 0 {
            return;
        }
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let sent = self.sent.load(Ordering::Relaxed) as f64;
            let owed = sent * self.fanout - self.unique.load(Ordering::Relaxed) as f64;
            if owed <= self.window as f64 * self.fanout || self.stop.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// All shards merged.
    pub fn merged_latency(&self) -> anyhow::Result<Histogram<u64>> {
        let mut all = Histogram::new_with_bounds(1, 600_000_000_000, 3)?;
        for shard in &self.latency {
            let h = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*h)?;
        }
        Ok(all)
    }
}

/// What one receiver saw from one sender.
#[derive(Default)]
struct SenderSeen {
    seen: Vec<u64>,
    max_seq: Option<u32>,
}

/// What one receiver saw in all.
#[derive(Default, Debug, Clone)]
pub struct Tally {
    /// Message lines received, whatever they were.
    pub delivered: u64,
    /// Each line of a sender of this room at most once, checked whole.
    pub unique: u64,
    /// Unique lines that came in their sender's order: what deliveries/s counts.
    pub good: u64,
    pub duplicated: u64,
    /// Unique lines that came after a later line of the same sender.
    pub out_of_order: u64,
    /// Message lines that are not a line the benchmark sent: wrong length,
    /// wrong padding, unparsable stamp, or a nick other than the sender's.
    pub garbled: u64,
    /// Well-formed lines this client must not get: from a sender of another
    /// room, or a sequence number never sent.
    pub extra: u64,
    /// The client's own lines, sent back to it.
    pub echoed: u64,
    /// Bytes read after registration.
    pub bytes: u64,
    /// The server closed the connection (EOF).
    pub eof: bool,
    /// The connection failed with an error (e.g. reset).
    pub error: bool,
    /// The longest time between two reads that returned data, from the
    /// first delivery on: how long this reader left its socket alone. A
    /// reader starved of CPU for longer than chatd's progress window (50 ms)
    /// after its buffers filled no longer counts as reading there (see
    /// chatd's outbox).
    pub longest_gap_ns: u64,
}

impl Tally {
    /// Adds another reader's counts of each kind of line (not its bytes,
    /// deliveries or gaps, which the callers sum or compare themselves).
    pub fn add_counts(&mut self, t: &Tally) {
        self.unique += t.unique;
        self.good += t.good;
        self.duplicated += t.duplicated;
        self.out_of_order += t.out_of_order;
        self.garbled += t.garbled;
        self.extra += t.extra;
        self.echoed += t.echoed;
    }
}

struct Receiver {
    dialect: Dialect,
    /// This client's id and room index.
    id: usize,
    room: usize,
    rooms: usize,
    size: usize,
    per_sender: Vec<SenderSeen>,
    messages: u32,
    tally: Tally,
    latencies: Vec<u64>,
    pong: Vec<u8>,
}

impl Receiver {
    fn new(dialect: Dialect, id: usize, shared: &Shared) -> Self {
        let (senders, messages) = (shared.senders, shared.messages);
        Receiver {
            dialect,
            id,
            room: id % shared.rooms,
            rooms: shared.rooms,
            size: shared.size,
            per_sender: (0..senders).map(|_| SenderSeen::default()).collect(),
            messages,
            tally: Tally::default(),
            latencies: Vec::with_capacity(256),
            pong: Vec::new(),
        }
    }

    /// Handles every complete line in `buf` and returns how many bytes it used.
    fn process(&mut self, buf: &[u8], now: u64) -> usize {
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &buf[start..]) {
            let mut line = &buf[start..start + nl];
            start += nl + 1;
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            match classify(self.dialect, line) {
                Event::Message(nick, p) => self.message(nick, p, now),
                Event::Ping(arg) => {
                    self.pong.extend_from_slice(b"PONG");
                    self.pong.extend_from_slice(arg);
                    self.pong.extend_from_slice(b"\r\n");
                }
                Event::Other => {}
            }
        }
        start
    }

    fn message(&mut self, nick: Option<&[u8]>, p: &[u8], now: u64) {
        self.tally.delivered += 1;
        let Some((sender, seq, sent)) = parse_payload(p, self.size) else {
            self.tally.garbled += 1;
            return;
        };
        // Every sender is registered as `b<id>`.
        if let Some(nick) = nick
            && (nick.first() != Some(&b'b')
                || parse_number(&nick[1..]) != Some((u64::from(sender), &[][..])))
        {
            self.tally.garbled += 1;
            return;
        }
        if sender as usize == self.id {
            self.tally.echoed += 1;
            return;
        }
        let (Some(s), true) = (
            self.per_sender.get_mut(sender as usize),
            seq < self.messages && sender as usize % self.rooms == self.room,
        ) else {
            self.tally.extra += 1;
            return;
        };
        if s.seen.is_empty() {
            s.seen = vec![0; (self.messages as usize).div_ceil(64)];
        }
        let (word, bit) = (seq as usize / 64, 1u64 << (seq % 64));
        if s.seen[word] & bit != 0 {
            self.tally.duplicated += 1;
            return;
        }
        s.seen[word] |= bit;
        self.tally.unique += 1;
        match s.max_seq {
            Some(max) if seq < max => self.tally.out_of_order += 1,
            _ => {
                s.max_seq = Some(seq);
                self.tally.good += 1;
                self.latencies.push(now.saturating_sub(sent).max(1));
            }
        }
    }
}

/// A registered client, ready to read and (maybe) send.
pub struct Conn {
    pub id: usize,
    pub room: String,
    pub dialect: Dialect,
    reader: OwnedReadHalf,
    pub writer: Arc<Mutex<OwnedWriteHalf>>,
    buf: BytesMut,
    buf_size: usize,
}

/// Connects client `id` and registers it in `room`.
///
/// `small_rcvbuf` pins the receive buffer to 64 KiB (for the client that never
/// reads, so that what it is owed cannot hide in kernel buffers).
pub async fn connect(
    addr: SocketAddr,
    id: usize,
    dialect: Dialect,
    room: String,
    small_rcvbuf: bool,
    buf_size: usize,
    sender: bool,
) -> anyhow::Result<Conn> {
    let socket = TcpSocket::new_v4()?;
    if small_rcvbuf {
        socket.set_recv_buffer_size(64 * 1024)?;
    }
    let stream = socket.connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.into_split();
    let mut conn = Conn {
        id,
        room,
        dialect,
        reader,
        writer: Arc::new(Mutex::new(writer)),
        buf: BytesMut::with_capacity(buf_size),
        buf_size,
    };
    conn.register(sender).await?;
    Ok(conn)
}

impl Conn {
    async fn write(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.writer.lock().await.write_all(bytes).await?;
        Ok(())
    }

    /// The next complete line (without its ending), or an error at EOF.
    async fn next_line(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(nl) = memchr::memchr(b'\n', &self.buf) {
                let mut line = self.buf.split_to(nl + 1).to_vec();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(self.buf_size);
        }
        if self.reader.read_buf(&mut self.buf).await? == 0 {
            bail!("server closed the connection during registration");
        }
        Ok(())
    }

    /// Registers in the room; a `sender` also takes the nick `b<id>` (IRC
    /// clients always do), which receivers check on every line.
    async fn register(&mut self, sender: bool) -> anyhow::Result<()> {
        match self.dialect {
            Dialect::Chatd => {
                self.register_chatd().await?;
                if sender {
                    self.nick_chatd().await?;
                }
                Ok(())
            }
            Dialect::Irc => self.register_irc().await,
            // The tutorial server greets every client with a (line-less)
            // notice once it is in the client list.
            Dialect::Tutorial => self.fill().await,
        }
    }

    async fn register_chatd(&mut self) -> anyhow::Result<()> {
        let lobby = Dialect::Chatd.room_name(0, 1);
        let mut wanted = format!("*** You are now in {lobby}");
        let mut joined_target = self.room == lobby;
        loop {
            let line = self.next_line().await?;
            if line.starts_with(b"*** error") || line.starts_with(b"*** Disconnected") {
                bail!("chatd refused client: {}", String::from_utf8_lossy(&line));
            }
            if !line.starts_with(wanted.as_bytes()) {
                continue;
            }
            if joined_target {
                return Ok(());
            }
            self.write(format!("/join {}\n", self.room).as_bytes())
                .await?;
            wanted = format!("*** You are now in {}", self.room);
            joined_target = true;
        }
    }

    async fn nick_chatd(&mut self) -> anyhow::Result<()> {
        let nick = format!("b{}", self.id);
        self.write(format!("/nick {nick}\n").as_bytes()).await?;
        let wanted = format!("*** You are now known as {nick}.");
        loop {
            let line = self.next_line().await?;
            if line.starts_with(b"*** error") || line.starts_with(b"*** Disconnected") {
                bail!(
                    "chatd refused nick {nick}: {}",
                    String::from_utf8_lossy(&line)
                );
            }
            if line == wanted.as_bytes() {
                return Ok(());
            }
        }
    }

    async fn register_irc(&mut self) -> anyhow::Result<()> {
        let nick = format!("b{}", self.id);
        self.write(format!("NICK {nick}\r\nUSER {nick} 0 * :bench\r\n").as_bytes())
            .await?;
        loop {
            let line = self.next_line().await?;
            if let Some(arg) = line.strip_prefix(b"PING") {
                let mut pong = b"PONG".to_vec();
                pong.extend_from_slice(arg);
                pong.extend_from_slice(b"\r\n");
                self.write(&pong).await?;
                continue;
            }
            if line.starts_with(b"ERROR") {
                bail!(
                    "IRC server refused client: {}",
                    String::from_utf8_lossy(&line)
                );
            }
            match irc_command(&line) {
                b"001" => {
                    self.write(format!("JOIN {}\r\n", self.room).as_bytes())
                        .await?
                }
                // End of NAMES: the JOIN is complete.
                b"366" => return Ok(()),
                b"433" | b"432" => bail!("nick {nick} refused"),
                b"403" | b"405" | b"471" | b"473" | b"474" | b"475" => {
                    bail!("JOIN refused: {}", String::from_utf8_lossy(&line))
                }
                _ => {}
            }
        }
    }

    /// Reads and accounts until `shared.stop` fires or the connection ends.
    ///
    /// With `hold` set, the client does not read at all until `hold` fires
    /// (the stalled client), and then drains until EOF, error, or `quiet`
    /// without data.
    pub async fn read_loop(
        mut self,
        shared: Arc<Shared>,
        hold: Option<(CancellationToken, Duration)>,
    ) -> Tally {
        let mut rx = Receiver::new(self.dialect, self.id, &shared);
        // Unique deliveries already added to `shared.unique`.
        let mut reported = 0u64;
        // When the last read returned, once deliveries have begun.
        let mut last_read: Option<u64> = None;
        let shard = self.id % SHARDS;
        let quiet = match hold {
            Some((release, quiet)) => {
                release.cancelled().await;
                Some(quiet)
            }
            None => None,
        };
        loop {
            let used = rx.process(&self.buf, now_nanos());
            self.buf.advance(used);
            if self.buf.len() > 4 * 1024 * 1024 {
                // A "line" this long is garbage (or the tutorial server's
                // notices without newlines); drop it.
                rx.tally.garbled += 1;
                self.buf.clear();
            }
            if quiet.is_some() {
                // The stalled client is not measured: it reads only at the end.
                rx.latencies.clear();
                reported = rx.tally.unique;
            }
            if rx.tally.unique > reported {
                if !rx.latencies.is_empty() {
                    let mut h = shared.latency[shard]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for &l in &rx.latencies {
                        h.saturating_record(l);
                    }
                }
                rx.latencies.clear();
                shared
                    .unique
                    .fetch_add(rx.tally.unique - reported, Ordering::Relaxed);
                reported = rx.tally.unique;
                shared
                    .last_delivery
                    .fetch_max(now_nanos(), Ordering::Relaxed);
                if shared.window > 0 {
                    shared.progress.notify_waiters();
                }
            }
            if !rx.pong.is_empty() {
                let pong = std::mem::take(&mut rx.pong);
                if self.write(&pong).await.is_err() {
                    rx.tally.error = true;
                    break;
                }
            }
            if self.buf.capacity() - self.buf.len() < self.buf_size / 4 {
                self.buf.reserve(self.buf_size);
            }
            let read = async {
                match quiet {
                    Some(q) => tokio::time::timeout(q, self.reader.read_buf(&mut self.buf)).await,
                    None => Ok(self.reader.read_buf(&mut self.buf).await),
                }
            };
            tokio::select! {
                biased;
                _ = shared.stop.cancelled(), if quiet.is_none() => break,
                r = read => match r {
                    Ok(Ok(0)) => { rx.tally.eof = true; break; }
                    Ok(Ok(n)) => {
                        rx.tally.bytes += n as u64;
                        if quiet.is_none() && rx.tally.unique > 0 {
                            let now = now_nanos();
                            if let Some(last) = last_read {
                                let gap = now.saturating_sub(last);
                                rx.tally.longest_gap_ns = rx.tally.longest_gap_ns.max(gap);
                            }
                            last_read = Some(now);
                        }
                    }
                    Ok(Err(_)) => { rx.tally.error = true; break; }
                    // Quiet for `quiet`: the server still holds the client.
                    Err(_) => break,
                },
            }
        }
        rx.tally
    }
}

/// How one sender sends.
#[derive(Clone, Copy, Debug)]
pub struct SendPlan {
    pub sender: u32,
    pub messages: u32,
    pub size: usize,
    /// Lines per second, or as fast as possible.
    pub rate: Option<f64>,
    /// When the first line is due.
    pub start: Instant,
}

/// Sends `plan.messages` stamped lines to the client's room; returns how many
/// were written.
pub async fn send_loop(
    writer: Arc<Mutex<OwnedWriteHalf>>,
    dialect: Dialect,
    room: String,
    plan: SendPlan,
    shared: Arc<Shared>,
) -> u32 {
    // In closed loop, a batch is a fraction of the window.
    let batch_lines = match shared.window {
        0 => u32::MAX,
        w => u32::try_from(w / shared.senders.max(1) as u64 / 2)
            .unwrap_or(u32::MAX)
            .max(1),
    }
    .min(shared.lines_per_write);
    let prefix = dialect.line_prefix(&room);
    let end = dialect.line_end();
    let mut buf = Vec::with_capacity(64 * 1024);
    tokio::time::sleep_until(plan.start.into()).await;
    let mut seq = 0u32;
    while seq < plan.messages {
        buf.clear();
        let first = seq;
        match plan.rate {
            Some(rate) => {
                let due = plan.start + Duration::from_secs_f64(f64::from(seq) / rate);
                tokio::time::sleep_until(due.into()).await;
                line(&mut buf, &prefix, end, plan, seq);
                seq += 1;
            }
            None => {
                shared.wait_for_window().await;
                // A batch per write so the client side is not the bottleneck.
                while seq < plan.messages && buf.len() < 16 * 1024 && seq - first < batch_lines {
                    line(&mut buf, &prefix, end, plan, seq);
                    seq += 1;
                }
            }
        }
        if writer.lock().await.write_all(&buf).await.is_err() {
            return first;
        }
        shared.writes.fetch_add(1, Ordering::Relaxed);
        shared
            .sent
            .fetch_add(u64::from(seq - first), Ordering::Relaxed);
    }
    seq
}

fn line(buf: &mut Vec<u8>, prefix: &[u8], end: &[u8], plan: SendPlan, seq: u32) {
    buf.extend_from_slice(prefix);
    encode_payload(buf, plan.sender, seq, now_nanos(), plan.size);
    buf.extend_from_slice(end);
}

/// Makes sure [`EPOCH`] is set before any stamp is compared.
pub fn init_epoch() {
    LazyLock::force(&EPOCH);
}
