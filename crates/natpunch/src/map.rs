//! `natpunch map …`: port mappings on the local router over PCP, NAT-PMP or UPnP IGD. The
//! record of this host's mappings and the renew policy live in `portmap`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use portmap::Protocol;
use portmap::client::{self, Gateway, MapRequest, Mapped};
use portmap::hold::{HoldConfig, Holder, Update};
use portmap::keeper::{Method, Want};
use portmap::record::{self, Record};
use portmap::upnp::Igd;

use crate::args::Json;

#[derive(Debug, Subcommand)]
pub(crate) enum MapCommand {
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
pub(crate) struct Common {
    /// The router to ask [default: the IPv4 default gateway].
    #[arg(long, env = "NATPUNCH_MAP_GATEWAY", global = true)]
    gateway: Option<Ipv4Addr>,
    /// How long to wait for each protocol's answer, in milliseconds (NAT-PMP and PCP
    /// retransmit after 250, 500, 1000 … ms within it).
    #[arg(
        long,
        env = "NATPUNCH_MAP_WAIT_MS",
        default_value_t = 2000,
        global = true
    )]
    wait_ms: u64,
    /// Where this host records its mappings [default: $XDG_STATE_HOME/natpunch/mappings.json
    /// or ~/.local/state/natpunch/mappings.json].
    #[arg(long, env = "NATPUNCH_MAP_STATE", global = true)]
    state: Option<PathBuf>,
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Args)]
pub(crate) struct ProbeArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    common: Common,
}

/// Which protocol to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Via {
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
pub(crate) enum Proto {
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
pub(crate) struct AddArgs {
    /// The port on this host.
    internal_port: u16,
    /// The external port to ask for [default: the internal port]. The router may give another.
    #[arg(long, env = "NATPUNCH_MAP_EXTERNAL_PORT")]
    external_port: Option<u16>,
    /// Transport protocol.
    #[arg(long, env = "NATPUNCH_MAP_PROTO", value_enum, default_value_t = Proto::Udp)]
    proto: Proto,
    #[command(flatten)]
    lease: Lease,
    #[command(flatten)]
    common: Common,
}

/// The lifetime to ask for and the protocol to map with (`map add`, `map keep`).
#[derive(Debug, Args)]
pub(crate) struct Lease {
    /// Lifetime to ask for, in seconds (routers clamp it; 0 asks UPnP for a permanent lease).
    #[arg(long, env = "NATPUNCH_MAP_LIFETIME", default_value_t = 7200)]
    lifetime: u32,
    /// Protocol to map with.
    #[arg(long, env = "NATPUNCH_MAP_VIA", value_enum, default_value_t = Via::Auto)]
    via: Via,
}

#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Internal (or else external) port of the mapping.
    port: u16,
    /// Transport protocol.
    #[arg(long, env = "NATPUNCH_MAP_PROTO", value_enum, default_value_t = Proto::Udp)]
    proto: Proto,
    #[command(flatten)]
    common: Common,
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
pub(crate) struct KeepArgs {
    /// Mappings to hold: INTERNAL_PORT[:EXTERNAL_PORT][/udp|/tcp], e.g. `6000`, `6000/tcp`,
    /// `6000:16000/udp`.
    #[arg(required = true, value_parser = parse_spec)]
    ports: Vec<Spec>,
    /// Transport protocol of ports given without /udp or /tcp.
    #[arg(long, env = "NATPUNCH_MAP_PROTO", value_enum, default_value_t = Proto::Udp)]
    proto: Proto,
    #[command(flatten)]
    lease: Lease,
    /// Seconds between checks that the router still has the mappings (PCP ANNOUNCE, NAT-PMP
    /// external address, or the UPnP external address and mapping table).
    #[arg(long, env = "NATPUNCH_MAP_CHECK_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    check_secs: u64,
    #[command(flatten)]
    common: Common,
}

/// One mapping to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spec {
    internal: u16,
    external: Option<u16>,
    proto: Option<Proto>,
}

fn parse_spec(text: &str) -> Result<Spec, String> {
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

pub(crate) fn run(cmd: MapCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cmd {
            MapCommand::Probe(a) => probe(a.common).await,
            MapCommand::List(a) => list(a.common).await,
            MapCommand::Add(a) => add(a).await,
            MapCommand::Delete(a) => delete(a).await,
            MapCommand::Keep(a) => keep(a).await,
        }
    })
}

impl Common {
    fn gateway(&self) -> anyhow::Result<Gateway> {
        Gateway::find(self.gateway).context("finding the router")
    }

    fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms.max(1))
    }

    fn record(&self) -> anyhow::Result<Record> {
        let path = match &self.state {
            Some(p) => p.clone(),
            None => crate::state_dir()?.join("mappings.json"),
        };
        Ok(Record::load(path)?)
    }

    /// The router, how long to wait for it, and this host's record of its mappings.
    fn open(&self) -> anyhow::Result<(Gateway, Duration, Record)> {
        Ok((self.gateway()?, self.wait(), self.record()?))
    }
}

impl Via {
    /// The one protocol asked for, or `None` for the best the router offers.
    fn only(self) -> Option<Method> {
        match self {
            Self::Auto => None,
            Self::Pcp => Some(Method::Pcp),
            Self::Natpmp => Some(Method::NatPmp),
            Self::Upnp => Some(Method::Upnp),
        }
    }
}

async fn probe(common: Common) -> anyhow::Result<ExitCode> {
    let gw = common.gateway()?;
    eprintln!(
        "map probe: asking {} (from {}) over PCP, NAT-PMP and UPnP",
        gw.addr, gw.local
    );
    let report = client::probe(gw, common.wait()).await;
    if common.json.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.methods().is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn list(common: Common) -> anyhow::Result<ExitCode> {
    let gw = common.gateway()?;
    let record = common.record()?;
    let ours: Vec<&Mapped> = record.on(gw).collect();
    let upnp = match Igd::discover(gw.local, common.wait()).await {
        Ok(igd) => Some(
            igd.list()
                .await
                .context("reading the router's UPnP table")?,
        ),
        Err(_) => None,
    };
    if common.json.json {
        let report = serde_json::json!({"gateway": gw, "recorded": ours, "upnp": upnp});
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "mappings this host made on {} ({}):",
        gw.addr,
        record.path().display()
    );
    if ours.is_empty() {
        println!("  none");
    }
    for m in &ours {
        println!("  {m}");
    }
    match upnp {
        Some(entries) => {
            println!("the router's UPnP table:");
            if entries.is_empty() {
                println!("  empty");
            }
            for e in entries {
                println!("  {e}");
            }
        }
        None => println!("the router answers no UPnP search"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn add(args: AddArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let (gw, wait, mut record) = common.open()?;
    let say = |m: &str| eprintln!("map add: {m}");
    let methods = record::methods(args.lease.via.only(), gw, wait, &say).await?;
    let request = MapRequest {
        protocol: args.proto.into(),
        internal_port: args.internal_port,
        external_port: args.external_port,
        lifetime_secs: args.lease.lifetime,
    };
    let m = record.add(gw, &methods, request, wait).await?;
    if common.json.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("mapped {m}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn keep(args: KeepArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let (gw, wait, mut record) = common.open()?;
    let say = |m: &str| eprintln!("map keep: {m}");
    let method = record::methods(args.lease.via.only(), gw, wait, &say).await?[0];
    let wants: Vec<Want> = args
        .ports
        .iter()
        .map(|s| Want {
            protocol: s.proto.unwrap_or(args.proto).into(),
            internal_port: s.internal,
            external_port: s.external,
            lifetime: Duration::from_secs(u64::from(args.lease.lifetime)),
        })
        .collect();
    let prior: Vec<Option<Mapped>> = wants
        .iter()
        .map(|w| record.find(gw, w.protocol, w.internal_port).cloned())
        .collect();
    let config = HoldConfig {
        method,
        wait,
        check_interval: Duration::from_secs(args.check_secs),
    };
    let mut holder = Holder::new(gw, config, wants, &prior)?;
    eprintln!(
        "map keep: holding {} mapping(s) on {} via {method}, checking every {} s; Ctrl-C \
         deletes them",
        args.ports.len(),
        gw.addr,
        args.check_secs
    );
    let start = std::time::Instant::now();
    let json = common.json.json;
    let mut report = |u: Update| {
        let elapsed = start.elapsed().as_secs_f64();
        if json {
            let mut value = serde_json::to_value(&u).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("elapsed_secs".into(), serde_json::json!(elapsed));
            }
            println!("{value}");
        } else {
            println!("[{elapsed:8.1} s] {u}");
        }
        if let Err(e) = record.apply(&u) {
            eprintln!("map keep: {:#}", anyhow::Error::from(e));
        }
    };
    let stop = crate::stop_signal();
    for p in holder.problems() {
        eprintln!("map keep: {p}");
    }
    holder.run(stop, &mut report).await;
    eprintln!("map keep: stopping; deleting the mappings");
    holder.release(&mut report).await;
    Ok(ExitCode::SUCCESS)
}

async fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let common = &args.common;
    let (gw, wait, mut record) = common.open()?;
    let m = record
        .delete(gw, args.proto.into(), args.port, wait)
        .await?;
    if common.json.json {
        println!("{}", serde_json::json!({"deleted": m}));
    } else {
        println!("deleted {m}");
    }
    Ok(ExitCode::SUCCESS)
}
