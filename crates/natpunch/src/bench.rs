//! `natpunch bench …`: side-by-side measurements, each against a baseline in the same run. The
//! harnesses are `labrun::bench`'s; this file holds the flags and the tables.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand};
use labrun::bench::punch::{self, PunchBench, PunchProgress};
use labrun::bench::server::{self as server_bench, ServerBench};
use labrun::bench::stun::{self, StunBench};

use crate::args::Json;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Binding throughput of natpunch's STUN server against coturn's, on loopback, in turns.
    Stun(StunArgs),
    /// Time to a direct connection, natpunch's DCUtR engine against stock rust-libp2p, between
    /// two port-restricted homes in the lab, each as a ratio to the floor.
    Punch(PunchArgs),
    /// The measurement server under concurrent clients: reports/s and latency on SQLite and on
    /// PostgreSQL, with the ratio.
    Server(ServerBenchArgs),
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
    #[command(flatten)]
    json: Json,
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
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the figures as JSON")))]
pub(crate) struct ServerBenchArgs {
    /// Concurrent clients, each on its own connection.
    #[arg(long, env = "NATPUNCH_BENCH_SERVER_CLIENTS", default_value_t = 32)]
    clients: usize,
    /// Reports per backend.
    #[arg(long, env = "NATPUNCH_BENCH_REPORTS", default_value_t = 4000)]
    reports: u64,
    /// PostgreSQL database to fill (tables are created, rows added) [default: a private
    /// server started for the run, removed after].
    #[arg(long, env = "NATPUNCH_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Skip PostgreSQL (no ratio then).
    #[arg(long, env = "NATPUNCH_BENCH_SQLITE_ONLY", value_parser = BoolishValueParser::new())]
    sqlite_only: bool,
    #[command(flatten)]
    json: Json,
}

pub(crate) fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Stun(args) => stun(&args),
        BenchCommand::Punch(args) => punch(&args),
        BenchCommand::Server(args) => server(&args),
    }
}

fn punch(args: &PunchArgs) -> anyhow::Result<ExitCode> {
    natlab::environment::check().map_err(anyhow::Error::msg)?;
    let bench = PunchBench {
        exe: std::env::current_exe().context("finding the natpunch binary")?,
        trials: args.trials,
        rtt_ms: args.rtt_ms,
        perf_mib: args.perf_mib,
        perf_trials: args.perf_trials,
        stop: crate::stop_flag(),
    };
    let progress = |p: PunchProgress<'_>| match p {
        PunchProgress::Engine { engine, trials } => {
            eprintln!("bench punch: {engine} engine, {trials} trials per transport");
        }
        PunchProgress::Trial { done, total } => eprint!("\r  {done}/{total}"),
        PunchProgress::EngineDone => eprintln!(),
        PunchProgress::Throughput { mib } => {
            eprintln!("bench punch: throughput, {mib} MiB over the circuit and direct");
        }
    };
    let report = punch::run(&bench, &progress)?;
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

fn stun(args: &StunArgs) -> anyhow::Result<ExitCode> {
    let bench = StunBench {
        secs: args.secs,
        rounds: args.rounds,
        clients: args.clients,
        coturn: args.coturn.clone(),
    };
    let report = stun::run(&bench, &|round| {
        eprintln!("bench stun: turn {round}/{}", args.rounds);
    })?;
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

fn server(args: &ServerBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.clients > 0 && args.reports > 0,
        "--clients and --reports must be above 0"
    );
    let bench = ServerBench {
        clients: args.clients,
        reports: args.reports,
        postgres_url: args.postgres_url.clone(),
        sqlite_only: args.sqlite_only,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let dir = std::env::temp_dir().join(format!("natpunch-bench-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let progress = |backend: &str, done: u64| {
        eprintln!("bench server: {backend}: {done}/{} reports", args.reports);
    };
    let result = runtime.block_on(server_bench::run(&bench, &dir, &progress));
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
