//! `natpunch`: one binary, one subcommand per role. This file parses the command line (its
//! types are the `cli` crate's), sets up logging and hands over to the role's module, which
//! wires the role's library to the terminal; the logic lives in the library crates.

mod args;
mod bench;
mod campaign;
mod client;
mod connect;
mod daemon;
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
use clap::Parser as _;
use cli::{Cli, Command};

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
        Command::Daemon(args) => daemon::run(args),
        Command::Peer(cmd) => peer::run(cmd),
        Command::Server(args) => server::run(args),
        Command::Honeypot(args) => honeypot::run(args),
        Command::Client(args) => client::run(args),
        Command::Connect(args) => connect::connect(args),
        Command::Accept(args) => connect::accept(args),
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
