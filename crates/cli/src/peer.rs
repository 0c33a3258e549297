//! The flags of `natpunch peer listen|dial`, and the peer configuration they ask for.

use crate::args::{Identity, Json};
use behaviour::Mapping;
use clap::builder::BoolishValueParser;
use clap::{Args, Subcommand, ValueEnum};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use p2p::peer::{Candidates, Dht, Engine, LocalMapping, MappingSource, PeerConfig, Transport};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Reserve on the relay, print the relayed address, and accept hole punches until Ctrl-C.
    Listen(Common),
    /// Dial PEER_ID through the relay and hole-punch once; exit 0 on a direct connection.
    Dial(DialArgs),
}

#[derive(Debug, Args)]
pub struct DialArgs {
    /// The peer to reach (it must be listening on the same relay).
    pub peer_id: PeerId,
    /// After the hole punch, send this many bytes to the peer over the connection left (the
    /// direct one, or the relayed one with --no-punch) and report the throughput.
    #[arg(long, env = "NATPUNCH_PEER_PERF_BYTES")]
    pub perf_bytes: Option<u64>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print one JSON object per event")))]
pub struct Common {
    /// The relay, with /p2p/<relay id> (repeat for its TCP and QUIC addresses; a missing one
    /// is derived with the same port).
    #[arg(long, required = true, env = "NATPUNCH_RELAY", value_delimiter = ',')]
    pub relay: Vec<Multiaddr>,
    /// Transports to listen, reach the relay and punch with.
    #[arg(long, value_enum, env = "NATPUNCH_TRANSPORT", default_value_t = TransportArg::Both)]
    pub transport: TransportArg,
    /// Hole-punching engine: natpunch's, or rust-libp2p's stock `dcutr` (for comparisons).
    #[arg(long, value_enum, env = "NATPUNCH_ENGINE", default_value_t = EngineArg::Natpunch, overrides_with = "engine")]
    pub engine: EngineArg,
    /// Addresses offered to the remote: as the relay observed them, or identify's candidates
    /// (listen port in place of the observed one) as stock libp2p does.
    #[arg(long, value_enum, env = "NATPUNCH_CANDIDATES", default_value_t = CandidatesArg::Observed)]
    pub candidates: CandidatesArg,
    /// How long one attempt may take after its dial, in milliseconds (natpunch engine).
    #[arg(long, env = "NATPUNCH_ATTEMPT_TIMEOUT_MS", default_value_t = 3000)]
    pub attempt_timeout_ms: u64,
    /// Attempts before giving up.
    #[arg(long, env = "NATPUNCH_PEER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Address to listen on.
    #[arg(long, env = "NATPUNCH_PEER_LISTEN_IP", default_value = "0.0.0.0")]
    pub listen_ip: IpAddr,
    /// Do not hole-punch: stay on the relayed connection (to measure the relay).
    #[arg(long, env = "NATPUNCH_PEER_NO_PUNCH", value_parser = BoolishValueParser::new())]
    pub no_punch: bool,
    /// Map the listen ports on the local router (PCP, NAT-PMP or UPnP) and offer the mapped
    /// addresses first. The mappings are renewed at half their lifetime and made again when
    /// the router reboots or gets a new external address (as `natpunch map keep` does); they
    /// are deleted when the peer stops.
    #[arg(long, env = "NATPUNCH_PORT_MAPPING", value_parser = BoolishValueParser::new())]
    pub port_mapping: bool,
    /// With --port-mapping: the lifetime to ask for, in seconds (routers may grant another).
    #[arg(
        long,
        env = "NATPUNCH_PORT_MAPPING_LIFETIME_SECS",
        default_value_t = p2p::peer::defaults::PORT_MAPPING_LIFETIME.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=u64::from(u32::MAX))
    )]
    pub port_mapping_lifetime_secs: u64,
    /// How this end's NAT maps (RFC 4787: none, endpoint-independent, address-dependent,
    /// address-and-port-dependent), as `natpunch nat check` finds it. natpunch remotes learn
    /// it over /natpunch/dcutr/1.1.0, so that TCP towards a NAT that maps per destination goes
    /// direct on the first attempt.
    #[arg(long, env = "NATPUNCH_PEER_MAPPING", value_parser = crate::daemon::parse_behaviour::<Mapping>)]
    pub mapping: Option<Mapping>,
    /// Do not take part in birthday probing over QUIC (for a NAT that maps per destination
    /// against one that filters by port); either side turning it off turns it off for the pair.
    #[arg(long, env = "NATPUNCH_PEER_NO_BIRTHDAY", value_parser = BoolishValueParser::new())]
    pub no_birthday: bool,
    /// Birthday probing: sockets this peer opens when its NAT maps per destination.
    #[arg(long, env = "NATPUNCH_PEER_BIRTHDAY_SOCKETS", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub birthday_sockets: u16,
    /// Birthday probing: probes this peer sends at most when its NAT maps
    /// endpoint-independently.
    #[arg(long, env = "NATPUNCH_PEER_BIRTHDAY_PROBES", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..=64512))]
    pub birthday_probes: u32,
    /// Birthday probing: probes per second at most.
    #[arg(long, env = "NATPUNCH_PEER_BIRTHDAY_RATE", default_value_t = 4000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub birthday_rate: u32,
    /// Port prediction: ports probed from the remote's predicted port before random ones, when
    /// its NAT maps per destination but allocates ports in order (0: no prediction).
    #[arg(long, env = "NATPUNCH_PEER_PREDICTION_WINDOW", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub prediction_window: u16,
    /// The number of mappings this end's router keeps (its session table), if known: birthday
    /// probing then opens fewer sockets (the table less 16), and a hit takes more probes.
    #[arg(long, env = "NATPUNCH_PEER_SESSION_TABLE",
          value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    pub session_table: Option<u32>,
    /// An RFC 5780 STUN server (`natpunch stun-server`) that tells at start how this end's NAT
    /// maps, unless --mapping says [default: learnt from what remotes at two or more addresses
    /// observe, or unknown]. When the NAT maps per destination, two fresh mappings it reports
    /// at each hole punch also say whether the NAT allocates ports in order, and where next
    /// (port prediction, told to the remote).
    #[arg(long, env = "NATPUNCH_PEER_STUN_SERVER")]
    pub stun_server: Option<SocketAddr>,
    #[command(flatten)]
    pub identity: Identity<Self>,
    /// Join a Kademlia DHT (as a client) through these peers, with /p2p/<peer id>, once set
    /// up; a honeypot among its servers then records this peer.
    #[arg(
        long = "dht-bootstrap",
        env = "NATPUNCH_DHT_BOOTSTRAP",
        value_delimiter = ','
    )]
    pub dht_bootstrap: Vec<Multiaddr>,
    /// The DHT's protocol name.
    #[arg(
        long,
        env = "NATPUNCH_DHT_PROTOCOL",
        default_value = "/ipfs/kad/1.0.0",
        value_parser = crate::stream_protocol
    )]
    pub dht_protocol: StreamProtocol,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TransportArg {
    /// TCP only.
    Tcp,
    /// QUIC only.
    Quic,
    /// Both; the first direct connection wins.
    Both,
}

impl EngineArg {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Natpunch => "natpunch",
            Self::Stock => "stock",
        }
    }
}

impl CandidatesArg {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Observed => "observed",
            Self::Stock => "stock",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EngineArg {
    /// natpunch's DCUtR engine (every attempt recorded on both sides, bounded, one connection).
    Natpunch,
    /// rust-libp2p's `dcutr` behaviour.
    Stock,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CandidatesArg {
    /// The addresses the relay observed.
    Observed,
    /// identify's candidates.
    Stock,
}

impl Common {
    /// The peer's configuration these flags ask for.
    pub fn config(&self) -> PeerConfig {
        let mut c = PeerConfig::new(self.relay.clone());
        c.listen_ip = self.listen_ip;
        c.transport = match self.transport {
            TransportArg::Tcp => Transport::Tcp,
            TransportArg::Quic => Transport::Quic,
            TransportArg::Both => Transport::Both,
        };
        c.engine = match self.engine {
            EngineArg::Natpunch => Engine::Natpunch,
            EngineArg::Stock => Engine::Stock,
        };
        c.candidates = match self.candidates {
            CandidatesArg::Observed => Candidates::Observed,
            CandidatesArg::Stock => Candidates::Stock,
        };
        c.attempt_timeout = Duration::from_millis(self.attempt_timeout_ms.max(100));
        c.max_attempts = self.max_attempts.max(1);
        c.punch = !self.no_punch;
        c.port_mapping = self.port_mapping;
        c.port_mapping_lifetime = Duration::from_secs(self.port_mapping_lifetime_secs);
        c.birthday.enabled = !self.no_birthday;
        c.birthday.sockets = self.birthday_sockets.into();
        c.birthday.probes = usize::try_from(self.birthday_probes).unwrap_or(usize::MAX);
        c.birthday.rate = self.birthday_rate;
        c.birthday.window = self.prediction_window;
        c.birthday.session_table = self.session_table.and_then(|n| usize::try_from(n).ok());
        c.stun_server = self.stun_server;
        c.local_mapping = self.mapping.map(|mapping| LocalMapping {
            mapping,
            source: MappingSource::Flag,
        });
        if !self.dht_bootstrap.is_empty() {
            c.dht = Some(Dht {
                protocol: self.dht_protocol.clone(),
                bootstrap: self.dht_bootstrap.clone(),
            });
        }
        c
    }
}

macro_rules! named_values {
    ($($t:ty),*) => {
        $(impl crate::write::ArgValue for $t {
            fn texts(&self) -> Vec<std::ffi::OsString> {
                crate::write::value_name(self)
            }
        })*
    };
}

named_values!(TransportArg, EngineArg, CandidatesArg);

crate::write_args!(DialArgs { peer_id, perf_bytes; common });

crate::write_args!(Common {
    relay,
    transport,
    engine,
    candidates,
    attempt_timeout_ms,
    max_attempts,
    listen_ip,
    no_punch,
    port_mapping,
    port_mapping_lifetime_secs,
    dht_bootstrap,
    dht_protocol,
    mapping,
    no_birthday,
    birthday_sockets,
    birthday_probes,
    birthday_rate,
    prediction_window,
    session_table,
    stun_server;
    identity,
    json,
});
