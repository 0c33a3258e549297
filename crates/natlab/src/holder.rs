//! The delay-line holder of a detached lab.
//!
//! Delay lines and session evictors run in the process that starts them, and a detached lab
//! outlives the process that built it (`natpunch lab up`). So a lab with impaired links or
//! evicting routers ([`crate::topology::LabPlan::needs_holder`]) gets a holder: a process of
//! its own (its own process group, so that a Ctrl-C meant for the caller's terminal does not
//! reach it) that runs them until it is sent SIGTERM, SIGINT or SIGHUP, as
//! [`crate::lab::down`] does. The holder tells its starter one line on stdout: `ready`, or
//! `error: WHY`.

use std::io::{self, BufRead as _, Write as _};
use std::process::{Command, Stdio};

use nix::sys::signal::{SigSet, Signal};

use crate::lab::{self, LabError, ProcessId};

/// Why the holder did not start or stopped holding.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// The holder process could not be started.
    #[error("starting the delay-line holder")]
    Spawn(#[source] io::Error),
    /// The holder ended without saying it is ready; with its reason when it gave one.
    #[error(
        "the delay-line holder did not start{}",
        if .0.is_empty() { String::new() } else { format!(": {}", .0) }
    )]
    NotReady(String),
    /// The lab's state or its delay lines.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The signals could not be blocked or waited for.
    #[error(transparent)]
    Signal(#[from] nix::Error),
    /// Talking to the holder, or to the starter.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Starts `command` (a program that calls [`hold`]) detached from this process, and waits until
/// it says it is ready.
pub fn start(mut command: Command) -> Result<(), HolderError> {
    use std::os::unix::process::CommandExt as _;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(HolderError::Spawn)?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        io::BufReader::new(stdout).read_line(&mut line)?;
    }
    if line.trim() == "ready" {
        return Ok(());
    }
    let _ = child.kill();
    let _ = child.wait();
    let why = line.trim();
    Err(HolderError::NotReady(
        why.strip_prefix("error: ").unwrap_or(why).to_owned(),
    ))
}

/// Runs the delay lines and session evictors of lab `name` until SIGTERM, SIGINT or SIGHUP, recording this process
/// as the lab's holder; says `ready` (or `error: WHY`) on stdout first.
pub fn hold(name: &str) -> Result<(), HolderError> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block()?;
    let mut state = lab::load_state(name)?;
    let started = lab::start_delay_lines(&state.plan, state.seed)
        .and_then(|lines| Ok((lines, lab::start_evictors(&state.plan)?)));
    let lines = match started {
        Ok(lines) => lines,
        Err(e) => {
            // The starter passes this line on as the reason the holder did not start.
            println!("error: {}", crate::chain(&e));
            return Err(e.into());
        }
    };
    state.holder = Some(ProcessId::current());
    lab::save_state(&state)?;
    println!("ready");
    io::stdout().flush()?;
    signals.wait()?;
    drop(lines);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn the_starter_waits_for_ready_and_passes_on_the_reason_otherwise() {
        assert!(start(sh("echo ready")).is_ok());
        let e = start(sh("echo 'error: no NFQUEUE'")).expect_err("not ready");
        assert_eq!(
            e.to_string(),
            "the delay-line holder did not start: no NFQUEUE"
        );
        let e = start(sh("exit 1")).expect_err("silent");
        assert_eq!(e.to_string(), "the delay-line holder did not start");
    }
}
