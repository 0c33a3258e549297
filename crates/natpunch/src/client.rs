//! `natpunch client`: libp2p hosts that take peers from a measurement server, hole-punch them
//! and report every punch (punchr's client, with a spool, concurrency and natpunch's engine).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use clap::builder::BoolishValueParser;
use measure::client::{ClientConfig, ClientEvent};
use measure::connect;
use measure::metrics::Metrics;
use measure::spool::Spool;
use p2p::peer::PeerConfig;

use crate::args::{Json, Telemetry};

#[derive(Debug, Args)]
#[command(after_help = "The API key comes from --api-key, NATPUNCH_API_KEY, or \
$XDG_CONFIG_HOME/natpunch/api-key.txt (~/.config/natpunch/api-key.txt), where a new one is saved \
when there is none (the server registers unknown keys as anonymous unless its registration is \
closed). Reports wait in the spool until the server acknowledges them: stopping the client or \
the server loses none.", mut_arg("json", |a| a.help("Print one JSON object per event")))]
pub(crate) struct ClientArgs {
    /// The measurement server: http://HOST:PORT or https://HOST:PORT.
    #[arg(
        long,
        env = "NATPUNCH_SERVER",
        default_value = "http://127.0.0.1:10000"
    )]
    server: String,
    /// The API key.
    #[arg(long, env = "NATPUNCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// libp2p hosts, each with its own identity, punching concurrently (1 to 256).
    #[arg(long, env = "NATPUNCH_CLIENT_HOST_COUNT", default_value_t = 10)]
    host_count: usize,
    /// Where the hosts' keys live (host-N.key, created on first start) [default:
    /// $XDG_STATE_HOME/natpunch/client or ~/.local/state/natpunch/client].
    #[arg(long, env = "NATPUNCH_CLIENT_KEYS")]
    keys_dir: Option<PathBuf>,
    /// Where reports wait until acknowledged [default: the keys directory's spool/].
    #[arg(long, env = "NATPUNCH_CLIENT_SPOOL")]
    spool: Option<PathBuf>,
    /// Stop after this many punches (all hosts together) once every report is delivered
    /// [default: run until stopped].
    #[arg(long, env = "NATPUNCH_CLIENT_PUNCHES")]
    punches: Option<u64>,
    /// Seconds a host waits when the server has no peer for it.
    #[arg(long, env = "NATPUNCH_CLIENT_IDLE_SECS", default_value_t = 30.0)]
    idle_secs: f64,
    /// A STUN server (RFC 5780, e.g. `natpunch stun-server`) to measure this network's NAT
    /// behaviour once at start; sent with every report.
    #[arg(long, env = "NATPUNCH_STUN_SERVER")]
    stun_server: Option<SocketAddr>,
    /// Send the router's login page with each host's first report (punchr did this unless told
    /// not to; natpunch does not unless told to).
    #[arg(long, env = "NATPUNCH_CLIENT_ROUTER_CHECK", value_parser = BoolishValueParser::new())]
    router_check: bool,
    /// CA certificate(s) (PEM) for an https server [default: the system's,
    /// /etc/ssl/certs/ca-certificates.crt].
    #[arg(long, env = "NATPUNCH_CLIENT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Map each punch's listen ports on the local router (PCP, NAT-PMP or UPnP) and offer the
    /// mapped addresses first; the mappings go into the report and are deleted after the punch.
    #[arg(long, env = "NATPUNCH_PORT_MAPPING", value_parser = BoolishValueParser::new())]
    port_mapping: bool,
    /// How long one hole-punch attempt may take, in ms.
    #[arg(long, env = "NATPUNCH_ATTEMPT_TIMEOUT_MS", default_value_t = 3000)]
    attempt_timeout_ms: u64,
    #[command(flatten)]
    telemetry: Telemetry<Self>,
    #[command(flatten)]
    json: Json,
}

pub(crate) fn run(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let max = api::report::MAX_HOSTS;
    anyhow::ensure!(
        (1..=max).contains(&args.host_count),
        "--host-count must be between 1 and {max} (the most hosts the server takes per request)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let keys_dir = match &args.keys_dir {
        Some(d) => d.clone(),
        None => crate::state_dir()?.join("client"),
    };
    let mut hosts = Vec::with_capacity(args.host_count);
    for i in 0..args.host_count {
        let (key, _) = p2p::identity::load_or_create(&keys_dir.join(format!("host-{i}.key")))?;
        hosts.push(key);
    }
    let spool_dir = args.spool.clone().unwrap_or_else(|| keys_dir.join("spool"));
    let spool = Spool::open(&spool_dir)
        .with_context(|| format!("creating the spool {}", spool_dir.display()))?;
    let waiting = spool.len();
    // The NAT measurement is an extra: without it the client punches and reports all the same.
    let client_nat = match args.stun_server {
        Some(server) => {
            let options = natcheck::client::CheckOptions::new(server);
            match natcheck::client::check(&options, &|_: &str| {}).await {
                Ok(report) => report
                    .mapping
                    .zip(report.filtering)
                    .map(|(m, f)| format!("{m}/{f}")),
                Err(e) => {
                    eprintln!(
                        "client: measuring the NAT with {server} failed ({:#}); going on without",
                        anyhow::Error::from(e)
                    );
                    None
                }
            }
        }
        None => None,
    };
    let api_key = connect::api_key(args.api_key.clone())?;
    if let Some(path) = &api_key.saved_in {
        eprintln!("client: a new API key is saved in {}", path.display());
    }
    let mut peer = PeerConfig::new(Vec::new());
    peer.attempt_timeout = Duration::from_millis(args.attempt_timeout_ms.max(100));
    peer.port_mapping = args.port_mapping;
    let config = ClientConfig {
        api_key: api_key.key,
        hosts,
        idle: Duration::from_secs_f64(args.idle_secs.max(0.1)),
        punches: args.punches,
        client_nat: client_nat.clone(),
        peer,
        router_check: args.router_check,
    };
    eprintln!(
        "client: {} hosts, server {}, spool {} ({waiting} waiting){}",
        args.host_count,
        args.server,
        spool_dir.display(),
        client_nat.map_or(String::new(), |n| format!(", NAT {n}"))
    );
    let channel = connect::channel(&args.server, args.ca_cert.as_deref())?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry, waiting);
    args.telemetry
        .serve(registry, telemetry::Health::default())
        .await?;
    let json = args.json.json;
    let report = move |e: ClientEvent| {
        metrics.observe(&e);
        if json {
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
        } else if let Some(line) = e.line() {
            println!("{line}");
        }
    };
    // Ctrl-C or SIGTERM: punches in progress finish and reports are delivered (for up to
    // 20 s); what is left waits in the spool for the next start.
    let punched = measure::client::run(
        config,
        channel,
        spool.clone(),
        crate::stop_signal(),
        &report,
    )
    .await?;
    match spool.len() {
        0 => eprintln!("client: {punched} punches, every report delivered"),
        n => {
            eprintln!("client: {punched} punches; {n} reports wait in the spool for the next start")
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use labrun::args::ClientArgs as Child;

    use crate::Command;
    use crate::tests::parse;

    #[test]
    fn the_labs_client_command_line_parses_to_its_values() {
        let child = Child {
            server: "http://203.0.113.3:10000".into(),
            api_key: "natpunch-lab-campaign".into(),
            host_count: 2,
            idle_secs: 1.0,
            keys_dir: "client-open".into(),
            stun_server: Some("203.0.113.4:3478".parse().expect("addr")),
            port_mapping: true,
            punches: Some(7),
        };
        let Command::Client(args) = parse(child.to_args()) else {
            panic!("not `client`");
        };
        assert_eq!(args.server, child.server);
        assert_eq!(args.api_key.as_ref(), Some(&child.api_key));
        assert_eq!(args.host_count, child.host_count);
        assert_eq!(args.idle_secs, child.idle_secs);
        assert_eq!(args.keys_dir.as_ref(), Some(&child.keys_dir));
        assert_eq!(args.stun_server, child.stun_server);
        assert_eq!(args.port_mapping, child.port_mapping);
        assert_eq!(args.punches, child.punches);
        assert!(args.json.json);
    }
}
