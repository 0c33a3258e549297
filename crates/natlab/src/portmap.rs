//! Port-mapping routers: real miniupnpd (UPnP IGD v2, NAT-PMP and PCP) on a lab router.
//!
//! A router with a [`PortMapConfig`] runs Debian's miniupnpd (nftables backend) in its namespace.
//! Its rules live in a table of their own, `inet natlab_portmap`, whose NAT chains run just
//! before the lab's `ip natlab` ones (so a port forwarding wins over the lab's own mapping
//! tables), and whose filter chains are only extras: the lab's forward chain already accepts
//! every DNATed flow. The configuration, lease file, PID record and log are kept in
//! `/run/natpunch/labs/LAB.d/ROUTER/`.
//!
//! miniupnpd serves NAT-PMP and PCP on one switch (`enable_natpmp`). To offer only one of them
//! the table drops the other's requests by their version byte (0 for NAT-PMP, 2 for PCP), as a
//! router without that protocol would ignore them. (A real NAT-PMP-only router answers PCP with
//! "unsupported version" instead; clients must cope with both.)
//!
//! This module renders configuration text (pure functions) and starts and stops the daemon;
//! reboots and address changes are [`crate::Lab`] operations.

use std::fmt;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::defaults;
use crate::net::Ipv4Net;

/// Name of the nftables table (family `inet`) that holds miniupnpd's chains.
pub const TABLE: &str = "natlab_portmap";
/// miniupnpd's chains in [`TABLE`], emptied when a router reboots.
pub const CHAINS: [&str; 3] = ["miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"];
/// The UPnP HTTP port the lab's miniupnpd listens on (on the LAN address).
pub const HTTP_PORT: u16 = 5000;
/// The miniupnpd binary.
pub const MINIUPNPD: &str = "/usr/sbin/miniupnpd";

/// What a port-mapping router offers. In a topology file: `portmap = true` for the defaults, or
/// a table `[router.NAME.portmap]` with any of these fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortMapConfig {
    /// UPnP IGD (SSDP discovery, SOAP on port 5000).
    pub upnp: bool,
    /// NAT-PMP (RFC 6886) on UDP 5351.
    pub natpmp: bool,
    /// PCP (RFC 6887) on UDP 5351.
    pub pcp: bool,
    /// Shortest lifetime granted to PCP requests (miniupnpd's `min_lifetime`; miniupnpd 2.3
    /// grants NAT-PMP and UPnP requests the lifetime they ask for).
    pub min_lifetime_secs: u32,
    /// Longest lifetime granted to PCP requests (miniupnpd's `max_lifetime`).
    pub max_lifetime_secs: u32,
    /// A client may only map ports to its own address.
    pub secure_mode: bool,
    /// Permission rules, first match wins. Empty: allow ports 1024–65535 to the router's LAN,
    /// deny everything else.
    pub rules: Vec<PermissionRule>,
}

impl Default for PortMapConfig {
    fn default() -> Self {
        Self {
            upnp: true,
            natpmp: true,
            pcp: true,
            min_lifetime_secs: 120,
            max_lifetime_secs: 86_400,
            secure_mode: true,
            rules: Vec::new(),
        }
    }
}

impl PortMapConfig {
    /// Checks the settings on their own (where the router sits is checked by the topology).
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.upnp || self.natpmp || self.pcp) {
            return Err("portmap: enable at least one of upnp, natpmp and pcp");
        }
        if self.min_lifetime_secs == 0 || self.min_lifetime_secs > self.max_lifetime_secs {
            return Err("portmap: need 0 < min_lifetime_secs <= max_lifetime_secs");
        }
        Ok(())
    }

    /// The rules in force: the configured ones, or the default for a LAN.
    pub fn effective_rules(&self, lan: Ipv4Net) -> Vec<PermissionRule> {
        if !self.rules.is_empty() {
            return self.rules.clone();
        }
        vec![
            PermissionRule {
                allow: true,
                external: (1024, 65535),
                client: lan,
                internal: (1024, 65535),
            },
            PermissionRule {
                allow: false,
                external: (0, 65535),
                client: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0),
                internal: (0, 65535),
            },
        ]
    }

    /// A one-line description for listings.
    pub fn summary(&self) -> String {
        let on: Vec<&str> = [
            (self.upnp, "upnp"),
            (self.natpmp, "nat-pmp"),
            (self.pcp, "pcp"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let mut text = format!("port mapping: {}", on.join("+"));
        if self.pcp {
            text += &format!(
                " (pcp lifetimes {}–{} s)",
                self.min_lifetime_secs, self.max_lifetime_secs
            );
        }
        text
    }
}

/// One miniupnpd permission rule: `allow|deny EXT_PORTS CLIENT/PREFIX INT_PORTS`, for example
/// `allow 1024-65535 192.168.1.0/24 1024-65535`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermissionRule {
    /// Allow (or deny) matching requests.
    pub allow: bool,
    /// External port range, inclusive.
    pub external: (u16, u16),
    /// Clients the rule is for.
    pub client: Ipv4Net,
    /// Internal port range, inclusive.
    pub internal: (u16, u16),
}

impl fmt::Display for PermissionRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}-{} {} {}-{}",
            if self.allow { "allow" } else { "deny" },
            self.external.0,
            self.external.1,
            self.client,
            self.internal.0,
            self.internal.1
        )
    }
}

impl FromStr for PermissionRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("permission rule `{s}`: {why}");
        let words: Vec<&str> = s.split_whitespace().collect();
        let [verb, external, client, internal] = words[..] else {
            return Err(bad(
                "expected `allow|deny EXT_PORTS ADDRESS/PREFIX INT_PORTS`",
            ));
        };
        let allow = match verb {
            "allow" => true,
            "deny" => false,
            _ => return Err(bad("the first word must be allow or deny")),
        };
        let range = |text: &str| -> Result<(u16, u16), String> {
            let (lo, hi) = text.split_once('-').unwrap_or((text, text));
            let port = |p: &str| p.parse::<u16>().map_err(|_| bad("ports are 0–65535"));
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(bad("a port range must not run backwards"));
            }
            Ok((lo, hi))
        };
        let (addr, prefix) = client.split_once('/').unwrap_or((client, "32"));
        let addr = addr
            .parse::<Ipv4Addr>()
            .map_err(|_| bad("the client must be an IPv4 address with an optional /prefix"))?;
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad("the prefix must be 0–32"))?;
        Ok(Self {
            allow,
            external: range(external)?,
            client: Ipv4Net::new(addr, prefix),
            internal: range(internal)?,
        })
    }
}

impl Serialize for PermissionRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PermissionRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where one router's miniupnpd keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// The directory.
    pub dir: PathBuf,
}

impl Files {
    /// The files of router `router` in lab `lab`.
    pub fn of(lab: &str, router: &str) -> Self {
        Self {
            dir: PathBuf::from(defaults::STATE_DIR)
                .join(format!("{lab}.d"))
                .join(router),
        }
    }

    /// miniupnpd's configuration.
    pub fn config(&self) -> PathBuf {
        self.dir.join("miniupnpd.conf")
    }

    /// The lease file: the mappings miniupnpd restores when it restarts.
    pub fn leases(&self) -> PathBuf {
        self.dir.join("upnp.leases")
    }

    /// miniupnpd's log (it runs in the foreground with debug output).
    pub fn log(&self) -> PathBuf {
        self.dir.join("miniupnpd.log")
    }

    /// miniupnpd's own PID file.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("miniupnpd.pid")
    }

    /// The lab's record of the daemon it started (PID and start time).
    pub fn process(&self) -> PathBuf {
        self.dir.join("process.json")
    }
}

/// What [`render_config`] needs to know about the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterSide<'a> {
    /// WAN interface.
    pub wan_if: &'a str,
    /// LAN interface (bridge).
    pub lan_if: &'a str,
    /// The LAN.
    pub lan_net: Ipv4Net,
}

/// Renders `miniupnpd.conf`. The epoch is the daemon's uptime (`system_uptime=no`), so a
/// simulated reboot restarts it as a real one would.
pub fn render_config(
    cfg: &PortMapConfig,
    router: RouterSide<'_>,
    files: &Files,
    uuid: &str,
) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut out = format!(
        "ext_ifname={wan}\n\
         listening_ip={lan}\n\
         http_port={HTTP_PORT}\n\
         enable_upnp={upnp}\n\
         enable_natpmp={pmp}\n\
         ipv6_disable=yes\n\
         secure_mode={secure}\n\
         system_uptime=no\n\
         min_lifetime={min}\n\
         max_lifetime={max}\n\
         notify_interval=60\n\
         clean_ruleset_interval=600\n\
         lease_file={leases}\n\
         upnp_table_name={TABLE}\n\
         upnp_nat_table_name={TABLE}\n\
         uuid={uuid}\n\
         friendly_name=natlab router\n",
        wan = router.wan_if,
        lan = router.lan_if,
        upnp = yes(cfg.upnp),
        pmp = yes(cfg.natpmp || cfg.pcp),
        secure = yes(cfg.secure_mode),
        min = cfg.min_lifetime_secs,
        max = cfg.max_lifetime_secs,
        leases = files.leases().display(),
    );
    for rule in cfg.effective_rules(router.lan_net) {
        out.push_str(&rule.to_string());
        out.push('\n');
    }
    out
}

/// Renders `table inet natlab_portmap`, to be loaded with `nft -f`. It replaces any previous
/// copy, emptying miniupnpd's chains.
pub fn render_table(cfg: &PortMapConfig, lan_if: &str) -> String {
    let mut out =
        format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    let hooks = [
        (
            "forward",
            "filter hook forward priority filter - 5",
            "miniupnpd",
        ),
        (
            "prerouting",
            "nat hook prerouting priority dstnat - 5",
            "prerouting_miniupnpd",
        ),
        (
            "postrouting",
            "nat hook postrouting priority srcnat - 5",
            "postrouting_miniupnpd",
        ),
    ];
    for (chain, hook, target) in hooks {
        out.push_str(&format!(
            "  chain {chain} {{\n    type {hook}; policy accept;\n    jump {target}\n  }}\n"
        ));
        out.push_str(&format!("  chain {target} {{\n  }}\n"));
    }
    // The first payload byte of a request to 5351 is its version: 0 NAT-PMP, 2 PCP.
    let off: Vec<u8> = [(cfg.natpmp, 0u8), (cfg.pcp, 2u8)]
        .into_iter()
        .filter_map(|(on, version)| (!on).then_some(version))
        .collect();
    if !off.is_empty() && (cfg.natpmp || cfg.pcp) {
        out.push_str(
            "  chain input {\n    type filter hook input priority filter - 5; policy accept;\n",
        );
        for version in off {
            out.push_str(&format!(
                "    iifname \"{lan_if}\" udp dport 5351 @th,64,8 {version} drop\n"
            ));
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}

/// A stable UUID for the router's IGD description, from the lab and router names.
pub fn uuid_for(lab: &str, router: &str) -> String {
    // FNV-1a, twice with different seeds: stable across runs, no dependency.
    let hash = |seed: u64| {
        format!("{lab}/{router}").bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (a, b) = (hash(0xcbf2_9ce4_8422_2325), hash(0x8422_2325_cbf2_9ce4));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// Starts miniupnpd in namespace `netns` with the configuration already written to `files`,
/// and waits until it serves what `cfg` enables. The daemon gets a process group of its own, so
/// it outlives a `natpunch lab up` that started it; the lab's teardown ends it with the rest.
pub fn spawn(netns: &str, cfg: &PortMapConfig, files: &Files) -> io::Result<Child> {
    let log = fs::File::create(files.log())?;
    let child = Command::new("ip")
        .args(["netns", "exec", netns, MINIUPNPD, "-d", "-f"])
        .arg(files.config())
        .arg("-P")
        .arg(files.pid())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{e} (is {MINIUPNPD} installed? apt-get install miniupnpd-nftables miniupnpd)"
                ),
            )
        })?;
    let mut needles = Vec::new();
    if cfg.upnp {
        needles.push("HTTP listening on port");
    }
    if cfg.natpmp || cfg.pcp {
        needles.push("Listening for NAT-PMP/PCP traffic");
    }
    wait_for_log(&files.log(), &needles, defaults::PORTMAP_START_TIMEOUT)?;
    Ok(child)
}

fn wait_for_log(path: &Path, needles: &[&str], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "miniupnpd did not start within {timeout:?}; its log ({}):\n{text}",
                    path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan() -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::new(192, 168, 1, 0), 24)
    }

    #[test]
    fn rules_parse_print_and_reject_nonsense() {
        let rule: PermissionRule = "allow 1024-65535 192.168.1.0/24 1024-65535"
            .parse()
            .expect("rule");
        assert_eq!(
            rule.to_string(),
            "allow 1024-65535 192.168.1.0/24 1024-65535"
        );
        let single: PermissionRule = "deny 80 10.0.0.7 80".parse().expect("rule");
        assert_eq!(single.to_string(), "deny 80-80 10.0.0.7/32 80-80");
        for bad in [
            "",
            "permit 1-2 1.2.3.4/32 1-2",
            "allow 2-1 1.2.3.4/32 1-2",
            "allow 1-70000 1.2.3.4/32 1-2",
            "allow 1-2 1.2.3.4/33 1-2",
            "allow 1-2 example.com 1-2",
            "allow 1-2 1.2.3.4/32",
        ] {
            assert!(bad.parse::<PermissionRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_allow_the_lan_above_1023_and_deny_the_rest() {
        let rules = PortMapConfig::default().effective_rules(lan());
        let text: Vec<String> = rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "allow 1024-65535 192.168.1.0/24 1024-65535",
                "deny 0-65535 0.0.0.0/0 0-65535"
            ]
        );
    }

    #[test]
    fn config_names_our_table_interfaces_and_switches() {
        let cfg = PortMapConfig {
            upnp: false,
            pcp: false,
            ..PortMapConfig::default()
        };
        let files = Files::of("lab", "home");
        let side = RouterSide {
            wan_if: "wan",
            lan_if: "lan",
            lan_net: lan(),
        };
        let text = render_config(&cfg, side, &files, "u");
        for line in [
            "ext_ifname=wan",
            "listening_ip=lan",
            "enable_upnp=no",
            "enable_natpmp=yes",
            "system_uptime=no",
            "upnp_table_name=natlab_portmap",
            "upnp_nat_table_name=natlab_portmap",
            "lease_file=/run/natpunch/labs/lab.d/home/upnp.leases",
            "allow 1024-65535 192.168.1.0/24 1024-65535",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn table_drops_only_the_disabled_protocol_by_version_byte() {
        let both = render_table(&PortMapConfig::default(), "lan");
        assert!(!both.contains("chain input"), "{both}");
        assert!(both.contains("type nat hook prerouting priority dstnat - 5;"));
        let pcp_only = render_table(
            &PortMapConfig {
                natpmp: false,
                ..PortMapConfig::default()
            },
            "lan",
        );
        assert!(
            pcp_only.contains("udp dport 5351 @th,64,8 0 drop"),
            "{pcp_only}"
        );
        assert!(!pcp_only.contains("@th,64,8 2 drop"), "{pcp_only}");
    }

    #[test]
    fn validation_and_uuid() {
        assert!(PortMapConfig::default().validate().is_ok());
        let none = PortMapConfig {
            upnp: false,
            natpmp: false,
            pcp: false,
            ..PortMapConfig::default()
        };
        assert!(none.validate().is_err());
        let inverted = PortMapConfig {
            min_lifetime_secs: 600,
            max_lifetime_secs: 60,
            ..PortMapConfig::default()
        };
        assert!(inverted.validate().is_err());
        let a = uuid_for("lab", "home");
        assert_eq!(a, uuid_for("lab", "home"));
        assert_ne!(a, uuid_for("lab", "work"));
        assert_eq!(a.len(), 36);
    }
}
