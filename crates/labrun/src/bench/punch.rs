//! Time to direct between two port-restricted homes, natpunch's engine against stock
//! rust-libp2p, each as a ratio to the floor; and relayed against direct throughput.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use crate::matrix::{self, MatrixConfig, MatrixError};
use crate::stats::quantile;

/// What to run.
#[derive(Debug, Clone)]
pub struct PunchBench {
    /// The `natpunch` binary.
    pub exe: std::path::PathBuf,
    /// Hole punches per engine and transport.
    pub trials: u32,
    /// Host-to-host round trip through the lab's internet, in ms.
    pub rtt_ms: u32,
    /// MiB sent per throughput test.
    pub perf_mib: u64,
    /// Throughput tests per connection kind (0: none).
    pub perf_trials: u32,
    /// Set to stop: no new trial starts.
    pub stop: Arc<AtomicBool>,
}

/// How far the benchmark is.
#[derive(Debug, Clone, Copy)]
pub enum PunchProgress<'a> {
    /// An engine's trials start.
    Engine {
        /// `natpunch` or `stock`.
        engine: &'a str,
        /// Trials per transport.
        trials: u32,
    },
    /// A trial ended.
    Trial {
        /// Trials done.
        done: usize,
        /// Trials in all.
        total: usize,
    },
    /// An engine's trials are done.
    EngineDone,
    /// The throughput tests start.
    Throughput {
        /// MiB per test.
        mib: u64,
    },
}

/// One engine's figures on one transport.
#[derive(Debug, Clone, Serialize)]
pub struct PunchArm {
    /// `natpunch` or `stock`.
    pub engine: &'static str,
    /// `tcp` or `quic`.
    pub transport: String,
    /// Trials run.
    pub trials: u32,
    /// Trials that ended direct.
    pub success: u32,
    /// Median time to direct, ms.
    pub median_ms: Option<f64>,
    /// 95th percentile of time to direct, ms.
    pub p95_ms: Option<f64>,
    /// The median in host-to-host RTTs.
    pub median_rtts: Option<f64>,
    /// The median over the floor.
    pub ratio_to_floor: Option<f64>,
}

/// Median throughput of one connection kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rate {
    /// Median, Mbit/s (`None`: no test ran to the end).
    pub median_mbit_s: Option<f64>,
    /// Tests behind the median.
    pub n: usize,
}

/// The benchmark's figures.
#[derive(Debug, Clone)]
pub struct PunchReport {
    /// Host-to-host RTT, ms.
    pub rtt_ms: u32,
    /// Each engine on each transport.
    pub arms: Vec<PunchArm>,
    /// MiB per throughput test.
    pub perf_mib: u64,
    /// Throughput tests per connection kind (0: none ran).
    pub perf_trials: u32,
    /// Over the direct connection.
    pub direct: Rate,
    /// Over the relay's circuit.
    pub relayed: Rate,
}

/// The floor of time to direct, in RTTs (MEASUREMENT.md): 1.5 relayed RTTs of signalling plus
/// the transport's handshake (QUIC 1 RTT, TCP + Noise about 2).
pub fn floor_rtts(transport: &str) -> f64 {
    if transport == "quic" { 2.5 } else { 3.5 }
}

impl PunchReport {
    /// natpunch's median time to direct over stock's on `transport`.
    pub fn natpunch_over_stock(&self, transport: &str) -> Option<f64> {
        let median = |engine: &str| {
            self.arms
                .iter()
                .find(|a| a.engine == engine && a.transport == transport)
                .and_then(|a| a.median_ms)
        };
        median("natpunch").zip(median("stock")).map(|(n, s)| n / s)
    }

    /// Relayed throughput over direct.
    pub fn relayed_over_direct(&self) -> Option<f64> {
        self.relayed
            .median_mbit_s
            .zip(self.direct.median_mbit_s)
            .map(|(r, d)| r / d)
    }

    /// The figures as `natpunch bench punch --json` prints them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rtt_ms": self.rtt_ms,
            "arms": self.arms,
            "natpunch_over_stock": {
                "tcp": self.natpunch_over_stock("tcp"),
                "quic": self.natpunch_over_stock("quic"),
            },
            "throughput_mbit_s": {
                "mib": self.perf_mib,
                "direct": self.direct.median_mbit_s, "direct_n": self.direct.n,
                "relayed": self.relayed.median_mbit_s, "relayed_n": self.relayed.n,
                "relayed_over_direct": self.relayed_over_direct(),
            },
        })
    }
}

/// `v` with `d` decimals, or `-`.
pub(crate) fn figure(v: Option<f64>, d: usize) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.d$}"))
}

/// The figures as a table, the ratios below it.
impl fmt::Display for PunchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "time to direct, port-restricted × port-restricted, {} ms host-to-host RTT",
            self.rtt_ms
        )?;
        writeln!(
            f,
            "{:<9} {:<5} {:>8} {:>9} {:>9} {:>7} {:>8}",
            "engine", "tr", "success", "median", "p95", "RTTs", "/floor"
        )?;
        for a in &self.arms {
            writeln!(
                f,
                "{:<9} {:<5} {:>4}/{:<3} {:>6} ms {:>6} ms {:>7} {:>8}",
                a.engine,
                a.transport,
                a.success,
                a.trials,
                figure(a.median_ms, 0),
                figure(a.p95_ms, 0),
                figure(a.median_rtts, 2),
                figure(a.ratio_to_floor, 2)
            )?;
        }
        for t in ["tcp", "quic"] {
            writeln!(
                f,
                "natpunch / stock, {t}: {} (floor {} RTT)",
                figure(self.natpunch_over_stock(t), 2),
                floor_rtts(t)
            )?;
        }
        if self.perf_trials > 0 {
            writeln!(
                f,
                "throughput ({} MiB over TCP, median): direct {} Mbit/s (n={}), relayed {} \
                 Mbit/s (n={}), relayed / direct {}",
                self.perf_mib,
                figure(self.direct.median_mbit_s, 1),
                self.direct.n,
                figure(self.relayed.median_mbit_s, 1),
                self.relayed.n,
                figure(self.relayed_over_direct(), 2)
            )?;
        }
        Ok(())
    }
}

/// Two port-restricted homes, one trial at a time, so that arms measured in turn get the same
/// machine.
fn port_restricted_pair(bench: &PunchBench) -> MatrixConfig {
    let pr = natlab::Preset::PortRestricted;
    MatrixConfig {
        presets: Vec::new(),
        pairs: vec![(pr, pr)],
        rtt_ms: bench.rtt_ms,
        parallel: 1,
        ..MatrixConfig::new(bench.exe.clone(), Arc::clone(&bench.stop))
    }
}

/// Median throughput of the perf trials between two port-restricted homes, relayed or direct.
fn throughput(bench: &PunchBench, relayed: bool) -> Result<Rate, MatrixError> {
    let config = MatrixConfig {
        transports: vec!["tcp".into()],
        trials: bench.perf_trials,
        perf_bytes: Some(bench.perf_mib.max(1) << 20),
        no_punch: relayed,
        ..port_restricted_pair(bench)
    };
    let report = matrix::run(&config, &|_, _, _| {})?;
    let rates: Vec<f64> = report
        .trials
        .iter()
        .filter_map(|t| t.throughput.as_ref())
        .filter(|v| v["connection"] == if relayed { "relayed" } else { "direct" })
        .filter_map(|v| v["mbit_s"].as_f64())
        .collect();
    Ok(Rate {
        median_mbit_s: quantile(&rates, 0.5),
        n: rates.len(),
    })
}

/// Runs the benchmark: both engines on both transports, then the throughput tests.
pub fn run(
    bench: &PunchBench,
    progress: &(dyn Fn(PunchProgress<'_>) + Sync),
) -> Result<PunchReport, MatrixError> {
    let mut arms = Vec::new();
    for (engine, candidates) in [("natpunch", "observed"), ("stock", "stock")] {
        progress(PunchProgress::Engine {
            engine,
            trials: bench.trials,
        });
        let config = MatrixConfig {
            trials: bench.trials.max(1),
            engine: engine.into(),
            candidates: candidates.into(),
            ..port_restricted_pair(bench)
        };
        let report = matrix::run(&config, &|_, done, total| {
            progress(PunchProgress::Trial { done, total });
        })?;
        progress(PunchProgress::EngineDone);
        for cell in report.cells {
            let rtt = f64::from(bench.rtt_ms.max(1));
            let floor = floor_rtts(&cell.transport);
            arms.push(PunchArm {
                engine,
                median_rtts: cell.median_ms.map(|m| m / rtt),
                ratio_to_floor: cell.median_ms.map(|m| m / rtt / floor),
                transport: cell.transport,
                trials: cell.trials,
                success: cell.success,
                median_ms: cell.median_ms,
                p95_ms: cell.p95_ms,
            });
        }
    }
    let (direct, relayed) = if bench.perf_trials > 0 {
        progress(PunchProgress::Throughput {
            mib: bench.perf_mib,
        });
        (throughput(bench, false)?, throughput(bench, true)?)
    } else {
        (Rate::default(), Rate::default())
    };
    Ok(PunchReport {
        rtt_ms: bench.rtt_ms,
        arms,
        perf_mib: bench.perf_mib,
        perf_trials: bench.perf_trials,
        direct,
        relayed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(engine: &'static str, transport: &str, median_ms: f64) -> PunchArm {
        PunchArm {
            engine,
            transport: transport.into(),
            trials: 10,
            success: 10,
            median_ms: Some(median_ms),
            p95_ms: Some(median_ms),
            median_rtts: None,
            ratio_to_floor: None,
        }
    }

    #[test]
    fn ratios_compare_like_with_like() {
        let report = PunchReport {
            rtt_ms: 100,
            arms: vec![
                arm("natpunch", "tcp", 300.0),
                arm("stock", "tcp", 600.0),
                arm("natpunch", "quic", 250.0),
            ],
            perf_mib: 8,
            perf_trials: 3,
            direct: Rate {
                median_mbit_s: Some(100.0),
                n: 3,
            },
            relayed: Rate {
                median_mbit_s: Some(25.0),
                n: 3,
            },
        };
        assert_eq!(report.natpunch_over_stock("tcp"), Some(0.5));
        assert_eq!(report.natpunch_over_stock("quic"), None);
        assert_eq!(report.relayed_over_direct(), Some(0.25));
        let json = report.to_json();
        assert_eq!(json["throughput_mbit_s"]["relayed_over_direct"], 0.25);
        assert_eq!(json["natpunch_over_stock"]["tcp"], 0.5);
        assert_eq!(json["arms"][0]["engine"], "natpunch");
        assert_eq!(floor_rtts("quic"), 2.5);
        let text = report.to_string();
        assert!(
            text.contains("natpunch / stock, tcp: 0.50 (floor 3.5 RTT)"),
            "{text}"
        );
        assert!(
            text.contains("natpunch / stock, quic: - (floor 2.5 RTT)"),
            "{text}"
        );
        assert!(text.contains("relayed / direct 0.25"), "{text}");
    }
}
