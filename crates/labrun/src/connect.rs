//! The connect matrix: applications connected by two daemons behind every pair of NAT presets.
//!
//! Each worker builds the matrix lab of [`crate::matrix`] (a relay, and a host behind each
//! preset on each side). A trial flushes the lab's NAT state, starts a fresh daemon (new
//! identity) on each side's host, waits for both reservations, has an application listen behind
//! `b`'s preset and one connect from behind `a`'s, and then moves 1 MiB each way through the
//! socket the application got: for TCP as a stream echoed back, for UDP as numbered datagrams
//! echoed back (a window of them in flight, each resent until its echo came), compared byte for
//! byte. The applications talk to the daemons over their API sockets with `natpunch-client`;
//! the sockets they get live in the daemons' namespaces.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use natlab::{Lab, LabProcess, Preset, SessionOverflow};
use natpunch_client::{Client, Proto, Socket};
use serde::Serialize;

use crate::matrix::{MatrixError, host, pairs_of, topology};
use crate::stats::{quantile, wilson95};

/// How long a daemon may take to reserve on the relay.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the transfer may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// The bytes moved each way.
pub const TRANSFER_BYTES: usize = 1 << 20;
/// A UDP datagram's payload (after its 4-byte sequence number).
const CHUNK: usize = 1024;
/// Datagrams in flight.
const WINDOW: usize = 64;
/// The first bytes of a daemon's probe datagram, which applications drop.
const PROBE_MAGIC: &[u8] = b"NPPUNCH1";

/// What to run.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// The `natpunch` binary.
    pub exe: PathBuf,
    /// The presets; every ordered pair (connecting side's, listening side's) is a row.
    pub presets: Vec<Preset>,
    /// Only these pairs, when not empty.
    pub pairs: Vec<(Preset, Preset)>,
    /// Transports, each its own cells.
    pub protos: Vec<Proto>,
    /// Trials per cell.
    pub trials: u32,
    /// Host-to-host round trip, ms.
    pub rtt_ms: u32,
    /// Labs running trials at once.
    pub parallel: usize,
    /// Tell each daemon its NAT's behaviour (as `natpunch nat check` would find it), so that
    /// pairs that cannot punch go to the relay at once.
    pub tell_nat: bool,
    /// More flags for every daemon (`--session-table 128`, `--no-birthday`, …).
    pub daemon_args: Vec<String>,
    /// A session table of this size (and what a new flow meets when it is full) on every
    /// router that maps per destination: the hard side of birthday probing.
    pub hard_sessions: Option<(u32, SessionOverflow)>,
    /// Set to stop: no new trial starts.
    pub stop: Arc<AtomicBool>,
}

impl ConnectConfig {
    /// Every pair of every preset, TCP and UDP, 3 trials, 100 ms RTT, 2 labs, NATs told.
    pub fn new(exe: PathBuf, stop: Arc<AtomicBool>) -> Self {
        Self {
            exe,
            presets: Preset::ALL.to_vec(),
            pairs: Vec::new(),
            protos: vec![Proto::Tcp, Proto::Udp],
            trials: 3,
            rtt_ms: 100,
            parallel: 2,
            tell_nat: true,
            daemon_args: Vec::new(),
            hard_sessions: None,
            stop,
        }
    }
}

/// One trial.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectTrial {
    /// The connecting side's preset.
    pub a: String,
    /// The listening side's preset.
    pub b: String,
    /// The transport.
    pub proto: String,
    /// The technique whose socket the application got.
    pub technique: Option<String>,
    /// Whether the socket was direct.
    pub direct: bool,
    /// From `connect` to the socket, ms.
    pub time_to_socket_ms: Option<f64>,
    /// 1 MiB went each way, byte-exact.
    pub transfer_ok: bool,
    /// The transfer's time, ms.
    pub transfer_ms: Option<f64>,
    /// What birthday probing or port prediction did, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub birthday: Option<TrialBirthday>,
    /// What went wrong.
    pub error: Option<String>,
}

/// Birthday probing in one trial, from both daemons' connection records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrialBirthday {
    /// Probes the easy side sent.
    pub probes: Option<u64>,
    /// Sockets the hard side opened.
    pub sockets: Option<u64>,
    /// The easy side probed a predicted window first.
    pub predicted: bool,
    /// The port that answered was in it.
    pub predicted_hit: bool,
}

impl TrialBirthday {
    /// What the daemons' connection records (their JSON `connection` events) say, if either
    /// ran birthday probing.
    pub fn from_records<'a>(
        records: impl IntoIterator<Item = &'a serde_json::Value>,
    ) -> Option<Self> {
        let mut out: Option<Self> = None;
        for r in records {
            let b = &r["birthday"];
            if !b.is_object() {
                continue;
            }
            let o = out.get_or_insert_with(Self::default);
            match b["role"].as_str() {
                Some("easy") => {
                    o.probes = b["probes"].as_u64();
                    o.predicted = b["predicted"].as_bool().unwrap_or(false);
                    o.predicted_hit = b["predicted_hit"].as_bool().unwrap_or(false);
                }
                Some("hard") => o.sockets = b["sockets"].as_u64(),
                _ => {}
            }
        }
        out
    }
}

/// One cell.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectCell {
    /// The connecting side's preset.
    pub a: String,
    /// The listening side's preset.
    pub b: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// Trials run.
    pub trials: u32,
    /// Trials where the application got a socket that carried 1 MiB each way byte-exact.
    pub sockets: u32,
    /// Of those, direct ones.
    pub direct: u32,
    /// The 95% (Wilson) interval of the direct share, in percent.
    pub direct_ci: (f64, f64),
    /// Median probes of the trials that ran birthday probing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes_median: Option<f64>,
    /// The most probes one trial sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes_max: Option<u64>,
    /// The most sockets a hard side opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockets_max: Option<u64>,
    /// Trials whose direct socket came from the predicted window.
    pub predicted_hits: u32,
    /// Winning technique → trials.
    pub techniques: BTreeMap<String, u32>,
    /// Median time to socket, ms.
    pub median_ms: Option<f64>,
    /// 95th percentile time to socket, ms.
    pub p95_ms: Option<f64>,
    /// The errors, distinct.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// Cells, in preset order.
    pub cells: Vec<ConnectCell>,
    /// Every trial.
    pub trials: Vec<ConnectTrial>,
    /// Host-to-host RTT, ms.
    pub rtt_ms: u32,
    /// The session table of the routers that map per destination, if bounded (`128 drop`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard_sessions: Option<String>,
    /// Wall-clock time, s.
    pub elapsed_secs: f64,
    /// Stopped before every trial ran.
    pub interrupted: bool,
}

impl std::fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.interrupted {
            writeln!(
                f,
                "interrupted: the cells below hold only the trials that ran"
            )?;
        }
        writeln!(
            f,
            "connect matrix: {} ms host-to-host RTT, 1 MiB each way per trial, {:.0} s",
            self.rtt_ms, self.elapsed_secs
        )?;
        if let Some(table) = &self.hard_sessions {
            writeln!(
                f,
                "session table of the routers that map per destination: {table}"
            )?;
        }
        writeln!(
            f,
            "{:<20} {:<20} {:<5} {:>8} {:>8} {:>9} {:>9} {:>9} {:>14}  techniques",
            "connects (A)",
            "listens (B)",
            "proto",
            "sockets",
            "direct",
            "95% CI",
            "median",
            "p95",
            "probes med/max"
        )?;
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |m| format!("{m:.0} ms"));
        for c in &self.cells {
            let techniques: Vec<String> = c
                .techniques
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect();
            let probes = match (c.probes_median, c.probes_max) {
                (Some(m), Some(x)) => format!("{m:.0}/{x}"),
                _ => "-".to_owned(),
            };
            writeln!(
                f,
                "{:<20} {:<20} {:<5} {:>4}/{:<3} {:>4}/{:<3} {:>4.0}–{:<3.0}% {:>9} {:>9} {:>14}  {}{}",
                c.a,
                c.b,
                c.proto,
                c.sockets,
                c.trials,
                c.direct,
                c.trials,
                c.direct_ci.0,
                c.direct_ci.1,
                ms(c.median_ms),
                ms(c.p95_ms),
                probes,
                techniques.join(", "),
                if c.errors.is_empty() {
                    String::new()
                } else {
                    format!("; errors: {}", c.errors.join("; "))
                }
            )?;
        }
        Ok(())
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

#[derive(Debug, Clone, Copy)]
struct Job {
    a: Preset,
    b: Preset,
    proto: Proto,
}

/// Runs the matrix; `progress` hears every finished trial (and how many are done, of how many).
///
/// # Errors
///
/// No lab or relay could start, so no trial ran.
pub fn run(
    config: &ConnectConfig,
    progress: &(dyn Fn(&ConnectTrial, usize, usize) + Sync),
) -> Result<ConnectReport, MatrixError> {
    let started = Instant::now();
    let pairs = pairs_of(&config.presets, &config.pairs);
    let mut jobs = VecDeque::new();
    for _ in 0..config.trials {
        for &(a, b) in &pairs {
            for &proto in &config.protos {
                jobs.push_back(Job { a, b, proto });
            }
        }
    }
    let total = jobs.len();
    let jobs = Mutex::new(jobs);
    let (tx, rx) = mpsc::channel::<Result<ConnectTrial, MatrixError>>();
    let mut trials = Vec::with_capacity(total);
    let mut first_error = None;
    std::thread::scope(|scope| {
        for _ in 0..config.parallel.clamp(1, total.max(1)) {
            let tx = tx.clone();
            let jobs = &jobs;
            scope.spawn(move || {
                if let Err(e) = worker(config, jobs, &tx) {
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
    if trials.is_empty()
        && let Some(e) = first_error
    {
        return Err(e);
    }
    let mut cells = Vec::new();
    for (a, b) in pairs {
        for &proto in &config.protos {
            let these: Vec<&ConnectTrial> = trials
                .iter()
                .filter(|t| t.a == a.name() && t.b == b.name() && t.proto == proto_name(proto))
                .collect();
            cells.push(cell(a, b, proto, &these));
        }
    }
    Ok(ConnectReport {
        interrupted: trials.len() < total,
        cells,
        trials,
        rtt_ms: config.rtt_ms,
        hard_sessions: config
            .hard_sessions
            .map(|(max, overflow)| format!("{max} {overflow}")),
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

fn cell(a: Preset, b: Preset, proto: Proto, trials: &[&ConnectTrial]) -> ConnectCell {
    let mut techniques = BTreeMap::new();
    let mut times = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let (mut sockets, mut direct) = (0, 0);
    for t in trials {
        if t.transfer_ok {
            sockets += 1;
            direct += u32::from(t.direct);
        }
        if let Some(technique) = &t.technique {
            *techniques.entry(technique.clone()).or_insert(0) += 1;
        }
        times.extend(t.time_to_socket_ms);
        if let Some(e) = &t.error
            && !errors.contains(e)
        {
            errors.push(e.clone());
        }
    }
    let birthdays: Vec<&TrialBirthday> =
        trials.iter().filter_map(|t| t.birthday.as_ref()).collect();
    let probes: Vec<f64> = birthdays
        .iter()
        .filter_map(|b| b.probes)
        .map(|p| p as f64)
        .collect();
    let n = u32::try_from(trials.len()).unwrap_or(u32::MAX);
    let (low, high) = wilson95(direct, n);
    ConnectCell {
        a: a.name().to_owned(),
        b: b.name().to_owned(),
        proto: proto_name(proto).to_owned(),
        trials: n,
        sockets,
        direct,
        direct_ci: (low * 100.0, high * 100.0),
        probes_median: quantile(&probes, 0.5),
        probes_max: birthdays.iter().filter_map(|b| b.probes).max(),
        sockets_max: birthdays.iter().filter_map(|b| b.sockets).max(),
        predicted_hits: u32::try_from(
            trials
                .iter()
                .filter(|t| t.direct && t.birthday.as_ref().is_some_and(|b| b.predicted_hit))
                .count(),
        )
        .unwrap_or(u32::MAX),
        techniques,
        median_ms: quantile(&times, 0.5),
        p95_ms: quantile(&times, 0.95),
        errors,
    }
}

fn worker(
    config: &ConnectConfig,
    jobs: &Mutex<VecDeque<Job>>,
    tx: &mpsc::Sender<Result<ConnectTrial, MatrixError>>,
) -> Result<(), MatrixError> {
    let mut presets = config.presets.clone();
    for &(a, b) in &config.pairs {
        for p in [a, b] {
            if !presets.contains(&p) {
                presets.push(p);
            }
        }
    }
    let mut t = topology(&presets, config.rtt_ms);
    if let Some((max, overflow)) = config.hard_sessions {
        bound_hard_routers(&mut t, max, overflow);
    }
    let lab = Lab::build(&t, natlab::LabOptions::default())?;
    let dir = std::env::temp_dir().join(format!("natpunch-connect-{}", lab.name()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| MatrixError::Worker(format!("creating {}: {e}", dir.display())))?;
    let result = serve(config, jobs, tx, &lab, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn serve(
    config: &ConnectConfig,
    jobs: &Mutex<VecDeque<Job>>,
    tx: &mpsc::Sender<Result<ConnectTrial, MatrixError>>,
    lab: &Lab,
    dir: &std::path::Path,
) -> Result<(), MatrixError> {
    let exe = config.exe.to_string_lossy().into_owned();
    let (_relay, address) = crate::matrix::start_relay(lab, &exe, &dir.join("relay.key"))?;
    let mut n = 0u64;
    loop {
        if config.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(job) = jobs
            .lock()
            .map_err(|_| MatrixError::Worker("the job queue is poisoned".into()))?
            .pop_front()
        else {
            return Ok(());
        };
        n += 1;
        let trial = run_trial(lab, config, &exe, &address, dir, n, job);
        if tx.send(Ok(trial)).is_err() {
            return Ok(());
        }
    }
}

/// A daemon started in a lab, with its API socket and peer ID; it stops when dropped.
pub(crate) struct StartedDaemon {
    process: LabProcess,
    pub(crate) socket: PathBuf,
    pub(crate) peer: String,
}

impl StartedDaemon {
    /// The daemon's record of its connection (its first `connection` event), once it wrote it.
    fn record(&self) -> serde_json::Value {
        self.process
            .wait_for("\"event\":\"connection\"", Duration::from_secs(2))
            .ok()
            .and_then(|line| serde_json::from_str(&line).ok())
            .unwrap_or_default()
    }
}

/// Starts a daemon with a fresh identity on `node`, its key and socket named `name` in `dir`,
/// told `nat`, with the `extra` flags; returns once it holds a reservation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_daemon(
    lab: &Lab,
    exe: &str,
    node: &str,
    relay: &str,
    dir: &std::path::Path,
    name: &str,
    nat: Option<Preset>,
    extra: &[String],
) -> Result<StartedDaemon, String> {
    let socket = dir.join(format!("{name}.sock"));
    let key = dir.join(format!("{name}.key"));
    let _ = std::fs::remove_file(&key);
    let args = cli::write::replace_flags::<crate::args::DaemonArgs>(
        crate::args::daemon(relay, &socket, &key, nat)?,
        extra,
    )?;
    let process = lab
        .spawn(node, exe, &args)
        .map_err(|e| natlab::chain(&e).to_string())?;
    let started = process
        .wait_for("\"event\":\"started\"", RESERVE_TIMEOUT)
        .map_err(|e| format!("the daemon on {node} did not start: {}", natlab::chain(&e)))?;
    let peer = serde_json::from_str::<serde_json::Value>(&started)
        .ok()
        .and_then(|v| v["peer_id"].as_str().map(str::to_owned))
        .ok_or_else(|| format!("unexpected line: {started}"))?;
    process
        .wait_for("\"event\":\"reserved\"", RESERVE_TIMEOUT)
        .map_err(|e| {
            format!(
                "the daemon on {node} did not reserve: {}",
                natlab::chain(&e)
            )
        })?;
    Ok(StartedDaemon {
        process,
        socket,
        peer,
    })
}

/// Gives every router of `t` that maps per destination a session table of `max` flows.
pub fn bound_hard_routers(t: &mut natlab::Topology, max: u32, overflow: SessionOverflow) {
    for node in &mut t.nodes {
        if let natlab::topology::NodeKind::Router { nat, .. } = &mut node.kind
            && !matches!(nat.mapping, natlab::Mapping::EndpointIndependent)
        {
            nat.max_sessions = Some(max);
            nat.session_overflow = overflow;
        }
    }
}

fn run_trial(
    lab: &Lab,
    config: &ConnectConfig,
    exe: &str,
    relay: &str,
    dir: &std::path::Path,
    n: u64,
    job: Job,
) -> ConnectTrial {
    let mut trial = ConnectTrial {
        a: job.a.name().to_owned(),
        b: job.b.name().to_owned(),
        proto: proto_name(job.proto).to_owned(),
        technique: None,
        direct: false,
        time_to_socket_ms: None,
        transfer_ok: false,
        transfer_ms: None,
        birthday: None,
        error: None,
    };
    let result = (|| -> Result<(), String> {
        lab.flush_nat_state()
            .map_err(|e| natlab::chain(&e).to_string())?;
        let nat = |p: Preset| config.tell_nat.then_some(p);
        let a = start_daemon(
            lab,
            exe,
            &host('a', job.a),
            relay,
            dir,
            &format!("a{n}"),
            nat(job.a),
            &config.daemon_args,
        )?;
        let b = start_daemon(
            lab,
            exe,
            &host('b', job.b),
            relay,
            dir,
            &format!("b{n}"),
            nat(job.b),
            &config.daemon_args,
        )?;
        let service = format!("matrix-{n}");
        let mut listening = Client::connect(&b.socket)
            .map_err(|e| e.to_string())?
            .listen(&service, job.proto)
            .map_err(|e| e.to_string())?;
        // The listening application reports through a channel: a daemon that never hands it
        // a socket must not hold the trial for ever.
        let (echoed_tx, echoed_rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let result = listening
                .accept()
                .map_err(|e| e.to_string())
                .and_then(|conn| echo(conn.socket));
            let _ = echoed_tx.send(result);
        });
        let mut client = Client::connect(&a.socket).map_err(|e| e.to_string())?;
        let asked = Instant::now();
        let conn = client
            .connect_peer(&b.peer, job.proto, &service, |_| {})
            .map_err(|e| e.to_string())?;
        trial.time_to_socket_ms = Some(asked.elapsed().as_secs_f64() * 1000.0);
        trial.technique = Some(conn.technique.clone());
        trial.direct = conn.direct;
        let moved = Instant::now();
        let sent = transfer(conn.socket);
        trial.transfer_ms = Some(moved.elapsed().as_secs_f64() * 1000.0);
        // The echo ends within its own timeouts once it has a socket; 30 s more for the daemon
        // to hand it one.
        let echoed = echoed_rx
            .recv_timeout(TRANSFER_TIMEOUT + Duration::from_secs(30))
            .unwrap_or_else(|_| {
                Err("the listening application got no socket from its daemon".to_owned())
            });
        trial.birthday = TrialBirthday::from_records(&[a.record(), b.record()]);
        sent.map_err(|e| format!("transfer: {e}"))?;
        echoed.map_err(|e| format!("echo: {e}"))?;
        trial.transfer_ok = true;
        Ok(())
    })();
    trial.error = result.err();
    trial
}

/// Echoes what comes until the other side is done (a UDP sender: quiet for 3 s), dropping
/// the daemons' probe datagrams.
///
/// # Errors
///
/// The socket's, or nothing arrived over UDP.
pub fn echo(socket: Socket) -> Result<(), String> {
    match socket {
        Socket::Tcp(mut s) => {
            s.set_read_timeout(Some(TRANSFER_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    return s.shutdown(Shutdown::Write).map_err(|e| e.to_string());
                }
                s.write_all(buf.get(..n).unwrap_or_default())
                    .map_err(|e| e.to_string())?;
            }
        }
        Socket::Udp(s) => {
            // Until the sender has been quiet for a while: it is done.
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 65_536];
            let mut echoed = 0usize;
            loop {
                match s.recv(&mut buf) {
                    Ok(n) => {
                        let d = buf.get(..n).unwrap_or_default();
                        if d.starts_with(PROBE_MAGIC) {
                            continue;
                        }
                        s.send(d).map_err(|e| e.to_string())?;
                        echoed += 1;
                    }
                    Err(_) if echoed > 0 => return Ok(()),
                    Err(e) => return Err(format!("nothing arrived: {e}")),
                }
            }
        }
    }
}

/// Sends a few bytes to an [`echo`] and checks that they come back: the socket works.
///
/// # Errors
///
/// What went wrong or differed.
pub fn hello(socket: Socket) -> Result<(), String> {
    const HELLO: &[u8] = b"hello through natpunch";
    match socket {
        Socket::Tcp(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            s.write_all(HELLO).map_err(|e| e.to_string())?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).map_err(|e| e.to_string())?;
            (back == HELLO)
                .then_some(())
                .ok_or_else(|| format!("{} bytes came back changed", back.len()))
        }
        Socket::Udp(s) => {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            for _ in 0..10 {
                s.send(HELLO).map_err(|e| e.to_string())?;
                while let Ok(n) = s.recv(&mut buf) {
                    if buf.get(..n) == Some(HELLO) {
                        return Ok(());
                    }
                }
            }
            Err("no echo over UDP".into())
        }
    }
}

/// Sends 1 MiB to an [`echo`] and checks that it all comes back, byte for byte.
///
/// # Errors
///
/// What went wrong or differed.
pub fn transfer(socket: Socket) -> Result<(), String> {
    let data: Vec<u8> = (0..TRANSFER_BYTES)
        .map(|i| u8::try_from((i * 7 + i / 251) % 256).unwrap_or(0))
        .collect();
    match socket {
        Socket::Tcp(s) => transfer_tcp(s, &data),
        Socket::Udp(s) => transfer_udp(&s, &data),
    }
}

fn transfer_tcp(s: TcpStream, data: &[u8]) -> Result<(), String> {
    s.set_read_timeout(Some(TRANSFER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    let owned = data.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&owned)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(data.len());
    let mut reader = s;
    reader
        .read_to_end(&mut back)
        .map_err(|e| format!("after {} bytes back: {e}", back.len()))?;
    sender
        .join()
        .map_err(|_| "the sender panicked".to_owned())?
        .map_err(|e| e.to_string())?;
    if back != data {
        return Err(format!(
            "{} bytes came back of {}, not the same",
            back.len(),
            data.len()
        ));
    }
    Ok(())
}

fn transfer_udp(s: &UdpSocket, data: &[u8]) -> Result<(), String> {
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let total = chunks.len();
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut done: HashSet<usize> = HashSet::new();
    let mut sent_at: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut next = 0usize;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    let mut buf = vec![0u8; 65_536];
    let resend = Duration::from_millis(300);
    let datagram = |i: usize| -> Vec<u8> {
        let mut d = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes().to_vec();
        d.extend_from_slice(chunks.get(i).copied().unwrap_or_default());
        d
    };
    while done.len() < total {
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {total} datagrams echoed in time",
                done.len()
            ));
        }
        let now = Instant::now();
        let due: Vec<usize> = sent_at
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= resend)
            .map(|(i, _)| *i)
            .collect();
        for i in due {
            s.send(&datagram(i)).map_err(|e| e.to_string())?;
            sent_at.insert(i, now);
        }
        while sent_at.len() < WINDOW && next < total {
            s.send(&datagram(next)).map_err(|e| e.to_string())?;
            sent_at.insert(next, Instant::now());
            next += 1;
        }
        match s.recv(&mut buf) {
            Ok(n) => {
                let d = buf.get(..n).unwrap_or_default();
                if d.starts_with(PROBE_MAGIC) || n < 4 {
                    continue;
                }
                let seq = d
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(usize::MAX, |b| u32::from_be_bytes(b) as usize);
                if sent_at.contains_key(&seq) {
                    if d.get(4..) != chunks.get(seq).copied() {
                        return Err(format!("datagram {seq} came back changed"));
                    }
                    sent_at.remove(&seq);
                    done.insert(seq);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(direct: bool, birthday: Option<TrialBirthday>) -> ConnectTrial {
        ConnectTrial {
            a: "port-restricted".into(),
            b: "symmetric".into(),
            proto: "udp".into(),
            technique: Some(if direct { "udp-birthday" } else { "relay" }.into()),
            direct,
            time_to_socket_ms: Some(500.0),
            transfer_ok: true,
            transfer_ms: Some(900.0),
            birthday,
            error: None,
        }
    }

    #[test]
    fn the_birthday_of_a_trial_comes_from_both_daemons_records() {
        let easy = serde_json::json!({"event": "connection", "birthday": {
            "role": "easy", "probes": 37, "predicted": true, "predicted_hit": true, "result": "ok"}});
        let hard = serde_json::json!({"event": "connection", "birthday": {
            "role": "hard", "sockets": 112, "probes": 37, "predicted": false,
            "predicted_hit": false, "result": "ok"}});
        let plain = serde_json::json!({"event": "connection"});
        assert_eq!(
            TrialBirthday::from_records([&easy, &hard]),
            Some(TrialBirthday {
                probes: Some(37),
                sockets: Some(112),
                predicted: true,
                predicted_hit: true,
            })
        );
        assert_eq!(TrialBirthday::from_records([&plain, &plain]), None);
    }

    #[test]
    fn a_cell_counts_probes_predictions_and_the_interval_of_the_direct_share() {
        let probed = |probes, hit| {
            Some(TrialBirthday {
                probes: Some(probes),
                sockets: Some(256),
                predicted: true,
                predicted_hit: hit,
            })
        };
        let trials = [
            trial(true, probed(10, true)),
            trial(true, probed(30, true)),
            trial(true, probed(400, false)),
            trial(false, None),
        ];
        let refs: Vec<&ConnectTrial> = trials.iter().collect();
        let c = cell(Preset::PortRestricted, Preset::Symmetric, Proto::Udp, &refs);
        assert_eq!((c.trials, c.direct, c.predicted_hits), (4, 3, 2));
        assert_eq!((c.probes_median, c.probes_max), (Some(30.0), Some(400)));
        assert_eq!(c.sockets_max, Some(256));
        // 3 of 4: Wilson's interval is about 30–95%.
        assert!((25.0..35.0).contains(&c.direct_ci.0), "{:?}", c.direct_ci);
        assert!((90.0..99.0).contains(&c.direct_ci.1), "{:?}", c.direct_ci);
    }
}
