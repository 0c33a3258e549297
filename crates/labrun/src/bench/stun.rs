//! Binding throughput of natpunch's STUN server against coturn's, on loopback, in turns.
//!
//! Like for like: coturn also runs RFC 5780 on two addresses, so both answers carry
//! OTHER-ADDRESS and RESPONSE-ORIGIN. coturn gets an empty configuration file, which keeps a
//! system-wide turnserver.conf (Debian's turns RFC 5780 off) out of the comparison.

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use natcheck::StunServer;
use natcheck::bench::{Load, binding_load};
use natcheck::server::ServerError;
use serde::Serialize;

/// How long a server may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct StunBench {
    /// Seconds of load per turn.
    pub secs: u64,
    /// Turns per server (natpunch and coturn alternate).
    pub rounds: usize,
    /// Concurrent clients, each with one request in flight.
    pub clients: usize,
    /// The coturn server binary.
    pub coturn: String,
}

/// Why the benchmark did not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum StunBenchError {
    /// coturn could not be started.
    #[error("starting coturn (`{program}`; apt-get install coturn)")]
    Coturn {
        /// The binary tried.
        program: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// natpunch's server could not be started.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A server never answered.
    #[error("the server on {0} never answered")]
    Silent(SocketAddr),
    /// Sockets, or the runtime.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One turn: each server under the same load.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    /// natpunch's server.
    pub natpunch: Load,
    /// coturn.
    pub coturn: Load,
    /// natpunch's answers per second over coturn's.
    pub ratio: f64,
}

/// The benchmark's figures (`natpunch bench stun --json`).
#[derive(Debug, Clone, Serialize)]
pub struct StunReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds per turn.
    pub secs_per_turn: u64,
    /// The turns, in order.
    pub turns: Vec<Turn>,
    /// The median of the turns' ratios.
    pub median_ratio: f64,
}

/// The turns as a table, the median ratio below it.
impl fmt::Display for StunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Binding throughput on loopback, {} clients with one request in flight each, {} s \
             per turn",
            self.clients, self.secs_per_turn
        )?;
        writeln!(
            f,
            "{:<5} {:>14} {:>9} {:>9} {:>14} {:>9} {:>9} {:>7}",
            "TURN",
            "NATPUNCH req/s",
            "p50 µs",
            "p99 µs",
            "COTURN req/s",
            "p50 µs",
            "p99 µs",
            "RATIO"
        )?;
        for (i, t) in self.turns.iter().enumerate() {
            writeln!(
                f,
                "{:<5} {:>14.0} {:>9} {:>9} {:>14.0} {:>9} {:>9} {:>7.2}",
                i + 1,
                t.natpunch.per_sec,
                t.natpunch.p50_us,
                t.natpunch.p99_us,
                t.coturn.per_sec,
                t.coturn.p50_us,
                t.coturn.p99_us,
                t.ratio
            )?;
        }
        writeln!(f, "median ratio natpunch/coturn: {:.2}", self.median_ratio)
    }
}

/// A free UDP port on `ip` (free a moment ago).
fn free_port(ip: &str) -> std::io::Result<u16> {
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?.port())
}

/// Ends the coturn child (ours, by PID) and removes its PID file when the benchmark ends,
/// however it ends.
struct Coturn {
    child: Child,
    pidfile: PathBuf,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

async fn wait_ready(server: SocketAddr) -> Result<(), StunBenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if binding_load(server, 1, Duration::from_millis(200))
            .await?
            .answered
            > 0
        {
            return Ok(());
        }
    }
    Err(StunBenchError::Silent(server))
}

/// Runs the benchmark; `progress` hears each turn start (1-based).
pub fn run(bench: &StunBench, progress: &dyn Fn(usize)) -> Result<StunReport, StunBenchError> {
    let ours = SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1")?);
    let alternate = SocketAddr::new([127, 0, 0, 2].into(), free_port("127.0.0.2")?);
    let theirs = SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1")?);
    let pidfile =
        std::env::temp_dir().join(format!("natpunch-bench-coturn-{}.pid", std::process::id()));
    let coturn = Command::new(&bench.coturn)
        .args(["-c", "/dev/null", "-L", "127.0.0.1", "-L", "127.0.0.2"])
        .arg("--pidfile")
        .arg(&pidfile)
        .args(["--listening-port", &theirs.port().to_string()])
        .args(["--alt-listening-port", &free_port("127.0.0.1")?.to_string()])
        .args([
            "--stun-only",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "-z",
            "--log-file",
            "stdout",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| StunBenchError::Coturn {
            program: bench.coturn.clone(),
            source,
        })?;
    let _coturn = Coturn {
        child: coturn,
        pidfile,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = StunServer::bind(ours, alternate, "natpunch bench").await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(server.run(stop_rx));
        wait_ready(ours).await?;
        wait_ready(theirs).await?;
        let d = Duration::from_secs(bench.secs);
        let mut turns = Vec::new();
        for round in 1..=bench.rounds {
            progress(round);
            let natpunch = binding_load(ours, bench.clients, d).await?;
            let coturn = binding_load(theirs, bench.clients, d).await?;
            let ratio = if coturn.per_sec > 0.0 {
                natpunch.per_sec / coturn.per_sec
            } else {
                f64::INFINITY
            };
            turns.push(Turn {
                natpunch,
                coturn,
                ratio,
            });
        }
        let _ = stop_tx.send(true);
        let _ = running.await;
        Ok(StunReport {
            clients: bench.clients,
            secs_per_turn: bench.secs,
            median_ratio: median_ratio(&turns),
            turns,
        })
    })
}

/// The middle ratio (the upper one of an even count); NaN without turns.
fn median_ratio(turns: &[Turn]) -> f64 {
    let mut ratios: Vec<f64> = turns.iter().map(|t| t.ratio).collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(ratio: f64) -> Turn {
        let load = Load {
            sent: 1,
            answered: 1,
            per_sec: 1.0,
            p50_us: 1,
            p99_us: 1,
        };
        Turn {
            natpunch: load,
            coturn: load,
            ratio,
        }
    }

    #[test]
    fn the_median_ratio_is_the_middle_turns() {
        assert_eq!(median_ratio(&[turn(3.0), turn(1.0), turn(2.0)]), 2.0);
        assert_eq!(median_ratio(&[turn(1.0), turn(2.0)]), 2.0);
        assert!(median_ratio(&[]).is_nan());
    }

    #[test]
    fn a_missing_coturn_is_named_with_the_package_to_install() {
        let bench = StunBench {
            secs: 1,
            rounds: 1,
            clients: 1,
            coturn: "natpunch-no-such-turnserver".into(),
        };
        let e = run(&bench, &|_| {}).expect_err("no coturn");
        assert!(
            e.to_string()
                .starts_with("starting coturn (`natpunch-no-such-turnserver`; apt-get install"),
            "{e}"
        );
    }
}
