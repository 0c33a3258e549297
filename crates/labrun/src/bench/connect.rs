//! Time to a socket from the daemon, against the libp2p engine's time to direct in the same run.
//!
//! Both between two port-restricted homes in the lab. The libp2p engine's figure (natpunch's
//! DCUtR engine, `natpunch peer dial`) runs from the relayed connection to the direct one; the
//! daemon's from the application's `connect` to its socket, once the two daemons have a relayed
//! connection (the first connect makes it, and is reported on its own). UDP is
//! also given in host-to-host RTTs, and a pair that cannot punch (a symmetric NAT against a
//! port-restricted one) in milliseconds to its relayed socket.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use natlab::{Lab, LabOptions, Preset};
use natpunch_client::{Client, Proto};
use serde::Serialize;

use crate::bench::punch::figure;
use crate::connect::{self, StartedDaemon};
use crate::matrix::{self, MatrixConfig, MatrixError, host, topology};
use crate::stats::quantile;

/// What to run.
#[derive(Debug, Clone)]
pub struct ConnectBench {
    /// The `natpunch` binary.
    pub exe: std::path::PathBuf,
    /// Connections per arm.
    pub trials: u32,
    /// Host-to-host round trip through the lab's internet, in ms.
    pub rtt_ms: u32,
    /// Set to stop: no new trial starts.
    pub stop: Arc<AtomicBool>,
}

/// One arm's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectArm {
    /// What was measured.
    pub name: &'static str,
    /// Trials run.
    pub trials: u32,
    /// Trials that gave what the arm expects (a direct socket, or the relayed one).
    pub ok: u32,
    /// Median, ms.
    pub median_ms: Option<f64>,
    /// 95th percentile, ms.
    pub p95_ms: Option<f64>,
    /// The median in host-to-host RTTs.
    pub median_rtts: Option<f64>,
}

/// The benchmark's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// Host-to-host RTT, ms.
    pub rtt_ms: u32,
    /// The arms: the libp2p engine's TCP and QUIC, the daemon's first connect, its TCP and UDP,
    /// and the relayed socket of a pair that cannot punch.
    pub arms: Vec<ConnectArm>,
    /// The daemon's direct TCP socket over the libp2p engine's TCP time to direct (the goal:
    /// at most 1.2).
    pub tcp_over_libp2p: Option<f64>,
    /// The daemon's direct UDP socket in host-to-host RTTs (the goal: at most 2.0).
    pub udp_rtts: Option<f64>,
    /// The relayed socket of a pair that cannot punch, ms (the goal: under 5,000).
    pub relayed_ms: Option<f64>,
}

impl ConnectReport {
    fn median(&self, name: &str) -> Option<f64> {
        self.arms
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.median_ms)
    }
}

impl fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "time to a socket, port-restricted × port-restricted, {} ms host-to-host RTT",
            self.rtt_ms
        )?;
        writeln!(
            f,
            "{:<40} {:>8} {:>9} {:>9} {:>7}",
            "arm", "ok", "median", "p95", "RTTs"
        )?;
        for a in &self.arms {
            writeln!(
                f,
                "{:<40} {:>4}/{:<3} {:>6} ms {:>6} ms {:>7}",
                a.name,
                a.ok,
                a.trials,
                figure(a.median_ms, 0),
                figure(a.p95_ms, 0),
                figure(a.median_rtts, 2)
            )?;
        }
        writeln!(
            f,
            "daemon TCP / libp2p engine TCP: {} (goal ≤ 1.2)",
            figure(self.tcp_over_libp2p, 2)
        )?;
        writeln!(
            f,
            "daemon UDP in RTTs: {} (goal ≤ 2.0)",
            figure(self.udp_rtts, 2)
        )?;
        writeln!(
            f,
            "relayed socket when no punch can work: {} ms (goal < 5000)",
            figure(self.relayed_ms, 0)
        )
    }
}

/// Runs the benchmark; `progress` hears what starts.
///
/// # Errors
///
/// A lab, the relay or a daemon did not start.
pub fn run(
    bench: &ConnectBench,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<ConnectReport, MatrixError> {
    let pr = Preset::PortRestricted;
    progress("the libp2p engine (natpunch peer dial), TCP and QUIC");
    let baseline = matrix::run(
        &MatrixConfig {
            presets: Vec::new(),
            pairs: vec![(pr, pr)],
            rtt_ms: bench.rtt_ms,
            parallel: 1,
            trials: bench.trials.max(1),
            ..MatrixConfig::new(bench.exe.clone(), Arc::clone(&bench.stop))
        },
        &|_, _, _| {},
    )?;
    let rtt = f64::from(bench.rtt_ms.max(1));
    let mut arms: Vec<ConnectArm> = baseline
        .cells
        .iter()
        .map(|c| ConnectArm {
            name: if c.transport == "tcp" {
                "libp2p engine TCP, relayed → direct"
            } else {
                "libp2p engine QUIC, relayed → direct"
            },
            trials: c.trials,
            ok: c.success,
            median_ms: c.median_ms,
            p95_ms: c.p95_ms,
            median_rtts: c.median_ms.map(|m| m / rtt),
        })
        .collect();
    progress("the daemon: TCP and UDP between two port-restricted homes, and a symmetric one");
    arms.extend(daemon_arms(bench)?);
    let mut report = ConnectReport {
        rtt_ms: bench.rtt_ms,
        arms,
        tcp_over_libp2p: None,
        udp_rtts: None,
        relayed_ms: None,
    };
    report.tcp_over_libp2p = report
        .median(DAEMON_TCP)
        .zip(report.median("libp2p engine TCP, relayed → direct"))
        .map(|(d, l)| d / l);
    report.udp_rtts = report.median(DAEMON_UDP).map(|m| m / rtt);
    report.relayed_ms = report.median(DAEMON_RELAYED);
    Ok(report)
}

const DAEMON_TCP: &str = "daemon TCP, connect → direct socket";
const DAEMON_UDP: &str = "daemon UDP, connect → direct socket";
const DAEMON_RELAYED: &str = "daemon TCP to symmetric → relayed";

fn daemon_arms(bench: &ConnectBench) -> Result<Vec<ConnectArm>, MatrixError> {
    let (pr, sy) = (Preset::PortRestricted, Preset::Symmetric);
    let lab = Lab::build(&topology(&[pr, sy], bench.rtt_ms), LabOptions::default())?;
    let dir = std::env::temp_dir().join(format!("natpunch-bench-connect-{}", lab.name()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| MatrixError::Worker(format!("creating {}: {e}", dir.display())))?;
    let result = measure(bench, &lab, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    bench: &ConnectBench,
    lab: &Lab,
    dir: &std::path::Path,
) -> Result<Vec<ConnectArm>, MatrixError> {
    let (pr, sy) = (Preset::PortRestricted, Preset::Symmetric);
    let exe = bench.exe.to_string_lossy().into_owned();
    let (_relay, address) = matrix::start_relay(lab, &exe, &dir.join("relay.key"))?;
    let start = |side: char, preset: Preset, name: &str| {
        connect::start_daemon(
            lab,
            &exe,
            &host(side, preset),
            &address,
            dir,
            name,
            Some(preset),
            &[],
        )
        .map_err(MatrixError::Worker)
    };
    let a = start('a', pr, "a")?;
    let b = start('b', pr, "b")?;
    let c = start('b', sy, "c")?;
    for d in [&b, &c] {
        for proto in [Proto::Tcp, Proto::Udp] {
            echo_service(d, proto)?;
        }
    }
    let rtt = f64::from(bench.rtt_ms.max(1));
    let mut client = Client::connect(&a.socket).map_err(|e| MatrixError::Worker(e.to_string()))?;
    // One connection: is it direct, and how long did it take?
    let mut once = |peer: &str, proto: Proto| -> Option<(bool, f64)> {
        if bench.stop.load(Ordering::Relaxed) {
            return None;
        }
        let asked = Instant::now();
        let conn = client.connect_peer(peer, proto, "bench", |_| {}).ok()?;
        let ms = asked.elapsed().as_secs_f64() * 1000.0;
        connect::hello(conn.socket).ok()?;
        Some((conn.direct, ms))
    };
    let mut arms = Vec::new();
    // The cold start: the first connection makes the relayed one.
    let cold = once(&b.peer, Proto::Tcp).filter(|s| s.0).map(|s| s.1);
    arms.push(arm(
        "daemon TCP, first connect (relay dial too)",
        1,
        &cold.into_iter().collect::<Vec<_>>(),
        rtt,
    ));
    for (name, peer, proto, direct) in [
        (DAEMON_TCP, &b.peer, Proto::Tcp, true),
        (DAEMON_UDP, &b.peer, Proto::Udp, true),
        (DAEMON_RELAYED, &c.peer, Proto::Tcp, false),
    ] {
        let mut times = Vec::new();
        for _ in 0..bench.trials.max(1) {
            if let Some((got_direct, ms)) = once(peer, proto)
                && got_direct == direct
            {
                times.push(ms);
            }
        }
        arms.push(arm(name, bench.trials.max(1), &times, rtt));
    }
    Ok(arms)
}

fn arm(name: &'static str, trials: u32, times: &[f64], rtt: f64) -> ConnectArm {
    let median = quantile(times, 0.5);
    ConnectArm {
        name,
        trials,
        ok: u32::try_from(times.len()).unwrap_or(u32::MAX),
        median_ms: median,
        p95_ms: quantile(times, 0.95),
        median_rtts: median.map(|m| m / rtt),
    }
}

/// Echoes every `bench` connection of `proto` to daemon `d`, for as long as the process runs.
fn echo_service(d: &StartedDaemon, proto: Proto) -> Result<(), MatrixError> {
    let mut listener = Client::connect(&d.socket)
        .and_then(|c| c.listen("bench", proto))
        .map_err(|e| MatrixError::Worker(e.to_string()))?;
    std::thread::spawn(move || {
        while let Ok(conn) = listener.accept() {
            std::thread::spawn(move || {
                let _ = connect::echo(conn.socket);
            });
        }
    });
    Ok(())
}
