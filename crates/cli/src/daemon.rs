//! The flags of `natpunch daemon`, and the daemon configuration they ask for.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use behaviour::{Filtering, Mapping, PortAllocation};
use clap::Args;
use libp2p::Multiaddr;

use crate::args::{Identity, Json, Telemetry};

#[derive(Debug, Args)]
#[command(
    after_help = "Applications talk to the daemon over its Unix socket (docs/daemon-api.md), or \
through `natpunch connect` and `natpunch accept`. Two daemons need a relay in common and each \
other's peer ID. Give the NAT's behaviour with --mapping and --filtering (as `natpunch nat \
check` reports it) so that pairs that cannot punch get the relayed socket at once.",
    mut_arg("json", |a| a.help("Print one JSON object per event"))
)]
pub struct DaemonArgs {
    /// A relay to hold a reservation on, with /p2p/<relay id> (repeatable; TCP or QUIC, the
    /// other transport is tried on the same port).
    #[arg(
        long,
        env = "NATPUNCH_DAEMON_RELAYS",
        value_delimiter = ',',
        required = true
    )]
    pub relay: Vec<Multiaddr>,
    /// Address to listen on (TCP and QUIC).
    #[arg(long, env = "NATPUNCH_DAEMON_LISTEN_IP", default_value = "0.0.0.0")]
    pub listen_ip: Ipv4Addr,
    /// The API socket [default: /run/natpunch/daemon.sock as root, else
    /// $XDG_RUNTIME_DIR/natpunch/daemon.sock].
    #[arg(long, env = "NATPUNCH_DAEMON_SOCKET")]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub identity: Identity<Self>,
    /// TTL of NUTSS's first SYN: enough to leave this end's NAT, too little to reach the
    /// remote's (0 turns NUTSS off; it needs root, for the nft rule that keeps the ICMP
    /// time-exceeded reply from killing the socket).
    #[arg(long, env = "NATPUNCH_DAEMON_NUTSS_TTL", default_value_t = 2)]
    pub nutss_ttl: u32,
    /// A STUN server (the relay's reflector, or any RFC 8489 server) that tells which external
    /// port the NAT gave a fresh socket, asked when the NAT does not keep ports; the first one
    /// named is also asked at start, as RFC 5780 allows, how the NAT maps and filters, unless
    /// --mapping and --filtering say [default: each relay's IP address, port 3478, where
    /// `natpunch relay` answers].
    #[arg(long, env = "NATPUNCH_DAEMON_STUN_SERVER", value_delimiter = ',')]
    pub stun_server: Vec<std::net::SocketAddr>,
    /// Do not map a direct port on the router (by default the daemon asks the router, with PCP,
    /// NAT-PMP or UPnP IGD, for a TCP and UDP port that others can dial straight, and holds it).
    #[arg(
        long,
        env = "NATPUNCH_DAEMON_NO_PORT_MAPPING",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_port_mapping: bool,
    /// How this end's NAT maps (RFC 4787), if known.
    #[arg(long, env = "NATPUNCH_DAEMON_MAPPING", value_parser = parse_behaviour::<Mapping>)]
    pub mapping: Option<Mapping>,
    /// How this end's NAT filters (RFC 4787), if known.
    #[arg(long, env = "NATPUNCH_DAEMON_FILTERING", value_parser = parse_behaviour::<Filtering>)]
    pub filtering: Option<Filtering>,
    /// How this end's NAT picks external ports (preserve, random, sequential), if known: a NAT
    /// that maps per destination and allocates sequentially lets the other end predict its
    /// ports [default: what the RFC 5780 check says, else two fresh mappings seen by the STUN
    /// server, per connection].
    #[arg(long, env = "NATPUNCH_DAEMON_PORT_ALLOCATION", value_parser = parse_behaviour::<PortAllocation>)]
    pub port_allocation: Option<PortAllocation>,
    /// Do not take part in birthday probing or port prediction (the UDP techniques for a NAT
    /// that maps per destination against one that does not); such pairs get the relay.
    #[arg(
        long,
        env = "NATPUNCH_DAEMON_NO_BIRTHDAY",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_birthday: bool,
    /// Birthday probing: sockets this end opens at most when its NAT maps per destination
    /// (256 and 1,024 probes give a hit 98% of the time: P = 1 − (1 − k/64,512)^n).
    #[arg(long, env = "NATPUNCH_DAEMON_BIRTHDAY_SOCKETS", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub birthday_sockets: u16,
    /// Birthday probing: probes this end sends at most per attempt when its NAT maps
    /// endpoint-independently (2,048 make a hit 99.97% likely with 256 sockets).
    #[arg(long, env = "NATPUNCH_DAEMON_BIRTHDAY_PROBES", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..=64512))]
    pub birthday_probes: u32,
    /// Birthday probing: probes per second at most (4,000: the whole budget in half a second,
    /// about 230 kB/s).
    #[arg(long, env = "NATPUNCH_DAEMON_BIRTHDAY_RATE", default_value_t = 4000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub birthday_rate: u32,
    /// Birthday probing: how long one attempt may take, in milliseconds.
    #[arg(long, env = "NATPUNCH_DAEMON_BIRTHDAY_DEADLINE_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u32).range(100..=15_000))]
    pub birthday_deadline_ms: u32,
    /// Port prediction: ports probed above the other end's last mapping before random ones,
    /// when its NAT allocates sequentially (0: no prediction).
    #[arg(long, env = "NATPUNCH_DAEMON_PREDICTION_WINDOW", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub prediction_window: u16,
    /// The number of mappings this end's router keeps (its session table), if known: birthday
    /// probing then opens fewer sockets (the table less 16), and a hit takes more probes.
    #[arg(long, env = "NATPUNCH_DAEMON_SESSION_TABLE",
          value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    pub session_table: Option<u32>,
    /// Report each connection this daemon's applications make to this measurement server
    /// (`natpunch server`, punchr's format with the technique), e.g. http://127.0.0.1:10000.
    #[arg(long, env = "NATPUNCH_DAEMON_REPORT_TO")]
    pub report_to: Option<String>,
    /// The API key for --report-to [default: the one kept in natpunch's config directory, made
    /// on first use].
    #[arg(long, env = "NATPUNCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Where reports wait until the server acknowledged them [default:
    /// $XDG_STATE_HOME/natpunch/daemon-spool].
    #[arg(long, env = "NATPUNCH_DAEMON_SPOOL")]
    pub spool: Option<PathBuf>,
    /// CA certificate(s) (PEM) for an https --report-to [default: the system's].
    #[arg(long, env = "NATPUNCH_DAEMON_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    #[command(flatten)]
    pub telemetry: Telemetry<Self>,
    #[command(flatten)]
    pub json: Json,
}

impl DaemonArgs {
    /// The STUN servers to ask: `--stun-server`, or each relay's IP address with port 3478.
    pub fn stun_servers(&self) -> Vec<std::net::SocketAddr> {
        if !self.stun_server.is_empty() {
            return self.stun_server.clone();
        }
        let mut out = Vec::new();
        for relay in &self.relay {
            let ip = relay.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
                libp2p::multiaddr::Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            });
            if let Some(ip) = ip {
                let server = std::net::SocketAddr::new(ip, 3478);
                if !out.contains(&server) {
                    out.push(server);
                }
            }
        }
        out
    }
}

crate::write_args!(DaemonArgs {
    relay,
    listen_ip,
    socket,
    nutss_ttl,
    stun_server,
    no_port_mapping,
    mapping,
    filtering,
    port_allocation,
    no_birthday,
    birthday_sockets,
    birthday_probes,
    birthday_rate,
    birthday_deadline_ms,
    prediction_window,
    session_table,
    report_to,
    api_key,
    spool,
    ca_cert;
    identity,
    telemetry,
    json
});

/// A NAT behaviour in RFC 4787's words, kebab-case (`endpoint-independent`, `address-dependent`,
/// `address-and-port-dependent`, `none`).
pub fn parse_behaviour<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        "expected none, endpoint-independent, address-dependent or address-and-port-dependent \
         (for a port allocation: preserve, random or sequential)"
            .to_owned()
    })
}
