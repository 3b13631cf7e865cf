//! chatbench: the fan-out benchmark (docs/PERFORMANCE.md).
//!
//! Drives many TCP clients over loopback against chatd and against peer
//! servers (ngIRCd, InspIRCd, optionally the Python tutorial's chat server),
//! all in one invocation, and prints one table per scenario with chatd/peer
//! ratios. Run it as `bash chatd/benches/run.sh [ARGS]` or
//! `cargo bench -p chatd --bench chatbench -- [ARGS]`.
//!
//! Layout: `client` (one client: dialects, registration, stamped sends,
//! accounting), `server` (spawning targets, /proc sampling), `scenario` (the
//! scenarios and one run), `report` (metrics and the table).

mod client;
mod cluster;
mod metric;
mod report;
mod scenario;
mod server;
mod upgrade;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::metric::Metric;
use crate::scenario::{Outcome, RunOptions, Scenario};
use crate::server::Target;

#[derive(Parser, Debug)]
#[command(
    name = "chatbench",
    about = "Fan-out benchmark: chatd against ngIRCd and InspIRCd"
)]
struct Args {
    /// Scenarios to run: a (= a, a-open, a-line), b (= b, b-open), c, d,
    /// e (= e-clean, e-stalled), f, quick, or any single name.
    #[arg(long, short, value_delimiter = ',', default_value = "a,b,c,d,e,f")]
    scenarios: Vec<String>,
    /// Servers to compare: chatd, ngircd, inspircd, python.
    #[arg(
        long,
        short,
        value_delimiter = ',',
        default_value = "chatd,ngircd,inspircd"
    )]
    targets: Vec<Target>,
    /// Runs per scenario and target; the table shows medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// A chatd binary built from an earlier commit: it runs as one more
    /// target, chatd@base, in turn with this build in every run, and the
    /// tables show chatd/chatd@base; with --cluster, the room loads run
    /// --runs times on each build and the storm once on each.
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// A tiny smoke scenario for CI; fails if chatd lost, garbled,
    /// duplicated, reordered, echoed or added a line, or cut a reader.
    #[arg(long)]
    quick: bool,
    /// Server on CPU 0, load generator on CPU 1 (taskset); without it both
    /// share every core.
    #[arg(long)]
    pin: bool,
    /// Also run scenario d (10,000 connections) against InspIRCd, which
    /// accepts connections in whole-second steps: expect minutes.
    #[arg(long)]
    inspircd_storm: bool,
    /// As-fast-as-possible senders keep at most this many lines (all senders
    /// together) not yet delivered to every receiver; 0 = open loop, where
    /// the senders outrun the readers and a server that bounds its queues
    /// cuts them off as slow consumers.
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Stop waiting for deliveries after this many seconds without progress.
    #[arg(long, default_value_t = 5)]
    idle_timeout: u64,
    /// Override the scenarios' client count.
    #[arg(long)]
    clients: Option<usize>,
    /// Override the scenarios' sender count.
    #[arg(long)]
    senders: Option<usize>,
    /// Override the scenarios' lines per sender.
    #[arg(long)]
    messages: Option<u32>,
    /// Override the scenarios' payload size in bytes (at least 32).
    #[arg(long)]
    size: Option<usize>,
    /// Override the scenarios' rate in lines/s per sender (0 = as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Override the scenarios' room count.
    #[arg(long)]
    rooms: Option<usize>,
    /// Instead of the scenarios above: the cluster scenarios (a and c on
    /// one node and over three nodes on a nats-server, then the storm).
    #[arg(long)]
    cluster: bool,
    /// Clients of the cluster storm, spread over three nodes (0: no storm).
    #[arg(long, default_value_t = 30_000)]
    storm_clients: usize,
    /// Internal: one load process of the cluster storm (ADDR/COUNT).
    #[arg(long, hide = true)]
    storm_worker: Option<String>,
    /// Instead of the scenarios: the longest delivery pause during a
    /// seamless upgrade (SIGUSR2) under steady load, with --clients
    /// (default 10000) and --rate lines/s per room of 100 (default 5).
    #[arg(long)]
    upgrade: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    /// The targets asked for that can run here, each once; the baseline
    /// right after this build, so that the two run back to back and their
    /// ratio comes first.
    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for &t in &self.targets {
            if targets.contains(&t) {
                continue;
            }
            match t.unavailable() {
                Some(why) => eprintln!("chatbench: skipping {}: {why}", t.name()),
                None => targets.push(t),
            }
        }
        if self.baseline.is_some() {
            let at = targets
                .iter()
                .position(|&t| t == Target::Chatd)
                .map_or(0, |i| i + 1);
            targets.insert(at, Target::ChatdBase);
        }
        targets
    }

    fn scenarios(&self) -> anyhow::Result<Vec<Scenario>> {
        let names: Vec<&str> = if self.quick {
            vec!["quick"]
        } else {
            self.scenarios
                .iter()
                .flat_map(|s| match s.as_str() {
                    "a" => vec!["a", "a-open", "a-line"],
                    "b" => vec!["b", "b-open"],
                    "e" => vec!["e-clean", "e-stalled"],
                    other => vec![other],
                })
                .collect()
        };
        let all = scenario::all();
        let mut chosen = Vec::new();
        for name in names {
            let mut s = all
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown scenario {name:?} (a, a-open, a-line, b, b-open, c, d, \
                         e-clean, e-stalled, f, quick)"
                    )
                })?;
            let p = &mut s.params;
            p.clients = self.clients.unwrap_or(p.clients);
            p.senders = self.senders.unwrap_or(p.senders);
            p.messages = self.messages.unwrap_or(p.messages);
            p.size = self.size.unwrap_or(p.size).max(32);
            p.rooms = self.rooms.unwrap_or(p.rooms).max(1);
            if let Some(r) = self.rate {
                p.rate = (r > 0.0).then_some(r);
            }
            anyhow::ensure!(
                p.senders >= 1 && p.senders <= p.clients && p.clients >= 2,
                "scenario {name}: need 2 or more clients and 1..=clients senders"
            );
            chosen.push(s);
        }
        Ok(chosen)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.pin {
        // Before the runtime starts, so that its threads inherit the mask.
        if let Err(e) = server::pin_self() {
            eprintln!("chatbench: --pin: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 10_500 => {
            eprintln!("chatbench: open-file limit is only {n}; scenario d needs about 10,100")
        }
        Ok(_) => {}
        Err(e) => eprintln!("chatbench: could not raise the open-file limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatbench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chatbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.upgrade {
        anyhow::ensure!(
            args.baseline.is_none(),
            "--baseline does not apply to --upgrade (CHATBENCH_CHATD runs another build there)"
        );
        let rate = args.rate.filter(|r| *r > 0.0).unwrap_or(5.0);
        return upgrade::run(args.clients.unwrap_or(10_000).max(2 * 100), rate).await;
    }
    client::init_epoch();
    if let Some(spec) = &args.storm_worker {
        cluster::storm_worker(spec).await?;
        return Ok(ExitCode::SUCCESS);
    }
    // Held to the end: the copies both chatd targets run.
    let _builds = match &args.baseline {
        Some(path) => {
            let (dir, version) = server::set_baseline(path)?;
            eprintln!("chatbench: chatd@base is {} ({version})", path.display());
            Some(dir)
        }
        None => None,
    };
    if args.cluster {
        if args.baseline.is_some() {
            cluster::compare(args.runs.max(1), args.storm_clients).await?;
        } else {
            cluster::run(args.storm_clients).await?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let scenarios = args.scenarios()?;
    let opts = RunOptions {
        connect_concurrency: args.connect_concurrency.max(1),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        window: args.window,
        pin: args.pin,
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cores = if args.pin {
        format!(
            "server pinned to CPU {}, load generator to CPU {}",
            server::SERVER_CPU,
            server::LOAD_CPU
        )
    } else {
        format!("server and load generator share all {cpus} CPUs")
    };
    let targets = args.targets();
    if targets.contains(&Target::Tutorial) {
        eprintln!(
            "chatbench: python relays raw 1024-byte chunks, not lines: its numbers are indicative"
        );
    }
    let mut chatd_faults = Vec::new();
    for s in &scenarios {
        let load_before = loadavg();
        let mut runs: report::Runs = BTreeMap::new();
        for run in 1..=args.runs.max(1) {
            // Targets alternate within each run so drift hits them alike.
            for &t in &targets {
                if s.name == "d" && t == Target::Inspircd && !args.inspircd_storm {
                    if run == 1 {
                        runs.entry(t).or_default().push(Outcome {
                            notes: vec![
                                "skipped: InspIRCd accepts connections in whole-second steps \
                                 (10,000 would take minutes); pass --inspircd-storm to run it"
                                    .to_owned(),
                            ],
                            ..Outcome::default()
                        });
                    }
                    continue;
                }
                eprintln!(
                    "chatbench: {} against {} (run {run}/{})",
                    s.name,
                    t.name(),
                    args.runs
                );
                let outcome = match scenario::run(t, &s.params, &opts).await {
                    Ok(o) => o,
                    Err(e) => Outcome {
                        notes: vec![format!("failed: {e:#}")],
                        ..Outcome::default()
                    },
                };
                if t == Target::Chatd {
                    for m in FAULTS {
                        let v = outcome.values.get(&m).copied();
                        if v != Some(0.0) {
                            chatd_faults.push(format!(
                                "{} run {run}: {m:?} = {}",
                                s.name,
                                v.map_or("not measured".to_owned(), |v| v.to_string())
                            ));
                        }
                    }
                }
                for note in &outcome.notes {
                    eprintln!("chatbench:   {}: {note}", t.name());
                }
                runs.entry(t).or_default().push(outcome);
            }
        }
        let conditions = format!(
            "{cores}; load average (1/5/15 min) {load_before} before, {} after",
            loadavg()
        );
        let table = report::table((s.name, s.what, &conditions), &targets, &runs);
        print!("{table}");
    }
    if args.quick && targets.contains(&Target::Chatd) && !chatd_faults.is_empty() {
        for f in &chatd_faults {
            eprintln!("chatbench: chatd: {f}");
        }
        eprintln!("chatbench: chatd failed the quick scenario");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `--quick` requires to be zero for chatd: every line arrived once,
/// whole, in order, only where it belongs, and no reader was cut.
const FAULTS: [Metric; 7] = [
    Metric::Lost,
    Metric::Garbled,
    Metric::Duplicated,
    Metric::OutOfOrder,
    Metric::Extra,
    Metric::Echoed,
    Metric::ClientsCut,
];

/// The first three fields of /proc/loadavg, as `uptime` shows them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}
