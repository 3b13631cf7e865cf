//! Cluster scenarios (`--cluster`): the same room load on one chatd node and
//! spread over three nodes of a cluster on a real `nats-server`, and a storm
//! of 30,000 clients over three nodes in one room, then one line that must
//! reach all of them.
//!
//! Per node: CPU per delivery (the node's CPU time over the deliveries its
//! own clients got) and RSS; for NATS: messages published per chat line
//! (`in_msgs` from the monitoring endpoint's `/varz`, which also counts the
//! nodes' presence heartbeats and confirmation markers).
//!
//! The storm needs more sockets than one process may open (the hard limit
//! here is 20,000), so its clients live in worker processes: this binary
//! again, with `--storm-worker ADDR:COUNT`, one per node.
//!
//! With `--baseline`, [`compare`] runs every room load on this build and on
//! the baseline in turn, and prints the medians of both and their ratio.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;

use crate::client::{self, Dialect, SendPlan, Shared, Tally};
use crate::metric::Metric;
use crate::report;
use crate::scenario::Outcome;
use crate::server::{Sample, Target, chatd_program, free_port, sample};

/// The line every storm client waits for.
const STORM_LINE: &str = "storm line for everyone";

/// A nats-server and `n` chatd nodes on loopback; killed on drop.
struct Cluster {
    nats: Option<(Child, u16)>,
    nodes: Vec<(Child, SocketAddr)>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes running `program`; with `n == 1`, a single node in plain
    /// mode (no NATS), the reference for the cluster's cost.
    fn start(n: usize, program: &Path) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("chatbench-cluster-")
            .tempdir()?;
        let nats = if n > 1 {
            let (port, monitor) = (free_port()?, free_port()?);
            let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
                .into_iter()
                .find(|p| Path::new(p).is_file())
                .context("nats-server not installed (apt-get install nats-server)")?;
            let child = Command::new(bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .args(["-m", &monitor.to_string()])
                // JetStream: cluster-wide nicks, history and bans live there.
                .arg("-js")
                .arg("-sd")
                .arg(dir.path().join("nats"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting nats-server")?;
            wait_accepting(SocketAddr::from(([127, 0, 0, 1], port)))?;
            Some((child, port, monitor))
        } else {
            None
        };
        let mut nodes = Vec::new();
        for i in 0..n {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = std::fs::File::create(dir.path().join(format!("node-{i}.log")))?;
            let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bench.toml");
            let mut cmd = Command::new(program);
            cmd.arg("--config")
                .arg(config)
                .env("CHATD_CHAT__LISTEN", addr.to_string())
                .env("CHATD_UDP__LISTEN", "127.0.0.1:0")
                .env("CHATD_ADMIN__LISTEN", "127.0.0.1:0")
                .env(
                    "CHATD_SERVER__STATE_DIR",
                    dir.path().join(format!("state-{i}")),
                )
                .env("RUNTIME_DIRECTORY", dir.path().join(format!("run-{i}")));
            if let Some((_, port, _)) = &nats {
                cmd.env(
                    "CHATD_CLUSTER__NATS_URLS",
                    format!("nats://127.0.0.1:{port}"),
                )
                .env("CHATD_CLUSTER__NODE_ID", format!("n{i}"))
                .env("CHATD_CLUSTER__ON_UNREACHABLE", "refuse");
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting chatd")?;
            nodes.push((child, addr));
            wait_accepting(addr)?;
        }
        Ok(Cluster {
            nats: nats.map(|(c, _, m)| (c, m)),
            nodes,
            _dir: dir,
        })
    }

    fn samples(&self) -> anyhow::Result<Vec<Sample>> {
        self.nodes.iter().map(|(c, _)| sample(c.id())).collect()
    }

    /// Messages NATS received from publishers so far (0 without NATS).
    async fn in_msgs(&self) -> anyhow::Result<u64> {
        let Some((_, monitor)) = &self.nats else {
            return Ok(0);
        };
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", *monitor)).await?;
        s.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        let body = text.split_once("\r\n\r\n").context("no HTTP body")?.1;
        let varz: serde_json::Value = serde_json::from_str(body)?;
        varz["in_msgs"].as_u64().context("no in_msgs in /varz")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (c, _) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((c, _)) = &mut self.nats {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_accepting(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} did not accept within 20 s");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// This build's chatd, which the cluster scenarios run unless told otherwise.
fn this_build() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chatd"))
}

/// One room load's clients, senders, lines per sender and rate per sender
/// (`None`: as fast as the window allows).
type Load = (usize, usize, u32, Option<f64>);

/// The room loads: scenario a (as fast as possible) and c (500 lines/s per
/// sender), each on one node and on three.
const LOADS: [(&str, Load); 2] = [
    ("a", (100, 10, 2_000, None)),
    ("c", (100, 10, 2_000, Some(500.0))),
];

/// One room load (`clients` clients, `senders` of them sending `messages`
/// lines of 64 B, at `rate` lines/s each or as fast as the window allows)
/// on `nodes` nodes running `program`; clients go to the nodes in turn.
/// Prints one block and returns its figures (CPU and RSS: all nodes
/// together).
async fn room_load(
    name: &str,
    nodes: usize,
    (clients, senders, messages, rate): Load,
    program: &Path,
) -> anyhow::Result<Outcome> {
    let program = program.to_owned();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(nodes, &program)).await??;
    let size = 64;
    let lines = u64::from(messages) * senders as u64;
    let expected = lines * (clients as u64 - 1);
    let window = if rate.is_none() { 1000 } else { 0 };
    let shared = Shared::new(
        (senders, messages, size, 1),
        u32::MAX,
        (clients - 1) as f64,
        window,
    )?;
    let mut conns = Vec::new();
    for id in 0..clients {
        let addr = cluster.nodes[id % nodes].1;
        let room = Dialect::Chatd.room_name(0, 1);
        conns.push(
            client::connect(
                addr,
                id,
                Dialect::Chatd,
                room,
                false,
                64 * 1024,
                id < senders,
            )
            .await?,
        );
    }
    let mut writers = Vec::new();
    let mut readers = JoinSet::new();
    for c in conns {
        if c.id < senders {
            writers.push((c.id, c.writer.clone(), c.room.clone()));
        }
        let node = c.id % nodes;
        let shared = shared.clone();
        readers.spawn(async move { (node, c.read_loop(shared, None).await) });
    }
    // Every node holds its room subscription well before this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cluster.samples()?;
    let msgs_before = cluster.in_msgs().await?;
    let start = Instant::now() + Duration::from_millis(50);
    let send_started = client::now_nanos() + 50_000_000;
    let mut sending = JoinSet::new();
    for (id, writer, room) in writers {
        let plan = SendPlan {
            sender: id as u32,
            messages,
            size,
            rate,
            start: start
                + rate
                    .map(|r| Duration::from_secs_f64(id as f64 / (r * senders as f64)))
                    .unwrap_or_default(),
        };
        sending.spawn(client::send_loop(
            writer,
            Dialect::Chatd,
            room,
            plan,
            shared.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (0, Instant::now());
    loop {
        let unique = shared.unique.load(Ordering::Relaxed);
        if unique >= expected || Instant::now() > deadline {
            break;
        }
        if unique != last.0 {
            last = (unique, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) && sending.is_empty() {
            break;
        }
        while sending.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = cluster.samples()?;
    let msgs_after = cluster.in_msgs().await?;
    shared.stop.cancel();
    let mut per_node = vec![0u64; nodes];
    let mut total = Tally::default();
    while let Some(r) = readers.join_next().await {
        let (node, t) = r?;
        per_node[node] += t.unique;
        total.add_counts(&t);
    }
    let (unique, good) = (total.unique, total.good);
    let bad = total.duplicated + total.out_of_order + total.garbled + total.extra + total.echoed;
    let span = shared
        .last_delivery
        .load(Ordering::Relaxed)
        .saturating_sub(send_started) as f64
        / 1e9;
    let lat = shared.merged_latency()?;
    let ms = |q: f64| lat.value_at_quantile(q) as f64 / 1e6;
    println!(
        "\n## {name}: {clients} clients on {nodes} node(s), {senders} senders x {messages} lines of {size} B, {}",
        rate.map_or("as fast as possible (window 1000)".to_owned(), |r| format!(
            "{r} lines/s each"
        ))
    );
    println!(
        "deliveries {unique}/{expected} (lost {}, faults {bad}); {:.0} deliveries/s; p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        expected.saturating_sub(unique),
        good as f64 / span.max(1e-9),
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    for i in 0..nodes {
        let cpu = after[i].cpu_ns.saturating_sub(before[i].cpu_ns);
        println!(
            "node {i}: CPU {:.2} s, {:.0} ns per delivery to its {} deliveries; RSS {:.1} MiB",
            cpu as f64 / 1e9,
            cpu as f64 / per_node[i].max(1) as f64,
            per_node[i],
            after[i].rss_kib as f64 / 1024.0
        );
    }
    if nodes > 1 {
        println!(
            "NATS: {} messages in for {lines} chat lines ({:.3} per line; includes presence and confirmation markers)",
            msgs_after - msgs_before,
            (msgs_after - msgs_before) as f64 / lines as f64
        );
    }
    let mut out = figures(&total, expected, span, &lat, (&before, &after));
    out.values.insert(Metric::Connected, clients as f64);
    Ok(out)
}

/// The figures of one room load, as the report's metrics; CPU and RSS of
/// all nodes together, from their samples `before` and `after` sending.
fn figures(
    total: &Tally,
    expected: u64,
    span: f64,
    lat: &hdrhistogram::Histogram<u64>,
    (before, after): (&[Sample], &[Sample]),
) -> Outcome {
    let mut out = Outcome::default();
    let mut set = |m: Metric, v: f64| {
        out.values.insert(m, v);
    };
    set(Metric::Expected, expected as f64);
    set(Metric::Delivered, total.unique as f64);
    set(Metric::Lost, expected.saturating_sub(total.unique) as f64);
    set(Metric::Duplicated, total.duplicated as f64);
    set(Metric::OutOfOrder, total.out_of_order as f64);
    set(Metric::Garbled, total.garbled as f64);
    set(Metric::Extra, total.extra as f64);
    set(Metric::Echoed, total.echoed as f64);
    if span > 0.0 && total.good > 0 {
        set(Metric::DeliveriesPerSec, total.good as f64 / span);
    }
    if !lat.is_empty() {
        let ms = |q: f64| lat.value_at_quantile(q) as f64 / 1e6;
        set(Metric::P50, ms(0.50));
        set(Metric::P99, ms(0.99));
        set(Metric::P999, ms(0.999));
        set(Metric::Max, lat.max() as f64 / 1e6);
    }
    let cpu_ns: u64 = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.cpu_ns.saturating_sub(b.cpu_ns))
        .sum();
    set(Metric::CpuSecs, cpu_ns as f64 / 1e9);
    if total.unique > 0 {
        set(Metric::CpuPerDelivery, cpu_ns as f64 / total.unique as f64);
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    set(Metric::RssEnd, mib(after.iter().map(|s| s.rss_kib).sum()));
    set(Metric::RssPeak, mib(after.iter().map(|s| s.hwm_kib).sum()));
    out
}

/// The storm: `per_node` clients on each of three nodes running `program`
/// in one room (one of node 0's is the sender, here), then one line to all
/// of them.
async fn storm(per_node: usize, program: &Path) -> anyhow::Result<()> {
    let program = program.to_owned();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(3, &program)).await??;
    let me = std::env::current_exe()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for (i, (_, addr)) in cluster.nodes.iter().enumerate() {
        let count = if i == 0 { per_node - 1 } else { per_node };
        let mut child = tokio::process::Command::new(&me)
            .arg("--storm-worker")
            .arg(format!("{addr}/{count}"))
            // Closed when the figures are taken: until then the worker
            // keeps its clients, so that no leave is measured.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        workers.push((child, out));
    }
    let sender = client::connect(
        cluster.nodes[0].1,
        0,
        Dialect::Chatd,
        Dialect::Chatd.room_name(0, 1),
        false,
        8 * 1024,
        true,
    )
    .await?;
    for (_, out) in &mut workers {
        let line = tokio::time::timeout(Duration::from_secs(300), out.next_line())
            .await
            .context("a worker did not register its clients within 300 s")??
            .context("a worker ended")?;
        if !line.starts_with("registered") {
            bail!("worker: {line}");
        }
    }
    let registered = started.elapsed().as_secs_f64();
    // What NATS carries with nobody talking (presence, markers), over 2 s.
    let idle_from = cluster.in_msgs().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = cluster.in_msgs().await? - idle_from;
    let before = cluster.samples()?;
    let msgs_before = cluster.in_msgs().await?;
    let sent_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    sender
        .writer
        .lock()
        .await
        .write_all(format!("{STORM_LINE}\n").as_bytes())
        .await?;
    let mut last = 0u64;
    let mut got = 0u64;
    for (_, out) in &mut workers {
        let line = tokio::time::timeout(Duration::from_secs(120), out.next_line())
            .await
            .context("a worker's clients did not all get the line within 120 s")??
            .context("a worker ended")?;
        let mut parts = line.split_whitespace().skip(1);
        let n: u64 = parts.next().context("count")?.parse()?;
        let at: u64 = parts.next().context("time")?.parse()?;
        got += n;
        last = last.max(at);
    }
    let after = cluster.samples()?;
    let msgs_after = cluster.in_msgs().await?;
    drop(workers);
    let total = per_node * 3;
    println!(
        "\n## storm: {total} clients over 3 nodes ({per_node} each) in one room, then one line"
    );
    println!(
        "registered in {registered:.1} s; the line reached {got}/{} others in {:.0} ms; NATS messages meanwhile: {} (with nobody talking: {idle} in 2 s)",
        total - 1,
        last.saturating_sub(sent_at) as f64 / 1e6,
        msgs_after - msgs_before
    );
    for i in 0..3 {
        println!(
            "node {i}: CPU for the line {:.1} ms; RSS {:.1} MiB ({:.1} KiB per client)",
            after[i].cpu_ns.saturating_sub(before[i].cpu_ns) as f64 / 1e6,
            after[i].rss_kib as f64 / 1024.0,
            after[i].rss_kib as f64 / per_node as f64
        );
    }
    Ok(())
}

/// A storm worker: `ADDR/COUNT` clients on one node; prints `registered N`
/// once all are in the room, then `received N NANOS` (the wall clock at the
/// last arrival) once all got [`STORM_LINE`], and keeps its clients until
/// its stdin closes.
pub async fn storm_worker(spec: &str) -> anyhow::Result<()> {
    let (addr, count) = spec.split_once('/').context("ADDR/COUNT")?;
    let addr: SocketAddr = addr.parse()?;
    let count: usize = count.parse()?;
    let gate = Arc::new(tokio::sync::Semaphore::new(128));
    let mut set = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(count.max(1));
    for _ in 0..count {
        let gate = gate.clone();
        let ready = ready_tx.clone();
        set.spawn(async move {
            let permit = gate.acquire_owned().await?;
            let stream = tokio::net::TcpStream::connect(addr).await?;
            let mut lines = BufReader::with_capacity(1024, stream).lines();
            loop {
                let l = lines.next_line().await?.context("closed while joining")?;
                if l.starts_with("*** You are now in") {
                    break;
                }
                if l.starts_with("*** error") {
                    bail!("{l}");
                }
            }
            drop(permit);
            let _ = ready.send(()).await;
            loop {
                let l = lines.next_line().await?.context("closed before the line")?;
                if l.ends_with(STORM_LINE) {
                    let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                    // The connection stays open: returned, not dropped.
                    return anyhow::Ok((at, lines));
                }
            }
        });
    }
    drop(ready_tx);
    for _ in 0..count {
        ready_rx
            .recv()
            .await
            .context("a client failed to register")?;
    }
    println!("registered {count}");
    let mut last = 0;
    let mut n = 0;
    let mut open = Vec::with_capacity(count);
    while let Some(r) = set.join_next().await {
        let (at, conn) = r??;
        last = last.max(at);
        open.push(conn);
        n += 1;
    }
    println!("received {n} {last}");
    // Keeps the clients until the coordinator has taken its figures.
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
    Ok(())
}

/// Runs every cluster scenario: a and c on one node and on three, then the
/// storm of `storm_clients` (30,000) over three nodes.
pub async fn run(storm_clients: usize) -> anyhow::Result<()> {
    println!("# cluster scenarios (chatbench --cluster)");
    for (name, load) in LOADS {
        for nodes in [1, 3] {
            room_load(name, nodes, load, this_build()).await?;
        }
    }
    if storm_clients > 0 {
        storm(storm_clients / 3, this_build()).await?;
    }
    Ok(())
}

/// [`run`] against the `--baseline` binary too: every room load `runs`
/// times on each build, alternating so that drift hits both alike, then a
/// table of the medians with this build's over the baseline's; the storm
/// once on each.
pub async fn compare(runs: usize, storm_clients: usize) -> anyhow::Result<()> {
    println!("# cluster scenarios (chatbench --cluster --baseline)");
    let mut builds = Vec::new();
    for target in [Target::Chatd, Target::ChatdBase] {
        let program = chatd_program(target).context("no --baseline binary given")?;
        builds.push((target, program));
    }
    let targets: Vec<Target> = builds.iter().map(|(t, _)| *t).collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    for (name, load) in LOADS {
        for nodes in [1, 3] {
            let load_before = crate::loadavg();
            let mut outcomes = report::Runs::new();
            for run in 1..=runs {
                for (target, program) in &builds {
                    let title = format!("{name}, {} run {run}/{runs}", target.name());
                    let outcome = room_load(&title, nodes, load, program)
                        .await
                        .unwrap_or_else(|e| Outcome {
                            notes: vec![format!("failed: {e:#}")],
                            ..Outcome::default()
                        });
                    outcomes.entry(*target).or_default().push(outcome);
                }
            }
            let conditions = format!(
                "CPU and RSS of all nodes together; nodes, NATS and load generator share all \
                 {cpus} CPUs; load average (1/5/15 min) {load_before} before, {} after",
                crate::loadavg()
            );
            let title = format!("cluster {name}, {nodes} node(s)");
            let what = format!(
                "{} clients in one room, {} senders x {} lines of 64 B, {}",
                load.0,
                load.1,
                load.2,
                load.3.map_or("as fast as possible".to_owned(), |r| format!(
                    "{r} lines/s each"
                ))
            );
            let table = report::table((&title, &what, &conditions), &targets, &outcomes);
            print!("{table}");
        }
    }
    if storm_clients > 0 {
        for (target, program) in &builds {
            println!("\n# storm on {}", target.name());
            storm(storm_clients / 3, program).await?;
        }
    }
    Ok(())
}
