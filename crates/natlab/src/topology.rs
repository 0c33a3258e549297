//! Lab topologies: the TOML file format, its validation, and the address plan (all pure).
//!
//! ```toml
//! [router.cgn]
//! nat = "cgnat"
//!
//! [router.home]
//! nat = { preset = "port-restricted", hairpin = false }
//! upstream = "cgn"                     # default: the internet
//! link = { delay_ms = 25 }
//!
//! [host.alice]
//! upstream = "home"
//!
//! [host.relay]                         # no upstream: a public host on the internet
//! addresses = 2
//! ```
//!
//! Validation happens completely before anything is created, so a bad file creates nothing.
//! `docs/lab.md` documents the format and the address plan.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::defaults;
use crate::nat::{NatConfig, NatConfigError, Preset, SessionOverflow, UnknownPreset};
use crate::net::Ipv4Net;
use crate::portmap::PortMapConfig;

/// Conditions of a node's uplink, applied in both directions (so the RTT over the link grows by
/// twice `delay_ms`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkCondition {
    /// One-way delay in milliseconds.
    #[serde(default)]
    pub delay_ms: u32,
    /// Uniform jitter in milliseconds around `delay_ms` (packets are never reordered).
    #[serde(default)]
    pub jitter_ms: u32,
    /// Packet loss in percent, per direction.
    #[serde(default)]
    pub loss_pct: f64,
}

impl LinkCondition {
    /// Whether the link needs a delay line at all.
    pub fn is_impaired(&self) -> bool {
        self.delay_ms > 0 || self.jitter_ms > 0 || self.loss_pct > 0.0
    }

    fn validate(&self) -> Result<(), &'static str> {
        if !(0.0..=100.0).contains(&self.loss_pct) || self.loss_pct.is_nan() {
            return Err("loss_pct must be between 0 and 100");
        }
        if self.jitter_ms > self.delay_ms {
            return Err("jitter_ms must not exceed delay_ms");
        }
        if self.delay_ms > 10_000 {
            return Err("delay_ms must be at most 10000");
        }
        Ok(())
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NodeKind {
    /// A NAT router.
    Router {
        /// Its behaviour.
        nat: NatConfig,
        /// The preset it came from, if any (informational).
        preset: Option<Preset>,
        /// Port mapping (miniupnpd), if the router offers it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        portmap: Option<PortMapConfig>,
    },
    /// An end host: behind a router, or public (on the internet) when it has no upstream.
    Host {
        /// Number of public addresses of a public host (1 for hosts behind routers).
        addresses: u8,
    },
}

/// One node of a topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique name: lowercase letters, digits and `-`.
    pub name: String,
    /// Router or host.
    #[serde(flatten)]
    pub kind: NodeKind,
    /// The router this node sits behind; `None` for the internet.
    pub upstream: Option<String>,
    /// Conditions of the link to the upstream.
    pub link: LinkCondition,
}

/// A validated set of nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// The nodes, in no particular order.
    pub nodes: Vec<Node>,
}

/// Why a topology is unusable. Each variant names the node and the problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The file is not valid TOML or has fields of the wrong shape.
    #[error("invalid topology file: {0}")]
    Parse(String),
    /// Neither routers nor hosts.
    #[error("the topology has no nodes: add at least one [host.NAME]")]
    Empty,
    /// A name that cannot be used.
    #[error("invalid name `{name}`: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two nodes with one name.
    #[error("duplicate name `{0}`: router and host names share one namespace")]
    DuplicateName(String),
    /// A preset name that does not exist.
    #[error("router `{node}`")]
    UnknownPreset {
        /// The router.
        node: String,
        /// The bad name.
        #[source]
        source: UnknownPreset,
    },
    /// A NAT table without enough fields.
    #[error("router `{node}`: a nat table needs `preset`, or both `mapping` and `filtering`")]
    IncompleteNat {
        /// The router.
        node: String,
    },
    /// A NAT configuration no router can have.
    #[error("router `{node}`")]
    InvalidNat {
        /// The router.
        node: String,
        /// The violation.
        #[source]
        source: NatConfigError,
    },
    /// An upstream that names no node.
    #[error("`{node}` has upstream `{upstream}`, but there is no router of that name")]
    MissingUpstream {
        /// The node.
        node: String,
        /// The missing name.
        upstream: String,
    },
    /// An upstream that is a host.
    #[error("`{node}` has upstream `{upstream}`, which is a host; only routers can be upstreams")]
    UpstreamNotRouter {
        /// The node.
        node: String,
        /// The host's name.
        upstream: String,
    },
    /// Routers that are each other's upstream.
    #[error("router loop: {0}")]
    RouterLoop(String),
    /// `addresses` on a host behind a router.
    #[error("host `{node}`: `addresses` is only for public hosts (hosts without upstream)")]
    AddressesBehindNat {
        /// The host.
        node: String,
    },
    /// A bad link condition.
    #[error("`{node}`: bad link: {reason}")]
    BadLink {
        /// The node.
        node: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A port-mapping router that cannot work.
    #[error("router `{node}`: {reason}")]
    BadPortMap {
        /// The router.
        node: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// More nodes than the address plan has room for.
    #[error("too many {0} for the lab's address plan")]
    TooMany(&'static str),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    router: BTreeMap<String, RouterEntry>,
    #[serde(default)]
    host: BTreeMap<String, HostEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterEntry {
    nat: toml::Value,
    portmap: Option<toml::Value>,
    upstream: Option<String>,
    #[serde(default)]
    link: LinkCondition,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    upstream: Option<String>,
    addresses: Option<u8>,
    #[serde(default)]
    link: LinkCondition,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NatTable {
    preset: Option<String>,
    mapping: Option<crate::nat::Mapping>,
    filtering: Option<crate::nat::Filtering>,
    port_allocation: Option<crate::nat::PortAllocation>,
    hairpin: Option<bool>,
    udp_timeout_secs: Option<u32>,
    tcp_timeout_secs: Option<u32>,
    unsolicited: Option<crate::nat::Unsolicited>,
    max_sessions: Option<u32>,
    session_overflow: Option<SessionOverflow>,
}

fn parse_nat(node: &str, value: toml::Value) -> Result<(NatConfig, Option<Preset>), TopologyError> {
    let preset_of = |name: &str| {
        name.parse::<Preset>()
            .map_err(|source| TopologyError::UnknownPreset {
                node: node.to_owned(),
                source,
            })
    };
    let no_router = |_| TopologyError::InvalidNat {
        node: node.to_owned(),
        source: NatConfigError::NoTranslation,
    };
    let (config, preset) = match value {
        toml::Value::String(name) => {
            let preset = preset_of(&name)?;
            (preset.config().ok_or(()).map_err(no_router)?, Some(preset))
        }
        table @ toml::Value::Table(_) => {
            let t: NatTable = table.try_into().map_err(|e: toml::de::Error| {
                TopologyError::Parse(format!("router `{node}`: nat: {e}"))
            })?;
            let preset = t.preset.as_deref().map(preset_of).transpose()?;
            let base = match (preset, t.mapping, t.filtering) {
                (Some(p), _, _) => p.config().ok_or(()).map_err(no_router)?,
                (None, Some(_), Some(_)) => Preset::PortRestricted
                    .config()
                    .ok_or(())
                    .map_err(no_router)?,
                _ => {
                    return Err(TopologyError::IncompleteNat {
                        node: node.to_owned(),
                    });
                }
            };
            let config = NatConfig {
                mapping: t.mapping.unwrap_or(base.mapping),
                filtering: t.filtering.unwrap_or(base.filtering),
                port_allocation: t.port_allocation.unwrap_or(base.port_allocation),
                hairpin: t.hairpin.unwrap_or(base.hairpin),
                udp_timeout_secs: t.udp_timeout_secs.unwrap_or(base.udp_timeout_secs),
                tcp_timeout_secs: t.tcp_timeout_secs.unwrap_or(base.tcp_timeout_secs),
                unsolicited: t.unsolicited.unwrap_or(base.unsolicited),
                max_sessions: t.max_sessions.or(base.max_sessions),
                session_overflow: t.session_overflow.unwrap_or(base.session_overflow),
            };
            // A preset with overrides is no longer that preset.
            let preset = preset.filter(|p| p.config() == Some(config));
            (config, preset)
        }
        other => {
            return Err(TopologyError::Parse(format!(
                "router `{node}`: nat must be a preset name or a table, not {}",
                other.type_str()
            )));
        }
    };
    config
        .validate()
        .map_err(|source| TopologyError::InvalidNat {
            node: node.to_owned(),
            source,
        })?;
    Ok((config, preset))
}

/// Why port mapping needs a router on the internet.
const PORTMAP_BEHIND_NAT: &str = "portmap needs a router on the internet: miniupnpd refuses to \
     map ports when its WAN address is private or in 100.64/10";

fn parse_portmap(node: &str, value: toml::Value) -> Result<Option<PortMapConfig>, TopologyError> {
    match value {
        toml::Value::Boolean(on) => Ok(on.then(PortMapConfig::default)),
        table @ toml::Value::Table(_) => {
            table.try_into().map(Some).map_err(|e: toml::de::Error| {
                TopologyError::Parse(format!(
                    "router `{node}`: portmap: {}",
                    e.to_string().trim()
                ))
            })
        }
        other => Err(TopologyError::Parse(format!(
            "router `{node}`: portmap must be true, false or a table, not {}",
            other.type_str()
        ))),
    }
}

/// Checks a node or lab name: lowercase ASCII letters, digits and `-`, starting with a letter
/// or digit, at most `max` characters.
pub fn validate_name(name: &str, max: usize) -> Result<(), TopologyError> {
    let invalid = |reason| {
        Err(TopologyError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("names cannot be empty");
    }
    if name.len() > max {
        return invalid("name is too long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("use only lowercase letters, digits and `-`");
    }
    if name.starts_with('-') {
        return invalid("names cannot start with `-`");
    }
    if name == INTERNET {
        return invalid("`internet` is the name of the lab's internet");
    }
    Ok(())
}

/// Reserved name of the lab's internet (never a node's name).
pub const INTERNET: &str = "internet";
/// Longest node name.
pub const MAX_NODE_NAME: usize = 32;

impl Topology {
    /// Parses and validates a topology file.
    pub fn from_toml(text: &str) -> Result<Self, TopologyError> {
        let file: FileFormat = toml::from_str(text)
            .map_err(|e| TopologyError::Parse(e.to_string().trim().to_owned()))?;
        let mut nodes = Vec::new();
        for (name, r) in file.router {
            let (nat, preset) = parse_nat(&name, r.nat)?;
            let portmap = r
                .portmap
                .map(|v| parse_portmap(&name, v))
                .transpose()?
                .flatten();
            nodes.push(Node {
                kind: NodeKind::Router {
                    nat,
                    preset,
                    portmap,
                },
                upstream: r.upstream,
                link: r.link,
                name,
            });
        }
        for (name, h) in file.host {
            if h.upstream.is_some() && h.addresses.is_some() {
                return Err(TopologyError::AddressesBehindNat { node: name });
            }
            nodes.push(Node {
                kind: NodeKind::Host {
                    addresses: h.addresses.unwrap_or(1),
                },
                upstream: h.upstream,
                link: h.link,
                name,
            });
        }
        let topology = Self { nodes };
        // Planning checks what validation cannot: room in the address plan.
        topology.plan("check")?;
        Ok(topology)
    }

    /// Adds a router (for topologies built in code; call [`Topology::validate`] when done).
    pub fn router(mut self, name: &str, nat: NatConfig, upstream: Option<&str>) -> Self {
        let preset = Preset::ALL.into_iter().find(|p| p.config() == Some(nat));
        self.nodes.push(Node {
            name: name.to_owned(),
            kind: NodeKind::Router {
                nat,
                preset,
                portmap: None,
            },
            upstream: upstream.map(str::to_owned),
            link: LinkCondition::default(),
        });
        self
    }

    /// Makes router `name` a port-mapping router (no effect on hosts or unknown names).
    pub fn portmap(mut self, name: &str, config: PortMapConfig) -> Self {
        if let Some(Node {
            kind: NodeKind::Router { portmap, .. },
            ..
        }) = self.nodes.iter_mut().find(|n| n.name == name)
        {
            *portmap = Some(config);
        }
        self
    }

    /// Adds a host behind `upstream`, or a public host with `addresses` addresses when `None`.
    pub fn host(mut self, name: &str, upstream: Option<&str>, addresses: u8) -> Self {
        self.nodes.push(Node {
            name: name.to_owned(),
            kind: NodeKind::Host { addresses },
            upstream: upstream.map(str::to_owned),
            link: LinkCondition::default(),
        });
        self
    }

    /// Sets the uplink condition of the node named `name` (no effect if there is none).
    pub fn link(mut self, name: &str, link: LinkCondition) -> Self {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.name == name) {
            n.link = link;
        }
        self
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Checks names, upstreams, loops, NAT configurations and links.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.nodes.is_empty() {
            return Err(TopologyError::Empty);
        }
        let mut seen = BTreeSet::new();
        for n in &self.nodes {
            validate_name(&n.name, MAX_NODE_NAME)?;
            if !seen.insert(n.name.as_str()) {
                return Err(TopologyError::DuplicateName(n.name.clone()));
            }
            n.link.validate().map_err(|reason| TopologyError::BadLink {
                node: n.name.clone(),
                reason,
            })?;
            match &n.kind {
                NodeKind::Router { nat, portmap, .. } => {
                    nat.validate().map_err(|source| TopologyError::InvalidNat {
                        node: n.name.clone(),
                        source,
                    })?;
                    if let Some(portmap) = portmap {
                        portmap
                            .validate()
                            .map_err(|reason| TopologyError::BadPortMap {
                                node: n.name.clone(),
                                reason,
                            })?;
                        if n.upstream.is_some() {
                            return Err(TopologyError::BadPortMap {
                                node: n.name.clone(),
                                reason: PORTMAP_BEHIND_NAT,
                            });
                        }
                    }
                }
                NodeKind::Host { addresses } => {
                    if n.upstream.is_some() && *addresses != 1 {
                        return Err(TopologyError::AddressesBehindNat {
                            node: n.name.clone(),
                        });
                    }
                    if *addresses == 0 {
                        return Err(TopologyError::TooMany("addresses (0 is too few)"));
                    }
                }
            }
        }
        for n in &self.nodes {
            let Some(up) = &n.upstream else { continue };
            match self.node(up) {
                None => {
                    return Err(TopologyError::MissingUpstream {
                        node: n.name.clone(),
                        upstream: up.clone(),
                    });
                }
                Some(Node {
                    kind: NodeKind::Host { .. },
                    ..
                }) => {
                    return Err(TopologyError::UpstreamNotRouter {
                        node: n.name.clone(),
                        upstream: up.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        for n in &self.nodes {
            let mut path = vec![n.name.as_str()];
            let mut cur = n;
            while let Some(up) = cur.upstream.as_deref() {
                if path.contains(&up) {
                    path.push(up);
                    let start = path.iter().position(|p| *p == up).unwrap_or(0);
                    return Err(TopologyError::RouterLoop(path[start..].join(" -> ")));
                }
                path.push(up);
                cur = self
                    .node(up)
                    .ok_or_else(|| TopologyError::MissingUpstream {
                        node: cur.name.clone(),
                        upstream: up.to_owned(),
                    })?;
            }
        }
        Ok(())
    }

    fn depth(&self, node: &Node) -> usize {
        let mut depth = 0;
        let mut cur = node;
        while let Some(up) = cur.upstream.as_deref().and_then(|u| self.node(u)) {
            depth += 1;
            cur = up;
        }
        depth
    }

    /// The address plan of a validated topology for a lab named `lab`.
    ///
    /// Routers come first, upstreams before the routers behind them (ties by name), then hosts
    /// by name. Public nodes get `11.99.0.10` onwards in that order; router number K (from 1)
    /// gets `192.168.K.0/24` as its LAN, or `100.64.K.0/24` if routers sit behind it.
    pub fn plan(&self, lab: &str) -> Result<LabPlan, TopologyError> {
        self.validate()?;
        let mut order: Vec<&Node> = self.nodes.iter().collect();
        order.sort_by_key(|n| match n.kind {
            NodeKind::Router { .. } => (false, self.depth(n), n.name.clone()),
            NodeKind::Host { .. } => (true, 0, n.name.clone()),
        });

        let internet = Ipv4Net::new(defaults::INTERNET_NET, defaults::INTERNET_PREFIX);
        let internet_ns = netns_name(lab, INTERNET);
        let mut next_public = defaults::FIRST_PUBLIC_HOST;
        let mut lans: BTreeMap<&str, (Ipv4Net, u32)> = BTreeMap::new();
        let mut planned = Vec::new();
        for (index, n) in order.iter().enumerate() {
            let peer_iface = format!("v{index}");
            let is_router = matches!(n.kind, NodeKind::Router { .. });
            let count = match n.kind {
                NodeKind::Host { addresses } => u32::from(addresses),
                NodeKind::Router { .. } => 1,
            };
            let uplink = match n.upstream.as_deref() {
                None => {
                    let mut addrs = Vec::new();
                    for _ in 0..count {
                        addrs.push(
                            internet
                                .nth(next_public)
                                .ok_or(TopologyError::TooMany("public addresses"))?,
                        );
                        next_public += 1;
                    }
                    Uplink {
                        iface: if is_router { "wan" } else { "eth0" }.to_owned(),
                        addrs,
                        net: internet,
                        gateway: defaults::INTERNET_SINK,
                        peer_netns: internet_ns.clone(),
                        peer_iface,
                        peer_bridge: INTERNET_BRIDGE.to_owned(),
                    }
                }
                Some(up) => {
                    let (net, next) =
                        lans.get_mut(up)
                            .ok_or_else(|| TopologyError::MissingUpstream {
                                node: n.name.clone(),
                                upstream: up.to_owned(),
                            })?;
                    let addr = net
                        .nth(*next)
                        .filter(|_| *next < 255)
                        .ok_or(TopologyError::TooMany("nodes behind one router"))?;
                    *next += 1;
                    Uplink {
                        iface: if is_router { "wan" } else { "eth0" }.to_owned(),
                        addrs: vec![addr],
                        net: *net,
                        gateway: net
                            .nth(1)
                            .ok_or(TopologyError::TooMany("addresses in a LAN"))?,
                        peer_netns: netns_name(lab, up),
                        peer_iface,
                        peer_bridge: LAN_BRIDGE.to_owned(),
                    }
                }
            };
            let router = match &n.kind {
                NodeKind::Router {
                    nat,
                    preset,
                    portmap,
                } => {
                    let k = u8::try_from(lans.len() + 1)
                        .map_err(|_| TopologyError::TooMany("routers"))?;
                    if k == 255 {
                        return Err(TopologyError::TooMany("routers"));
                    }
                    let has_routers_behind = self.nodes.iter().any(|m| {
                        matches!(m.kind, NodeKind::Router { .. })
                            && m.upstream.as_deref() == Some(n.name.as_str())
                    });
                    let base = if has_routers_behind {
                        defaults::CGNAT_LAN_BASE
                    } else {
                        defaults::HOME_LAN_BASE
                    };
                    let lan_net = Ipv4Net::new(Ipv4Addr::new(base[0], base[1], k, 0), 24);
                    lans.insert(n.name.as_str(), (lan_net, 2));
                    Some(RouterPlan {
                        nat: *nat,
                        preset: *preset,
                        portmap: portmap.clone(),
                        lan_net,
                        lan_addr: lan_net
                            .nth(1)
                            .ok_or(TopologyError::TooMany("addresses in a LAN"))?,
                    })
                }
                NodeKind::Host { .. } => None,
            };
            planned.push(NodePlan {
                name: n.name.clone(),
                netns: netns_name(lab, &n.name),
                upstream: n.upstream.clone(),
                uplink,
                router,
                link: n.link,
            });
        }
        Ok(LabPlan {
            lab: lab.to_owned(),
            internet_netns: internet_ns,
            nodes: planned,
        })
    }
}

/// Name of the bridge in the internet namespace.
pub const INTERNET_BRIDGE: &str = "ix";
/// Name of a router's LAN bridge (and LAN interface).
pub const LAN_BRIDGE: &str = "lan";

/// The namespace name of node `node` in lab `lab`.
pub fn netns_name(lab: &str, node: &str) -> String {
    format!("{}{lab}.{node}", defaults::NETNS_PREFIX)
}

/// A node's link to its upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Uplink {
    /// Interface name inside the node (`wan` on routers, `eth0` on hosts).
    pub iface: String,
    /// The node's addresses on the link (the first is the primary).
    pub addrs: Vec<Ipv4Addr>,
    /// The link's network.
    #[serde(with = "net_string")]
    pub net: Ipv4Net,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// Namespace of the other end.
    pub peer_netns: String,
    /// Interface name of the other end.
    pub peer_iface: String,
    /// Bridge the other end is a port of.
    pub peer_bridge: String,
}

/// The router part of a node's plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterPlan {
    /// NAT behaviour.
    pub nat: NatConfig,
    /// Preset name, if the behaviour is exactly a preset.
    pub preset: Option<Preset>,
    /// The LAN behind the router.
    #[serde(with = "net_string")]
    pub lan_net: Ipv4Net,
    /// The router's own LAN address (the LAN's gateway).
    pub lan_addr: Ipv4Addr,
    /// Port mapping (miniupnpd), if the router offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portmap: Option<PortMapConfig>,
}

/// Everything needed to create one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePlan {
    /// Node name.
    pub name: String,
    /// Namespace name.
    pub netns: String,
    /// Upstream router, `None` for the internet.
    pub upstream: Option<String>,
    /// Link to the upstream.
    pub uplink: Uplink,
    /// Router settings, for routers.
    pub router: Option<RouterPlan>,
    /// Uplink condition.
    pub link: LinkCondition,
}

impl NodePlan {
    /// The node's primary address.
    pub fn addr(&self) -> Ipv4Addr {
        self.uplink.addrs[0]
    }

    /// Whether the node is a router.
    pub fn is_router(&self) -> bool {
        self.router.is_some()
    }

    /// Whether the node is a router with a bounded session table that evicts its oldest flow
    /// when full (which takes a userspace evictor, see [`crate::session`]).
    pub fn evicts_sessions(&self) -> bool {
        self.router.as_ref().is_some_and(|r| {
            r.nat.max_sessions.is_some() && r.nat.session_overflow == SessionOverflow::EvictOldest
        })
    }
}

/// The plan as a table: one row per node with its kind, addresses, upstream and details (the
/// router's NAT, its port mapping, the link's impairment).
impl fmt::Display for LabPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "lab {}: {} nodes; namespaces natlab.{}.*",
            self.lab,
            self.nodes.len(),
            self.lab
        )?;
        writeln!(
            f,
            "{:<14} {:<7} {:<24} {:<12} DETAILS",
            "NODE", "KIND", "ADDRESS", "UPSTREAM"
        )?;
        for n in &self.nodes {
            let addrs: Vec<String> = n.uplink.addrs.iter().map(ToString::to_string).collect();
            writeln!(
                f,
                "{:<14} {:<7} {:<24} {:<12} {}",
                n.name,
                if n.is_router() { "router" } else { "host" },
                addrs.join(","),
                n.upstream.as_deref().unwrap_or("internet"),
                n.details()
            )?;
        }
        Ok(())
    }
}

impl NodePlan {
    /// The node's details in one line: a router's NAT behaviour, LAN and port mapping, and the
    /// link's delay and loss when it has any.
    pub fn details(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.router {
            let nat = &r.nat;
            let name = r
                .preset
                .map_or_else(|| "custom".to_owned(), |p| p.to_string());
            parts.push(format!(
                "{name}: {} mapping, {} filtering, {} ports, hairpin {}, udp {} s, tcp {} s, \
                 unsolicited: {}; lan {}",
                nat.mapping,
                nat.filtering,
                nat.port_allocation,
                if nat.hairpin { "on" } else { "off" },
                nat.udp_timeout_secs,
                nat.tcp_timeout_secs,
                nat.unsolicited,
                r.lan_net
            ));
            if let Some(max) = nat.max_sessions {
                parts.push(format!(
                    "session table: {max}, then {}",
                    nat.session_overflow
                ));
            }
            if let Some(p) = &r.portmap {
                parts.push(p.summary());
            }
        }
        if self.link.is_impaired() {
            parts.push(format!(
                "link: {} ms ± {} ms, {}% loss each way",
                self.link.delay_ms, self.link.jitter_ms, self.link.loss_pct
            ));
        }
        parts.join("; ")
    }
}

/// The complete, addressed plan of a lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabPlan {
    /// Lab name.
    pub lab: String,
    /// Namespace of the lab's internet.
    pub internet_netns: String,
    /// Nodes in creation order (upstreams first).
    pub nodes: Vec<NodePlan>,
}

impl LabPlan {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Whether a detached copy of this lab needs a process to run its userspace parts: delay
    /// lines for impaired links and session evictors for `evict-oldest` routers.
    pub fn needs_holder(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| n.link.is_impaired() || n.evicts_sessions())
    }

    /// Every namespace of the lab, the internet's first.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.internet_netns.as_str())
            .chain(self.nodes.iter().map(|n| n.netns.as_str()))
    }

    /// The address a node's traffic appears from on the internet: the outermost router's WAN
    /// address, or the node's own address if it is public.
    pub fn public_addr_of(&self, name: &str) -> Option<Ipv4Addr> {
        let mut cur = self.node(name)?;
        while let Some(up) = cur.upstream.as_deref() {
            cur = self.node(up)?;
        }
        Some(cur.addr())
    }
}

mod net_string {
    use std::net::Ipv4Addr;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::net::Ipv4Net;

    pub(super) fn serialize<S: Serializer>(net: &Ipv4Net, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(net)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Net, D::Error> {
        let text = String::deserialize(d)?;
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| serde::de::Error::custom("expected addr/prefix"))?;
        let addr: Ipv4Addr = addr.parse().map_err(serde::de::Error::custom)?;
        let prefix: u8 = prefix.parse().map_err(serde::de::Error::custom)?;
        Ok(Ipv4Net::new(addr, prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::{Filtering, Mapping};

    const CHAIN: &str = r#"
        [router.cgn]
        nat = "cgnat"
        [router.home-a]
        nat = "port-restricted"
        upstream = "cgn"
        [router.home-b]
        nat = { preset = "port-restricted", hairpin = false }
        upstream = "cgn"
        link = { delay_ms = 10 }
        [host.alice]
        upstream = "home-a"
        [host.bob]
        upstream = "home-b"
        [host.relay]
        addresses = 2
    "#;

    #[test]
    fn a_plan_prints_one_row_per_node() {
        let plan = Topology::from_toml(CHAIN)
            .and_then(|t| t.plan("t1"))
            .expect("valid");
        let text = plan.to_string();
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows[0], "lab t1: 6 nodes; namespaces natlab.t1.*");
        assert_eq!(rows.len(), 2 + 6);
        assert!(
            rows[2].starts_with("cgn            router  11.99.0.10"),
            "{text}"
        );
        assert!(rows[2].contains("lan 100.64.1.0/24"), "{text}");
        assert!(rows[5].contains(" host "), "{text}");
    }

    #[test]
    fn chain_gets_the_documented_address_plan() {
        let plan = Topology::from_toml(CHAIN)
            .and_then(|t| t.plan("t1"))
            .expect("valid");
        let names: Vec<_> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["cgn", "home-a", "home-b", "alice", "bob", "relay"]);
        let cgn = plan.node("cgn").expect("cgn");
        assert_eq!(cgn.addr(), Ipv4Addr::new(11, 99, 0, 10));
        assert_eq!(cgn.netns, "natlab.t1.cgn");
        let cgn_lan = cgn.router.as_ref().expect("router").lan_net;
        assert_eq!(cgn_lan.to_string(), "100.64.1.0/24");
        let home_a = plan.node("home-a").expect("home-a");
        assert_eq!(home_a.addr(), Ipv4Addr::new(100, 64, 1, 2));
        assert_eq!(home_a.uplink.gateway, Ipv4Addr::new(100, 64, 1, 1));
        assert_eq!(home_a.uplink.peer_netns, "natlab.t1.cgn");
        assert_eq!(
            home_a.router.as_ref().expect("router").lan_net.to_string(),
            "192.168.2.0/24"
        );
        let alice = plan.node("alice").expect("alice");
        assert_eq!(alice.addr(), Ipv4Addr::new(192, 168, 2, 2));
        assert_eq!(
            plan.public_addr_of("alice"),
            Some(Ipv4Addr::new(11, 99, 0, 10))
        );
        let relay = plan.node("relay").expect("relay");
        assert_eq!(
            relay.uplink.addrs,
            [Ipv4Addr::new(11, 99, 0, 11), Ipv4Addr::new(11, 99, 0, 12)]
        );
        assert_eq!(plan.node("home-b").expect("home-b").link.delay_ms, 10);
        let peer_ifaces: BTreeSet<_> = plan.nodes.iter().map(|n| &n.uplink.peer_iface).collect();
        assert_eq!(
            peer_ifaces.len(),
            plan.nodes.len(),
            "peer interface names are unique"
        );
    }

    #[test]
    fn overriding_a_preset_drops_its_name() {
        let t = Topology::from_toml(CHAIN).expect("valid");
        let Some(Node {
            kind: NodeKind::Router { nat, preset, .. },
            ..
        }) = t.node("home-b")
        else {
            panic!("home-b is a router")
        };
        assert!(!nat.hairpin);
        assert_eq!(*preset, None);
        let Some(Node {
            kind: NodeKind::Router { preset, .. },
            ..
        }) = t.node("home-a")
        else {
            panic!("home-a is a router")
        };
        assert_eq!(*preset, Some(Preset::PortRestricted));
    }

    #[test]
    fn a_session_table_is_set_in_the_nat_table_and_checked() {
        let nat_of = |text: &str| {
            let t = Topology::from_toml(text)?;
            match t.node("r").map(|n| &n.kind) {
                Some(NodeKind::Router { nat, preset, .. }) => {
                    Ok::<_, TopologyError>((*nat, *preset))
                }
                _ => panic!("r is a router"),
            }
        };
        let (nat, preset) = nat_of(
            "[router.r]\nnat = { preset = \"symmetric\", max_sessions = 16, session_overflow = \"evict-oldest\" }",
        )
        .expect("valid");
        assert_eq!(nat.max_sessions, Some(16));
        assert_eq!(nat.session_overflow, SessionOverflow::EvictOldest);
        assert_eq!(preset, None, "a bounded preset is no longer the preset");
        let (nat, _) =
            nat_of("[router.r]\nnat = { preset = \"cgnat\", max_sessions = 4 }").expect("valid");
        assert_eq!(
            (nat.max_sessions, nat.session_overflow),
            (Some(4), SessionOverflow::Drop)
        );
        let (nat, _) = nat_of("[router.r]\nnat = \"symmetric\"").expect("valid");
        assert_eq!(nat.max_sessions, None, "unbounded unless asked");
        let err = |text| {
            nat_of(text)
                .map(drop)
                .map_err(|e| crate::chain(&e).to_string())
        };
        assert_eq!(
            err("[router.r]\nnat = { preset = \"symmetric\", max_sessions = 0 }"),
            Err("router `r`: max_sessions of 0 is out of range (1..=65535); leave it out for an unbounded table".to_owned())
        );
        assert!(
            err(
                "[router.r]\nnat = { preset = \"symmetric\", session_overflow = \"evict-oldest\" }"
            )
            .is_err_and(|e| e.contains("needs max_sessions"))
        );
        assert!(
            err("[router.r]\nnat = { preset = \"symmetric\", max_sessions = 8, session_overflow = \"lru\" }")
                .is_err_and(|e| e.contains("unknown variant `lru`, expected `drop` or `evict-oldest`")),
            "{:?}",
            err("[router.r]\nnat = { preset = \"symmetric\", max_sessions = 8, session_overflow = \"lru\" }")
        );
        let plan = Topology::from_toml(
            "[router.r]\nnat = { preset = \"symmetric\", max_sessions = 16, session_overflow = \"evict-oldest\" }\n[host.h]\nupstream = \"r\"",
        )
        .and_then(|t| t.plan("t"))
        .expect("valid");
        assert!(plan.needs_holder(), "an evicting router needs a process");
        assert!(
            plan.to_string()
                .contains("session table: 16, then evict-oldest"),
            "{plan}"
        );
    }

    #[test]
    fn portmap_is_true_or_a_table_and_only_on_the_internet() {
        let portmap_of = |text: &str| {
            let t = Topology::from_toml(text)?;
            let plan = t.plan("t")?;
            Ok::<_, TopologyError>(
                plan.node("r")
                    .and_then(|n| n.router.as_ref())
                    .and_then(|r| r.portmap.clone()),
            )
        };
        assert_eq!(
            portmap_of("[router.r]\nnat = \"port-restricted\"\nportmap = true\n"),
            Ok(Some(PortMapConfig::default()))
        );
        assert_eq!(
            portmap_of("[router.r]\nnat = \"port-restricted\"\nportmap = false\n"),
            Ok(None)
        );
        let custom = portmap_of(
            "[router.r]\nnat = \"port-restricted\"\n[router.r.portmap]\nupnp = false\n\
             max_lifetime_secs = 600\nrules = [\"allow 2000-3000 192.168.1.0/24 2000-3000\"]\n",
        )
        .expect("valid")
        .expect("portmap");
        assert!(!custom.upnp && custom.natpmp && custom.pcp);
        assert_eq!(custom.max_lifetime_secs, 600);
        assert_eq!(custom.rules.len(), 1);
        for (text, needle) in [
            ("portmap = 3", "must be true, false or a table"),
            ("portmap = { upnpp = true }", "unknown field"),
            (
                "portmap = { rules = [\"allow everything\"] }",
                "permission rule",
            ),
            (
                "portmap = { upnp = false, natpmp = false, pcp = false }",
                "at least one",
            ),
        ] {
            let err = portmap_of(&format!("[router.r]\nnat = \"port-restricted\"\n{text}\n"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let behind = portmap_of(
            "[router.cgn]\nnat = \"cgnat\"\n[router.r]\nnat = \"port-restricted\"\n\
             upstream = \"cgn\"\nportmap = true\n",
        )
        .expect_err("behind a NAT")
        .to_string();
        assert!(behind.contains("on the internet"), "{behind}");
    }

    #[test]
    fn custom_nat_tables_need_mapping_and_filtering() {
        let t = Topology::from_toml(
            "[router.r]\nnat = { mapping = \"address-dependent\", filtering = \"endpoint-independent\", port_allocation = \"sequential\" }\n[host.h]\nupstream = \"r\"",
        )
        .expect("valid");
        let Some(Node {
            kind: NodeKind::Router { nat, .. },
            ..
        }) = t.node("r")
        else {
            panic!("router")
        };
        assert_eq!(nat.mapping, Mapping::AddressDependent);
        assert_eq!(nat.filtering, Filtering::EndpointIndependent);
        let err =
            Topology::from_toml("[router.r]\nnat = { hairpin = true }").expect_err("incomplete");
        assert_eq!(err, TopologyError::IncompleteNat { node: "r".into() });
    }

    fn error_of(text: &str) -> String {
        let e = Topology::from_toml(text).expect_err("should be rejected");
        crate::chain(&e).to_string()
    }

    #[test]
    fn mutated_example_files_give_errors_not_panics() {
        let examples = [
            include_str!("../../../examples/labs/two-homes.toml"),
            include_str!("../../../examples/labs/home-symmetric.toml"),
            include_str!("../../../examples/labs/cgnat-two-homes.toml"),
            include_str!("../../../examples/labs/office-session-table.toml"),
        ];
        let mut rng = crate::delay::SplitMix64::new(5);
        let alphabet = b"[]{}=\".,-_ abcgnrtx019\n";
        for example in examples {
            let plan = Topology::from_toml(example)
                .and_then(|t| t.plan("x"))
                .expect("examples are valid");
            assert!(plan.nodes.len() >= 5);
            for _ in 0..2000 {
                let mut bytes = example.as_bytes().to_vec();
                for _ in 0..1 + rng.next_u64() % 4 {
                    let at = (rng.next_u64() as usize) % bytes.len();
                    bytes[at] = alphabet[(rng.next_u64() as usize) % alphabet.len()];
                }
                let text = String::from_utf8_lossy(&bytes);
                if let Ok(t) = Topology::from_toml(&text) {
                    t.plan("x").expect("a parsed topology always has a plan");
                }
            }
        }
    }

    #[test]
    fn too_many_hosts_behind_one_router_is_an_error() {
        let mut text = String::from("[router.r]\nnat = \"cgnat\"\n");
        for i in 0..300 {
            text.push_str(&format!("[host.h{i}]\nupstream = \"r\"\n"));
        }
        assert_eq!(
            Topology::from_toml(&text),
            Err(TopologyError::TooMany("nodes behind one router"))
        );
    }

    #[test]
    fn bad_files_are_rejected_with_the_problem_named() {
        assert!(error_of("[router.r]\nnat = \"cone\"").contains("unknown NAT preset `cone`"));
        assert!(
            error_of("[host.h]\nupstream = \"nowhere\"")
                .contains("upstream `nowhere`, but there is no router")
        );
        assert_eq!(
            error_of(
                "[router.a]\nnat = \"symmetric\"\nupstream = \"b\"\n[router.b]\nnat = \"cgnat\"\nupstream = \"a\""
            ),
            "router loop: a -> b -> a"
        );
        assert!(error_of("[router.x]\nnat = \"cgnat\"\n[host.x]\n").contains("duplicate name `x`"));
        assert!(
            error_of("[router.x]\nnat = \"cgnat\"\n[router.x]\nnat = \"cgnat\"")
                .contains("duplicate key")
        );
        assert!(error_of("[host.a]\n[host.b]\nupstream = \"a\"").contains("which is a host"));
        assert!(
            error_of("[router.r]\nnat = \"open\"")
                .contains("cannot have mapping or filtering `none`")
        );
        assert!(error_of("[host.Alice]").contains("invalid name `Alice`"));
        assert!(error_of("[host.internet]").contains("`internet` is the name"));
        assert!(error_of("").contains("no nodes"));
        assert!(error_of("[host.h]\nlink = { delay_ms = 5, jitter_ms = 9 }").contains("jitter_ms"));
        assert!(error_of("[host.h]\ncolour = 1").contains("unknown field `colour`"));
        assert!(
            error_of("[router.r]\nnat = { preset = \"cgnat\", udp_timeout_secs = 1 }")
                .contains("out of range")
        );
    }
}
