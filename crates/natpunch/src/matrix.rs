//! `natpunch lab matrix`: hole punches between every pair of NAT presets, summed up per cell.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use labrun::matrix::{self, MatrixConfig, Trial};
use natlab::Preset;

use crate::peer::{CandidatesArg, EngineArg, TransportArg};

use crate::args::Json;

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the report as JSON (`{\"cells\":[…]}`)")))]
pub(crate) struct MatrixArgs {
    /// Trials per cell (dialer preset × listener preset × transport).
    #[arg(long, env = "NATPUNCH_MATRIX_TRIALS", default_value_t = 5)]
    trials: u32,
    /// Transports: each gets its own cells (`both` means a TCP and a QUIC cell).
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_TRANSPORT",
        value_enum,
        default_value_t = TransportArg::Both
    )]
    transport: TransportArg,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_MATRIX_RTT_MS", default_value_t = 100)]
    rtt_ms: u32,
    /// Presets to pair (comma-separated) [default: all].
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_PRESETS",
        value_delimiter = ',',
        value_parser = parse_preset
    )]
    presets: Vec<Preset>,
    /// Only these pairs, as DIALER:LISTENER (comma-separated), e.g.
    /// `port-restricted:port-restricted,symmetric:symmetric` [default: every pair of --presets].
    #[arg(long, env = "NATPUNCH_MATRIX_PAIRS", value_delimiter = ',', value_parser = parse_pair)]
    pairs: Vec<(Preset, Preset)>,
    /// Labs running trials at once.
    #[arg(long, env = "NATPUNCH_MATRIX_PARALLEL", default_value_t = 4)]
    parallel: usize,
    /// Hole-punching engine.
    #[arg(long, env = "NATPUNCH_MATRIX_ENGINE", value_enum, default_value_t = EngineArg::Natpunch)]
    engine: EngineArg,
    /// The dialer's engine, when it differs from --engine (interoperability runs).
    #[arg(long, env = "NATPUNCH_MATRIX_DIALER_ENGINE", value_enum)]
    dialer_engine: Option<EngineArg>,
    /// The listener's engine, when it differs from --engine.
    #[arg(long, env = "NATPUNCH_MATRIX_LISTENER_ENGINE", value_enum)]
    listener_engine: Option<EngineArg>,
    /// Addresses the peers offer.
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_CANDIDATES",
        value_enum,
        default_value_t = CandidatesArg::Observed
    )]
    candidates: CandidatesArg,
    /// Each attempt's time after its dial, in ms.
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_ATTEMPT_TIMEOUT_MS",
        default_value_t = 3000
    )]
    attempt_timeout_ms: u64,
    #[command(flatten)]
    json: Json,
    /// Also write every trial, both sides' records, as JSON lines to this file.
    #[arg(long, env = "NATPUNCH_MATRIX_TRIALS_OUT")]
    trials_out: Option<std::path::PathBuf>,
}

/// A preset named on the command line. clap shows the value with the error, so the message
/// names only what is wrong: the value is not repeated.
pub(crate) fn parse_preset(s: &str) -> Result<Preset, String> {
    preset_named(s).ok_or_else(|| format!("unknown NAT preset (known: {})", known_presets()))
}

fn preset_named(s: &str) -> Option<Preset> {
    Preset::ALL.into_iter().find(|p| p.name() == s)
}

fn known_presets() -> String {
    let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
    names.join(", ")
}

fn parse_pair(s: &str) -> Result<(Preset, Preset), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or("not a pair: DIALER:LISTENER, e.g. symmetric:open")?;
    let side = |p: &str| {
        preset_named(p)
            .ok_or_else(|| format!("unknown NAT preset `{p}` (known: {})", known_presets()))
    };
    Ok((side(a)?, side(b)?))
}

pub(crate) fn run(args: MatrixArgs) -> anyhow::Result<ExitCode> {
    natlab::environment::check().map_err(anyhow::Error::msg)?;
    let presets = if args.presets.is_empty() && args.pairs.is_empty() {
        Preset::ALL.to_vec()
    } else {
        args.presets.clone()
    };
    let transports = match args.transport {
        TransportArg::Tcp => vec!["tcp".to_owned()],
        TransportArg::Quic => vec!["quic".to_owned()],
        TransportArg::Both => vec!["tcp".to_owned(), "quic".to_owned()],
    };
    let exe = std::env::current_exe().context("finding the natpunch binary")?;
    let config = MatrixConfig {
        presets,
        pairs: args.pairs.clone(),
        transports,
        trials: args.trials.max(1),
        rtt_ms: args.rtt_ms,
        parallel: args.parallel.max(1),
        engine: args.engine.name().to_owned(),
        candidates: args.candidates.name().to_owned(),
        attempt_timeout_ms: args.attempt_timeout_ms,
        listener_engine: args.listener_engine.map(|e| e.name().to_owned()),
        dialer_engine: args.dialer_engine.map(|e| e.name().to_owned()),
        ..MatrixConfig::new(exe, crate::stop_flag())
    };
    let pairs = if config.pairs.is_empty() {
        config.presets.len().pow(2)
    } else {
        config.pairs.len()
    };
    let cells = pairs * config.transports.len();
    eprintln!(
        "lab matrix: {cells} cells × {} trials, {} labs in parallel, {} ms RTT, engine {}, \
         candidates {}",
        config.trials, config.parallel, config.rtt_ms, config.engine, config.candidates
    );
    let progress = |t: &Trial, done: usize, total: usize| {
        let ms = t
            .dialer
            .as_ref()
            .and_then(|r| r.time_to_direct_ms)
            .map(|m| format!(" {m:.0} ms"))
            .unwrap_or_default();
        let err = t
            .error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        eprintln!(
            "[{done:>4}/{total}] {} × {} {}: {:?}{ms}{err}",
            t.a,
            t.b,
            t.transport,
            t.outcome()
        );
    };
    let report = matrix::run(&config, &progress)?;
    if let Some(path) = &args.trials_out {
        let mut file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for t in &report.trials {
            writeln!(file, "{}", serde_json::to_string(t)?)?;
        }
    }
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
