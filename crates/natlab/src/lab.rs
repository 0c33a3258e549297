//! A running lab: build it from a [`Topology`], use it, drop it.
//!
//! Building writes a state file first (`/run/natpunch/labs/NAME.json`), then creates the
//! namespaces, links, addresses, routes and router rules. Dropping a [`Lab`] (also while a test
//! panics) kills the processes it started, stops its delay lines and deletes its namespaces,
//! which takes every veth and nft table with them. [`sweep`] removes what crashed processes left.
//! A lab made with [`Lab::detach`] outlives its process until [`down`] removes it.

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
    /// The machine cannot run labs.
    #[error("{0}")]
    Environment(String),
    /// File or thread trouble.
    #[error("{what}: {source}")]
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
    /// Leave delay lines to another process (the CLI's holder) instead of running them here.
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
    children: Mutex<Vec<Arc<Mutex<Child>>>>,
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
            children: Mutex::new(Vec::new()),
            built: true,
        };
        lab.create()?;
        if !options.external_delay_lines {
            lab.delay_lines = start_delay_lines(&lab.state.plan, options.seed)?;
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
        Ok(())
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
    pub fn spawn(&self, node: &str, program: &str, args: &[&str]) -> Result<LabProcess, LabError> {
        let mut cmd = self.command(node, program)?;
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
        netns::scoped(ns, f).map_err(io_err(format!("entering {ns}")))
    }

    /// Forgets every NAT mapping: flushes conntrack and the mapping tables of every router, so
    /// that independent trials do not see each other's state.
    pub fn flush_nat_state(&self) -> Result<(), LabError> {
        for node in self.state.plan.nodes.iter().filter(|n| n.is_router()) {
            // Conntrack first: a packet between the two steps must not re-learn a flushed entry.
            // (conntrack -F exits non-zero on an empty table with some versions: ignore that.)
            let _ = netns::run(Some(&node.netns), "conntrack", &["-F"], None);
            let sets = node
                .router
                .as_ref()
                .map(|r| nft::state_sets(&r.nat))
                .unwrap_or_default();
            for (kind, name) in &sets {
                let args = ["flush", kind, "ip", nft::TABLE, name];
                netns::run(Some(&node.netns), "nft", &args, None)?;
            }
        }
        Ok(())
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
        self.delay_lines.clear();
        delete_namespaces(&self.state.plan)?;
        remove_state(&self.state.plan.lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.built
            && let Err(e) = self.teardown()
        {
            tracing::error!(lab = %self.name(), "lab teardown: {e}");
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
        let rules = nft::render(&RouterRules {
            nat: &r.nat,
            wan_if: &up.iface,
            wan_ip: up.addrs[0],
            lan_if: LAN_BRIDGE,
            lan_net: r.lan_net,
        });
        netns::run(Some(ns), "nft", &["-f", "-"], Some(&rules))?;
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
