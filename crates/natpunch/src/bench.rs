//! `natpunch bench …`: side-by-side measurements, each against a baseline in the same run. The
//! harnesses are `labrun::bench`'s; this file holds the flags and the tables.

use std::process::ExitCode;

use anyhow::Context as _;
use labrun::bench::punch::{self, PunchBench, PunchProgress};
use labrun::bench::server::{self as server_bench, ServerBench};
use labrun::bench::stun::{self, StunBench};

use cli::bench::{BenchCommand, ConnectBenchArgs, PunchArgs, ServerBenchArgs, StunArgs};
use labrun::bench::connect::{self as connect_bench, ConnectBench};

pub(crate) fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Stun(args) => stun(&args),
        BenchCommand::Punch(args) => punch(&args),
        BenchCommand::Connect(args) => connect(&args),
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

fn connect(args: &ConnectBenchArgs) -> anyhow::Result<ExitCode> {
    natlab::environment::check().map_err(anyhow::Error::msg)?;
    let bench = ConnectBench {
        exe: std::env::current_exe().context("finding the natpunch binary")?,
        trials: args.trials,
        rtt_ms: args.rtt_ms,
        stop: crate::stop_flag(),
    };
    let report = connect_bench::run(&bench, &|what| eprintln!("bench connect: {what}"))?;
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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
