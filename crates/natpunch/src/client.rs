//! `natpunch client`: libp2p hosts that take peers from a measurement server, hole-punch them
//! and report every punch (punchr's client, with a spool, concurrency and natpunch's engine).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use measure::client::{ClientConfig, ClientEvent};
use measure::connect;
use measure::metrics::Metrics;
use measure::spool::Spool;
use p2p::peer::{LocalMapping, MappingSource, PeerConfig};

use crate::args::ServeTelemetry as _;
use cli::client::ClientArgs;

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
    let (client_nat, local_mapping) = match args.stun_server {
        Some(server) => {
            let options = natcheck::client::CheckOptions::new(server);
            match natcheck::client::check(&options, &|_: &str| {}).await {
                Ok(report) => (
                    report
                        .mapping
                        .zip(report.filtering)
                        .map(|(m, f)| format!("{m}/{f}")),
                    // The hosts tell it to natpunch targets, for the first attempt's form.
                    report.mapping.map(|mapping| LocalMapping {
                        mapping,
                        source: MappingSource::Rfc5780,
                    }),
                ),
                Err(e) => {
                    eprintln!(
                        "client: measuring the NAT with {server} failed ({:#}); going on without",
                        anyhow::Error::from(e)
                    );
                    (None, None)
                }
            }
        }
        None => (None, None),
    };
    let api_key = connect::api_key(args.api_key.clone())?;
    if let Some(path) = &api_key.saved_in {
        eprintln!("client: a new API key is saved in {}", path.display());
    }
    let mut peer = PeerConfig::new(Vec::new());
    peer.attempt_timeout = Duration::from_millis(args.attempt_timeout_ms.max(100));
    peer.port_mapping = args.port_mapping;
    peer.local_mapping = local_mapping;
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
