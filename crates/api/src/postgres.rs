//! A private PostgreSQL server: its own cluster in a temporary directory, listening on loopback
//! only, for tests, benchmarks and lab campaigns. Dropping it stops the server (by its PID) and
//! removes the directory.
//!
//! It needs Debian's `postgresql` package (`/usr/lib/postgresql/VERSION/bin`). PostgreSQL
//! refuses to run as root, so as root the cluster belongs to the `postgres` user.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct TempPostgres {
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    user: Option<nix::unistd::User>,
    databases: AtomicU32,
}

/// The newest installed PostgreSQL's program directory.
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// `program` from `bin`, run in `dir`, as `user` when given.
fn command(bin: &Path, dir: &Path, user: Option<&nix::unistd::User>, program: &str) -> Command {
    let mut c = Command::new(bin.join(program));
    c.current_dir(dir);
    if let Some(u) = user {
        c.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    c
}

/// Starts the server of the cluster in `dir` on 127.0.0.1:`port`, logging to `dir/server.log`
/// (appended to, so that a restart keeps the earlier log).
fn spawn_server(
    bin: &Path,
    dir: &Path,
    user: Option<&nix::unistd::User>,
    port: u16,
) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .map_err(|e| format!("server.log: {e}"))?;
    command(bin, dir, user, "postgres")
        .arg("-D")
        .arg(dir.join("data"))
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=200",
            "-p",
        ])
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("postgres: {e}"))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl TempPostgres {
    /// Creates a cluster and starts its server; the error says what is missing or failed.
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir().ok_or(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt install \
             postgresql)",
        )?;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "natpunch-pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let user = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or("running as root, and there is no postgres user to run PostgreSQL")?;
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
            Some(user)
        } else {
            None
        };
        let data = dir.join("data");
        let fail = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let out = command(&bin, &dir, user.as_ref(), "initdb")
            .args([
                "--auth=trust",
                "--username=natpunch",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data)
            .output()
            .map_err(|e| fail(format!("initdb: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let port = free_port().map_err(|e| fail(format!("a free port: {e}")))?;
        let child = spawn_server(&bin, &dir, user.as_ref(), port).map_err(fail)?;
        // From here on, dropping `this` stops the server and removes the directory.
        let mut this = Self {
            child,
            dir,
            bin,
            port,
            user,
            databases: AtomicU32::new(0),
        };
        this.wait_ready()?;
        Ok(this)
    }

    /// Waits until the server accepts connections.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-q", "-p"])
                .arg(self.port.to_string())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                return Err(format!("postgres exited ({status}): {}", log.trim()));
            }
            if Instant::now() > deadline {
                return Err("postgres did not accept connections within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (PostgreSQL's fast shutdown: clients are disconnected) and keeps the
    /// cluster: an outage, until [`Self::start_again`].
    pub fn stop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: clients are disconnected, the server exits.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Starts a server stopped by [`Self::stop`] again, on the same cluster and port (the
    /// databases and URLs stay valid); returns once it accepts connections.
    pub fn start_again(&mut self) -> Result<(), String> {
        if matches!(self.child.try_wait(), Ok(None)) {
            return Ok(());
        }
        self.child = spawn_server(&self.bin, &self.dir, self.user.as_ref(), self.port)?;
        self.wait_ready()
    }

    fn command(&self, program: &str) -> Command {
        command(&self.bin, &self.dir, self.user.as_ref(), program)
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `url` (from [`Self::new_database`]) reached over the server's Unix socket instead of TCP:
    /// usable from every network namespace of this machine (a lab's nodes included) without
    /// any network path to the root namespace.
    pub fn socket_url(&self, url: &str) -> String {
        format!("{url}?host={}", self.dir.display())
    }

    /// Creates a new, empty database and returns its URL.
    pub fn new_database(&self) -> Result<String, String> {
        let name = format!(
            "natpunch_{}",
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        let out = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-U", "natpunch", "-p"])
            .arg(self.port.to_string())
            .arg(&name)
            .output()
            .map_err(|e| format!("createdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "createdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(format!(
            "postgres://natpunch@127.0.0.1:{}/{name}",
            self.port
        ))
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
