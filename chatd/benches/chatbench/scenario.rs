//! The scenarios and how one run of one scenario against one server goes:
//! start the server, connect and register every client, send, wait for the
//! deliveries, and measure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Conn, SendPlan, Shared, Tally};
use crate::metric::Metric;
use crate::server::{Server, Target};

/// What a scenario asks of the clients.
#[derive(Clone, Debug)]
pub struct Params {
    pub clients: usize,
    pub senders: usize,
    pub messages: u32,
    /// Payload bytes per line (the stamp, padded).
    pub size: usize,
    /// Lines per second per sender; `None` is as fast as possible.
    pub rate: Option<f64>,
    pub rooms: usize,
    /// One extra client that registers and then never reads.
    pub stalled: bool,
    /// As-fast-as-possible senders ignore `--window`: open loop, they write
    /// as fast as TCP lets them.
    pub open_loop: bool,
    /// At most this many lines per sender `write` (as fast as possible);
    /// `None` batches up to 16 KiB per write.
    pub lines_per_write: Option<u32>,
}

/// A named scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub what: &'static str,
    pub params: Params,
}

const fn params(clients: usize, senders: usize, messages: u32, size: usize) -> Params {
    Params {
        clients,
        senders,
        messages,
        size,
        rate: None,
        rooms: 1,
        stalled: false,
        open_loop: false,
        lines_per_write: None,
    }
}

/// Every scenario, in order.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "a",
            what: "throughput: 100 clients, 10 senders x 2,000 lines of 64 B, as fast as possible",
            params: params(100, 10, 2_000, 64),
        },
        Scenario {
            name: "a-open",
            what: "open-loop burst: as a, but the senders write as fast as TCP allows (no window)",
            params: Params {
                open_loop: true,
                ..params(100, 10, 2_000, 64)
            },
        },
        Scenario {
            name: "a-line",
            what: "one line per write: as a (closed loop), but each sender writes one line per write",
            params: Params {
                lines_per_write: Some(1),
                ..params(100, 10, 2_000, 64)
            },
        },
        Scenario {
            name: "b",
            what: "wide fan-out: 1,000 clients, 5 senders x 200 lines of 64 B, as fast as possible",
            params: params(1_000, 5, 200, 64),
        },
        Scenario {
            name: "b-open",
            what: "open-loop burst: as b, but the senders write as fast as TCP allows (no window)",
            params: Params {
                open_loop: true,
                ..params(1_000, 5, 200, 64)
            },
        },
        Scenario {
            name: "c",
            what: "latency: 100 clients, 10 senders at 500 lines/s x 2,000 lines of 64 B",
            params: Params {
                rate: Some(500.0),
                ..params(100, 10, 2_000, 64)
            },
        },
        Scenario {
            name: "d",
            what: "connection storm: 10,000 clients join one room, then one broadcast line",
            params: params(10_000, 1, 1, 64),
        },
        Scenario {
            name: "e-clean",
            what: "slow consumer, baseline: 100 clients, 10 senders at 200 lines/s of 400 B for 10 s",
            params: Params {
                rate: Some(200.0),
                ..params(100, 10, 2_000, 400)
            },
        },
        Scenario {
            name: "e-stalled",
            what: "slow consumer: as e-clean, plus one client that never reads",
            params: Params {
                rate: Some(200.0),
                stalled: true,
                ..params(100, 10, 2_000, 400)
            },
        },
        Scenario {
            name: "f",
            what: "busy room: 2,000 clients in one room, each sends one line every 2 s for 10 s \
                   (1,000 lines/s into 2,000 members)",
            params: Params {
                rate: Some(0.5),
                ..params(2_000, 2_000, 5, 64)
            },
        },
        Scenario {
            name: "quick",
            what: "smoke test: 5 clients, 2 senders x 50 lines of 64 B",
            params: params(5, 2, 50, 64),
        },
    ]
}

/// Knobs that apply to every run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Registrations in flight at once.
    pub connect_concurrency: usize,
    /// Give up waiting for deliveries after this long without progress.
    pub idle_timeout: Duration,
    /// As-fast-as-possible senders keep at most this many lines in flight in
    /// all (0 = open loop, no limit).
    pub window: u64,
    /// Server on CPU 0, load generator on CPU 1.
    pub pin: bool,
}

/// What one run measured; metrics that could not be measured are absent.
#[derive(Debug, Default)]
pub struct Outcome {
    pub values: BTreeMap<Metric, f64>,
    pub notes: Vec<String>,
}

impl Outcome {
    fn set(&mut self, m: Metric, v: f64) {
        self.values.insert(m, v);
    }
}

const MIB: f64 = 1024.0;

/// Runs `params` once against a fresh `target`.
pub async fn run(target: Target, params: &Params, opts: &RunOptions) -> anyhow::Result<Outcome> {
    let pin = opts.pin;
    let mut server = tokio::task::spawn_blocking(move || Server::start(target, pin))
        .await?
        .with_context(|| format!("starting {}", target.name()))?;
    let mut out = Outcome::default();
    let idle = server.sample()?;
    out.set(Metric::RssIdle, idle.rss_kib as f64 / MIB);

    // Connect and register.
    let dialect = target.dialect();
    let expected = expected_deliveries(params);
    let lines = u64::from(params.messages) * params.senders as u64;
    let fanout = expected as f64 / lines.max(1) as f64;
    let window = if params.rate.is_none() && !params.open_loop {
        opts.window
    } else {
        0
    };
    let shared = Shared::new(
        (params.senders, params.messages, params.size, params.rooms),
        params.lines_per_write.unwrap_or(u32::MAX),
        fanout,
        window,
    )?;
    let buf_size = if params.clients > 2_000 {
        8 * 1024
    } else {
        64 * 1024
    };
    // 25 ms per client, within [30 s, 120 s].
    let connect_timeout = (Duration::from_millis(25) * params.clients as u32)
        .clamp(Duration::from_secs(30), Duration::from_secs(120));
    let started = Instant::now();
    let release = CancellationToken::new();
    let conns = connect_all(
        server.addr,
        target,
        params,
        opts,
        (&shared, &release),
        buf_size,
        connect_timeout,
    )
    .await;
    let connect_secs = started.elapsed().as_secs_f64();
    let (conns, failures) = conns;
    out.set(Metric::Connected, conns.len() as f64);
    out.set(Metric::ConnectSecs, connect_secs);
    let wanted = params.clients + usize::from(params.stalled);
    if conns.len() < wanted {
        if let Ok(now) = server.sample() {
            out.set(Metric::RssLoaded, now.rss_kib as f64 / MIB);
            out.set(Metric::RssPeak, now.hwm_kib as f64 / MIB);
            if !conns.is_empty() {
                let grown = now.rss_kib.saturating_sub(idle.rss_kib) as f64;
                out.set(Metric::RssPerConn, grown / conns.len() as f64);
            }
        }
        out.notes.push(format!(
            "only {}/{} clients registered in {:.1} s ({}){}",
            conns.len(),
            wanted,
            connect_secs,
            failures,
            if server.alive() {
                ""
            } else {
                "; the server died"
            },
        ));
        return Ok(out);
    }

    let mut readers = JoinSet::new();
    let mut writers = Vec::new();
    let mut stalled_reader = None;
    for c in conns {
        if c.id < params.senders {
            writers.push((c.id, c.writer.clone(), c.room.clone()));
        }
        if params.stalled && c.id == params.clients {
            stalled_reader = Some(c.reader);
        } else {
            readers.spawn(async move { c.reader.await.unwrap_or_default() });
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let loaded = server.sample()?;
    out.set(Metric::RssLoaded, loaded.rss_kib as f64 / MIB);
    out.set(
        Metric::RssPerConn,
        loaded.rss_kib.saturating_sub(idle.rss_kib) as f64 / wanted as f64,
    );

    // Send.
    out.set(Metric::Expected, expected as f64);
    let before = server.sample()?;
    let start = Instant::now() + Duration::from_millis(50);
    let send_started = client::now_nanos() + 50_000_000;
    // How late a 1 ms tick of the load generator's runtime runs: a reader
    // that is ready waits at least as long for a thread.
    let watch_stop = CancellationToken::new();
    let watchdog = tokio::spawn(longest_stall(watch_stop.clone()));
    let mut senders = JoinSet::new();
    for (id, writer, room) in writers {
        let plan = SendPlan {
            sender: id as u32,
            messages: params.messages,
            size: params.size,
            rate: params.rate,
            // Spread rate-limited senders over one period.
            start: start
                + params
                    .rate
                    .map(|r| Duration::from_secs_f64(id as f64 / (r * params.senders as f64)))
                    .unwrap_or_default(),
        };
        senders.spawn(client::send_loop(
            writer,
            dialect,
            room,
            plan,
            shared.clone(),
        ));
    }

    // Wait until every delivery arrived, or progress stops.
    let send_secs = params.rate.map_or(0.0, |r| f64::from(params.messages) / r);
    let hard_deadline = start + Duration::from_secs_f64(send_secs) + Duration::from_secs(120);
    let mut last_progress = (0u64, Instant::now());
    let mut sent = 0u64;
    let mut senders_done = false;
    loop {
        let unique = shared.unique.load(Ordering::Relaxed);
        if unique >= expected {
            break;
        }
        let now = Instant::now();
        if unique != last_progress.0 {
            last_progress = (unique, now);
        }
        if !senders_done {
            while let Some(r) = senders.try_join_next() {
                sent += u64::from(r.unwrap_or(0));
            }
            senders_done = senders.is_empty();
        }
        if senders_done && now - last_progress.1 > opts.idle_timeout {
            out.notes.push(format!(
                "deliveries stopped at {unique}/{expected} (no progress for {} s)",
                opts.idle_timeout.as_secs()
            ));
            break;
        }
        if now > hard_deadline {
            out.notes
                .push(format!("gave up at {unique}/{expected}: phase deadline"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = server.sample()?;
    watch_stop.cancel();
    if let Ok(stall) = watchdog.await {
        out.set(Metric::LoadStall, stall.as_secs_f64() * 1e3);
    }
    senders.abort_all();
    while let Some(r) = senders.join_next().await {
        sent += u64::from(r.unwrap_or(0));
    }
    if sent < u64::from(params.messages) * params.senders as u64 {
        out.notes.push(format!(
            "senders wrote only {sent}/{} lines",
            u64::from(params.messages) * params.senders as u64
        ));
    }

    // The stalled client finally reads: was it cut off?
    if let Some(reader) = stalled_reader {
        release.cancel();
        match tokio::time::timeout(Duration::from_secs(60), reader).await {
            Ok(Ok(t)) => {
                out.set(Metric::StalledCut, if t.eof || t.error { 1.0 } else { 0.0 });
                out.set(Metric::StalledGot, t.unique as f64);
            }
            _ => out
                .notes
                .push("the stalled client's drain did not finish".to_owned()),
        }
    }

    shared.stop.cancel();
    let mut total = Tally::default();
    let mut cut = 0;
    let mut cut_gap = 0u64;
    while let Some(r) = readers.join_next().await {
        let t = r.unwrap_or_default();
        total.longest_gap_ns = total.longest_gap_ns.max(t.longest_gap_ns);
        if t.eof || t.error {
            cut_gap = cut_gap.max(t.longest_gap_ns);
        }
        total.delivered += t.delivered;
        total.add_counts(&t);
        total.bytes += t.bytes;
        cut += usize::from(t.eof || t.error);
    }
    if cut > 0 {
        out.notes.push(format!(
            "{cut} reading clients were disconnected by the server"
        ));
    }
    if !server.alive() {
        out.notes.push(format!(
            "the server died; its log ends:\n{}",
            server.log_tail()
        ));
    } else if cut > 0 || total.unique < expected {
        out.notes
            .push(format!("the server's log ends:\n{}", server.log_tail()));
    }

    let last = shared.last_delivery.load(Ordering::Relaxed);
    let span = last.saturating_sub(send_started) as f64 / 1e9;
    out.set(Metric::Delivered, total.unique as f64);
    out.set(Metric::Lost, expected.saturating_sub(total.unique) as f64);
    out.set(Metric::Duplicated, total.duplicated as f64);
    out.set(Metric::OutOfOrder, total.out_of_order as f64);
    out.set(Metric::Garbled, total.garbled as f64);
    out.set(Metric::Extra, total.extra as f64);
    out.set(Metric::Echoed, total.echoed as f64);
    out.set(Metric::ClientsCut, cut as f64);
    out.set(Metric::ReadGap, total.longest_gap_ns as f64 / 1e6);
    if cut > 0 {
        out.set(Metric::CutReadGap, cut_gap as f64 / 1e6);
    }
    // Only whole, in-order, first-time lines of this room's senders count.
    if span > 0.0 && total.good > 0 {
        out.set(Metric::DeliveriesPerSec, total.good as f64 / span);
    }
    if total.unique > 0 {
        out.set(
            Metric::BytesPerDelivery,
            total.bytes as f64 / total.unique as f64,
        );
    }
    let writes = shared.writes.load(Ordering::Relaxed);
    if writes > 0 {
        out.set(
            Metric::LinesPerWrite,
            shared.sent.load(Ordering::Relaxed) as f64 / writes as f64,
        );
    }
    out.set(Metric::ServerThreads, after.threads as f64);
    let lat = shared.merged_latency()?;
    if !lat.is_empty() {
        let ms = |q: f64| lat.value_at_quantile(q) as f64 / 1e6;
        out.set(Metric::P50, ms(0.50));
        out.set(Metric::P99, ms(0.99));
        out.set(Metric::P999, ms(0.999));
        out.set(Metric::Max, lat.max() as f64 / 1e6);
    }
    let cpu = after.cpu_ns.saturating_sub(before.cpu_ns);
    out.set(Metric::CpuSecs, cpu as f64 / 1e9);
    if total.unique > 0 {
        out.set(Metric::CpuPerDelivery, cpu as f64 / total.unique as f64);
    }
    out.set(Metric::RssEnd, after.rss_kib as f64 / MIB);
    out.set(Metric::RssPeak, after.hwm_kib as f64 / MIB);
    Ok(out)
}

/// Every receiver in a sender's room gets each of its lines, except the
/// sender itself and the stalled client (which is not counted).
fn expected_deliveries(p: &Params) -> u64 {
    (0..p.senders)
        .map(|s| {
            let room = s % p.rooms;
            let members = (0..p.clients).filter(|c| c % p.rooms == room).count();
            u64::from(p.messages) * (members as u64 - 1)
        })
        .sum()
}

/// A registered client whose reader is running.
struct Registered {
    id: usize,
    room: String,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    reader: JoinHandle<Tally>,
}

/// Starts reading right away: registration notices keep coming while the
/// others connect.
fn start_reading(conn: Conn, shared: &Arc<Shared>, hold: Option<CancellationToken>) -> Registered {
    let hold = hold.map(|release| (release, Duration::from_secs(2)));
    Registered {
        id: conn.id,
        room: conn.room.clone(),
        writer: conn.writer.clone(),
        reader: tokio::spawn(conn.read_loop(shared.clone(), hold)),
    }
}

/// Connects and registers every client (and the stalled one, last); returns
/// those that made it and a summary of the failures.
async fn connect_all(
    addr: SocketAddr,
    target: Target,
    params: &Params,
    opts: &RunOptions,
    (shared, release): (&Arc<Shared>, &CancellationToken),
    buf_size: usize,
    timeout: Duration,
) -> (Vec<Registered>, String) {
    let dialect = target.dialect();
    let in_flight = target
        .max_connecting()
        .map_or(opts.connect_concurrency, |m| {
            m.min(opts.connect_concurrency)
        });
    let gate = Arc::new(Semaphore::new(in_flight));
    let mut set = JoinSet::new();
    let senders = params.senders;
    for id in 0..params.clients {
        let gate = gate.clone();
        let room = dialect.room_name(id % params.rooms, params.rooms);
        let shared = shared.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let sender = id < senders;
            let conn = client::connect(addr, id, dialect, room, false, buf_size, sender).await?;
            anyhow::Ok(start_reading(conn, &shared, None))
        });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut conns = Vec::with_capacity(params.clients + 1);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(Ok(c)))) => conns.push(c),
            Ok(Some(Ok(Err(e)))) => *errors.entry(format!("{e:#}")).or_default() += 1,
            Ok(Some(Err(e))) => *errors.entry(e.to_string()).or_default() += 1,
            Ok(None) => break,
            Err(_) => {
                *errors.entry("timed out".to_owned()).or_default() += set.len();
                set.abort_all();
                break;
            }
        }
    }
    if params.stalled && errors.is_empty() {
        let room = dialect.room_name(0, params.rooms);
        match client::connect(addr, params.clients, dialect, room, true, buf_size, false).await {
            Ok(c) => conns.push(start_reading(c, shared, Some(release.clone()))),
            Err(e) => *errors.entry(format!("stalled client: {e:#}")).or_default() += 1,
        }
    }
    let summary = errors
        .iter()
        .map(|(e, n)| format!("{n}x {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    (conns, summary)
}

/// The longest delay past its due time of a 1 ms tick on this runtime,
/// until `stop`.
async fn longest_stall(stop: CancellationToken) -> Duration {
    let tick = Duration::from_millis(1);
    let mut longest = Duration::ZERO;
    loop {
        let due = Instant::now() + tick;
        tokio::select! {
            () = stop.cancelled() => return longest,
            () = tokio::time::sleep_until(due.into()) => {}
        }
        longest = longest.max(Instant::now().saturating_duration_since(due));
    }
}
