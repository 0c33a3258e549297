//! `natpunch`: one binary, one subcommand per role. This file parses the command line, sets up
//! logging and hands over to the role's module; the logic lives in the library crates.

mod args;
mod bench;
mod campaign;
mod client;
mod honeypot;
mod lab;
mod map;
mod matrix;
mod nat;
mod peer;
mod relay;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use clap::{Parser, Subcommand};

/// Direct connections between computers behind NATs, and measurements of how well that works.
#[derive(Debug, Parser)]
#[command(
    name = "natpunch",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `info`, `natlab=debug`).
    #[arg(long, global = true, env = "NATPUNCH_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// NAT lab: build NAT topologies in network namespaces, run programs in them, self-test.
    #[command(subcommand, display_order = 10)]
    Lab(lab::LabCommand),
    /// NAT discovery: what NAT is this host behind, and can it be hole-punched?
    #[command(subcommand, display_order = 20)]
    Nat(nat::NatCommand),
    /// Run an RFC 5780 STUN server on two addresses × two ports (for `nat check`).
    #[command(display_order = 21)]
    StunServer(nat::StunServerArgs),
    /// Port mapping on the local router: PCP, NAT-PMP or UPnP IGD (probe, list, add, delete).
    #[command(subcommand, display_order = 30)]
    Map(map::MapCommand),
    /// Run a libp2p circuit relay v2 server (with identify, ping and AutoNAT v2) for hole punching.
    #[command(display_order = 40)]
    Relay(relay::RelayArgs),
    /// A libp2p peer that hole-punches through a relay (DCUtR over TCP and QUIC).
    #[command(subcommand, display_order = 41)]
    Peer(peer::PeerCommand),
    /// A Kademlia DHT server that records the peers connecting to it into the measurement store.
    #[command(display_order = 51)]
    Honeypot(honeypot::HoneypotArgs),
    /// libp2p hosts that take peers from a measurement server, hole-punch them and report.
    #[command(display_order = 52)]
    Client(client::ClientArgs),
    /// The measurement server: punchr-compatible gRPC API on SQLite or PostgreSQL.
    #[command(display_order = 50)]
    Server(server::ServerArgs),
    /// Benchmarks, each against a baseline in the same run.
    #[command(subcommand, display_order = 90)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Lab(cmd) => lab::run(cmd),
        Command::Nat(cmd) => nat::run(cmd),
        Command::StunServer(args) => nat::stun_server(args),
        Command::Map(cmd) => map::run(cmd),
        Command::Relay(args) => relay::run(args),
        Command::Peer(cmd) => peer::run(cmd),
        Command::Server(args) => server::run(args),
        Command::Honeypot(args) => honeypot::run(args),
        Command::Client(args) => client::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Lets a closed standard output end natpunch quietly, as it ends any Unix tool
/// (`natpunch client --json | head -3`), instead of a panic at the next `println!`: Rust's
/// runtime ignores SIGPIPE, so a write to a closed pipe fails rather than ending the process.
/// What the process had to keep is already on disk (the client's spool, written before it
/// prints).
#[allow(
    unsafe_code,
    reason = "signal(2) is the one way to restore SIGPIPE's default"
)]
fn restore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first in main, before any thread exists, and SigDfl installs no handler
    // code of ours, so nothing can run in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Where natpunch keeps state on this host: $XDG_STATE_HOME/natpunch or ~/.local/state/natpunch.
fn state_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .context("neither XDG_STATE_HOME nor HOME is set: name the file with its flag")?;
    Ok(base.join("natpunch"))
}

/// A libp2p protocol name from the command line (it starts with `/`).
fn stream_protocol(s: &str) -> Result<libp2p::StreamProtocol, String> {
    libp2p::StreamProtocol::try_from_owned(s.to_owned())
        .map_err(|e| format!("{e} (a protocol name starts with /, e.g. /ipfs/kad/1.0.0)"))
}

/// Completes on Ctrl-C or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { term.as_mut()?.recv().await } => {}
    }
}

/// A flag set on Ctrl-C or SIGTERM, for work that runs on plain threads (lab trials): they stop
/// at the next trial and remove their labs. The first call starts the watcher.
fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    Arc::clone(FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let set = Arc::clone(&flag);
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(stop_signal());
            eprintln!("stopping after the trials in progress; the labs are removed");
            set.store(true, Ordering::Relaxed);
        });
        flag
    }))
}

#[cfg(test)]
mod tests {
    use clap::{ArgAction, CommandFactory as _, Parser as _};

    use super::Cli;

    /// Calls `f` with every command of the tree (built, so that global flags appear in each
    /// subcommand) and its path, e.g. `natpunch lab up`.
    fn walk(cmd: &clap::Command, path: &str, f: &mut impl FnMut(&str, &clap::Command)) {
        f(path, cmd);
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), f);
        }
    }

    /// The subcommand `args` (a labrun child's command line, without the program) parses to.
    pub(crate) fn parse(args: Vec<std::ffi::OsString>) -> super::Command {
        let line = std::iter::once("natpunch".into()).chain(args);
        match Cli::try_parse_from(line) {
            Ok(cli) => cli.command,
            Err(e) => panic!("natpunch refuses labrun's command line: {e}"),
        }
    }

    /// The name a `ValueEnum` value has on the command line.
    pub(crate) fn name(v: impl clap::ValueEnum) -> Option<String> {
        v.to_possible_value().map(|p| p.get_name().to_owned())
    }

    fn built() -> clap::Command {
        let mut cmd = Cli::command();
        cmd.build();
        cmd
    }

    /// The README promises a `NATPUNCH_*` environment variable for every flag.
    #[test]
    fn every_flag_has_a_natpunch_env_var() {
        Cli::command().debug_assert();
        let mut missing = Vec::new();
        let mut foreign = Vec::new();
        let mut flags = 0;
        walk(&built(), "natpunch", &mut |path, cmd| {
            for arg in cmd.get_arguments() {
                let exempt = matches!(
                    arg.get_action(),
                    ArgAction::Help
                        | ArgAction::HelpShort
                        | ArgAction::HelpLong
                        | ArgAction::Version
                );
                if arg.is_positional() || exempt {
                    continue;
                }
                flags += 1;
                let flag = match arg.get_long() {
                    Some(long) => format!("--{long}"),
                    None => format!("{:?}", arg.get_id()),
                };
                match arg.get_env().map(|e| e.to_string_lossy().into_owned()) {
                    None => missing.push(format!("{path} {flag}")),
                    Some(env) if !env.starts_with("NATPUNCH_") => {
                        foreign.push(format!("{path} {flag}: {env}"));
                    }
                    Some(_) => {}
                }
            }
        });
        assert!(flags > 100, "the walk found only {flags} flags");
        assert!(
            missing.is_empty() && foreign.is_empty(),
            "flags without an environment variable (add env = \"NATPUNCH_…\"):\n  {}\n\
             environment variables not named NATPUNCH_*:\n  {}",
            missing.join("\n  "),
            foreign.join("\n  ")
        );
    }

    /// One variable may not set two flags of the same command.
    #[test]
    fn env_vars_are_unique_within_a_command() {
        let mut clashes = Vec::new();
        walk(&built(), "natpunch", &mut |path, cmd| {
            let mut seen = std::collections::HashMap::new();
            for arg in cmd.get_arguments() {
                let Some(env) = arg.get_env() else { continue };
                if let Some(first) = seen.insert(env.to_owned(), arg.get_id().clone()) {
                    clashes.push(format!(
                        "{path}: {} sets both {first} and {}",
                        env.to_string_lossy(),
                        arg.get_id()
                    ));
                }
            }
        });
        assert!(clashes.is_empty(), "{}", clashes.join("\n"));
    }

    /// clap takes a boolean flag's variable for the flag given even when it says `false`
    /// (clap-rs/clap#5591): `NATPUNCH_CAMPAIGN_POSTGRES=false` would clash with
    /// `--database-url`. Such flags stay out of clap's conflicts; the commands check them.
    #[test]
    fn env_booleans_take_no_part_in_conflicts() {
        let env_bool =
            |a: &clap::Arg| a.get_env().is_some() && matches!(a.get_action(), ArgAction::SetTrue);
        let mut booleans = 0;
        let mut clashes = Vec::new();
        walk(&built(), "natpunch", &mut |path, cmd| {
            for arg in cmd.get_arguments() {
                booleans += usize::from(env_bool(arg));
                for other in cmd.get_arg_conflicts_with(arg) {
                    if env_bool(arg) || env_bool(other) {
                        clashes.push(format!(
                            "{path}: {} conflicts with {}",
                            arg.get_id(),
                            other.get_id()
                        ));
                    }
                }
            }
        });
        assert!(
            booleans > 10,
            "the walk found only {booleans} boolean flags"
        );
        assert!(clashes.is_empty(), "{}", clashes.join("\n"));
    }
}
