//! `natpunch client`: libp2p hosts that take peers from a measurement server, hole-punch them
//! and report every punch (punchr's client, with a spool, concurrency and natpunch's engine).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use clap::builder::BoolishValueParser;
use measure::client::{ClientConfig, ClientEvent};
use measure::spool::Spool;
use p2p::peer::PeerConfig;

#[derive(Debug, Args)]
#[command(after_help = "The API key comes from --api-key, NATPUNCH_API_KEY, or \
$XDG_CONFIG_HOME/natpunch/api-key.txt (~/.config/natpunch/api-key.txt), where a new one is saved \
when there is none (the server registers unknown keys as anonymous unless its registration is \
closed). Reports wait in the spool until the server acknowledges them: stopping the client or \
the server loses none.")]
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
    /// Host of the telemetry port (/metrics, /health).
    #[arg(
        long,
        env = "NATPUNCH_CLIENT_TELEMETRY_HOST",
        default_value = "127.0.0.1"
    )]
    telemetry_host: std::net::IpAddr,
    /// Telemetry port; 0 turns it off.
    #[arg(long, env = "NATPUNCH_CLIENT_TELEMETRY_PORT", default_value_t = 12001)]
    telemetry_port: u16,
    /// Print one JSON object per event.
    #[arg(long, env = "NATPUNCH_JSON", value_parser = BoolishValueParser::new())]
    json: bool,
}

/// The API key: given, or kept in the config file (created with a new key when missing).
fn api_key(given: Option<String>) -> anyhow::Result<String> {
    if let Some(k) = given.filter(|k| !k.trim().is_empty()) {
        return Ok(k.trim().to_owned());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .context("no --api-key, and neither XDG_CONFIG_HOME nor HOME is set")?;
    let path = base.join("natpunch/api-key.txt");
    if let Ok(k) = std::fs::read_to_string(&path)
        && !k.trim().is_empty()
    {
        return Ok(k.trim().to_owned());
    }
    let key = measure::client::new_api_key();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, format!("{key}\n"))
        .with_context(|| format!("saving the new API key in {}", path.display()))?;
    eprintln!("client: a new API key is saved in {}", path.display());
    Ok(key)
}

fn channel(server: &str, ca: Option<&Path>) -> anyhow::Result<tonic::transport::Channel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(server.to_owned())
        .with_context(|| format!("--server {server}"))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30));
    if server.starts_with("https://") {
        api::server::install_tls_provider();
        let ca = ca.unwrap_or(Path::new("/etc/ssl/certs/ca-certificates.crt"));
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    // Connected on first use: a server that is down now is retried by the calls.
    Ok(endpoint.connect_lazy())
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
    let mut peer = PeerConfig::new(Vec::new());
    peer.attempt_timeout = Duration::from_millis(args.attempt_timeout_ms.max(100));
    peer.port_mapping = args.port_mapping;
    let config = ClientConfig {
        api_key: api_key(args.api_key.clone())?,
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
    let channel = channel(&args.server, args.ca_cert.as_deref())?;
    let metrics = Metrics::default();
    metrics
        .spool
        .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    if args.telemetry_port != 0 {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let addr = SocketAddr::new(args.telemetry_host, args.telemetry_port);
        crate::serve_telemetry(
            addr,
            std::sync::Arc::new(std::sync::Mutex::new(registry)),
            telemetry::Health::default(),
        )
        .await?;
    }
    let json = args.json;
    let report = move |e: ClientEvent| {
        metrics.observe(&e);
        if json {
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
        } else if let Some(line) = describe(&e) {
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

/// The client's metrics: punches by outcome and transport, what became of the reports.
#[derive(Debug, Clone, Default)]
struct Metrics {
    punches: prometheus_client::metrics::family::Family<
        Vec<(&'static str, String)>,
        prometheus_client::metrics::counter::Counter,
    >,
    reports: prometheus_client::metrics::family::Family<
        Vec<(&'static str, &'static str)>,
        prometheus_client::metrics::counter::Counter,
    >,
    spool: prometheus_client::metrics::gauge::Gauge,
}

impl Metrics {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "natpunch_client_punches",
            "Hole punches by outcome and transport",
            self.punches.clone(),
        );
        r.register(
            "natpunch_client_reports",
            "Reports delivered, deferred (kept for later) or rejected",
            self.reports.clone(),
        );
        r.register(
            "natpunch_client_spool_reports",
            "Reports waiting in the spool",
            self.spool.clone(),
        );
    }

    fn observe(&self, e: &ClientEvent) {
        let report = |what| self.reports.get_or_create(&vec![("result", what)]).inc();
        match e {
            ClientEvent::Punched {
                outcome, transport, ..
            } => {
                let labels = vec![
                    ("outcome", format!("{outcome:?}")),
                    ("transport", transport.clone().unwrap_or_default()),
                ];
                self.punches.get_or_create(&labels).inc();
                self.spool.inc();
            }
            ClientEvent::Delivered { .. } => {
                report("delivered");
                self.spool.dec();
            }
            ClientEvent::Rejected { .. } => {
                report("rejected");
                self.spool.dec();
            }
            ClientEvent::Deferred { .. } => {
                report("deferred");
            }
            _ => {}
        }
    }
}

fn describe(e: &ClientEvent) -> Option<String> {
    Some(match e {
        ClientEvent::Registered { host, db_peer_id } => {
            format!("registered {host} (id {db_peer_id})")
        }
        ClientEvent::Served { .. } | ClientEvent::Delivered { .. } => return None,
        ClientEvent::Idle { host, wait_secs } => {
            format!("{host}: nothing to punch, waiting {wait_secs:.0} s")
        }
        ClientEvent::Punched {
            host,
            remote,
            outcome,
            transport,
            time_to_direct_ms,
            ..
        } => format!(
            "{host} → {remote}: {outcome:?}{}{}",
            transport
                .as_ref()
                .map_or(String::new(), |t| format!(" over {t}")),
            time_to_direct_ms.map_or(String::new(), |t| format!(" in {t:.0} ms"))
        ),
        ClientEvent::Deferred {
            key,
            error,
            retry_secs,
        } => format!("report {key} not delivered ({error}); next try in {retry_secs:.1} s"),
        ClientEvent::Rejected { key, error } => {
            format!("report {key} refused by the server: {error} (kept in rejected/)")
        }
        ClientEvent::ServerError { call, error } => format!("{call}: {error}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_punches_and_follow_the_spool() {
        let m = Metrics::default();
        let mut registry = prometheus_client::registry::Registry::default();
        m.register(&mut registry);
        let punched = |outcome| ClientEvent::Punched {
            host: "h".into(),
            remote: "r".into(),
            outcome,
            transport: Some("quic".into()),
            time_to_direct_ms: Some(1.0),
            key: "k".into(),
        };
        m.observe(&punched(p2p::record::Outcome::Success));
        m.observe(&punched(p2p::record::Outcome::Success));
        m.observe(&punched(p2p::record::Outcome::Failed));
        m.observe(&ClientEvent::Delivered { key: "k".into() });
        m.observe(&ClientEvent::Deferred {
            key: "k".into(),
            error: "down".into(),
            retry_secs: 1.0,
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(r#"natpunch_client_punches_total{outcome="Success",transport="quic"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"natpunch_client_reports_total{result="delivered"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"natpunch_client_reports_total{result="deferred"} 1"#),
            "{text}"
        );
        assert!(text.contains("natpunch_client_spool_reports 2"), "{text}");
    }
}
