//! The flags of `natpunch map …`: port mappings over PCP, NAT-PMP or UPnP IGD, and the
//! mapping specs `map keep` takes.

use crate::args::Json;
use clap::{Args, Subcommand, ValueEnum};
use portmap::Protocol;
use portmap::keeper::Method;
use std::net::Ipv4Addr;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum MapCommand {
    /// Ask the router which of PCP, NAT-PMP and UPnP IGD it speaks, and its external address.
    Probe(ProbeArgs),
    /// Mappings this host made (from its record), and the router's UPnP table.
    List(ListArgs),
    /// Map an internal port of this host on the router.
    Add(AddArgs),
    /// Delete a mapping this host made (by internal or external port).
    Delete(DeleteArgs),
    /// Hold mappings until Ctrl-C: renew them, re-create them when the router loses them
    /// (reboot, new external address), print every change, delete them at the end.
    Keep(KeepArgs),
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.global(true)))]
pub struct Common {
    /// The router to ask [default: the IPv4 default gateway].
    #[arg(long, env = "NATPUNCH_MAP_GATEWAY", global = true)]
    pub gateway: Option<Ipv4Addr>,
    /// How long to wait for each protocol's answer, in milliseconds (NAT-PMP and PCP
    /// retransmit after 250, 500, 1000 … ms within it).
    #[arg(
        long,
        env = "NATPUNCH_MAP_WAIT_MS",
        default_value_t = 2000,
        global = true
    )]
    pub wait_ms: u64,
    /// Where this host records its mappings [default: $XDG_STATE_HOME/natpunch/mappings.json
    /// or ~/.local/state/natpunch/mappings.json].
    #[arg(long, env = "NATPUNCH_MAP_STATE", global = true)]
    pub state: Option<PathBuf>,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub common: Common,
}

/// Which protocol to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// The best the router offers: PCP, then NAT-PMP, then UPnP.
    Auto,
    /// UPnP IGD.
    Upnp,
    /// NAT-PMP.
    Natpmp,
    /// PCP.
    Pcp,
}

/// Transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

impl From<Proto> for Protocol {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Udp => Self::Udp,
            Proto::Tcp => Self::Tcp,
        }
    }
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The port on this host.
    pub internal_port: u16,
    /// The external port to ask for [default: the internal port]. The router may give another.
    #[arg(long, env = "NATPUNCH_MAP_EXTERNAL_PORT")]
    pub external_port: Option<u16>,
    /// Transport protocol.
    #[arg(long, env = "NATPUNCH_MAP_PROTO", value_enum, default_value_t = Proto::Udp)]
    pub proto: Proto,
    #[command(flatten)]
    pub lease: Lease,
    #[command(flatten)]
    pub common: Common,
}

/// The lifetime to ask for and the protocol to map with (`map add`, `map keep`).
#[derive(Debug, Args)]
pub struct Lease {
    /// Lifetime to ask for, in seconds (routers clamp it; 0 asks UPnP for a permanent lease).
    #[arg(long, env = "NATPUNCH_MAP_LIFETIME", default_value_t = 7200)]
    pub lifetime: u32,
    /// Protocol to map with.
    #[arg(long, env = "NATPUNCH_MAP_VIA", value_enum, default_value_t = Via::Auto)]
    pub via: Via,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Internal (or else external) port of the mapping.
    pub port: u16,
    /// Transport protocol.
    #[arg(long, env = "NATPUNCH_MAP_PROTO", value_enum, default_value_t = Proto::Udp)]
    pub proto: Proto,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
#[command(
    after_help = "How changes are noticed: PCP and NAT-PMP routers announce a reboot or a \
new external address on 224.0.0.1:5350, and UPnP routers multicast SSDP NOTIFYs when they start; \
either makes natpunch ask the router at once (miniupnpd: about a second). A router that says \
nothing is caught by the check every --check-secs (UPnP has no announcement of an external \
address change, so that waits for the check).",
    mut_arg("lifetime", |a| a.help(
        "Lifetime to ask for, in seconds; mappings are renewed at half the lifetime granted"
    ))
)]
pub struct KeepArgs {
    /// Mappings to hold: INTERNAL_PORT[:EXTERNAL_PORT][/udp|/tcp], e.g. `6000`, `6000/tcp`,
    /// `6000:16000/udp`.
    #[arg(required = true, value_parser = parse_spec)]
    pub ports: Vec<Spec>,
    /// Transport protocol of ports given without /udp or /tcp.
    #[arg(long, env = "NATPUNCH_MAP_PROTO", value_enum, default_value_t = Proto::Udp)]
    pub proto: Proto,
    #[command(flatten)]
    pub lease: Lease,
    /// Seconds between checks that the router still has the mappings (PCP ANNOUNCE, NAT-PMP
    /// external address, or the UPnP external address and mapping table).
    #[arg(long, env = "NATPUNCH_MAP_CHECK_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub check_secs: u64,
    #[command(flatten)]
    pub common: Common,
}

/// One mapping to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub internal: u16,
    pub external: Option<u16>,
    pub proto: Option<Proto>,
}

pub fn parse_spec(text: &str) -> Result<Spec, String> {
    let (ports, proto) = match text.split_once('/') {
        Some((ports, "udp")) => (ports, Some(Proto::Udp)),
        Some((ports, "tcp")) => (ports, Some(Proto::Tcp)),
        Some((_, other)) => return Err(format!("unknown protocol `{other}` (udp or tcp)")),
        None => (text, None),
    };
    // clap shows the whole value: name the part only when it is not the whole.
    let port = |p: &str| {
        p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
            if p == text {
                "not a port (1-65535)".to_owned()
            } else if p.is_empty() {
                "a port is missing (1-65535)".to_owned()
            } else {
                format!("`{p}` is not a port (1-65535)")
            }
        })
    };
    let (internal, external) = match ports.split_once(':') {
        Some((i, e)) => (port(i)?, Some(port(e)?)),
        None => (port(ports)?, None),
    };
    Ok(Spec {
        internal,
        external,
        proto,
    })
}

impl Via {
    /// The one protocol asked for, or `None` for the best the router offers.
    pub fn only(self) -> Option<Method> {
        match self {
            Self::Auto => None,
            Self::Pcp => Some(Method::Pcp),
            Self::Natpmp => Some(Method::NatPmp),
            Self::Upnp => Some(Method::Upnp),
        }
    }
}
