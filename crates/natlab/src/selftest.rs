//! The lab proves itself: every preset is built, then measured from a host behind it.
//!
//! One lab holds a reflector (a public host with two addresses) and, per preset, a host behind a
//! router of that preset (`open`: a public host; `cgnat`: behind a port-restricted home router
//! behind the CGNAT). Each host measures mapping, filtering, port allocation and hairpinning over
//! UDP, mapping, filtering and the answer to unsolicited SYNs over TCP, and, for presets with a
//! UDP idle timeout of at most a minute, that a mapping is still there just before the timeout
//! and gone just after it. Presets are measured in parallel.
//!
//! Asked to ([`SelftestOptions`]), it gives every router a bounded session table and measures
//! that first, on the fresh router: `max_sessions + 8` new UDP flows, one after the other, how
//! many are answered and which still reach the host at the end
//! ([`probe::measure_session_table`]). The routers then forget those flows before the other
//! measurements run.

use std::fmt;
use std::net::Ipv4Addr;
use std::thread;
use std::time::Duration;

use serde::Serialize;

use crate::lab::{Lab, LabError, LabOptions};
use crate::nat::{
    Filtering, Mapping, NatConfig, PortAllocation, Preset, SessionOverflow, Unsolicited,
};
use crate::probe::{self, Reflector, SessionTable};
use crate::topology::{NodeKind, Topology};

/// Ports of the reflector.
const REFLECTOR_PORTS: [u16; 2] = [3478, 3479];
/// Name of the reflector node.
const REFLECTOR: &str = "reflector";
/// Longest UDP timeout the self-test waits out.
const MAX_TIMEOUT_CHECK_SECS: u32 = 60;
/// Flows the session-table check opens beyond the table's size.
const SESSION_PROBE_EXTRA: u32 = 8;
/// Smallest session table the self-test measures: with `drop`, its other measurements need
/// room for about a dozen UDP flows at once (nine for mapping, filtering, ports and hairpin,
/// two for the idle timeout, and TCP).
pub const MIN_SELFTEST_SESSIONS: u32 = 16;
/// Largest session table the self-test measures: the check holds a socket per flow until it
/// ends, and 256 + 8 stays well below the usual limit of 1024 open files.
pub const MAX_SELFTEST_SESSIONS: u32 = 256;

/// How to run the self-test beyond the choice of presets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SelftestOptions {
    /// Give every router of the tested presets a session table of this many sessions
    /// ([`MIN_SELFTEST_SESSIONS`] to [`MAX_SELFTEST_SESSIONS`]) and measure it.
    pub max_sessions: Option<u32>,
    /// What those tables do when full.
    pub session_overflow: SessionOverflow,
}

impl SelftestOptions {
    /// `nat` with the session table these options ask for.
    pub fn apply(&self, nat: NatConfig) -> NatConfig {
        match self.max_sessions {
            Some(max) => NatConfig {
                max_sessions: Some(max),
                session_overflow: self.session_overflow,
                ..nat
            },
            None => nat,
        }
    }

    /// Checks that the self-test can measure the table asked for.
    pub fn validate(&self) -> Result<(), SelftestError> {
        match self.max_sessions {
            Some(n) if !(MIN_SELFTEST_SESSIONS..=MAX_SELFTEST_SESSIONS).contains(&n) => {
                Err(SelftestError::TableSize(n))
            }
            None if self.session_overflow != SessionOverflow::Drop => {
                Err(SelftestError::OverflowWithoutTable)
            }
            _ => Ok(()),
        }
    }
}

/// Why the self-test did not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SelftestError {
    /// A session table the self-test cannot measure.
    #[error(
        "the self-test measures session tables of {MIN_SELFTEST_SESSIONS} to {MAX_SELFTEST_SESSIONS} sessions, not {0}: \
         smaller ones leave its other measurements no room, larger ones take a socket per flow"
    )]
    TableSize(u32),
    /// An overflow behaviour without a table size.
    #[error("a session overflow behaviour needs a table size (max_sessions)")]
    OverflowWithoutTable,
    /// The lab failed.
    #[error(transparent)]
    Lab(#[from] LabError),
}

/// The four UDP axes, configured or measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UdpAxes {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Port allocation.
    pub port_allocation: PortAllocation,
    /// Hairpinning.
    pub hairpin: bool,
}

/// The TCP axes, configured or measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcpAxes {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Answer to an unsolicited SYN.
    pub unsolicited: Unsolicited,
}

/// The UDP idle-timeout check of one preset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimeoutCheck {
    /// Configured idle timeout.
    pub configured_secs: u32,
    /// When the first mapping was tested, in seconds of idle time.
    pub checked_before_secs: f64,
    /// Whether it was still there.
    pub alive_before: bool,
    /// When the second mapping was tested.
    pub checked_after_secs: f64,
    /// Whether it was still there (it should not be).
    pub alive_after: bool,
}

/// The session-table check of one preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SessionCheck {
    /// The table the routers have.
    pub configured: SessionTable,
    /// The table the flows showed, if the check ran.
    pub measured: Option<SessionTable>,
    /// New flows opened.
    pub flows: u32,
    /// How many were answered.
    pub answered: u32,
    /// How many of the answered ones still reached the host at the end.
    pub kept: u32,
}

/// TCP part of a row.
#[derive(Debug, Clone, Serialize)]
pub struct TcpRow {
    /// Expected.
    pub configured: TcpAxes,
    /// Seen.
    pub measured: Option<TcpAxes>,
}

/// One row of the self-test.
#[derive(Debug, Clone, Serialize)]
pub struct PresetRow {
    /// Preset name.
    pub name: Preset,
    /// The routers between the host and the internet, innermost first.
    pub path: Vec<Preset>,
    /// Expected UDP behaviour.
    pub configured: UdpAxes,
    /// Measured UDP behaviour, if the measurement ran.
    pub measured: Option<UdpAxes>,
    /// TCP behaviour.
    pub tcp: TcpRow,
    /// The idle-timeout check, for presets with short timeouts.
    pub udp_timeout: Option<TimeoutCheck>,
    /// The session-table check, for routers with a bounded table.
    pub sessions: Option<SessionCheck>,
    /// Why a measurement failed, if one did.
    pub error: Option<String>,
    /// Whether everything measured matches the configuration.
    pub ok: bool,
}

/// The whole self-test.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestReport {
    /// One row per preset.
    pub presets: Vec<PresetRow>,
}

impl SelftestReport {
    /// Whether every row matches.
    pub fn ok(&self) -> bool {
        self.presets.iter().all(|r| r.ok)
    }

    fn has_sessions(&self) -> bool {
        self.presets.iter().any(|r| r.sessions.is_some())
    }
}

/// The [`cell`] of one axis (`get`) of a configured and a measured behaviour.
fn axis<A, T: PartialEq + ToString>(c: &A, m: Option<&A>, get: impl Fn(&A) -> T) -> String {
    cell(get(c), m.map(&get))
}

/// `configured` when the measurement agrees, `configured≠measured` when it does not.
fn cell<T: PartialEq + ToString>(configured: T, measured: Option<T>) -> String {
    match measured {
        Some(m) if m == configured => configured.to_string(),
        Some(m) => format!("{}≠{}", configured.to_string(), m.to_string()),
        None => format!("{}≠?", configured.to_string()),
    }
}

/// The presets as a table (configured≠measured where they differ), the tally below it.
impl fmt::Display for SelftestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report = self;
        writeln!(f, "each cell: the configured value, or configured≠measured")?;
        writeln!(
            f,
            "{:<21} {:<10} {:<10} {:<10} {:<8} {:<10} {:<10} {:<11} {:<14} {}RESULT",
            "PRESET",
            "MAPPING",
            "FILTERING",
            "PORTS",
            "HAIRPIN",
            "TCP MAP",
            "TCP FILTER",
            "UNSOLICITED",
            "UDP IDLE",
            if self.has_sessions() {
                format!("{:<17} ", "SESSIONS")
            } else {
                String::new()
            }
        )?;
        for r in &report.presets {
            let (c, m) = (&r.configured, r.measured.as_ref());
            let (tc, tm) = (&r.tcp.configured, r.tcp.measured.as_ref());
            let on_off = |b: bool| if b { "on" } else { "off" };
            let idle = r.udp_timeout.as_ref().map_or_else(
                || "-".to_owned(),
                |t| {
                    format!(
                        "{} s {}",
                        t.configured_secs,
                        if t.alive_before && !t.alive_after {
                            "ok"
                        } else {
                            "WRONG"
                        }
                    )
                },
            );
            let sessions = if self.has_sessions() {
                let cell = r.sessions.as_ref().map_or_else(
                    || "-".to_owned(),
                    |s| cell(s.configured.to_string(), s.measured.map(|m| m.to_string())),
                );
                format!("{cell:<17} ")
            } else {
                String::new()
            };
            writeln!(
                f,
                "{:<21} {:<10} {:<10} {:<10} {:<8} {:<10} {:<10} {:<11} {:<14} {}{}",
                r.name.to_string(),
                axis(c, m, |a| a.mapping.abbreviation()),
                axis(c, m, |a| a.filtering.abbreviation()),
                axis(c, m, |a| a.port_allocation),
                axis(c, m, |a| on_off(a.hairpin)),
                axis(tc, tm, |a| a.mapping.abbreviation()),
                axis(tc, tm, |a| a.filtering.abbreviation()),
                axis(tc, tm, |a| a.unsolicited),
                idle,
                sessions,
                if r.ok { "ok" } else { "MISMATCH" }
            )?;
            if let Some(s) = &r.sessions {
                writeln!(
                    f,
                    "{:<21} session table: {} new flows, {} answered, {} still mapped at the end",
                    "", s.flows, s.answered, s.kept
                )?;
            }
            if let Some(t) = &r.udp_timeout {
                writeln!(
                    f,
                    "{:<21} udp idle timeout: mapping alive after {:.0} s: {}, after {:.0} s: {}",
                    "", t.checked_before_secs, t.alive_before, t.checked_after_secs, t.alive_after
                )?;
            }
            if let Some(e) = &r.error {
                writeln!(f, "{:<21} error: {e}", "")?;
            }
        }
        let failed = report.presets.iter().filter(|r| !r.ok).count();
        writeln!(
            f,
            "\n{} of {} presets behave as configured",
            report.presets.len() - failed,
            report.presets.len()
        )?;
        Ok(())
    }
}

fn rank_mapping(m: Mapping) -> u8 {
    match m {
        Mapping::None => 0,
        Mapping::EndpointIndependent => 1,
        Mapping::AddressDependent => 2,
        Mapping::AddressAndPortDependent => 3,
    }
}

fn rank_filtering(f: Filtering) -> u8 {
    match f {
        Filtering::None => 0,
        Filtering::EndpointIndependent => 1,
        Filtering::AddressDependent => 2,
        Filtering::AddressAndPortDependent => 3,
    }
}

/// The behaviour a host sees through a chain of NATs, innermost first. An empty chain is no NAT.
pub fn expected_through(chain: &[NatConfig]) -> (UdpAxes, TcpAxes) {
    let Some(outer) = chain.last() else {
        let udp = UdpAxes {
            mapping: Mapping::None,
            filtering: Filtering::None,
            port_allocation: PortAllocation::Preserve,
            hairpin: true,
        };
        // A public host without firewall: the kernel answers SYNs to closed ports with RST.
        let tcp = TcpAxes {
            mapping: Mapping::None,
            filtering: Filtering::None,
            unsolicited: Unsolicited::Reject,
        };
        return (udp, tcp);
    };
    let mapping = chain
        .iter()
        .map(|c| c.mapping)
        .max_by_key(|m| rank_mapping(*m))
        .unwrap_or(outer.mapping);
    let filtering = chain
        .iter()
        .map(|c| c.filtering)
        .max_by_key(|f| rank_filtering(*f))
        .unwrap_or(outer.filtering);
    let allocations: Vec<PortAllocation> = chain.iter().map(|c| c.port_allocation).collect();
    let port_allocation = if allocations.iter().all(|a| *a == PortAllocation::Preserve) {
        PortAllocation::Preserve
    } else if allocations
        .iter()
        .filter(|a| **a != PortAllocation::Preserve)
        .count()
        == 1
        && allocations.contains(&PortAllocation::Sequential)
    {
        PortAllocation::Sequential
    } else {
        PortAllocation::Random
    };
    // Inner routers forward a packet to the outer public address like any other; only the
    // outermost router can turn it around.
    let udp = UdpAxes {
        mapping,
        filtering,
        port_allocation,
        hairpin: outer.hairpin,
    };
    let tcp = TcpAxes {
        mapping,
        filtering,
        unsolicited: outer.unsolicited,
    };
    (udp, tcp)
}

/// The routers a preset's host sits behind in the self-test, innermost first.
pub fn path_of(preset: Preset) -> Vec<Preset> {
    match preset {
        Preset::Open => vec![],
        Preset::Cgnat => vec![Preset::PortRestricted, Preset::Cgnat],
        p => vec![p],
    }
}

fn host_name(p: Preset) -> String {
    format!("h-{p}")
}

/// The self-test's name for the `i`-th router from the internet on `preset`'s path.
fn router_name(preset: Preset, i: usize) -> String {
    if i == 0 {
        format!("r-{preset}")
    } else {
        format!("r-{preset}-{i}")
    }
}

/// The self-test lab's topology for `presets`.
pub fn topology(presets: &[Preset]) -> Topology {
    topology_with(presets, &SelftestOptions::default())
}

/// The self-test lab's topology for `presets`, its routers changed as `options` say.
pub fn topology_with(presets: &[Preset], options: &SelftestOptions) -> Topology {
    let mut t = Topology::default().host(REFLECTOR, None, 2);
    for &p in presets {
        let (with_path, upstream) = add_path(t, p, |i| router_name(p, i));
        t = with_path.host(&host_name(p), upstream.as_deref(), 1);
    }
    for node in &mut t.nodes {
        if let NodeKind::Router { nat, preset, .. } = &mut node.kind {
            *nat = options.apply(*nat);
            *preset = preset.filter(|p| p.config() == Some(*nat));
        }
    }
    t
}

/// Adds the routers of `preset`'s path ([`path_of`]) to `t`, outermost first, the `i`-th from
/// the internet named `name(i)`. Returns the topology and the innermost router (where a host
/// behind the preset attaches; `None` for [`Preset::Open`]).
pub fn add_path(
    mut t: Topology,
    preset: Preset,
    name: impl Fn(usize) -> String,
) -> (Topology, Option<String>) {
    let mut upstream: Option<String> = None;
    for (i, config) in path_of(preset)
        .iter()
        .rev()
        .filter_map(|hop| hop.config())
        .enumerate()
    {
        let n = name(i);
        t = t.router(&n, config, upstream.as_deref());
        upstream = Some(n);
    }
    (t, upstream)
}

/// Runs the self-test over `presets` and reports every row; `progress` hears what is going on.
pub fn run(
    presets: &[Preset],
    progress: &(dyn Fn(&str) + Sync),
) -> Result<SelftestReport, LabError> {
    measure_all(presets, &SelftestOptions::default(), progress)
}

/// Runs the self-test over `presets` with `options` and reports every row; `progress` hears
/// what is going on.
pub fn run_with(
    presets: &[Preset],
    options: &SelftestOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<SelftestReport, SelftestError> {
    options.validate()?;
    Ok(measure_all(presets, options, progress)?)
}

fn measure_all(
    presets: &[Preset],
    options: &SelftestOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<SelftestReport, LabError> {
    progress(&format!("building a lab with {} presets", presets.len()));
    let lab = Lab::build(&topology_with(presets, options), LabOptions::default())?;
    let reflector = Reflector::start(&lab, REFLECTOR, REFLECTOR_PORTS)?;
    progress("measuring every preset from a host behind it");
    let rows = thread::scope(|s| {
        let handles: Vec<_> = presets
            .iter()
            .map(|&p| {
                let (lab, reflector) = (&lab, &reflector);
                s.spawn(move || measure_row(lab, reflector, p, options, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    Ok(SelftestReport { presets: rows })
}

fn measure_row(
    lab: &Lab,
    reflector: &Reflector,
    preset: Preset,
    options: &SelftestOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> PresetRow {
    let path = path_of(preset);
    let chain: Vec<NatConfig> = path
        .iter()
        .filter_map(|p| p.config())
        .map(|c| options.apply(c))
        .collect();
    let configured_table = SessionTable::of_chain(&chain);
    let (configured, configured_tcp) = expected_through(&chain);
    let host = host_name(preset);
    let mut row = PresetRow {
        name: preset,
        path,
        configured,
        measured: None,
        tcp: TcpRow {
            configured: configured_tcp,
            measured: None,
        },
        udp_timeout: None,
        sessions: (configured_table != SessionTable::Unbounded).then_some(SessionCheck {
            configured: configured_table,
            measured: None,
            flows: 0,
            answered: 0,
            kept: 0,
        }),
        error: None,
        ok: false,
    };
    let local_ip = match lab.node(&host) {
        Ok(n) => n.addr(),
        Err(e) => {
            row.error = Some(crate::chain(&e).to_string());
            return row;
        }
    };
    // The session table first, on the fresh router; then the routers forget those flows, so
    // that the other measurements start from an empty table.
    if let (
        SessionTable::Drop { max_sessions } | SessionTable::EvictOldest { max_sessions },
        Some(check),
    ) = (configured_table, row.sessions.as_mut())
    {
        progress(&format!("{preset}: filling its session table"));
        let flows = max_sessions + SESSION_PROBE_EXTRA;
        let measured = lab
            .run_in(&host, || probe::measure_session_table(reflector, flows))
            .map_err(|e| crate::chain(&e).to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let flushed = (0..chain.len())
            .try_for_each(|i| lab.flush_router(&router_name(preset, i)))
            .map_err(|e| crate::chain(&e).to_string());
        match measured.and_then(|m| flushed.map(|()| m)) {
            Ok(m) => {
                *check = SessionCheck {
                    measured: Some(m.table),
                    flows: m.flows,
                    answered: m.answered,
                    kept: m.kept,
                    ..*check
                };
            }
            Err(e) => {
                row.error = Some(format!("session table: {e}"));
                return row;
            }
        }
    }
    let result = lab.run_in(&host, || -> std::io::Result<_> {
        let udp = probe::measure_udp(reflector, local_ip)?;
        let tcp = probe::measure_tcp(reflector, local_ip)?;
        let timeout = match chain.iter().map(|c| c.udp_timeout_secs).min() {
            Some(secs) if secs <= MAX_TIMEOUT_CHECK_SECS => {
                let t = Duration::from_secs(secs.into());
                let margin = (t / 10).max(Duration::from_secs(2));
                progress(&format!(
                    "{preset}: waiting out the {secs} s UDP idle timeout"
                ));
                let (alive_before, alive_after) =
                    probe::udp_mapping_lifetime(reflector, t - margin, t + margin)?;
                Some(TimeoutCheck {
                    configured_secs: secs,
                    checked_before_secs: (t - margin).as_secs_f64(),
                    alive_before,
                    checked_after_secs: (t + margin).as_secs_f64(),
                    alive_after,
                })
            }
            _ => None,
        };
        Ok((udp, tcp, timeout))
    });
    match result {
        Ok(Ok((udp, tcp, timeout))) => {
            row.measured = Some(UdpAxes {
                mapping: udp.mapping,
                filtering: udp.filtering,
                port_allocation: udp.port_allocation,
                hairpin: udp.hairpin,
            });
            row.tcp.measured = Some(TcpAxes {
                mapping: tcp.mapping,
                filtering: tcp.filtering,
                unsolicited: tcp.unsolicited,
            });
            row.udp_timeout = timeout;
            let public = lab.public_addr(&host).unwrap_or(Ipv4Addr::UNSPECIFIED);
            let public_ok = udp.public_ip == public;
            if !public_ok {
                row.error = Some(format!("seen from {}, expected {public}", udp.public_ip));
            }
            row.ok = public_ok
                && row
                    .sessions
                    .is_none_or(|s| s.measured == Some(s.configured))
                && row.measured == Some(row.configured)
                && row.tcp.measured == Some(row.tcp.configured)
                && timeout.is_none_or(|t| t.alive_before && !t.alive_after);
        }
        Ok(Err(e)) => row.error = Some(e.to_string()),
        Err(e) => row.error = Some(crate::chain(&e).to_string()),
    }
    progress(&format!(
        "{preset}: {}",
        if row.ok { "ok" } else { "MISMATCH" }
    ));
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(p: Preset) -> NatConfig {
        p.config().expect("router preset")
    }

    #[test]
    fn a_chain_is_as_strict_as_its_strictest_router() {
        let (udp, tcp) = expected_through(&[config(Preset::FullCone), config(Preset::Symmetric)]);
        assert_eq!(udp.mapping, Mapping::AddressAndPortDependent);
        assert_eq!(udp.filtering, Filtering::AddressAndPortDependent);
        assert_eq!(udp.port_allocation, PortAllocation::Random);
        assert!(!udp.hairpin, "the outer router decides hairpinning");
        assert_eq!(tcp.unsolicited, Unsolicited::Drop);
    }

    #[test]
    fn the_cgnat_chain_looks_like_the_cgnat_preset() {
        let (udp, _) = expected_through(&[config(Preset::PortRestricted), config(Preset::Cgnat)]);
        let c = config(Preset::Cgnat);
        assert_eq!(
            udp,
            UdpAxes {
                mapping: c.mapping,
                filtering: c.filtering,
                port_allocation: c.port_allocation,
                hairpin: c.hairpin
            }
        );
    }

    #[test]
    fn sequential_survives_a_preserving_router() {
        let mut seq = config(Preset::PortRestricted);
        seq.port_allocation = PortAllocation::Sequential;
        let (udp, _) = expected_through(&[config(Preset::PortRestricted), seq]);
        assert_eq!(udp.port_allocation, PortAllocation::Sequential);
    }

    #[test]
    fn no_router_is_no_nat() {
        let (udp, tcp) = expected_through(&[]);
        assert_eq!(
            (udp.mapping, udp.filtering),
            (Mapping::None, Filtering::None)
        );
        assert_eq!(tcp.unsolicited, Unsolicited::Reject);
    }

    #[test]
    fn session_options_bound_every_router_and_are_checked() {
        let options = SelftestOptions {
            max_sessions: Some(16),
            session_overflow: SessionOverflow::EvictOldest,
        };
        assert!(options.validate().is_ok());
        let t = topology_with(&Preset::ALL, &options);
        let routers: Vec<_> = t
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Router { nat, preset, .. } => Some((nat, preset)),
                NodeKind::Host { .. } => None,
            })
            .collect();
        assert_eq!(
            routers.len(),
            7,
            "six router presets, two routers for cgnat"
        );
        for (nat, preset) in routers {
            assert_eq!(nat.max_sessions, Some(16));
            assert_eq!(nat.session_overflow, SessionOverflow::EvictOldest);
            assert_eq!(*preset, None);
        }
        let unbounded = topology(&[Preset::Symmetric]);
        assert!(unbounded.nodes.iter().any(|n| matches!(
            n.kind,
            NodeKind::Router {
                preset: Some(Preset::Symmetric),
                ..
            }
        )));
        for bad in [Some(8), Some(257)] {
            let o = SelftestOptions {
                max_sessions: bad,
                ..options
            };
            assert!(
                o.validate().is_err_and(|e| e
                    .to_string()
                    .starts_with("the self-test measures session tables of 16 to 256 sessions")),
                "{bad:?}"
            );
        }
        let o = SelftestOptions {
            max_sessions: None,
            ..options
        };
        assert!(matches!(
            o.validate(),
            Err(SelftestError::OverflowWithoutTable)
        ));
    }

    #[test]
    fn the_report_shows_the_session_table_only_when_one_was_asked_for() {
        let (udp, tcp) = expected_through(&[config(Preset::Symmetric)]);
        let row = |sessions| PresetRow {
            name: Preset::Symmetric,
            path: vec![Preset::Symmetric],
            configured: udp,
            measured: Some(udp),
            tcp: TcpRow {
                configured: tcp,
                measured: Some(tcp),
            },
            udp_timeout: None,
            sessions,
            error: None,
            ok: true,
        };
        let plain = SelftestReport {
            presets: vec![row(None)],
        }
        .to_string();
        assert!(!plain.contains("SESSIONS"), "{plain}");
        let check = SessionCheck {
            configured: SessionTable::Drop { max_sessions: 16 },
            measured: Some(SessionTable::Drop { max_sessions: 15 }),
            flows: 24,
            answered: 15,
            kept: 15,
        };
        let bounded = SelftestReport {
            presets: vec![row(Some(check))],
        }
        .to_string();
        assert!(
            bounded.contains("UDP IDLE       SESSIONS          RESULT"),
            "{bounded}"
        );
        assert!(bounded.contains("16 drop≠15 drop"), "{bounded}");
        assert!(
            bounded
                .contains("session table: 24 new flows, 15 answered, 15 still mapped at the end"),
            "{bounded}"
        );
        let json = serde_json::to_value(row(Some(check))).expect("json");
        assert_eq!(
            json["sessions"]["configured"],
            serde_json::json!({"table": "drop", "max_sessions": 16})
        );
    }

    #[test]
    fn selftest_topology_has_a_host_per_preset_and_a_two_address_reflector() {
        let t = topology(&Preset::ALL);
        t.validate().expect("valid");
        for p in Preset::ALL {
            assert!(t.node(&host_name(p)).is_some(), "{p}");
        }
        let plan = t.plan("x").expect("plan");
        assert_eq!(plan.node(REFLECTOR).map(|n| n.uplink.addrs.len()), Some(2));
        assert_eq!(
            plan.node("h-cgnat").and_then(|n| n.upstream.as_deref()),
            Some("r-cgnat-1")
        );
        assert_eq!(
            plan.node("r-cgnat-1").and_then(|n| n.upstream.as_deref()),
            Some("r-cgnat")
        );
    }
}
