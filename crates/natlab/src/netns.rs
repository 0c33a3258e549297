//! Network namespaces: create, delete, list, run commands and threads inside them.
//!
//! Namespaces are the named kind (`ip netns add`, a bind mount under `/run/netns`), so that
//! `ip netns exec` and other tools can enter them too. Code runs inside a namespace on a thread
//! of its own that has called `setns(2)`; sockets it creates stay in that namespace for life and
//! can be used from any thread afterwards.

use std::fs::File;
use std::io::{self, Write as _};
use std::process::{Command, Output, Stdio};
use std::thread;

use nix::sched::{CloneFlags, setns};

/// A command that could not be run or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The program could not be started (not installed?).
    #[error(
        "cannot run `{command}` (is it installed? run the README's test command to install the lab's packages)"
    )]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The program did not finish in time and was ended.
    #[error("`{command}` did not finish within {timeout:?} and was ended")]
    Timeout {
        /// The command line.
        command: String,
        /// How long it had.
        timeout: std::time::Duration,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a lab setup command: `program args…` (in namespace `ns` when given) with `stdin` as
/// input, ended after [`crate::defaults::SETUP_COMMAND_TIMEOUT`]; returns its stdout. A non-zero
/// exit becomes [`CommandError::Failed`] with the program's stderr.
pub fn run(
    ns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CommandError> {
    run_for(
        ns,
        program,
        args,
        stdin,
        Some(crate::defaults::SETUP_COMMAND_TIMEOUT),
    )
}

/// Like [`run`], with a timeout of the caller's choice (`None`: wait as long as it takes).
pub fn run_for(
    ns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Option<std::time::Duration>,
) -> Result<String, CommandError> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let command = match ns {
        Some(ns) => format!("[{ns}] {}", describe(program, args)),
        None => describe(program, args),
    };
    let spawn_err = |source| CommandError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    // Wait on a helper thread so that a hung command (an xtables lock, a stuck netlink call)
    // cannot hang the lab: after the timeout it is ended, by its PID, which we started.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let received = match timeout {
        Some(t) => rx.recv_timeout(t).ok(),
        None => rx.recv().ok(),
    };
    let Output {
        status,
        stdout,
        stderr,
    } = match received {
        Some(result) => result.map_err(spawn_err)?,
        None => {
            if let Ok(raw) = i32::try_from(pid) {
                use nix::sys::signal::{Signal, kill};
                let _ = kill(nix::unistd::Pid::from_raw(raw), Signal::SIGKILL);
            }
            let timeout = timeout.unwrap_or_default();
            return Err(CommandError::Timeout { command, timeout });
        }
    };
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        return Err(CommandError::Failed {
            command,
            status: status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Runs `ip -n NS ARGS…` (or `ip ARGS…` without a namespace).
pub fn ip(ns: Option<&str>, args: &[&str]) -> Result<String, CommandError> {
    let mut full = Vec::with_capacity(args.len() + 2);
    if let Some(ns) = ns {
        full.extend(["-n", ns]);
    }
    full.extend_from_slice(args);
    run(None, "ip", &full, None)
}

/// Creates a named namespace.
pub fn add(name: &str) -> Result<(), CommandError> {
    ip(None, &["netns", "add", name]).map(drop)
}

/// Deletes a named namespace; its interfaces, veths (both ends) and nft tables go with it.
/// Deleting a namespace that does not exist is not an error.
pub fn delete(name: &str) -> Result<(), CommandError> {
    if !exists(name) {
        return Ok(());
    }
    ip(None, &["netns", "delete", name]).map(drop)
}

/// Whether a named namespace exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Names of all named namespaces.
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn enter(ns: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{ns}"))
        .map_err(|e| io::Error::new(e.kind(), format!("namespace {ns}: {e}")))?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` on a thread inside namespace `ns` and returns its result. Sockets `f` creates belong
/// to `ns`. A panic in `f` is propagated.
pub fn scoped<F, T>(ns: &str, f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    thread::scope(|s| {
        let handle = s.spawn(|| enter(ns).map(|()| f()));
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Starts a named thread inside namespace `ns` that runs `f` (for long-lived work such as a
/// delay line).
pub fn spawn<F, T>(ns: &str, name: String, f: F) -> io::Result<thread::JoinHandle<io::Result<T>>>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let ns = ns.to_owned();
    thread::Builder::new().name(name).spawn(move || {
        enter(&ns)?;
        f()
    })
}
