//! A running lab: build it from a [`Topology`], use it, drop it.
//!
//! Building writes a state file first (`/run/natpunch/labs/NAME.json`), then creates the
//! namespaces, links, addresses, routes and router rules. Dropping a [`Lab`] (also while a test
//! panics) kills the processes it started, stops its delay lines and session evictors and
//! deletes its namespaces, which takes every veth, nft table and iptables rule with them. [`sweep`] removes what crashed processes left.
//! A lab made with [`Lab::detach`] outlives its process until [`down`] removes it.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use std::{fs, io, thread};

use serde::{Deserialize, Serialize};

use crate::delay::{DelayError, DelayLine};
use crate::netns::{self, CommandError};
use crate::nft::{self, RouterRules};
use crate::portmap::{self, Files, RouterSide};
use crate::session::{Evictor, EvictorError};
use crate::topology::{
    INTERNET_BRIDGE, LAN_BRIDGE, LabPlan, NodePlan, Topology, TopologyError, validate_name,
};
use crate::{defaults, environment};

/// Longest lab name.
pub const MAX_LAB_NAME: usize = 24;

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// The topology is unusable.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A system command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A delay line failed.
    #[error(transparent)]
    Delay(#[from] DelayError),
    /// A session evictor failed.
    #[error(transparent)]
    Evictor(#[from] EvictorError),
    /// The machine cannot run labs.
    #[error("{0}")]
    Environment(String),
    /// File or thread trouble.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A node name that is not in the lab.
    #[error("lab `{lab}` has no node `{node}` (nodes: {known})")]
    UnknownNode {
        /// Lab name.
        lab: String,
        /// The unknown name.
        node: String,
        /// The names there are.
        known: String,
    },
    /// No lab of that name.
    #[error("no lab named `{0}` (see `natpunch lab list`)")]
    NotFound(String),
    /// A lab of that name exists already.
    #[error("a lab named `{0}` exists already: pick another --name or run `natpunch lab down {0}`")]
    Exists(String),
    /// An operation for routers named a host.
    #[error("`{0}` is a host; only routers can be rebooted or renumbered")]
    NotARouter(String),
    /// An address that cannot be used.
    #[error("{0}")]
    BadAddress(String),
    /// A spawned process did not print what was awaited in time.
    #[error("`{process}` did not print `{needle}` within {timeout:?}; output so far:\n{output}")]
    NotReady {
        /// The process.
        process: String,
        /// What was awaited.
        needle: String,
        /// The wait.
        timeout: Duration,
        /// What it printed.
        output: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// How to build a lab.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Lab name (unique on the machine); a random one if `None`.
    pub name: Option<String>,
    /// Seed for the delay lines' jitter and loss.
    pub seed: u64,
    /// Leave delay lines and session evictors to another process (the CLI's holder) instead
    /// of running them here.
    pub external_delay_lines: bool,
}

/// What the state file of a lab records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// The plan the lab was built from.
    pub plan: LabPlan,
    /// The process that owns the lab; the lab is stale when it is gone.
    pub owner: ProcessId,
    /// A detached lab lives until `natpunch lab down`, whatever happens to its owner.
    pub detached: bool,
    /// The process running the lab's delay lines when they are not the owner's.
    pub holder: Option<ProcessId>,
    /// Seed of the delay lines.
    pub seed: u64,
}

/// A process identity that survives PID reuse: the PID plus its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// The PID.
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start: u64,
}

impl ProcessId {
    /// The identity of process `pid`, if it is running.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may contain spaces; fields after its ')' are plain.
        let rest = &stat[stat.rfind(')')? + 1..];
        let start = rest.split_whitespace().nth(19)?.parse().ok()?;
        Some(Self { pid, start })
    }

    /// This process.
    pub fn current() -> Self {
        Self::of(std::process::id()).unwrap_or(Self {
            pid: std::process::id(),
            start: 0,
        })
    }

    /// Whether the process is still the one recorded.
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now.start == self.start)
    }
}

fn state_path(lab: &str) -> PathBuf {
    PathBuf::from(defaults::STATE_DIR).join(format!("{lab}.json"))
}

/// Reads the state of lab `lab`.
pub fn load_state(lab: &str) -> Result<LabState, LabError> {
    validate_name(lab, MAX_LAB_NAME)?;
    let path = state_path(lab);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LabError::NotFound(lab.to_owned()));
        }
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    serde_json::from_str(&text).map_err(|e| LabError::Io {
        what: format!("reading {}", path.display()),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// Claims the name of a new lab by creating its state file; fails with [`LabError::Exists`]
/// if the name is taken (also by a build running at the same moment).
fn claim(state: &LabState) -> Result<(), LabError> {
    fs::create_dir_all(defaults::STATE_DIR)
        .map_err(io_err(format!("creating {}", defaults::STATE_DIR)))?;
    let path = state_path(&state.plan.lab);
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(_) => save_state(state),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(LabError::Exists(state.plan.lab.clone()))
        }
        Err(e) => Err(io_err(format!("writing {}", path.display()))(e)),
    }
}

/// Writes the state of a lab (atomically, through a temporary file).
pub fn save_state(state: &LabState) -> Result<(), LabError> {
    fs::create_dir_all(defaults::STATE_DIR)
        .map_err(io_err(format!("creating {}", defaults::STATE_DIR)))?;
    let path = state_path(&state.plan.lab);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(state).map_err(|e| LabError::Io {
        what: "encoding lab state".into(),
        source: io::Error::other(e),
    })?;
    fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))
}

/// The names of every lab with a state file, readable or not.
fn state_names() -> Vec<String> {
    let Ok(dir) = fs::read_dir(defaults::STATE_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// The states of every lab on the machine, by name (unreadable state files are left out).
pub fn list() -> Vec<LabState> {
    state_names()
        .iter()
        .filter_map(|name| load_state(name).ok())
        .collect()
}

/// A lab as `natpunch lab list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabSummary {
    /// Lab name.
    pub name: String,
    /// Its nodes, in creation order.
    pub nodes: Vec<String>,
    /// Whether it lives until `natpunch lab down`.
    pub detached: bool,
    /// Whether the process that owns it runs.
    pub owner_alive: bool,
    /// The process running its delay lines, if one runs.
    pub delay_holder: Option<u32>,
    #[serde(skip)]
    owner: u32,
}

impl From<&LabState> for LabSummary {
    fn from(s: &LabState) -> Self {
        Self {
            name: s.plan.lab.clone(),
            nodes: s.plan.nodes.iter().map(|n| n.name.clone()).collect(),
            detached: s.detached,
            owner_alive: s.owner.is_alive(),
            delay_holder: s.holder.filter(ProcessId::is_alive).map(|h| h.pid),
            owner: s.owner.pid,
        }
    }
}

impl LabSummary {
    /// `detached`, `owned by pid N`, or `stale (owner gone)`.
    pub fn kind(&self) -> String {
        if self.detached {
            "detached".to_owned()
        } else if self.owner_alive {
            format!("owned by pid {}", self.owner)
        } else {
            "stale (owner gone)".to_owned()
        }
    }
}

/// What [`down_all`] did with one lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Kept: a running program owns it, and removing it is that program's business.
    Kept {
        /// Lab name.
        lab: String,
        /// The owner's process ID.
        owner: u32,
    },
    /// Removed.
    Removed(String),
}

/// Removes every detached lab and every stale one, telling `each` as it goes (labs owned by
/// running programs, a test or a self-test, are kept), then sweeps what crashed runs left
/// behind; returns what the sweep removed.
pub fn down_all(each: &mut dyn FnMut(Removal)) -> Result<Vec<String>, LabError> {
    for state in list() {
        let lab = state.plan.lab;
        if !state.detached && state.owner.is_alive() {
            each(Removal::Kept {
                lab,
                owner: state.owner.pid,
            });
            continue;
        }
        down(&lab)?;
        each(Removal::Removed(lab));
    }
    Ok(sweep())
}

/// Removes lab `lab`: ends its holder process, deletes its namespaces and its state file.
pub fn down(lab: &str) -> Result<(), LabError> {
    let state = load_state(lab)?;
    if let Some(holder) = state.holder.filter(ProcessId::is_alive) {
        stop_process(holder);
    }
    delete_namespaces(&state.plan)?;
    remove_state(lab)
}

fn remove_state(lab: &str) -> Result<(), LabError> {
    // The routers' files (miniupnpd configurations, leases, logs) go first, the state last:
    // a lab without state is what a sweep looks for.
    let files = PathBuf::from(defaults::STATE_DIR).join(format!("{lab}.d"));
    match fs::remove_dir_all(&files) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err(format!("removing {}", files.display()))(e));
        }
        _ => {}
    }
    match fs::remove_file(state_path(lab)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing lab state")(e)),
        _ => Ok(()),
    }
}

/// Ends a process we started, by PID: SIGTERM, then SIGKILL after two seconds.
fn stop_process(id: ProcessId) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Ok(raw) = i32::try_from(id.pid) else {
        return;
    };
    let pid = Pid::from_raw(raw);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while id.is_alive() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if id.is_alive() {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// Ends every process still inside the lab's namespaces (they were started there by the lab or
/// through `natpunch lab exec`; left alive they would keep a deleted namespace, its veths and
/// nft tables in existence), then deletes the namespaces. Only names of this lab are touched.
fn delete_namespaces(plan: &LabPlan) -> Result<(), LabError> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let own = format!("{}{}.", defaults::NETNS_PREFIX, plan.lab);
    let namespaces: Vec<&str> = plan
        .namespaces()
        .filter(|ns| ns.starts_with(&own))
        .collect();
    for ns in &namespaces {
        let Ok(pids) = netns::ip(None, &["netns", "pids", ns]) else {
            continue;
        };
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let mut first_err = None;
    for ns in namespaces.into_iter().rev() {
        if let Err(e) = netns::delete(ns) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), |e| Err(e.into()))
}

/// Removes labs whose owner died without cleaning up (detached labs are kept), and lab
/// namespaces that belong to no lab. Returns the names of what was removed.
pub fn sweep() -> Vec<String> {
    // Namespaces first: a lab writes its state before it creates namespaces, so every
    // namespace in this snapshot that belongs to a live lab has its state in the listing below.
    let namespaces = netns::list();
    let mut removed = Vec::new();
    let mut live = std::collections::BTreeSet::new();
    for name in state_names() {
        match load_state(&name) {
            Ok(state) if !state.detached && !state.owner.is_alive() => {
                if down(&name).is_ok() {
                    removed.push(name);
                }
            }
            // Live, detached, or unreadable (then `lab down` may still know better): keep.
            _ => {
                live.insert(name);
            }
        }
    }
    for ns in namespaces {
        let Some(rest) = ns.strip_prefix(defaults::NETNS_PREFIX) else {
            continue;
        };
        let lab = rest.split('.').next().unwrap_or_default();
        if !live.contains(lab) && netns::exists(&ns) && netns::delete(&ns).is_ok() {
            removed.push(ns);
        }
    }
    removed
}

/// A fresh lab name: `t` and ten hex digits from the time, the PID and a counter.
pub fn random_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = crate::delay::SplitMix64::new(
        nanos ^ u64::from(std::process::id()) << 32 ^ COUNTER.fetch_add(1, Ordering::Relaxed),
    );
    format!("t{:010x}", rng.next_u64() >> 24)
}

/// A lab that exists while this value lives (unless detached).
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    delay_lines: Vec<DelayLine>,
    evictors: Vec<Evictor>,
    children: Mutex<Vec<Arc<Mutex<Child>>>>,
    /// The miniupnpd of each port-mapping router, by router name.
    daemons: Mutex<BTreeMap<String, Child>>,
    /// Set once the namespaces exist, so that Drop knows there is something to remove.
    built: bool,
}

impl Lab {
    /// Builds the lab described by `topology`.
    pub fn build(topology: &Topology, options: LabOptions) -> Result<Self, LabError> {
        environment::check().map_err(LabError::Environment)?;
        let name = options.name.unwrap_or_else(random_name);
        validate_name(&name, MAX_LAB_NAME)?;
        let plan = topology.plan(&name)?;
        let maps_ports = plan
            .nodes
            .iter()
            .any(|n| n.router.as_ref().is_some_and(|r| r.portmap.is_some()));
        if maps_ports && !std::path::Path::new(portmap::MINIUPNPD).is_file() {
            return Err(LabError::Environment(format!(
                "port-mapping routers need {} (apt-get install miniupnpd-nftables miniupnpd)",
                portmap::MINIUPNPD
            )));
        }
        if plan.namespaces().any(netns::exists) {
            return Err(LabError::Exists(name));
        }
        let state = LabState {
            plan,
            owner: ProcessId::current(),
            detached: false,
            holder: None,
            seed: options.seed,
        };
        claim(&state)?;
        let mut lab = Self {
            state,
            delay_lines: Vec::new(),
            evictors: Vec::new(),
            children: Mutex::new(Vec::new()),
            daemons: Mutex::new(BTreeMap::new()),
            built: true,
        };
        lab.create()?;
        if !options.external_delay_lines {
            lab.delay_lines = start_delay_lines(&lab.state.plan, options.seed)?;
            lab.evictors = start_evictors(&lab.state.plan)?;
        }
        Ok(lab)
    }

    fn create(&self) -> Result<(), LabError> {
        let plan = &self.state.plan;
        for ns in plan.namespaces() {
            netns::add(ns)?;
            netns::ip(Some(ns), &["link", "set", "lo", "up"])?;
            // IPv6 stays off: the lab is IPv4, and router solicitations would only add noise.
            // Bridges must not call iptables (br_netfilter may be loaded on the host): a LAN
            // bridge would otherwise NAT frames at layer 2 and hairpinning could never work.
            let forward = if ns == plan.internet_netns { "0" } else { "1" };
            netns::run(
                Some(ns),
                "sysctl",
                &[
                    "-e",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                    &format!("net.ipv4.ip_forward={forward}"),
                    "net.bridge.bridge-nf-call-iptables=0",
                    "net.bridge.bridge-nf-call-ip6tables=0",
                    "net.bridge.bridge-nf-call-arptables=0",
                ],
                None,
            )?;
        }
        let inet = plan.internet_netns.as_str();
        let sink = format!("{}/{}", defaults::INTERNET_SINK, defaults::INTERNET_PREFIX);
        netns::ip(
            Some(inet),
            &["link", "add", INTERNET_BRIDGE, "type", "bridge"],
        )?;
        netns::ip(Some(inet), &["addr", "add", &sink, "dev", INTERNET_BRIDGE])?;
        netns::ip(Some(inet), &["link", "set", INTERNET_BRIDGE, "up"])?;
        for node in &plan.nodes {
            create_node(node)?;
        }
        for node in &plan.nodes {
            if let Some(child) = start_portmap(&plan.lab, node)? {
                self.keep_daemon(&node.name, child);
            }
        }
        Ok(())
    }

    fn keep_daemon(&self, router: &str, child: Child) {
        if let Ok(mut daemons) = self.daemons.lock()
            && let Some(mut old) = daemons.insert(router.to_owned(), child)
        {
            end_group(&mut old);
        }
    }

    /// Power-cycles router `router`: it goes dark for `downtime`, forgets every NAT mapping and
    /// port mapping (conntrack, the lab's tables, miniupnpd's rules and lease file), and comes
    /// back with a fresh miniupnpd whose epoch starts again from zero. See [`reboot_router`].
    pub fn reboot_router(&self, router: &str, downtime: Duration) -> Result<(), LabError> {
        // Our own child is ended and reaped here; `reboot_router` then finds it gone.
        if let Ok(mut daemons) = self.daemons.lock()
            && let Some(mut old) = daemons.remove(router)
        {
            end_group(&mut old);
        }
        if let Some(child) = reboot_router(&self.state.plan, router, downtime)? {
            self.keep_daemon(router, child);
        }
        Ok(())
    }

    /// Gives router `router` a new external address (`new`, or a free one on its uplink) and
    /// returns it. See [`renumber_router`].
    pub fn renumber_router(
        &mut self,
        router: &str,
        new: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, LabError> {
        renumber_router(&mut self.state, router, new)
    }

    /// Keeps the lab after this value is dropped, until `natpunch lab down` (or [`down`]).
    /// Delay lines run by this process stop with it, so detach labs built with
    /// `external_delay_lines` and let a holder process run them.
    pub fn detach(mut self) -> Result<LabPlan, LabError> {
        self.state.detached = true;
        save_state(&self.state)?;
        self.built = false;
        Ok(self.state.plan.clone())
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.state.plan.lab
    }

    /// The lab's plan: nodes, namespaces, addresses.
    pub fn plan(&self) -> &LabPlan {
        &self.state.plan
    }

    /// The plan of node `name`.
    pub fn node(&self, name: &str) -> Result<&NodePlan, LabError> {
        node_of(&self.state.plan, name)
    }

    /// Runs `program args…` in node `node` to its end and returns its stdout.
    pub fn exec(&self, node: &str, program: &str, args: &[&str]) -> Result<String, LabError> {
        Ok(netns::run_for(
            Some(&self.node(node)?.netns),
            program,
            args,
            None,
            None,
        )?)
    }

    /// A [`Command`] that runs `program` inside node `node` (add arguments, then spawn it).
    pub fn command(&self, node: &str, program: &str) -> Result<Command, LabError> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node(node)?.netns, program]);
        Ok(c)
    }

    /// Starts a long-lived process in node `node`; its stdout and stderr are captured. The
    /// process ends when the returned handle or the lab is dropped, whichever comes first.
    /// It gets none of the caller's `NATPUNCH_*` variables: the roles a lab starts are set by
    /// their arguments alone, not by what the person running the lab has exported.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(
        &self,
        node: &str,
        program: &str,
        args: &[S],
    ) -> Result<LabProcess, LabError> {
        let mut cmd = self.command(node, program)?;
        for name in natpunch_settings(std::env::vars_os().map(|(k, _)| k)) {
            cmd.env_remove(name);
        }
        // A process group of its own, so that ending it also ends whatever it started.
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let label = format!("{node}: {program}");
        let mut child = cmd.spawn().map_err(io_err(format!("starting {label}")))?;
        let output = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let mut readers = Vec::new();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let output = Arc::clone(&output);
            readers.push(thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let (text, cond) = &*output;
                    if let Ok(mut t) = text.lock() {
                        t.push_str(&line);
                        t.push('\n');
                    }
                    cond.notify_all();
                }
            }));
        }
        let child = Arc::new(Mutex::new(child));
        if let Ok(mut children) = self.children.lock() {
            children.push(Arc::clone(&child));
        }
        Ok(LabProcess {
            label,
            child,
            output,
            readers,
        })
    }

    /// Runs `f` on a thread inside node `node`; sockets it creates live in that node.
    pub fn run_in<F, T>(&self, node: &str, f: F) -> Result<T, LabError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let ns = &self.node(node)?.netns;
        // The error names the namespace.
        netns::scoped(ns, f).map_err(io_err(format!("running in node `{node}`")))
    }

    /// Forgets every NAT mapping: flushes conntrack and the mapping tables of every router, so
    /// that independent trials do not see each other's state.
    pub fn flush_nat_state(&self) -> Result<(), LabError> {
        for node in self.state.plan.nodes.iter().filter(|n| n.is_router()) {
            flush_router_state(node)?;
        }
        Ok(())
    }

    /// Forgets router `router`'s NAT state (conntrack, mapping tables, session count), as
    /// [`Lab::flush_nat_state`] does for every router.
    pub fn flush_router(&self, router: &str) -> Result<(), LabError> {
        flush_router_state(router_of(&self.state.plan, router)?)
    }

    /// The address node `name`'s traffic shows on the internet.
    pub fn public_addr(&self, name: &str) -> Result<Ipv4Addr, LabError> {
        self.node(name)?;
        self.state
            .plan
            .public_addr_of(name)
            .ok_or_else(|| LabError::NotFound(name.to_owned()))
    }

    fn teardown(&mut self) -> Result<(), LabError> {
        if let Ok(mut children) = self.children.lock() {
            for child in children.drain(..) {
                if let Ok(mut c) = child.lock() {
                    end_group(&mut c);
                }
            }
        }
        if let Ok(mut daemons) = self.daemons.lock() {
            for (_, mut child) in std::mem::take(&mut *daemons) {
                end_group(&mut child);
            }
        }
        self.delay_lines.clear();
        self.evictors.clear();
        delete_namespaces(&self.state.plan)?;
        remove_state(&self.state.plan.lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.built
            && let Err(e) = self.teardown()
        {
            tracing::error!(lab = %self.name(), "lab teardown: {}", crate::chain(&e));
        }
    }
}

fn node_of<'a>(plan: &'a LabPlan, name: &str) -> Result<&'a NodePlan, LabError> {
    plan.node(name).ok_or_else(|| LabError::UnknownNode {
        lab: plan.lab.clone(),
        node: name.to_owned(),
        known: plan
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Starts the delay lines of every node with an impaired uplink.
pub fn start_delay_lines(plan: &LabPlan, seed: u64) -> Result<Vec<DelayLine>, LabError> {
    let mut lines = Vec::new();
    for (i, node) in plan
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.link.is_impaired())
    {
        lines.push(DelayLine::start(node, seed.wrapping_add(i as u64))?);
    }
    Ok(lines)
}

/// Starts the session evictor of every router whose table evicts its oldest flow when full.
pub fn start_evictors(plan: &LabPlan) -> Result<Vec<Evictor>, LabError> {
    let mut evictors = Vec::new();
    for node in plan.nodes.iter().filter(|n| n.evicts_sessions()) {
        evictors.push(Evictor::start(node)?);
    }
    Ok(evictors)
}

/// Starts miniupnpd on `node` if it is a port-mapping router: writes its configuration, loads
/// its nft table (emptying its chains), starts it and records its process. `None` for other
/// nodes.
fn start_portmap(lab: &str, node: &NodePlan) -> Result<Option<Child>, LabError> {
    let Some((router, cfg)) = node
        .router
        .as_ref()
        .and_then(|r| r.portmap.as_ref().map(|p| (r, p)))
    else {
        return Ok(None);
    };
    let files = Files::of(lab, &node.name);
    fs::create_dir_all(&files.dir).map_err(io_err(format!("creating {}", files.dir.display())))?;
    let side = RouterSide {
        wan_if: &node.uplink.iface,
        lan_if: LAN_BRIDGE,
        lan_net: router.lan_net,
    };
    let config = portmap::render_config(cfg, side, &files, &portmap::uuid_for(lab, &node.name));
    fs::write(files.config(), config)
        .map_err(io_err(format!("writing {}", files.config().display())))?;
    let table = portmap::render_table(cfg, LAN_BRIDGE);
    netns::run(Some(&node.netns), "nft", &["-f", "-"], Some(&table))?;
    let child = portmap::spawn(&node.netns, cfg, &files)
        .map_err(io_err(format!("starting miniupnpd on {}", node.name)))?;
    if let Some(id) = ProcessId::of(child.id()) {
        let text = serde_json::to_string(&id).map_err(|e| LabError::Io {
            what: "encoding a process record".into(),
            source: io::Error::other(e),
        })?;
        fs::write(files.process(), text)
            .map_err(io_err(format!("writing {}", files.process().display())))?;
    }
    Ok(Some(child))
}

/// Ends the miniupnpd that the lab recorded for router `router` of lab `lab`, if it still runs.
fn stop_portmap(lab: &str, router: &str) {
    let files = Files::of(lab, router);
    let id = fs::read_to_string(files.process())
        .ok()
        .and_then(|text| serde_json::from_str::<ProcessId>(&text).ok());
    // The start time in the record makes sure a reused PID is never signalled.
    if let Some(id) = id.filter(ProcessId::is_alive) {
        stop_process(id);
    }
}

/// Power-cycles router `router` of a running lab (also a detached one, from another process).
///
/// For `downtime` the router forwards, accepts and sends nothing (an nft table that drops
/// everything, ahead of all others). Meanwhile it loses what a reboot loses: conntrack, the
/// lab's mapping tables and, on a port-mapping router, miniupnpd with its rules and lease
/// file. Then it comes back: traffic flows again and a fresh miniupnpd starts (its epoch from
/// zero) and announces itself on the LAN. Returns that miniupnpd's process, if any.
pub fn reboot_router(
    plan: &LabPlan,
    router: &str,
    downtime: Duration,
) -> Result<Option<Child>, LabError> {
    let node = router_of(plan, router)?;
    let ns = node.netns.as_str();
    let dark = format!(
        "table inet {DARK} {{\n\
           chain input {{ type filter hook input priority raw - 10; policy drop; }}\n\
           chain forward {{ type filter hook forward priority raw - 10; policy drop; }}\n\
           chain output {{ type filter hook output priority raw - 10; policy drop; }}\n\
         }}\n"
    );
    netns::run(Some(ns), "nft", &["-f", "-"], Some(&dark))?;
    let result = (|| {
        stop_portmap(&plan.lab, router);
        flush_router_state(node)?;
        if let Some(cfg) = node.router.as_ref().and_then(|r| r.portmap.as_ref()) {
            netns::run(
                Some(ns),
                "nft",
                &["-f", "-"],
                Some(&portmap::render_table(cfg, LAN_BRIDGE)),
            )?;
            let leases = Files::of(&plan.lab, router).leases();
            match fs::remove_file(&leases) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(format!("removing {}", leases.display()))(e));
                }
                _ => {}
            }
        }
        thread::sleep(downtime);
        Ok(())
    })();
    // Back on, whatever happened above: a lab must not keep a dark router by accident.
    netns::run(Some(ns), "nft", &["delete", "table", "inet", DARK], None)?;
    result?;
    start_portmap(&plan.lab, node)
}

/// The nft table that keeps a rebooting router dark.
const DARK: &str = "natlab_dark";

/// Gives router `router` a new external address and returns it: `new`, or the highest free
/// address of its uplink network. The old address goes (the new one is promoted in its place),
/// the lab's NAT rules are reloaded for the new address with empty tables, conntrack is flushed,
/// and the lab's state records the change. miniupnpd notices by itself (netlink), announces the
/// new address on the LAN and restarts its epoch; its port forwardings keep working.
pub fn renumber_router(
    state: &mut LabState,
    router: &str,
    new: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, LabError> {
    let node = router_of(&state.plan, router)?.clone();
    let up = &node.uplink;
    let used = |ip: Ipv4Addr| {
        ip == up.gateway
            || state.plan.nodes.iter().any(|n| {
                n.uplink.addrs.contains(&ip) || n.router.as_ref().is_some_and(|r| r.lan_addr == ip)
            })
    };
    let size = 1u32 << (32 - u32::from(up.net.prefix()).min(31));
    let broadcast = up.net.nth(size - 1);
    let new = match new {
        Some(ip) if !up.net.contains(ip) || ip == up.net.addr() || Some(ip) == broadcast => {
            return Err(LabError::BadAddress(format!(
                "{ip} is not a host address of {router}'s uplink network {}",
                up.net
            )));
        }
        Some(ip) if used(ip) => {
            return Err(LabError::BadAddress(format!(
                "{ip} is in use in lab {}",
                state.plan.lab
            )));
        }
        Some(ip) => ip,
        None => (2..size - 1)
            .rev()
            .filter_map(|n| up.net.nth(n))
            .find(|ip| !used(*ip))
            .ok_or_else(|| LabError::BadAddress(format!("no free address in {}", up.net)))?,
    };
    let ns = node.netns.as_str();
    let old = up.addrs[0];
    let prefix = up.net.prefix();
    netns::run(
        Some(ns),
        "sysctl",
        &[
            "-qw",
            &format!("net.ipv4.conf.{}.promote_secondaries=1", up.iface),
        ],
        None,
    )?;
    netns::ip(
        Some(ns),
        &["addr", "add", &format!("{new}/{prefix}"), "dev", &up.iface],
    )?;
    netns::ip(
        Some(ns),
        &["addr", "del", &format!("{old}/{prefix}"), "dev", &up.iface],
    )?;
    netns::ip(
        Some(ns),
        &[
            "route",
            "replace",
            "default",
            "via",
            &up.gateway.to_string(),
        ],
    )?;
    load_rules(&node, new)?;
    let _ = netns::run(Some(ns), "conntrack", &["-F"], None);
    if let Some(n) = state.plan.nodes.iter_mut().find(|n| n.name == router) {
        n.uplink.addrs[0] = new;
    }
    save_state(state)?;
    Ok(new)
}

fn router_of<'a>(plan: &'a LabPlan, name: &str) -> Result<&'a NodePlan, LabError> {
    let node = node_of(plan, name)?;
    if node.is_router() {
        Ok(node)
    } else {
        Err(LabError::NotARouter(name.to_owned()))
    }
}

/// Forgets one router's NAT state: conntrack, then the lab's mapping tables.
fn flush_router_state(node: &NodePlan) -> Result<(), LabError> {
    // Conntrack first: a packet between the two steps must not re-learn a flushed entry.
    // (conntrack -F exits non-zero on an empty table with some versions: ignore that.)
    let _ = netns::run(Some(&node.netns), "conntrack", &["-F"], None);
    let Some(router) = &node.router else {
        return Ok(());
    };
    if router.nat.max_sessions.is_some() {
        // The kernel keeps a bounded table's count in its rule and prunes flushed flows from
        // it only a few at a time, as new flows come: a fresh ruleset starts from zero (and
        // with empty mapping tables).
        return load_rules(node, node.addr());
    }
    for (kind, name) in &nft::state_sets(&router.nat) {
        let args = ["flush", kind, "ip", nft::TABLE, name];
        netns::run(Some(&node.netns), "nft", &args, None)?;
    }
    Ok(())
}

/// Loads (or replaces) router `node`'s NAT ruleset for external address `wan_ip`; a no-op on
/// hosts.
fn load_rules(node: &NodePlan, wan_ip: Ipv4Addr) -> Result<(), LabError> {
    let Some(r) = &node.router else {
        return Ok(());
    };
    let rules = nft::render(&RouterRules {
        nat: &r.nat,
        wan_if: &node.uplink.iface,
        wan_ip,
        lan_if: LAN_BRIDGE,
        lan_net: r.lan_net,
    });
    netns::run(Some(&node.netns), "nft", &["-f", "-"], Some(&rules))?;
    Ok(())
}

fn create_node(node: &NodePlan) -> Result<(), LabError> {
    let ns = node.netns.as_str();
    let up = &node.uplink;
    if let Some(r) = &node.router {
        let lan_addr = format!("{}/{}", r.lan_addr, r.lan_net.prefix());
        netns::ip(Some(ns), &["link", "add", LAN_BRIDGE, "type", "bridge"])?;
        netns::ip(Some(ns), &["addr", "add", &lan_addr, "dev", LAN_BRIDGE])?;
        netns::ip(Some(ns), &["link", "set", LAN_BRIDGE, "up"])?;
    }
    // The veth is created inside the upstream's namespace with its other end moved straight into
    // the node's: no interface ever appears in the root namespace.
    netns::ip(
        Some(&up.peer_netns),
        &[
            "link",
            "add",
            &up.peer_iface,
            "type",
            "veth",
            "peer",
            "name",
            &up.iface,
            "netns",
            ns,
        ],
    )?;
    netns::ip(
        Some(&up.peer_netns),
        &[
            "link",
            "set",
            &up.peer_iface,
            "master",
            &up.peer_bridge,
            "up",
        ],
    )?;
    for addr in &up.addrs {
        netns::ip(
            Some(ns),
            &[
                "addr",
                "add",
                &format!("{addr}/{}", up.net.prefix()),
                "dev",
                &up.iface,
            ],
        )?;
    }
    netns::ip(Some(ns), &["link", "set", &up.iface, "up"])?;
    netns::ip(
        Some(ns),
        &["route", "add", "default", "via", &up.gateway.to_string()],
    )?;
    if let Some(r) = &node.router {
        load_rules(node, up.addrs[0])?;
        let sysctls: Vec<String> = nft::conntrack_sysctls(&r.nat)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut args = vec!["-qw"];
        args.extend(sysctls.iter().map(String::as_str));
        netns::run(Some(ns), "sysctl", &args, None)?;
    }
    Ok(())
}

/// A process running in a lab node. Dropping it ends the process.
#[derive(Debug)]
pub struct LabProcess {
    label: String,
    child: Arc<Mutex<Child>>,
    output: Arc<(Mutex<String>, Condvar)>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl LabProcess {
    /// The process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().ok().map(|c| c.id())
    }

    /// Everything the process printed so far (stdout and stderr, line by line).
    pub fn output(&self) -> String {
        self.output.0.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Waits until the process has printed a line containing `needle` and returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, LabError> {
        let deadline = Instant::now() + timeout;
        let (text, cond) = &*self.output;
        let mut guard = text
            .lock()
            .map_err(|_| io_err("process output")(io::Error::other("poisoned")))?;
        loop {
            if let Some(line) = guard.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            let now = Instant::now();
            if now >= deadline || self.has_exited() {
                return Err(LabError::NotReady {
                    process: self.label.clone(),
                    needle: needle.to_owned(),
                    timeout,
                    output: guard.clone(),
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            guard = cond
                .wait_timeout(guard, wait)
                .map_err(|_| io_err("process output")(io::Error::other("poisoned")))?
                .0;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        !self.has_exited()
    }

    fn has_exited(&self) -> bool {
        self.child
            .lock()
            .map(|mut c| matches!(c.try_wait(), Ok(Some(_))))
            .unwrap_or(true)
    }

    /// Waits for the process to exit and returns its exit code (`None` if killed by a signal).
    pub fn wait(mut self) -> Result<Option<i32>, LabError> {
        let status = self
            .child
            .lock()
            .map_err(|_| io_err("wait")(io::Error::other("poisoned")))?
            .wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok(status
            .map_err(io_err(format!("waiting for {}", self.label)))?
            .code())
    }
}

/// Ends a child we started and everything in its process group, then reaps it.
fn end_group(child: &mut Child) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let (Ok(None), Ok(pid)) = (child.try_wait(), i32::try_from(child.id())) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            end_group(&mut c);
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// The names among `names` that are natpunch's settings (`NATPUNCH_*`).
fn natpunch_settings(names: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    names
        .filter(|n| n.as_encoded_bytes().starts_with(b"NATPUNCH_"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn lab_processes_get_none_of_the_callers_natpunch_settings() {
        let names = [
            "PATH",
            "NATPUNCH_PEER_IDENTITY",
            "HOME",
            "NATPUNCH_LOG",
            "XNATPUNCH_A",
        ];
        assert_eq!(
            super::natpunch_settings(names.into_iter().map(Into::into)),
            ["NATPUNCH_PEER_IDENTITY", "NATPUNCH_LOG"].map(std::ffi::OsString::from)
        );
    }
}
