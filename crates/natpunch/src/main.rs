//! `natpunch`: one binary, one subcommand per role. This file parses the command line, sets up
//! logging and hands over to the role's module; the logic lives in the library crates.

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
mod serverbench;

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

/// Serves `/metrics` (for `registry`) and `/health` on `addr` in the background.
async fn serve_telemetry(
    addr: std::net::SocketAddr,
    registry: std::sync::Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the telemetry port {addr}"))?;
    tokio::spawn(p2p::telemetry::serve(listener, registry));
    Ok(())
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
