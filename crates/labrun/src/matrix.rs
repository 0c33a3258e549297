//! The NAT-pair matrix: hole punches between hosts behind every pair of NAT presets.
//!
//! Each worker builds its own lab: a relay and an RFC 5780 STUN server (`natpunch stun-server`
//! on a node with two addresses) on the internet and, for each preset, one host
//! behind it on the dialing side (`a`) and one on the listening side (`b`), every path's outer
//! link delayed by a quarter of the host-to-host RTT each way. A trial flushes the lab's NAT
//! state, starts a fresh listener (new identity) behind `b`'s preset, runs one dial from behind
//! `a`'s preset, and keeps both sides' records. Workers run in parallel, one trial at a time each.
//! Every peer learns its NAT's mapping class from the STUN server at start (`--stun-server`)
//! and tells it to the other over `/natpunch/dcutr/1.1.0`.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use natlab::selftest::add_path;
use natlab::{Lab, LabError, LabOptions, LinkCondition, Preset, Topology};
use p2p::record::{Outcome, Record};
use p2p::relay::RelayEvent;
use serde::Serialize;

use crate::args::{self, named};
use crate::stats::{quantile, wilson95};

/// How long a listener may take to reserve on the relay.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the listener's record may take after the dialer's.
const LISTENER_RECORD_TIMEOUT: Duration = Duration::from_secs(40);
/// The relay's port.
const RELAY_PORT: u16 = 4001;
/// The lab node of the RFC 5780 STUN server (two addresses).
pub const STUN_NODE: &str = "stun";
/// How long the STUN server may take to start.
const STUN_START_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct MatrixConfig {
    /// The `natpunch` binary.
    pub exe: PathBuf,
    /// The presets; every ordered pair (dialer's, listener's) is a row of the matrix.
    pub presets: Vec<Preset>,
    /// Only these (dialer, listener) pairs, when not empty.
    pub pairs: Vec<(Preset, Preset)>,
    /// Transports, each its own cells: `tcp`, `quic`.
    pub transports: Vec<String>,
    /// Trials per cell.
    pub trials: u32,
    /// Host-to-host round trip through the lab's internet, in ms.
    pub rtt_ms: u32,
    /// Labs running trials at once.
    pub parallel: usize,
    /// `natpunch` or `stock`.
    pub engine: String,
    /// `observed` or `stock`.
    pub candidates: String,
    /// Each attempt's time, in ms (natpunch engine).
    pub attempt_timeout_ms: u64,
    /// The listener's engine, when it differs from `engine` (interoperability runs).
    pub listener_engine: Option<String>,
    /// The dialer's engine, when it differs from `engine`.
    pub dialer_engine: Option<String>,
    /// Both peers stay on the relayed connection (to measure the relay).
    pub no_punch: bool,
    /// After the punch, the dialer sends this many bytes and reports the throughput.
    pub perf_bytes: Option<u64>,
    /// More flags for every peer (`--session-table 128`, `--no-birthday`, …).
    pub peer_args: Vec<String>,
    /// A session table of this size (and what a new flow meets when it is full) on every
    /// router that maps per destination: the hard side of birthday probing.
    pub hard_sessions: Option<(u32, natlab::SessionOverflow)>,
    /// Set to stop: no new trial starts, the labs are removed, the report has what ran.
    pub stop: Arc<AtomicBool>,
}

impl MatrixConfig {
    /// natpunch's defaults (natpunch engine, observed candidates, 5 trials, 100 ms RTT, 4 labs,
    /// 3 s attempts) for the `exe` binary, over both transports, every pair of every preset.
    pub fn new(exe: PathBuf, stop: Arc<AtomicBool>) -> Self {
        Self {
            exe,
            presets: Preset::ALL.to_vec(),
            pairs: Vec::new(),
            transports: vec!["tcp".to_owned(), "quic".to_owned()],
            trials: 5,
            rtt_ms: 100,
            parallel: 4,
            engine: "natpunch".to_owned(),
            candidates: "observed".to_owned(),
            attempt_timeout_ms: 3000,
            listener_engine: None,
            dialer_engine: None,
            no_punch: false,
            perf_bytes: None,
            peer_args: Vec::new(),
            hard_sessions: None,
            stop,
        }
    }
}

/// One trial's result.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// The dialer's preset.
    pub a: String,
    /// The listener's preset.
    pub b: String,
    /// The transport.
    pub transport: String,
    /// The dialer's record.
    pub dialer: Option<Record>,
    /// The listener's record.
    pub listener: Option<Record>,
    /// The dialer's throughput test, if it ran one (`natpunch peer dial --perf-bytes`).
    pub throughput: Option<serde_json::Value>,
    /// What went wrong outside the hole punch (a role that did not start, a missing record).
    pub error: Option<String>,
    /// The trial's wall-clock time, ms.
    pub duration_ms: f64,
}

impl Trial {
    /// The trial's outcome: the dialer's, or the listener's when the dialer has none.
    pub fn outcome(&self) -> Outcome {
        self.dialer
            .as_ref()
            .or(self.listener.as_ref())
            .map_or(Outcome::Unknown, |r| r.outcome)
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The dialer's preset.
    pub a: String,
    /// The listener's preset.
    pub b: String,
    /// The transport.
    pub transport: String,
    /// Trials run.
    pub trials: u32,
    /// Trials that ended with a direct connection.
    pub success: u32,
    /// The success rate's 95% Wilson interval.
    pub success_ci95: (f64, f64),
    /// Outcomes on the dialing side.
    pub outcomes: BTreeMap<String, u32>,
    /// Outcomes on the listening side.
    pub listener_outcomes: BTreeMap<String, u32>,
    /// Median time to direct (dialer), ms.
    pub median_ms: Option<f64>,
    /// 95th percentile time to direct (dialer), ms.
    pub p95_ms: Option<f64>,
    /// Which attempt succeeded: attempt number → count.
    pub attempts_needed: BTreeMap<u32, u32>,
    /// Median time until a failed hole punch was declared failed (dialer), ms.
    pub median_fail_ms: Option<f64>,
    /// Trials where both records are complete.
    pub complete_records: u32,
    /// Successful trials that left exactly one direct connection on both sides.
    pub one_direct_connection: u32,
    /// Successful trials whose direct connection came through a pair birthday probing found.
    pub birthday_direct: u32,
    /// Successful trials in which a probe hit the window port prediction gave (its first
    /// probes open the easy side's filter for the hard side's own next mapping, so the
    /// simultaneous dial may be what connects).
    pub predicted_hits: u32,
    /// Median probes the easy side sent in the trials that probed.
    pub probes_median: Option<f64>,
    /// The most probes the easy side sent in a trial.
    pub probes_max: Option<u32>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixReport {
    /// Cells, in preset order.
    pub cells: Vec<Cell>,
    /// Every trial.
    #[serde(skip)]
    pub trials: Vec<Trial>,
    /// The conditions, to repeat the run.
    pub conditions: Conditions,
    /// Stopped before every trial ran.
    pub interrupted: bool,
}

/// The conditions of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Conditions {
    /// Host-to-host RTT, ms.
    pub rtt_ms: u32,
    /// Trials per cell.
    pub trials: u32,
    /// Engine.
    pub engine: String,
    /// Candidate source.
    pub candidates: String,
    /// Attempt timeout, ms.
    pub attempt_timeout_ms: u64,
    /// The session table of the routers that map per destination, if bounded (`128 drop`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard_sessions: Option<String>,
    /// The flags every peer got beyond the matrix's own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_args: Vec<String>,
    /// natpunch's version.
    pub version: String,
    /// Wall-clock time of the run, s.
    pub elapsed_secs: f64,
}

/// The matrix as a table, one row per cell, under the conditions it was measured in.
impl std::fmt::Display for MatrixReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.conditions;
        if self.interrupted {
            writeln!(
                f,
                "interrupted: the cells below hold only the trials that ran"
            )?;
        }
        writeln!(
            f,
            "NAT-pair matrix: {} trials per cell, {} ms host-to-host RTT, engine {}, candidates \
             {}, {:.0} s",
            c.trials, c.rtt_ms, c.engine, c.candidates, c.elapsed_secs
        )?;
        if let Some(table) = &c.hard_sessions {
            writeln!(
                f,
                "session table of the routers that map per destination: {table}"
            )?;
        }
        if !c.peer_args.is_empty() {
            writeln!(f, "every peer with: {}", c.peer_args.join(" "))?;
        }
        writeln!(
            f,
            "{:<16} {:<16} {:<5} {:>7} {:>13} {:>8} {:>8} {:>9} {:>9}  outcomes",
            "dialer (A)",
            "listener (B)",
            "tr",
            "success",
            "95% CI",
            "median",
            "p95",
            "attempts",
            "fail at"
        )?;
        for cell in &self.cells {
            writeln!(f, "{cell}")?;
        }
        Ok(())
    }
}

/// One row of the matrix's table.
impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |m| format!("{m:.0} ms"));
        let attempts: Vec<String> = self
            .attempts_needed
            .iter()
            .map(|(n, k)| format!("{n}:{k}"))
            .collect();
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(o, k)| format!("{o} {k}"))
            .collect();
        write!(
            f,
            "{:<16} {:<16} {:<5} {:>3}/{:<3} {:>13} {:>8} {:>8} {:>9} {:>9}  {}",
            self.a,
            self.b,
            self.transport,
            self.success,
            self.trials,
            format!(
                "{:.0}–{:.0}%",
                self.success_ci95.0 * 100.0,
                self.success_ci95.1 * 100.0
            ),
            ms(self.median_ms),
            ms(self.p95_ms),
            if attempts.is_empty() {
                "-".to_owned()
            } else {
                attempts.join(",")
            },
            ms(self.median_fail_ms),
            outcomes.join(", ")
        )?;
        if let (Some(median), Some(max)) = (self.probes_median, self.probes_max) {
            write!(
                f,
                "; birthday: {} direct, {} hit the predicted window, probes median {median:.0}, \
                 max {max}",
                self.birthday_direct, self.predicted_hits
            )?;
        }
        Ok(())
    }
}

/// Why the matrix could not run.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// A lab could not be built.
    #[error("building a lab")]
    Lab(#[from] LabError),
    /// The relay did not start.
    #[error("the relay did not start: {0}")]
    Relay(String),
    /// The STUN server did not start.
    #[error("the STUN server did not start: {0}")]
    Stun(String),
    /// A worker died.
    #[error("a worker stopped: {0}")]
    Worker(String),
}

fn code(p: Preset) -> &'static str {
    match p {
        Preset::Open => "op",
        Preset::FullCone => "fc",
        Preset::RestrictedCone => "rc",
        Preset::PortRestricted => "pr",
        Preset::Symmetric => "sy",
        Preset::SymmetricSequential => "sq",
        Preset::Cgnat => "cg",
    }
}

/// The host behind `preset` on `side` (`a` or `b`).
pub fn host(side: char, preset: Preset) -> String {
    format!("h{side}-{}", code(preset))
}

/// The matrix lab: a relay, and a host behind each preset on each side.
pub fn topology(presets: &[Preset], rtt_ms: u32) -> Topology {
    let delay = LinkCondition {
        delay_ms: rtt_ms / 4,
        jitter_ms: 0,
        loss_pct: 0.0,
    };
    let mut t = Topology::default().host("relay", None, 1);
    for side in ['a', 'b'] {
        for &p in presets {
            let outer = format!("r{side}-{}", code(p));
            let (with_path, upstream) = add_path(t, p, |i| {
                if i == 0 {
                    outer.clone()
                } else {
                    format!("{outer}{i}")
                }
            });
            t = with_path;
            if upstream.is_some() && delay.is_impaired() {
                t = t.link(&outer, delay);
            }
            let h = host(side, p);
            t = t.host(&h, upstream.as_deref(), 1);
            if upstream.is_none() && delay.is_impaired() {
                t = t.link(&h, delay);
            }
        }
    }
    t
}

#[derive(Debug, Clone)]
struct Job {
    a: Preset,
    b: Preset,
    transport: String,
}

/// Runs the matrix; `progress` hears every finished trial (and how many are left).
pub fn run(
    config: &MatrixConfig,
    progress: &(dyn Fn(&Trial, usize, usize) + Sync),
) -> Result<MatrixReport, MatrixError> {
    let started = Instant::now();
    let mut jobs = VecDeque::new();
    let pairs = pairs(config);
    for _ in 0..config.trials {
        for &(a, b) in &pairs {
            {
                for t in &config.transports {
                    jobs.push_back(Job {
                        a,
                        b,
                        transport: t.clone(),
                    });
                }
            }
        }
    }
    let total = jobs.len();
    let jobs = Arc::new(Mutex::new(jobs));
    let (tx, rx) = mpsc::channel::<Result<Trial, MatrixError>>();
    let workers = config.parallel.clamp(1, total.max(1));
    let mut trials = Vec::with_capacity(total);
    let mut first_error = None;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let jobs = Arc::clone(&jobs);
            let tx = tx.clone();
            scope.spawn(move || {
                if let Err(e) = worker(config, &jobs, &tx) {
                    let _ = tx.send(Err(e));
                }
            });
        }
        drop(tx);
        for result in rx {
            match result {
                Ok(trial) => {
                    trials.push(trial);
                    if let Some(last) = trials.last() {
                        progress(last, trials.len(), total);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    if trials.len() < total
        && let Some(e) = first_error
    {
        return Err(e);
    }
    let cells = cells(config, &trials);
    Ok(MatrixReport {
        interrupted: trials.len() < total,
        cells,
        trials,
        conditions: Conditions {
            rtt_ms: config.rtt_ms,
            trials: config.trials,
            engine: config.engine.clone(),
            candidates: config.candidates.clone(),
            attempt_timeout_ms: config.attempt_timeout_ms,
            hard_sessions: config
                .hard_sessions
                .map(|(max, overflow)| format!("{max} {overflow}")),
            peer_args: config.peer_args.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            elapsed_secs: started.elapsed().as_secs_f64(),
        },
    })
}

fn worker(
    config: &MatrixConfig,
    jobs: &Mutex<VecDeque<Job>>,
    tx: &mpsc::Sender<Result<Trial, MatrixError>>,
) -> Result<(), MatrixError> {
    let mut presets = config.presets.clone();
    for &(a, b) in &config.pairs {
        for p in [a, b] {
            if !presets.contains(&p) {
                presets.push(p);
            }
        }
    }
    let mut t = topology(&presets, config.rtt_ms).host(STUN_NODE, None, 2);
    if let Some((max, overflow)) = config.hard_sessions {
        crate::connect::bound_hard_routers(&mut t, max, overflow);
    }
    let lab = Lab::build(&t, LabOptions::default())?;
    let exe = config.exe.to_string_lossy().into_owned();
    let key = std::env::temp_dir().join(format!("natpunch-matrix-{}.key", lab.name()));
    let result = serve(config, jobs, tx, &lab, &exe, &key);
    let _ = std::fs::remove_file(&key);
    result
}

fn serve(
    config: &MatrixConfig,
    jobs: &Mutex<VecDeque<Job>>,
    tx: &mpsc::Sender<Result<Trial, MatrixError>>,
    lab: &Lab,
    exe: &str,
    key: &std::path::Path,
) -> Result<(), MatrixError> {
    let (_relay, address) = start_relay(lab, exe, key)?;
    let (_stun, stun) = start_stun(lab, exe).map_err(MatrixError::Stun)?;
    loop {
        if config.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let job = match jobs.lock() {
            Ok(mut q) => q.pop_front(),
            Err(_) => return Err(MatrixError::Worker("the job queue is poisoned".into())),
        };
        let Some(job) = job else {
            return Ok(());
        };
        let trial = run_trial(lab, config, exe, &address, stun, &job);
        if tx.send(Ok(trial)).is_err() {
            return Ok(());
        }
    }
}

/// Starts `natpunch relay` (as [`args::relay`] has it) on the lab's node `relay` with its key
/// in `key`; the relay, and its address once it announces one.
///
/// # Errors
///
/// The relay did not start or announce an address.
pub fn start_relay(
    lab: &Lab,
    exe: &str,
    key: &std::path::Path,
) -> Result<(natlab::LabProcess, String), MatrixError> {
    let args = args::relay(key.to_owned(), RELAY_PORT, None).map_err(MatrixError::Relay)?;
    let relay = lab
        .spawn("relay", exe, &args)
        .map_err(|e| MatrixError::Relay(natlab::chain(&e).to_string()))?;
    let line = relay
        .wait_for("\"event\":\"external-address\"", Duration::from_secs(20))
        .map_err(|e| MatrixError::Relay(natlab::chain(&e).to_string()))?;
    let Ok(RelayEvent::ExternalAddress { address }) = serde_json::from_str(&line) else {
        return Err(MatrixError::Relay(format!("unexpected line: {line}")));
    };
    Ok((relay, address))
}

/// Starts `natpunch stun-server` on the lab's node [`STUN_NODE`] (which needs two addresses:
/// RFC 5780 answers from the other one); the server, and its primary address.
///
/// # Errors
///
/// The node lacks two addresses, or the server did not start.
pub fn start_stun(lab: &Lab, exe: &str) -> Result<(natlab::LabProcess, SocketAddr), String> {
    let addrs = lab
        .node(STUN_NODE)
        .map_err(|e| natlab::chain(&e).to_string())?
        .uplink
        .addrs
        .clone();
    let [a, b, ..] = addrs.as_slice() else {
        return Err(format!("the node {STUN_NODE} lacks two addresses"));
    };
    let stun = args::StunServerArgs {
        primary: SocketAddr::new((*a).into(), 3478),
        alternate: SocketAddr::new((*b).into(), 3479),
    };
    let primary = stun.primary;
    let server = lab
        .spawn(
            STUN_NODE,
            exe,
            &cli::write::to_args(&["stun-server"], &stun),
        )
        .map_err(|e| natlab::chain(&e).to_string())?;
    server
        .wait_for("listening on", STUN_START_TIMEOUT)
        .map_err(|e| natlab::chain(&e).to_string())?;
    Ok((server, primary))
}

fn run_trial(
    lab: &Lab,
    config: &MatrixConfig,
    exe: &str,
    relay: &str,
    stun: SocketAddr,
    job: &Job,
) -> Trial {
    let started = Instant::now();
    let mut trial = Trial {
        a: job.a.name().to_owned(),
        b: job.b.name().to_owned(),
        transport: job.transport.clone(),
        dialer: None,
        listener: None,
        throughput: None,
        error: None,
        duration_ms: 0.0,
    };
    let result = (|| -> Result<(), String> {
        let text = |e: LabError| natlab::chain(&e).to_string();
        lab.flush_nat_state().map_err(text)?;
        let peer = |engine: &Option<String>| -> Result<args::PeerArgs, String> {
            let mut p = args::peer(relay)?;
            p.transport = named(&job.transport)?;
            p.engine = named(engine.as_ref().unwrap_or(&config.engine))?;
            p.candidates = named(&config.candidates)?;
            p.attempt_timeout_ms = config.attempt_timeout_ms;
            p.no_punch = config.no_punch;
            p.stun_server = Some(stun);
            Ok(p)
        };
        let args = cli::write::replace_flags::<cli::peer::Common>(
            args::listen(&peer(&config.listener_engine)?),
            &config.peer_args,
        )?;
        let listener = lab.spawn(&host('b', job.b), exe, &args).map_err(text)?;
        let reserved = listener
            .wait_for("\"event\":\"reserved\"", RESERVE_TIMEOUT)
            .map_err(|e| format!("the listener did not reserve: {}", natlab::chain(&e)))?;
        let peer_id =
            args::reserved_peer(&reserved).ok_or_else(|| format!("unexpected line: {reserved}"))?;
        let mut cmd = lab.command(&host('a', job.a), exe).map_err(text)?;
        let dialer = peer(&config.dialer_engine)?;
        cmd.args(cli::write::replace_flags::<cli::peer::Common>(
            args::dial(&peer_id, dialer, config.perf_bytes)?,
            &config.peer_args,
        )?);
        let out = cmd
            .output()
            .map_err(|e| format!("running the dialer: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        trial.dialer = record_in(&stdout);
        trial.throughput = stdout
            .lines()
            .filter(|l| l.contains("\"event\":\"throughput\""))
            .find_map(|l| serde_json::from_str(l).ok());
        let line = listener.wait_for("\"event\":\"hole-punch\"", LISTENER_RECORD_TIMEOUT);
        trial.listener = line.ok().as_deref().and_then(record_in);
        if trial.dialer.is_none() {
            return Err(format!(
                "the dialer left no record: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if trial.listener.is_none() {
            return Err("the listener left no record".into());
        }
        Ok(())
    })();
    trial.error = result.err();
    trial.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    trial
}

/// The hole-punch record among JSON lines.
fn record_in(text: &str) -> Option<Record> {
    text.lines()
        .filter(|l| l.contains("\"event\":\"hole-punch\""))
        .find_map(|l| serde_json::from_str(l).ok())
}

/// The (dialer, listener) pairs to run.
fn pairs(config: &MatrixConfig) -> Vec<(Preset, Preset)> {
    pairs_of(&config.presets, &config.pairs)
}

/// `pairs`, or when it is empty every ordered pair of `presets`.
pub(crate) fn pairs_of(presets: &[Preset], pairs: &[(Preset, Preset)]) -> Vec<(Preset, Preset)> {
    if !pairs.is_empty() {
        return pairs.to_vec();
    }
    let mut out = Vec::new();
    for &a in presets {
        for &b in presets {
            out.push((a, b));
        }
    }
    out
}

fn cells(config: &MatrixConfig, trials: &[Trial]) -> Vec<Cell> {
    let mut out = Vec::new();
    for (a, b) in pairs(config) {
        {
            for t in &config.transports {
                let these: Vec<&Trial> = trials
                    .iter()
                    .filter(|x| x.a == a.name() && x.b == b.name() && &x.transport == t)
                    .collect();
                out.push(cell(a, b, t, &these));
            }
        }
    }
    out
}

fn name(o: Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "UNKNOWN".into())
}

fn cell(a: Preset, b: Preset, transport: &str, trials: &[&Trial]) -> Cell {
    let mut outcomes = BTreeMap::new();
    let mut listener_outcomes = BTreeMap::new();
    let mut attempts_needed = BTreeMap::new();
    let mut times = Vec::new();
    let mut fail_times = Vec::new();
    let mut success = 0;
    let mut complete = 0;
    let mut one = 0;
    let mut birthday_direct = 0;
    let mut predicted_hits = 0;
    let mut probes = Vec::new();
    for t in trials {
        // The easy side's record counts the probes it sent.
        let easy = [&t.dialer, &t.listener]
            .into_iter()
            .flatten()
            .flat_map(|r| &r.attempts)
            .filter_map(|a| a.birthday.as_ref())
            .filter(|b| b.role == p2p::record::BirthdayRole::Easy);
        probes.extend(easy.filter_map(|b| b.probes));
        *outcomes.entry(name(t.outcome())).or_insert(0) += 1;
        if let Some(l) = &t.listener {
            *listener_outcomes.entry(name(l.outcome)).or_insert(0) += 1;
        }
        let both = t.dialer.as_ref().zip(t.listener.as_ref());
        if both.is_some_and(|(d, l)| d.is_complete() && l.is_complete()) {
            complete += 1;
        }
        let Some(d) = &t.dialer else { continue };
        match d.outcome {
            Outcome::Success | Outcome::ConnectionReversed => {
                success += 1;
                times.extend(d.time_to_direct_ms);
                let n = d
                    .attempts
                    .iter()
                    .find(|x| x.outcome == p2p::record::AttemptOutcome::Success)
                    .map_or(0, |x| x.number);
                *attempts_needed.entry(n).or_insert(0) += 1;
                if both.is_some_and(|(d, l)| d.direct_connections == 1 && l.direct_connections == 1)
                {
                    one += 1;
                }
                let probed: Vec<_> = [&t.dialer, &t.listener]
                    .into_iter()
                    .flatten()
                    .flat_map(|r| &r.attempts)
                    .filter_map(|a| a.birthday.as_ref())
                    .collect();
                birthday_direct += u32::from(probed.iter().any(|b| b.direct));
                predicted_hits += u32::from(probed.iter().any(|b| b.in_window));
            }
            _ => fail_times.push(d.ended_ms),
        }
    }
    let n = u32::try_from(trials.len()).unwrap_or(u32::MAX);
    Cell {
        a: a.name().to_owned(),
        b: b.name().to_owned(),
        transport: transport.to_owned(),
        trials: n,
        success,
        success_ci95: wilson95(success, n),
        outcomes,
        listener_outcomes,
        median_ms: quantile(&times, 0.5),
        p95_ms: quantile(&times, 0.95),
        attempts_needed,
        median_fail_ms: quantile(&fail_times, 0.5),
        complete_records: complete,
        one_direct_connection: one,
        birthday_direct,
        predicted_hits,
        probes_median: quantile(
            &probes.iter().map(|p| f64::from(*p)).collect::<Vec<_>>(),
            0.5,
        ),
        probes_max: probes.iter().copied().max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_lab_has_each_preset_on_both_sides_with_the_outer_link_delayed() {
        let t = topology(&[Preset::Open, Preset::Cgnat], 100);
        let plan = t.plan("m").expect("plan");
        let upstream = |n: &str| plan.node(n).and_then(|x| x.upstream.clone());
        for side in ['a', 'b'] {
            assert_eq!(upstream(&host(side, Preset::Open)), None, "open is public");
            assert_eq!(
                upstream(&host(side, Preset::Cgnat)),
                Some(format!("r{side}-cg1")),
                "a home router behind the carrier"
            );
            assert_eq!(
                upstream(&format!("r{side}-cg1")),
                Some(format!("r{side}-cg"))
            );
            for delayed in [host(side, Preset::Open), format!("r{side}-cg")] {
                assert_eq!(
                    plan.node(&delayed).map(|n| n.link.delay_ms),
                    Some(25),
                    "{delayed}: a quarter of the RTT each way"
                );
            }
            assert_eq!(
                plan.node(&format!("r{side}-cg1")).map(|n| n.link.delay_ms),
                Some(0)
            );
        }
        assert!(plan.node("relay").is_some());
    }
}
