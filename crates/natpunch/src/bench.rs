//! `natpunch bench …`: side-by-side measurements, each against a baseline in the same run.

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand};
use natcheck::StunServer;
use natcheck::bench::{Load, binding_load};
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Binding throughput of natpunch's STUN server against coturn's, on loopback, in turns.
    Stun(StunArgs),
    /// Time to a direct connection, natpunch's DCUtR engine against stock rust-libp2p, between
    /// two port-restricted homes in the lab, each as a ratio to the floor.
    Punch(PunchArgs),
    /// The measurement server under concurrent clients: reports/s and latency on SQLite and on
    /// PostgreSQL, with the ratio.
    Server(crate::serverbench::ServerBenchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct PunchArgs {
    /// Hole punches per engine and transport.
    #[arg(long, env = "NATPUNCH_BENCH_TRIALS", default_value_t = 10)]
    trials: u32,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_BENCH_RTT_MS", default_value_t = 100)]
    rtt_ms: u32,
    /// MiB sent per throughput test (relayed circuit against the direct connection, over TCP).
    #[arg(long, env = "NATPUNCH_BENCH_PERF_MIB", default_value_t = 8)]
    perf_mib: u64,
    /// Throughput tests per connection kind (0: none).
    #[arg(long, env = "NATPUNCH_BENCH_PERF_TRIALS", default_value_t = 3)]
    perf_trials: u32,
    /// Print JSON.
    #[arg(long, env = "NATPUNCH_JSON", value_parser = BoolishValueParser::new())]
    json: bool,
}

/// Two port-restricted homes, one trial at a time, so that arms measured in turn get the same
/// machine.
fn port_restricted_pair(exe: &std::path::Path, rtt_ms: u32) -> labrun::matrix::MatrixConfig {
    let pr = natlab::Preset::PortRestricted;
    labrun::matrix::MatrixConfig {
        presets: Vec::new(),
        pairs: vec![(pr, pr)],
        rtt_ms,
        parallel: 1,
        ..labrun::matrix::MatrixConfig::new(exe.to_owned(), crate::stop_flag())
    }
}

/// Median throughput of `trials` transfers between two port-restricted homes, relayed or
/// direct, in Mbit/s.
fn throughput(
    exe: &std::path::Path,
    args: &PunchArgs,
    relayed: bool,
) -> anyhow::Result<(Option<f64>, usize)> {
    let bytes = (args.perf_mib.max(1) << 20).to_string();
    let mut dialer_args = vec!["--perf-bytes".to_owned(), bytes];
    let mut listener_args = Vec::new();
    if relayed {
        dialer_args.push("--no-punch".into());
        listener_args.push("--no-punch".into());
    }
    let config = labrun::matrix::MatrixConfig {
        transports: vec!["tcp".into()],
        trials: args.perf_trials,
        listener_args,
        dialer_args,
        ..port_restricted_pair(exe, args.rtt_ms)
    };
    let report = labrun::matrix::run(&config, &|_, _, _| {})?;
    let rates: Vec<f64> = report
        .trials
        .iter()
        .filter_map(|t| t.throughput.as_ref())
        .filter(|v| v["connection"] == if relayed { "relayed" } else { "direct" })
        .filter_map(|v| v["mbit_s"].as_f64())
        .collect();
    Ok((labrun::stats::quantile(&rates, 0.5), rates.len()))
}

/// One engine's figures on one transport.
#[derive(Debug, Serialize)]
struct PunchArm {
    engine: &'static str,
    transport: String,
    trials: u32,
    success: u32,
    median_ms: Option<f64>,
    p95_ms: Option<f64>,
    /// The median in host-to-host RTTs.
    median_rtts: Option<f64>,
    /// The median over the floor.
    ratio_to_floor: Option<f64>,
}

/// The floor of time to direct, in RTTs (MEASUREMENT.md): 1.5 relayed RTTs of signalling plus
/// the transport's handshake (QUIC 1 RTT, TCP + Noise about 2).
fn floor_rtts(transport: &str) -> f64 {
    if transport == "quic" { 2.5 } else { 3.5 }
}

fn punch(args: PunchArgs) -> anyhow::Result<ExitCode> {
    natlab::environment::check().map_err(anyhow::Error::msg)?;
    let exe = std::env::current_exe().context("finding the natpunch binary")?;
    let mut arms = Vec::new();
    for (engine, candidates) in [("natpunch", "observed"), ("stock", "stock")] {
        eprintln!(
            "bench punch: {engine} engine, {} trials per transport",
            args.trials
        );
        let config = labrun::matrix::MatrixConfig {
            trials: args.trials.max(1),
            engine: engine.into(),
            candidates: candidates.into(),
            ..port_restricted_pair(&exe, args.rtt_ms)
        };
        let report = labrun::matrix::run(&config, &|_, done, total| {
            eprint!("\r  {done}/{total}");
        })?;
        eprintln!();
        for cell in report.cells {
            let rtt = f64::from(args.rtt_ms.max(1));
            let floor = floor_rtts(&cell.transport);
            arms.push(PunchArm {
                engine,
                median_rtts: cell.median_ms.map(|m| m / rtt),
                ratio_to_floor: cell.median_ms.map(|m| m / rtt / floor),
                transport: cell.transport,
                trials: cell.trials,
                success: cell.success,
                median_ms: cell.median_ms,
                p95_ms: cell.p95_ms,
            });
        }
    }
    let (direct, relayed) = if args.perf_trials > 0 {
        eprintln!(
            "bench punch: throughput, {} MiB over the circuit and direct",
            args.perf_mib
        );
        (
            throughput(&exe, &args, false)?,
            throughput(&exe, &args, true)?,
        )
    } else {
        ((None, 0), (None, 0))
    };
    let relay_ratio = relayed.0.zip(direct.0).map(|(r, d)| r / d);
    let ratio = |t: &str| {
        let m = |e: &str| {
            arms.iter()
                .find(|a| a.engine == e && a.transport == t)
                .and_then(|a| a.median_ms)
        };
        m("natpunch").zip(m("stock")).map(|(n, s)| n / s)
    };
    if args.json {
        let out = serde_json::json!({
            "rtt_ms": args.rtt_ms,
            "arms": arms,
            "natpunch_over_stock": {"tcp": ratio("tcp"), "quic": ratio("quic")},
            "throughput_mbit_s": {
                "mib": args.perf_mib,
                "direct": direct.0, "direct_n": direct.1,
                "relayed": relayed.0, "relayed_n": relayed.1,
                "relayed_over_direct": relay_ratio,
            },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "time to direct, port-restricted × port-restricted, {} ms host-to-host RTT",
        args.rtt_ms
    );
    println!(
        "{:<9} {:<5} {:>8} {:>9} {:>9} {:>7} {:>8}",
        "engine", "tr", "success", "median", "p95", "RTTs", "/floor"
    );
    let f = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |x| format!("{x:.d$}"));
    for a in &arms {
        println!(
            "{:<9} {:<5} {:>4}/{:<3} {:>6} ms {:>6} ms {:>7} {:>8}",
            a.engine,
            a.transport,
            a.success,
            a.trials,
            f(a.median_ms, 0),
            f(a.p95_ms, 0),
            f(a.median_rtts, 2),
            f(a.ratio_to_floor, 2)
        );
    }
    for t in ["tcp", "quic"] {
        println!(
            "natpunch / stock, {t}: {} (floor {} RTT)",
            f(ratio(t), 2),
            floor_rtts(t)
        );
    }
    if args.perf_trials > 0 {
        println!(
            "throughput ({} MiB over TCP, median): direct {} Mbit/s (n={}), relayed {} Mbit/s \
             (n={}), relayed / direct {}",
            args.perf_mib,
            f(direct.0, 1),
            direct.1,
            f(relayed.0, 1),
            relayed.1,
            f(relay_ratio, 2)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(crate) struct StunArgs {
    /// Seconds of load per turn.
    #[arg(long, env = "NATPUNCH_BENCH_SECS", default_value_t = 3)]
    secs: u64,
    /// Turns per server (natpunch and coturn alternate).
    #[arg(long, env = "NATPUNCH_BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, env = "NATPUNCH_BENCH_CLIENTS", default_value_t = 16)]
    clients: usize,
    /// The coturn server binary.
    #[arg(long, env = "NATPUNCH_BENCH_COTURN", default_value = "turnserver")]
    coturn: String,
    /// Print JSON.
    #[arg(long, env = "NATPUNCH_JSON", value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Stun(args) => stun(args),
        BenchCommand::Punch(args) => punch(args),
        BenchCommand::Server(args) => crate::serverbench::run(&args),
    }
}

/// A free UDP port on `ip` (free a moment ago).
fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(StdUdpSocket::bind((ip, 0))?.local_addr()?.port())
}

/// Ends the coturn child (ours, by PID) and removes its PID file when the benchmark ends,
/// however it ends.
struct Coturn {
    child: Child,
    pidfile: PathBuf,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

#[derive(Debug, Serialize)]
struct Turn {
    natpunch: Load,
    coturn: Load,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    clients: usize,
    secs_per_turn: u64,
    turns: Vec<Turn>,
    median_ratio: f64,
}

async fn wait_ready(server: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if binding_load(server, 1, Duration::from_millis(200))
            .await?
            .answered
            > 0
        {
            return Ok(());
        }
    }
    bail!("the server on {server} never answered")
}

fn stun(args: StunArgs) -> anyhow::Result<ExitCode> {
    let ours = SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1")?);
    let alternate = SocketAddr::new([127, 0, 0, 2].into(), free_port("127.0.0.2")?);
    let theirs = SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1")?);
    // Like for like: coturn also runs RFC 5780 on two addresses, so both answers carry
    // OTHER-ADDRESS and RESPONSE-ORIGIN. An empty configuration keeps a system-wide
    // turnserver.conf (Debian's turns RFC 5780 off) out of the comparison.
    let pidfile =
        std::env::temp_dir().join(format!("natpunch-bench-coturn-{}.pid", std::process::id()));
    let coturn = Command::new(&args.coturn)
        .args(["-c", "/dev/null", "-L", "127.0.0.1", "-L", "127.0.0.2"])
        .arg("--pidfile")
        .arg(&pidfile)
        .args(["--listening-port", &theirs.port().to_string()])
        .args(["--alt-listening-port", &free_port("127.0.0.1")?.to_string()])
        .args([
            "--stun-only",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "-z",
            "--log-file",
            "stdout",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting coturn (`{}`; apt-get install coturn)",
                args.coturn
            )
        })?;
    let _coturn = Coturn {
        child: coturn,
        pidfile,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let server = StunServer::bind(ours, alternate, "natpunch bench").await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(server.run(stop_rx));
        wait_ready(ours).await?;
        wait_ready(theirs).await?;
        let d = Duration::from_secs(args.secs);
        let mut turns = Vec::new();
        for round in 1..=args.rounds {
            eprintln!("bench stun: turn {round}/{}", args.rounds);
            let natpunch = binding_load(ours, args.clients, d).await?;
            let coturn = binding_load(theirs, args.clients, d).await?;
            let ratio = if coturn.per_sec > 0.0 {
                natpunch.per_sec / coturn.per_sec
            } else {
                f64::INFINITY
            };
            turns.push(Turn {
                natpunch,
                coturn,
                ratio,
            });
        }
        let _ = stop_tx.send(true);
        let _ = running.await;
        let mut ratios: Vec<f64> = turns.iter().map(|t| t.ratio).collect();
        ratios.sort_by(f64::total_cmp);
        let median_ratio = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
        anyhow::Ok(Report {
            clients: args.clients,
            secs_per_turn: args.secs,
            turns,
            median_ratio,
        })
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Binding throughput on loopback, {} clients with one request in flight each, {} s per turn",
        report.clients, report.secs_per_turn
    );
    println!(
        "{:<5} {:>14} {:>9} {:>9} {:>14} {:>9} {:>9} {:>7}",
        "TURN", "NATPUNCH req/s", "p50 µs", "p99 µs", "COTURN req/s", "p50 µs", "p99 µs", "RATIO"
    );
    for (i, t) in report.turns.iter().enumerate() {
        println!(
            "{:<5} {:>14.0} {:>9} {:>9} {:>14.0} {:>9} {:>9} {:>7.2}",
            i + 1,
            t.natpunch.per_sec,
            t.natpunch.p50_us,
            t.natpunch.p99_us,
            t.coturn.per_sec,
            t.coturn.p50_us,
            t.coturn.p99_us,
            t.ratio
        );
    }
    println!("median ratio natpunch/coturn: {:.2}", report.median_ratio);
    Ok(ExitCode::SUCCESS)
}
