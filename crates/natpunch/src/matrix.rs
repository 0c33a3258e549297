//! `natpunch lab matrix`: hole punches between every pair of NAT presets, summed up per cell.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use labrun::matrix::{self, MatrixConfig, Trial};
use natlab::Preset;

use cli::peer::TransportArg;

use cli::matrix::{ConnectMatrixArgs, MatrixArgs, ProtoArg};
use labrun::connect::{self, ConnectConfig, ConnectTrial};
use natpunch_client::Proto;

pub(crate) fn run(args: MatrixArgs) -> anyhow::Result<ExitCode> {
    cli::write::replace_flags::<cli::peer::Common>(Vec::new(), &args.peer_arg).map_err(|e| {
        anyhow::anyhow!(
            "--peer-arg: {e} for `natpunch peer` (its flags: `natpunch peer listen --help`)"
        )
    })?;
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
        peer_args: args.peer_arg.clone(),
        hard_sessions: args.max_sessions.map(|max| (max, args.session_overflow)),
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

/// `natpunch lab connect-matrix`: applications connected by two daemons behind every pair of
/// NAT presets.
pub(crate) fn connect(args: ConnectMatrixArgs) -> anyhow::Result<ExitCode> {
    natlab::environment::check().map_err(anyhow::Error::msg)?;
    let presets = if args.presets.is_empty() && args.pairs.is_empty() {
        Preset::ALL.to_vec()
    } else {
        args.presets.clone()
    };
    let protos = match args.proto {
        ProtoArg::Tcp => vec![Proto::Tcp],
        ProtoArg::Udp => vec![Proto::Udp],
        ProtoArg::Both => vec![Proto::Tcp, Proto::Udp],
    };
    cli::write::replace_flags::<cli::daemon::DaemonArgs>(Vec::new(), &args.daemon_arg).map_err(
        |e| {
            anyhow::anyhow!(
                "--daemon-arg: {e} for `natpunch daemon` (its flags: `natpunch daemon --help`)"
            )
        },
    )?;
    let exe = std::env::current_exe().context("finding the natpunch binary")?;
    let config = ConnectConfig {
        presets,
        pairs: args.pairs.clone(),
        protos,
        trials: args.trials.max(1),
        rtt_ms: args.rtt_ms,
        parallel: args.parallel.max(1),
        tell_nat: !args.untold,
        daemon_args: args.daemon_arg.clone(),
        hard_sessions: args.max_sessions.map(|max| (max, args.session_overflow)),
        ..ConnectConfig::new(exe, crate::stop_flag())
    };
    let pairs = if config.pairs.is_empty() {
        config.presets.len().pow(2)
    } else {
        config.pairs.len()
    };
    eprintln!(
        "lab connect-matrix: {} cells × {} trials, {} labs in parallel, {} ms RTT",
        pairs * config.protos.len(),
        config.trials,
        config.parallel,
        config.rtt_ms
    );
    let progress = |t: &ConnectTrial, done: usize, total: usize| {
        let how = match (&t.technique, t.time_to_socket_ms) {
            (Some(technique), Some(ms)) => format!(
                "{} via {technique} in {ms:.0} ms",
                if t.direct { "direct" } else { "relayed" }
            ),
            _ => "no socket".to_owned(),
        };
        let transfer = if t.transfer_ok {
            ", 1 MiB each way ok"
        } else {
            ""
        };
        let err = t
            .error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        eprintln!(
            "[{done:>4}/{total}] {} × {} {}: {how}{transfer}{err}",
            t.a, t.b, t.proto
        );
    };
    let report = connect::run(&config, &progress)?;
    if args.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    let failed = report.trials.iter().filter(|t| !t.transfer_ok).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("lab connect-matrix: {failed} trials without a working socket");
        ExitCode::FAILURE
    })
}
