//! The flags of `natpunch client`: measurement hosts that punch what a server serves.

use crate::args::{Json, Telemetry};
use clap::Args;
use clap::builder::BoolishValueParser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(after_help = "The API key comes from --api-key, NATPUNCH_API_KEY, or \
$XDG_CONFIG_HOME/natpunch/api-key.txt (~/.config/natpunch/api-key.txt), where a new one is saved \
when there is none (the server registers unknown keys as anonymous unless its registration is \
closed). Reports wait in the spool until the server acknowledges them: stopping the client or \
the server loses none.", mut_arg("json", |a| a.help("Print one JSON object per event")))]
pub struct ClientArgs {
    /// The measurement server: http://HOST:PORT or https://HOST:PORT.
    #[arg(
        long,
        env = "NATPUNCH_SERVER",
        default_value = "http://127.0.0.1:10000"
    )]
    pub server: String,
    /// The API key.
    #[arg(long, env = "NATPUNCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// libp2p hosts, each with its own identity, punching concurrently (1 to 256).
    #[arg(long, env = "NATPUNCH_CLIENT_HOST_COUNT", default_value_t = 10)]
    pub host_count: usize,
    /// Where the hosts' keys live (host-N.key, created on first start) [default:
    /// $XDG_STATE_HOME/natpunch/client or ~/.local/state/natpunch/client].
    #[arg(long, env = "NATPUNCH_CLIENT_KEYS")]
    pub keys_dir: Option<PathBuf>,
    /// Where reports wait until acknowledged [default: the keys directory's spool/].
    #[arg(long, env = "NATPUNCH_CLIENT_SPOOL")]
    pub spool: Option<PathBuf>,
    /// Stop after this many punches (all hosts together) once every report is delivered
    /// [default: run until stopped].
    #[arg(long, env = "NATPUNCH_CLIENT_PUNCHES")]
    pub punches: Option<u64>,
    /// Seconds a host waits when the server has no peer for it.
    #[arg(long, env = "NATPUNCH_CLIENT_IDLE_SECS", default_value_t = 30.0)]
    pub idle_secs: f64,
    /// A STUN server (RFC 5780, e.g. `natpunch stun-server`) to measure this network's NAT
    /// behaviour once at start; sent with every report.
    #[arg(long, env = "NATPUNCH_STUN_SERVER")]
    pub stun_server: Option<SocketAddr>,
    /// Send the router's login page with each host's first report (punchr did this unless told
    /// not to; natpunch does not unless told to).
    #[arg(long, env = "NATPUNCH_CLIENT_ROUTER_CHECK", value_parser = BoolishValueParser::new())]
    pub router_check: bool,
    /// CA certificate(s) (PEM) for an https server [default: the system's,
    /// /etc/ssl/certs/ca-certificates.crt].
    #[arg(long, env = "NATPUNCH_CLIENT_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Map each punch's listen ports on the local router (PCP, NAT-PMP or UPnP) and offer the
    /// mapped addresses first; the mappings go into the report and are deleted after the punch.
    #[arg(long, env = "NATPUNCH_PORT_MAPPING", value_parser = BoolishValueParser::new())]
    pub port_mapping: bool,
    /// How long one hole-punch attempt may take, in ms.
    #[arg(long, env = "NATPUNCH_ATTEMPT_TIMEOUT_MS", default_value_t = 3000)]
    pub attempt_timeout_ms: u64,
    #[command(flatten)]
    pub telemetry: Telemetry<Self>,
    #[command(flatten)]
    pub json: Json,
}

crate::write_args!(ClientArgs {
    server,
    api_key,
    host_count,
    keys_dir,
    spool,
    punches,
    idle_secs,
    stun_server,
    router_check,
    ca_cert,
    port_mapping,
    attempt_timeout_ms;
    telemetry,
    json,
});
