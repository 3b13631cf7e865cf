//! `--upgrade`: the longest delivery pause a seamless upgrade causes.
//!
//! Starts chatd (config/bench.toml) on loopback, connects `clients` clients
//! spread over rooms of `ROOM` members, lets one sender per room talk at a
//! steady rate, sends SIGUSR2 in the middle and reports the delivery
//! latency of the lines sent around the upgrade (p50, p99, max) against
//! the steady state before it, the upgrade's own duration (as chatd logs
//! it), and whether any line was lost or any client cut. Lines carry their
//! send time, so a line held up by the freeze shows its whole wait.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpStream;

/// Members per room: each line reaches this many clients but one.
const ROOM: usize = 100;
/// How long the load runs before and after the upgrade.
const STEADY: Duration = Duration::from_secs(4);

pub async fn run(clients: usize, rate: f64) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bench.toml");
    // CHATBENCH_CHATD runs another build (the upgrade starts the same file).
    let program =
        std::env::var_os("CHATBENCH_CHATD").unwrap_or_else(|| env!("CARGO_BIN_EXE_chatd").into());
    let mut child = Command::new(program)
        .arg("--config")
        .arg(config)
        .env("CHATD_CHAT__LISTEN", "127.0.0.1:0")
        .env("CHATD_UDP__LISTEN", "127.0.0.1:0")
        .env("CHATD_ADMIN__LISTEN", "127.0.0.1:0")
        .env("CHATD_SERVER__STATE_DIR", dir.path().join("state"))
        .env("RUNTIME_DIRECTORY", dir.path().join("run"))
        .env("CHATD_LOG__FORMAT", "json")
        .env("CHATD_LOG__LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting chatd")?;
    // The log, read by a thread: the chat address, then the handoff.
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stderr = child.stderr.take().context("stderr")?;
    std::thread::spawn(move || {
        let mut keep =
            std::env::var_os("CHATBENCH_UPGRADE_LOG").and_then(|p| std::fs::File::create(p).ok());
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = keep.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m == "listening" || m.starts_with("upgrade: handed over"))
            {
                let _ = tx.send(v);
            }
        }
    });
    let listening = rx
        .recv_timeout(Duration::from_secs(20))
        .context("chatd did not report its address")?;
    let addr: SocketAddr = listening["chat"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .context("no chat address")?
        .parse()?;
    let mut successor = None;
    let result = measure(addr, clients, rate, child.id(), &rx, &mut successor).await;
    let _ = child.kill();
    let _ = child.wait();
    if let Some(pid) = successor.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    result
}

/// Microseconds since the benchmark started: the stamp in each line.
fn now_us(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

async fn measure(
    addr: SocketAddr,
    clients: usize,
    rate: f64,
    pid: u32,
    log: &std::sync::mpsc::Receiver<serde_json::Value>,
    successor: &mut Option<u32>,
) -> anyhow::Result<ExitCode> {
    let epoch = Instant::now();
    let rooms = clients.div_ceil(ROOM);
    let received = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicU64::new(0));
    // (send time, latency) of every delivery, in µs, per reader.
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    let mut quiet = Vec::new();
    let connect = Arc::new(tokio::sync::Semaphore::new(128));
    let mut joined = Vec::new();
    for i in 0..clients {
        let connect = connect.clone();
        joined.push(tokio::spawn(async move {
            let _permit = connect.acquire().await?;
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (r, mut w) = stream.into_split();
            let mut r = AsyncBufReader::new(r);
            w.write_all(format!("/join r{}\n", i % rooms).as_bytes())
                .await?;
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await? == 0 {
                    bail!("closed while joining");
                }
                if line.contains("You are now in r") {
                    break;
                }
            }
            anyhow::Ok((r, w))
        }));
    }
    for (i, j) in joined.into_iter().enumerate() {
        let (r, w) = j.await??;
        if i < rooms {
            // Room i's sender: it hears nobody (one sender per room).
            writers.push(w);
            continue;
        }
        // Kept open: dropping a write half sends FIN, which chatd takes
        // for the client leaving.
        quiet.push(w);
        let received = received.clone();
        let cut = cut.clone();
        readers.push(tokio::spawn(async move {
            let mut r = r;
            let mut seen = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line).await {
                    Ok(0) | Err(_) => {
                        cut.fetch_add(1, Relaxed);
                        return seen;
                    }
                    Ok(_) => {}
                }
                if line.trim_end().ends_with("> end") {
                    return seen;
                }
                if let Some(stamp) = line
                    .split_once("> ")
                    .and_then(|(_, t)| t.trim_end().parse::<u64>().ok())
                {
                    received.fetch_add(1, Relaxed);
                    let now = now_us(epoch);
                    seen.push((stamp, now.saturating_sub(stamp)));
                }
            }
        }));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    let period = Duration::from_secs_f64(1.0 / rate);
    let senders_n = writers.len().max(1) as u32;
    let start = tokio::time::Instant::now();
    for (i, mut w) in writers.into_iter().enumerate() {
        let sent = sent.clone();
        let stopping = stopping.clone();
        // Senders are spread evenly over the period, as independent people
        // typing are: all of them on the same tick would make every period
        // start with a burst of `rooms` lines at once, and the steady-state
        // latency would measure that burst rather than the server.
        let phase = period * i as u32 / senders_n;
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start + phase, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stopping.load(Relaxed) {
                tick.tick().await;
                let line = format!("{}\n", now_us(epoch));
                if w.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Relaxed);
            }
            w
        }));
    }
    let load_start = now_us(epoch);
    tokio::time::sleep(STEADY).await;
    let upgrade_at = now_us(epoch);
    let signalled = Instant::now();
    let pid = rustix::process::Pid::from_raw(pid as i32).context("pid")?;
    rustix::process::kill_process(pid, rustix::process::Signal::USR2)?;
    let handed = tokio::task::block_in_place(|| {
        loop {
            // The new process's own "listening" comes first.
            match log.recv_timeout(Duration::from_secs(60)) {
                Ok(v) if v["message"] == "listening" => continue,
                Ok(v)
                    if v["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("upgrade failed")) =>
                {
                    break Err(anyhow::anyhow!("the upgrade failed: {}", v["error"]));
                }
                Ok(v)
                    if !v["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("upgrade: handed")) =>
                {
                    continue;
                }
                Ok(v) => break Ok(v),
                Err(e) => break Err(anyhow::anyhow!("chatd did not log the handoff: {e}")),
            }
        }
    })?;
    let observed = signalled.elapsed();
    *successor = handed["pid"].as_u64().map(|p| p as u32);
    let duration_ms = handed["duration_ms"].as_u64().unwrap_or(0);
    let frozen_ms = handed["frozen_ms"].as_u64().unwrap_or(0);
    let upgrade_end = now_us(epoch);
    tokio::time::sleep(STEADY).await;
    stopping.store(true, Relaxed);
    let mut writers = Vec::new();
    for s in senders {
        writers.push(s.await?);
    }
    let sent = sent.load(Relaxed);
    let expected = sent * (ROOM as u64 - 1);
    // Wait for the deliveries to settle.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = received.load(Relaxed);
        if now >= expected || now == last {
            break;
        }
        last = now;
    }
    for w in &mut writers {
        let _ = w.write_all(b"end\n").await;
    }
    // Steady state: from 1 s after the load starts until 1 s before the
    // signal; the upgrade window: lines sent from 1 s before the signal to
    // 1 s after the new process serves.
    let mut steady = Histogram::<u64>::new(3)?;
    let mut around = Histogram::<u64>::new(3)?;
    let warm = load_start + 1_000_000;
    let (from, to) = (
        upgrade_at.saturating_sub(1_000_000),
        upgrade_end + 1_000_000,
    );
    for r in readers {
        let seen = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .context("a reader did not finish")??;
        for (stamp, latency) in seen {
            if stamp >= from && stamp <= to {
                around.record(latency)?;
            } else if stamp >= warm && stamp < from {
                steady.record(latency)?;
            }
        }
    }
    drop((writers, quiet));
    let ms = |us: u64| us as f64 / 1000.0;
    let delivered = received.load(Relaxed);
    let cut = cut.load(Relaxed);
    println!(
        "upgrade: {clients} clients in {rooms} rooms of {ROOM}, {rate} lines/s per room ({} lines/s, {} deliveries/s)",
        rate * rooms as f64,
        rate * rooms as f64 * (ROOM - 1) as f64
    );
    println!(
        "  upgrade duration: {duration_ms} ms (chatd's own measure; clients frozen {frozen_ms} ms), {} ms from SIGUSR2 to the log line",
        observed.as_millis()
    );
    println!(
        "  steady latency:   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(steady.value_at_quantile(0.5)),
        ms(steady.value_at_quantile(0.99)),
        ms(steady.max())
    );
    println!(
        "  during upgrade:   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} deliveries)",
        ms(around.value_at_quantile(0.5)),
        ms(around.value_at_quantile(0.99)),
        ms(around.max()),
        around.len()
    );
    println!("  lines: sent {sent}, delivered {delivered} of {expected}; clients cut: {cut}");
    Ok(if delivered == expected && cut == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("chatbench: the upgrade lost lines or clients");
        ExitCode::FAILURE
    })
}
