//! The flags of `natpunch lab matrix`: which NAT pairs, transports and trials, and the
//! preset and pair parsers.

use crate::args::Json;
use crate::peer::{CandidatesArg, EngineArg, TransportArg};
use clap::Args;
use clap::builder::BoolishValueParser;
use natlab::Preset;

#[derive(Debug, Args)]
#[command(mut_arg("json", |a| a.help("Print the report as JSON (`{\"cells\":[…]}`)")))]
pub struct MatrixArgs {
    /// Trials per cell (dialer preset × listener preset × transport).
    #[arg(long, env = "NATPUNCH_MATRIX_TRIALS", default_value_t = 5)]
    pub trials: u32,
    /// Transports: each gets its own cells (`both` means a TCP and a QUIC cell).
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_TRANSPORT",
        value_enum,
        default_value_t = TransportArg::Both
    )]
    pub transport: TransportArg,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_MATRIX_RTT_MS", default_value_t = 100)]
    pub rtt_ms: u32,
    /// Presets to pair (comma-separated) [default: all].
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_PRESETS",
        value_delimiter = ',',
        value_parser = parse_preset
    )]
    pub presets: Vec<Preset>,
    /// Only these pairs, as DIALER:LISTENER (comma-separated), e.g.
    /// `port-restricted:port-restricted,symmetric:symmetric` [default: every pair of --presets].
    #[arg(long, env = "NATPUNCH_MATRIX_PAIRS", value_delimiter = ',', value_parser = parse_pair)]
    pub pairs: Vec<(Preset, Preset)>,
    /// Labs running trials at once.
    #[arg(long, env = "NATPUNCH_MATRIX_PARALLEL", default_value_t = 4)]
    pub parallel: usize,
    /// Hole-punching engine.
    #[arg(long, env = "NATPUNCH_MATRIX_ENGINE", value_enum, default_value_t = EngineArg::Natpunch)]
    pub engine: EngineArg,
    /// The dialer's engine, when it differs from --engine (interoperability runs).
    #[arg(long, env = "NATPUNCH_MATRIX_DIALER_ENGINE", value_enum)]
    pub dialer_engine: Option<EngineArg>,
    /// The listener's engine, when it differs from --engine.
    #[arg(long, env = "NATPUNCH_MATRIX_LISTENER_ENGINE", value_enum)]
    pub listener_engine: Option<EngineArg>,
    /// Addresses the peers offer.
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_CANDIDATES",
        value_enum,
        default_value_t = CandidatesArg::Observed
    )]
    pub candidates: CandidatesArg,
    /// Each attempt's time after its dial, in ms.
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_ATTEMPT_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub attempt_timeout_ms: u64,
    #[command(flatten)]
    pub json: Json,
    /// Also write every trial, both sides' records, as JSON lines to this file.
    #[arg(long, env = "NATPUNCH_MATRIX_TRIALS_OUT")]
    pub trials_out: Option<std::path::PathBuf>,
    /// A flag for every peer, e.g. --peer-arg=--session-table=128 or
    /// --peer-arg=--no-birthday (repeatable; see `natpunch peer listen --help`).
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_PEER_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub peer_arg: Vec<String>,
    /// Bound the session table of every router that maps per destination (the hard side of
    /// birthday probing) to this many flows.
    #[arg(long, env = "NATPUNCH_MATRIX_MAX_SESSIONS",
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub max_sessions: Option<u32>,
    /// What a new flow meets on a full table: `drop` (it gets no mapping) or `evict-oldest`
    /// (the oldest flow's mapping goes).
    #[arg(
        long,
        env = "NATPUNCH_MATRIX_SESSION_OVERFLOW",
        default_value = "drop",
        requires = "max_sessions"
    )]
    pub session_overflow: natlab::SessionOverflow,
}

/// The transports of `lab connect-matrix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    /// TCP sockets only.
    Tcp,
    /// UDP sockets only.
    Udp,
    /// A TCP cell and a UDP cell per pair.
    Both,
}

#[derive(Debug, Args)]
#[command(
    mut_arg("json", |a| a.help("Print the report as JSON (`{\"cells\":[…]}`)")),
    after_help = "Each trial starts two fresh daemons (`natpunch daemon`), one behind each \
preset, connects an application behind the first to one listening behind the second, and moves \
1 MiB each way through the socket it got, compared byte for byte."
)]
pub struct ConnectMatrixArgs {
    /// Trials per cell (connecting preset × listening preset × transport).
    #[arg(long, env = "NATPUNCH_CONNECT_MATRIX_TRIALS", default_value_t = 3)]
    pub trials: u32,
    /// Socket transports: each gets its own cells.
    #[arg(
        long,
        env = "NATPUNCH_CONNECT_MATRIX_PROTO",
        value_enum,
        default_value_t = ProtoArg::Both
    )]
    pub proto: ProtoArg,
    /// Host-to-host round trip through the lab's internet, in ms.
    #[arg(long, env = "NATPUNCH_CONNECT_MATRIX_RTT_MS", default_value_t = 100)]
    pub rtt_ms: u32,
    /// Presets to pair (comma-separated) [default: all].
    #[arg(
        long,
        env = "NATPUNCH_CONNECT_MATRIX_PRESETS",
        value_delimiter = ',',
        value_parser = parse_preset
    )]
    pub presets: Vec<Preset>,
    /// Only these pairs, as CONNECTING:LISTENING (comma-separated) [default: every pair of
    /// --presets].
    #[arg(
        long,
        env = "NATPUNCH_CONNECT_MATRIX_PAIRS",
        value_delimiter = ',',
        value_parser = parse_pair
    )]
    pub pairs: Vec<(Preset, Preset)>,
    /// Labs running trials at once.
    #[arg(long, env = "NATPUNCH_CONNECT_MATRIX_PARALLEL", default_value_t = 2)]
    pub parallel: usize,
    /// Do not tell the daemons their NAT's behaviour: they try a hole punch with every pair
    /// (what a daemon that has not checked its NAT does).
    #[arg(
        long,
        env = "NATPUNCH_CONNECT_MATRIX_UNTOLD",
        value_parser = BoolishValueParser::new()
    )]
    pub untold: bool,
    /// A flag for every daemon, e.g. --daemon-arg=--session-table=128 or
    /// --daemon-arg=--no-birthday (repeatable; see `natpunch daemon --help`).
    #[arg(
        long,
        env = "NATPUNCH_CONNECT_MATRIX_DAEMON_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub daemon_arg: Vec<String>,
    /// Bound the session table of every router that maps per destination (the hard side of
    /// birthday probing) to this many flows.
    #[arg(long, env = "NATPUNCH_CONNECT_MATRIX_MAX_SESSIONS",
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub max_sessions: Option<u32>,
    /// What a new flow meets on a full table: `drop` (it gets no mapping) or `evict-oldest`
    /// (the oldest flow's mapping goes).
    #[arg(
        long,
        env = "NATPUNCH_CONNECT_MATRIX_SESSION_OVERFLOW",
        default_value = "drop",
        requires = "max_sessions"
    )]
    pub session_overflow: natlab::SessionOverflow,
    #[command(flatten)]
    pub json: Json,
}

/// A preset named on the command line. clap shows the value with the error, so the message
/// names only what is wrong: the value is not repeated.
pub fn parse_preset(s: &str) -> Result<Preset, String> {
    preset_named(s).ok_or_else(|| format!("unknown NAT preset (known: {})", known_presets()))
}

pub fn preset_named(s: &str) -> Option<Preset> {
    Preset::ALL.into_iter().find(|p| p.name() == s)
}

pub fn known_presets() -> String {
    let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
    names.join(", ")
}

pub fn parse_pair(s: &str) -> Result<(Preset, Preset), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or("not a pair: DIALER:LISTENER, e.g. symmetric:open")?;
    let side = |p: &str| {
        preset_named(p)
            .ok_or_else(|| format!("unknown NAT preset `{p}` (known: {})", known_presets()))
    };
    Ok((side(a)?, side(b)?))
}
