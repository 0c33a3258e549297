//! A measurement campaign in the lab: the whole system, as it runs on the internet, on one
//! machine.
//!
//! The lab has a relay, a DHT bootstrap node, and a node running the honeypot and the server
//! (one database); behind each NAT preset a target peer that reserves on the relay and joins the
//! DHT (where the honeypot finds it), and a client with a few hosts that asks the server for
//! peers, punches them and reports. An RFC 5780 STUN server on two addresses tells every
//! target and client its NAT's mapping class (`--stun-server`), which natpunch peers exchange
//! to choose a punch's first attempt. When the budget (punches or time) is spent the clients
//! deliver their reports and stop; the summary (outcome mix, success rates, time to direct and
//! the NAT-pair matrix) is computed from the database, the same place a researcher would read.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::store::dashboard::transport_of;
use api::store::{ResultRow, SqlStore};
use natlab::{Lab, LabOptions, LabProcess, Preset};
use p2p::honeypot::HoneypotEvent;
use p2p::relay::RelayEvent;
use serde::Serialize;
use serde::de::DeserializeOwned;

use cli::args::Identity;
use cli::write::to_args;

use crate::args;
use crate::matrix::{STUN_NODE, host, start_stun, topology};
use crate::stats::quantile;

/// The lab DHT's protocol name.
pub const DHT_PROTOCOL: &str = "/natpunch/lab/kad/1.0.0";
/// Ports of the lab's services.
const RELAY_PORT: u16 = 4001;
const DHT_PORT: u16 = 11000;
const SERVER_PORT: u16 = 10000;
/// The router that maps ports, and the client's host behind it.
const PORT_MAPPED_ROUTER: &str = "ra-pm";
const PORT_MAPPED_HOST: &str = "ha-pm";
/// The NAT name of the client behind it.
pub const PORT_MAPPED_NAT: &str = "port-restricted+portmap";
/// How long a role may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The presets a campaign puts targets and clients behind unless told otherwise: the six the
/// campaign was designed and measured with (newer presets join by `--presets`).
pub const DEFAULT_PRESETS: [Preset; 6] = [
    Preset::Open,
    Preset::FullCone,
    Preset::RestrictedCone,
    Preset::PortRestricted,
    Preset::Symmetric,
    Preset::Cgnat,
];

/// How to run a campaign.
#[derive(Debug, Clone)]
pub struct CampaignConfig {
    /// The `natpunch` binary.
    pub exe: PathBuf,
    /// The presets: one target and one client behind each.
    pub presets: Vec<Preset>,
    /// Hosts per client.
    pub hosts_per_client: usize,
    /// Stop after this many punches in all.
    pub punches: Option<u64>,
    /// Stop after this long (punches in progress finish).
    pub duration: Option<Duration>,
    /// The database (none: a SQLite file in `work_dir`).
    pub database_url: Option<String>,
    /// Keys, database and spools.
    pub work_dir: PathBuf,
    /// Host-to-host round trip through the lab's internet, in ms.
    pub rtt_ms: u32,
    /// Set to stop early: the clients finish and deliver, the summary has what ran.
    pub stop: Arc<AtomicBool>,
    /// Add a client behind a port-restricted router that maps ports (miniupnpd: PCP, NAT-PMP,
    /// UPnP), punching with `--port-mapping`; its NAT is named `port-restricted+portmap`.
    pub port_mapped_client: bool,
    /// Kill the server (SIGKILL) this long after the clients start, and start it again after
    /// the second duration: the clients must lose nothing.
    pub server_outage: Option<(Duration, Duration)>,
}

impl CampaignConfig {
    /// Defaults: the [`DEFAULT_PRESETS`], 2 hosts per client, 100 ms RTT, 3 minutes.
    pub fn new(exe: PathBuf, work_dir: PathBuf, stop: Arc<AtomicBool>) -> Self {
        Self {
            exe,
            presets: DEFAULT_PRESETS.to_vec(),
            hosts_per_client: 2,
            punches: None,
            duration: Some(Duration::from_secs(180)),
            database_url: None,
            work_dir,
            rtt_ms: 100,
            stop,
            port_mapped_client: true,
            server_outage: None,
        }
    }
}

/// Why a campaign failed.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// The lab failed.
    #[error("the lab failed")]
    Lab(#[from] natlab::LabError),
    /// A role did not come up.
    #[error("{0}")]
    Role(String),
    /// The results could not be read from the database.
    #[error("reading the results from the database")]
    Store(#[from] api::store::StoreError),
    /// Files or threads.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What the campaign is doing.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A step of the set-up.
    Step(String),
    /// Punches made so far.
    Punches {
        /// Made.
        done: u64,
        /// The budget, if one.
        total: Option<u64>,
        /// Time so far.
        elapsed: Duration,
    },
}

/// One cell of the NAT-pair matrix.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignCell {
    /// The client's NAT preset.
    pub client_nat: String,
    /// The target's NAT preset.
    pub target_nat: String,
    /// The target's NAT as the reports say (from the relay's and the honeypot's view).
    pub remote_nat: String,
    /// `tcp` or `quic` (the filter the server assigned).
    pub transport: String,
    /// Punches.
    pub trials: u64,
    /// SUCCESS.
    pub success: u64,
    /// Every outcome.
    pub outcomes: BTreeMap<String, u64>,
    /// Median time to direct of the successes.
    pub median_ms: Option<f64>,
}

/// A target's NAT as the server derived it from the two vantage points, against its preset.
#[derive(Debug, Clone, Serialize)]
pub struct TargetNat {
    /// The target's preset.
    pub target: String,
    /// The mapping class of the preset.
    pub expected: String,
    /// The `remote_nat` most reports on it carry (`unknown` without reports).
    pub observed: String,
    /// Reports that carry it.
    pub reports: u64,
    /// `match`, `mismatch`, or `unknown` (the vantage points could not tell).
    pub verdict: &'static str,
}

/// The campaign's summary, from the database.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignReport {
    /// Punches made (reported by the clients).
    pub punches: u64,
    /// Results in the database.
    pub stored: u64,
    /// Outcomes in the database.
    pub outcomes: BTreeMap<String, u64>,
    /// The database (password hidden).
    pub database: String,
    /// SUCCESS / (SUCCESS + FAILED): punchr's definition.
    pub success_rate: Option<f64>,
    /// SUCCESS / every punch.
    pub end_to_end_rate: Option<f64>,
    /// Time to direct of the successes, median and p95, in ms.
    pub median_ms: Option<f64>,
    /// p95.
    pub p95_ms: Option<f64>,
    /// Every time to direct, for plots.
    pub times_ms: Vec<(String, f64)>,
    /// The NAT-pair matrix.
    pub matrix: Vec<CampaignCell>,
    /// Each client's NAT as it measured it (RFC 5780, `mapping/filtering`), by the name the
    /// campaign gave it.
    pub measured_nat: BTreeMap<String, String>,
    /// Each target's NAT as the reports on it say (the relay's and the honeypot's view),
    /// against its preset.
    pub remote_nat: Vec<TargetNat>,
    /// The NAT the campaign put each peer behind (clients' hosts and targets), by peer ID: the
    /// labels of the matrix.
    pub peers: BTreeMap<String, String>,
    /// Targets the honeypot recorded, of those started.
    pub targets_recorded: usize,
    /// Targets started.
    pub targets: usize,
    /// Seconds the campaign ran (punching).
    pub seconds: f64,
    /// Stopped early (Ctrl-C).
    pub interrupted: bool,
}

impl CampaignReport {
    /// The summary as `natpunch lab campaign --json` prints it: the counts, outcomes and rates,
    /// the matrix, and the peers.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "punches": self.punches,
            "stored": self.stored,
            "outcomes": self.outcomes,
            "database": self.database,
            "success_rate": self.success_rate,
            "end_to_end_rate": self.end_to_end_rate,
            "median_ms": self.median_ms,
            "p95_ms": self.p95_ms,
            "targets_recorded": self.targets_recorded,
            "targets": self.targets,
            "seconds": self.seconds,
            "interrupted": self.interrupted,
            "matrix": self.matrix,
            "measured_nat": self.measured_nat,
            "remote_nat": self.remote_nat,
            "peers": self.peers,
        })
    }
}

/// The summary for people: counts, outcomes and rates, then the NAT-pair table.
impl std::fmt::Display for CampaignReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0));
        let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.0} ms"));
        writeln!(
            f,
            "{} punches, {} in the database ({}); honeypot recorded {} of {} targets",
            self.punches, self.stored, self.database, self.targets_recorded, self.targets
        )?;
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        writeln!(f, "outcomes: {}", outcomes.join(", "))?;
        writeln!(
            f,
            "success rate {} (SUCCESS/(SUCCESS+FAILED)), end to end {}, time to direct median {} \
             p95 {}",
            pct(self.success_rate),
            pct(self.end_to_end_rate),
            ms(self.median_ms),
            ms(self.p95_ms)
        )?;
        for (name, m) in &self.measured_nat {
            writeln!(f, "client behind {name}: measured {m}")?;
        }
        for t in &self.remote_nat {
            writeln!(
                f,
                "target behind {}: seen by the relay and the honeypot as {} ({} reports), \
                 expected {}: {}",
                t.target, t.observed, t.reports, t.expected, t.verdict
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<24} {:<16} {:<20} {:<5} {:>7} {:>8} {:>10}",
            "client NAT", "target NAT", "target seen as", "via", "punches", "success", "median ms"
        )?;
        for c in &self.matrix {
            writeln!(
                f,
                "{:<24} {:<16} {:<20} {:<5} {:>7} {:>8} {:>10}",
                c.client_nat,
                c.target_nat,
                c.remote_nat,
                c.transport,
                c.trials,
                c.success,
                c.median_ms
                    .map_or_else(|| "-".into(), |m| format!("{m:.0}"))
            )?;
        }
        Ok(())
    }
}

/// The first JSON line of `p` with `needle`, parsed.
fn json_line<T: DeserializeOwned>(
    p: &LabProcess,
    needle: &str,
    what: &str,
) -> Result<T, CampaignError> {
    let line = p
        .wait_for(needle, START_TIMEOUT)
        // The error carries what the process printed.
        .map_err(|e| CampaignError::Role(format!("{what}: {}", natlab::chain(&e))))?;
    serde_json::from_str(&line).map_err(|e| CampaignError::Role(format!("{what}: {e}: {line}")))
}

fn listen_addr(p: &LabProcess, ip: &str, port: u16, what: &str) -> Result<String, CampaignError> {
    match json_line(p, &format!("/ip4/{ip}/tcp/{port}\""), what)? {
        HoneypotEvent::Listening { address, peer_id } => Ok(format!("{address}/p2p/{peer_id}")),
        other => Err(CampaignError::Role(format!("{what}: unexpected {other:?}"))),
    }
}

/// Sends SIGTERM to `p` (our child, by PID).
fn terminate(p: &LabProcess) {
    if let Some(pid) = p.pid().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Punches the clients have reported so far.
fn punched(clients: &[LabProcess]) -> u64 {
    clients
        .iter()
        .map(|c| c.output().matches("\"event\":\"punched\"").count() as u64)
        .sum()
}

/// Runs the campaign.
pub fn run(
    config: &CampaignConfig,
    progress: &mut impl FnMut(Progress),
) -> Result<CampaignReport, CampaignError> {
    std::fs::create_dir_all(&config.work_dir).map_err(|source| CampaignError::Io {
        what: format!("creating {}", config.work_dir.display()),
        source,
    })?;
    let exe = config.exe.to_string_lossy().into_owned();
    let path = |name: &str| config.work_dir.join(name).display().to_string();
    let database_url = config
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", path("campaign.db")));
    progress(Progress::Step("building the lab".into()));
    let mut t = topology(&config.presets, config.rtt_ms)
        .host("dht", None, 1)
        .host("honeypot", None, 1)
        .host(STUN_NODE, None, 2);
    if config.port_mapped_client
        && let Some(nat) = Preset::PortRestricted.config()
    {
        t = t
            .router(PORT_MAPPED_ROUTER, nat, None)
            .portmap(
                PORT_MAPPED_ROUTER,
                natlab::portmap::PortMapConfig::default(),
            )
            .host(PORT_MAPPED_HOST, Some(PORT_MAPPED_ROUTER), 1);
        let delay = natlab::LinkCondition {
            delay_ms: config.rtt_ms / 4,
            jitter_ms: 0,
            loss_pct: 0.0,
        };
        if delay.is_impaired() {
            t = t.link(PORT_MAPPED_ROUTER, delay);
        }
    }
    let lab = Lab::build(&t, LabOptions::default())?;
    let file = |name: &str| config.work_dir.join(name);
    // The relay is a vantage point: it records where reserving targets connect from.
    let relay_args = args::relay(file("relay.key"), RELAY_PORT, Some(&database_url))
        .map_err(CampaignError::Role)?;
    let relay = lab.spawn("relay", &exe, &relay_args)?;
    // An RFC 5780 STUN server on two addresses: clients and targets learn their NAT from it.
    let (stun, primary) =
        start_stun(&lab, &exe).map_err(|e| CampaignError::Role(format!("the STUN server: {e}")))?;
    let relay_addr = match json_line(&relay, "\"event\":\"external-address\"", "the relay")? {
        RelayEvent::ExternalAddress { address } => address,
        other => {
            return Err(CampaignError::Role(format!(
                "the relay: unexpected {other:?}"
            )));
        }
    };
    // Targets reserve over QUIC, as they reach the honeypot: the two vantage points then see
    // the same socket of theirs, and its mapping tells the target's NAT.
    let relay_ip = lab.public_addr("relay")?;
    let quic = format!("/ip4/{relay_ip}/udp/{RELAY_PORT}/quic-v1/p2p/");
    let relay_addr = match json_line(&relay, &quic, "the relay's QUIC address")? {
        RelayEvent::ExternalAddress { address } | RelayEvent::Listening { address } => address,
        other => {
            return Err(CampaignError::Role(format!(
                "the relay: unexpected {other:?} ({relay_addr} announced)"
            )));
        }
    };
    progress(Progress::Step(format!("relay at {relay_addr}")));
    let dht_ip = lab.public_addr("dht")?.to_string();
    let role = CampaignError::Role;
    let dht_args = args::honeypot(DHT_PORT, file("dht.key"), DHT_PROTOCOL).map_err(role)?;
    let dht = lab.spawn("dht", &exe, &to_args(&["honeypot"], &dht_args))?;
    let dht_addr = listen_addr(&dht, &dht_ip, DHT_PORT, "the DHT bootstrap node")?;
    let hp_ip = lab.public_addr("honeypot")?.to_string();
    let mut honeypot_args =
        args::honeypot(DHT_PORT, file("honeypot.key"), DHT_PROTOCOL).map_err(role)?;
    honeypot_args.bootstrap = vec![
        dht_addr
            .parse()
            .map_err(|e| role(format!("{dht_addr}: {e}")))?,
    ];
    honeypot_args.crawler_count = 3;
    honeypot_args.crawl_secs = 60;
    honeypot_args.database_url.clone_from(&database_url);
    honeypot_args.no_record = false;
    let honeypot = lab.spawn("honeypot", &exe, &to_args(&["honeypot"], &honeypot_args))?;
    listen_addr(&honeypot, &hp_ip, DHT_PORT, "the honeypot")?;
    let honeypot_quic = match json_line(
        &honeypot,
        &format!("/ip4/{hp_ip}/udp/{DHT_PORT}/quic-v1\""),
        "the honeypot's QUIC address",
    )? {
        HoneypotEvent::Listening { address, peer_id } => format!("{address}/p2p/{peer_id}"),
        other => {
            return Err(role(format!("the honeypot: unexpected {other:?}")));
        }
    };
    json_line::<HoneypotEvent>(
        &honeypot,
        "\"event\":\"crawl-ended\"",
        "the honeypot's first crawl",
    )?;
    let mut server = args::server(SERVER_PORT, &database_url).map_err(role)?;
    // One transport per punch, so that failures count for a transport too; every target may
    // be punched again at once and often.
    server.protocol_filters = "ip4/tcp:1,ip4/quic-v1:1".parse().map_err(role)?;
    server.dedup_secs = 0;
    server.per_remote = 100_000;
    let server_args = to_args(&["server"], &server);
    let start_server = || -> Result<LabProcess, CampaignError> {
        let server = lab.spawn("honeypot", &exe, &server_args)?;
        json_line::<serde_json::Value>(&server, "\"event\":\"listening\"", "the server")?;
        Ok(server)
    };
    let mut server = Some(start_server()?);
    progress(Progress::Step(format!(
        "DHT, honeypot and server up; database {}",
        api::store::redact(&database_url)
    )));

    // Targets: reserve on the relay, then join the DHT through the bootstrap node.
    let mut targets = Vec::new();
    let mut nat_of: HashMap<String, Preset> = HashMap::new();
    for &p in &config.presets {
        let mut target_args = args::peer(&relay_addr).map_err(role)?;
        target_args.identity = Identity::new(Some(file(&format!("target-{}.key", p.name()))));
        // The honeypot first, over QUIC: the target's connection to it then comes from the
        // socket its relay connection comes from (the honeypot's vantage point).
        target_args.dht_bootstrap = vec![
            honeypot_quic
                .parse()
                .map_err(|e| role(format!("{honeypot_quic}: {e}")))?,
        ];
        target_args
            .dht_bootstrap
            .extend(honeypot_args.bootstrap.iter().cloned());
        target_args.dht_protocol = honeypot_args.protocol.clone();
        target_args.stun_server = Some(primary);
        let target = lab.spawn(&host('b', p), &exe, &args::listen(&target_args))?;
        let reserved = target
            .wait_for("\"event\":\"reserved\"", START_TIMEOUT)
            .map_err(|e| CampaignError::Role(format!("a target: {}", natlab::chain(&e))))?;
        let id = args::reserved_peer(&reserved)
            .ok_or_else(|| CampaignError::Role(format!("a target: unexpected line: {reserved}")))?;
        nat_of.insert(id.clone(), p);
        targets.push((id, target));
    }
    let deadline = Instant::now() + START_TIMEOUT;
    let recorded = |hp: &LabProcess| {
        let out = hp.output();
        targets
            .iter()
            .filter(|(id, _)| out.contains(&format!("\"peer_id\":\"{id}\"")))
            .count()
    };
    while recorded(&honeypot) < targets.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let targets_recorded = recorded(&honeypot);
    progress(Progress::Step(format!(
        "{targets_recorded} of {} targets recorded by the honeypot",
        targets.len()
    )));

    // Clients: the budget is shared out; each delivers its reports before it exits.
    let mut homes: Vec<(String, String, bool)> = config
        .presets
        .iter()
        .map(|p| (host('a', *p), p.name().to_owned(), false))
        .collect();
    if config.port_mapped_client {
        homes.push((PORT_MAPPED_HOST.into(), PORT_MAPPED_NAT.into(), true));
    }
    let n = homes.len() as u64;
    let mut clients = Vec::new();
    let mut nat_name: HashMap<String, String> = nat_of
        .iter()
        .map(|(id, p)| (id.clone(), p.name().to_owned()))
        .collect();
    let server_url = format!("http://{hp_ip}:{SERVER_PORT}");
    for (i, (node, nat, mapped)) in homes.iter().enumerate() {
        let share = config
            .punches
            .map(|total| total / n + u64::from((i as u64) < total % n));
        if share == Some(0) {
            continue;
        }
        let mut client = args::client(&server_url, "natpunch-lab-campaign").map_err(role)?;
        client.host_count = config.hosts_per_client.max(1);
        client.idle_secs = 1.0;
        client.keys_dir = Some(file(&format!("client-{nat}")));
        client.stun_server = Some(primary);
        client.port_mapping = *mapped;
        client.punches = share;
        let args = to_args(&["client"], &client);
        // The keys are made here, before the client starts: it loads these, so the labels are
        // those of the identities it punches with.
        for i in 0..config.hosts_per_client.max(1) {
            let path = config.work_dir.join(format!("client-{nat}/host-{i}.key"));
            let (key, _) = p2p::identity::load_or_create(&path)
                .map_err(|e| CampaignError::Role(format!("client key: {}", natlab::chain(&e))))?;
            nat_name.insert(key.public().to_peer_id().to_base58(), nat.clone());
        }
        clients.push(lab.spawn(node, &exe, &args)?);
    }
    let started = Instant::now();
    let mut interrupted = false;
    let mut told_to_stop = false;
    let mut outage_over = false;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let done = punched(&clients);
        progress(Progress::Punches {
            done,
            total: config.punches,
            elapsed: started.elapsed(),
        });
        let running = clients.iter().any(LabProcess::is_running);
        if !running {
            break;
        }
        if let Some((at, down)) = config.server_outage {
            let t = started.elapsed();
            if t >= at && t < at + down && server.is_some() {
                progress(Progress::Step(format!(
                    "killing the server for {:.0} s",
                    down.as_secs_f64()
                )));
                // Dropping ends it with SIGKILL: no chance to finish anything.
                server = None;
            } else if t >= at + down && server.is_none() && !outage_over {
                server = Some(start_server()?);
                outage_over = true;
                progress(Progress::Step("the server is back".into()));
            }
        }
        let out_of_time = config.duration.is_some_and(|d| started.elapsed() >= d);
        let stop = config.stop.load(Ordering::Relaxed);
        if (out_of_time || stop) && !told_to_stop {
            interrupted = stop;
            told_to_stop = true;
            progress(Progress::Step(
                "stopping the clients (punches in progress finish, reports are delivered)".into(),
            ));
            for c in &clients {
                terminate(c);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let punches = punched(&clients);
    // A client that failed (rather than stopping when told or when done) fails the campaign,
    // with its words.
    for c in clients {
        let output = c.output();
        if let Ok(code) = c.wait()
            && code != Some(0)
        {
            let tail: Vec<&str> = output.lines().rev().take(5).collect();
            return Err(CampaignError::Role(format!(
                "a client exited with {code:?}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
    }
    drop(targets);
    drop(server);
    drop(honeypot);
    drop(dht);
    drop(stun);
    drop(relay);
    drop(lab);
    let expected: BTreeMap<String, (String, &'static str)> = nat_of
        .iter()
        .map(|(id, p)| (id.clone(), (p.name().to_owned(), expected_remote_nat(*p))))
        .collect();
    summarise(
        &database_url,
        &nat_name,
        &expected,
        punches,
        seconds,
        interrupted,
        targets_recorded,
    )
}

/// A matrix cell's key: client NAT, target NAT, transport.
type CellKey = (String, String, String);

/// What the two vantage points can tell of a target behind `preset`: its mapping class.
/// Without a NAT the mapping is the same for every destination, as behind an
/// endpoint-independent one.
pub fn expected_remote_nat(preset: Preset) -> &'static str {
    let chain: Vec<_> = natlab::selftest::path_of(preset)
        .iter()
        .filter_map(|p| p.config())
        .collect();
    match natlab::selftest::expected_through(&chain).0.mapping {
        natlab::Mapping::EndpointIndependent | natlab::Mapping::None => {
            api::vantage::ENDPOINT_INDEPENDENT
        }
        _ => api::vantage::ENDPOINT_DEPENDENT,
    }
}

/// The remote's NAT stored in the reports on `target`: the most common value (`unknown`
/// without reports), and how many reports said it.
fn observed_nat<'a>(rows: impl Iterator<Item = &'a ResultRow>) -> (String, u64) {
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rows {
        *seen
            .entry(r.remote_nat.as_deref().unwrap_or(api::vantage::UNKNOWN))
            .or_default() += 1;
    }
    seen.into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or((api::vantage::UNKNOWN.to_owned(), 0), |(v, n)| {
            (v.to_owned(), n)
        })
}

fn summarise(
    database_url: &str,
    nat_of: &HashMap<String, String>,
    expected: &BTreeMap<String, (String, &'static str)>,
    punches: u64,
    seconds: f64,
    interrupted: bool,
    targets_recorded: usize,
) -> Result<CampaignReport, CampaignError> {
    let targets = expected.len();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CampaignError::Io {
            what: "starting the async runtime".into(),
            source,
        })?;
    let rows = rt.block_on(async {
        let store = SqlStore::open(database_url).await?;
        let rows = store.results().await;
        store.close().await;
        rows
    })?;
    let mut outcomes = BTreeMap::new();
    let mut cells: BTreeMap<CellKey, (Vec<&ResultRow>, Vec<f64>)> = BTreeMap::new();
    let mut times = Vec::new();
    let mut measured_nat = BTreeMap::new();
    for r in &rows {
        if let (Some(name), Some(m)) = (nat_of.get(&r.local), &r.client_nat) {
            measured_nat.insert(name.clone(), m.clone());
        }
        *outcomes.entry(r.outcome.clone()).or_insert(0u64) += 1;
        let nat = |id: &str| nat_of.get(id).map_or("unknown", String::as_str).to_owned();
        let transport = transport_of(&r.filters, r.transport.as_deref());
        let cell = cells
            .entry((nat(&r.local), nat(&r.remote), transport.clone()))
            .or_default();
        cell.0.push(r);
        if r.outcome == "SUCCESS"
            && let Some(t) = r.time_to_direct
        {
            cell.1.push(t * 1000.0);
            times.push((transport, t * 1000.0));
        }
    }
    let count = |o: &str| outcomes.get(o).copied().unwrap_or(0);
    let (success, failed) = (count("SUCCESS"), count("FAILED"));
    let all: Vec<f64> = times.iter().map(|(_, t)| *t).collect();
    let matrix = cells
        .into_iter()
        .map(|((client_nat, target_nat, transport), (rows, ts))| {
            let mut outcomes = BTreeMap::new();
            for r in &rows {
                *outcomes.entry(r.outcome.clone()).or_insert(0u64) += 1;
            }
            CampaignCell {
                client_nat,
                target_nat,
                remote_nat: observed_nat(rows.iter().copied()).0,
                transport,
                trials: rows.len() as u64,
                success: outcomes.get("SUCCESS").copied().unwrap_or(0),
                outcomes,
                median_ms: quantile(&ts, 0.5),
            }
        })
        .collect();
    let stored = rows.len() as u64;
    let remote_nat = expected
        .iter()
        .map(|(id, (target, expected))| {
            let (observed, reports) = observed_nat(rows.iter().filter(|r| &r.remote == id));
            TargetNat {
                target: target.clone(),
                expected: (*expected).to_owned(),
                verdict: if observed == api::vantage::UNKNOWN {
                    "unknown"
                } else if observed == *expected {
                    "match"
                } else {
                    "mismatch"
                },
                observed,
                reports,
            }
        })
        .collect();
    Ok(CampaignReport {
        punches,
        stored,
        outcomes,
        database: api::store::redact(database_url),
        success_rate: (success + failed > 0).then(|| success as f64 / (success + failed) as f64),
        end_to_end_rate: (stored > 0).then(|| success as f64 / stored as f64),
        median_ms: quantile(&all, 0.5),
        p95_ms: quantile(&all, 0.95),
        times_ms: times,
        matrix,
        measured_nat,
        remote_nat,
        peers: nat_of.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        targets_recorded,
        targets,
        seconds,
        interrupted,
    })
}
