//! `natpunch honeypot`: a Kademlia DHT server that records the peers connecting to it into the
//! measurement store, where `natpunch server` hands them to clients.

use std::process::ExitCode;

use anyhow::Context as _;
use api::store::SqlStore;
use p2p::honeypot::{Honeypot, HoneypotConfig, HoneypotEvent, Metrics, SqlSightings};

use crate::args::{LoadKey as _, ServeTelemetry as _};
use cli::honeypot::HoneypotArgs;

pub(crate) fn run(args: HoneypotArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: HoneypotArgs) -> anyhow::Result<ExitCode> {
    let key = args.identity.load()?;
    let store = if args.no_record {
        None
    } else {
        let url = &args.database_url;
        Some(
            SqlStore::open(url)
                .await
                .with_context(|| format!("opening {}", api::store::redact(url)))?,
        )
    };
    let mut config = HoneypotConfig::new(p2p::host::listen_addrs(args.listen_ip, args.port));
    config.protocol = args.protocol.clone();
    config.bootstrap = args.bootstrap.clone();
    config.crawler_count = args.crawler_count;
    config.crawl_interval = std::time::Duration::from_secs(args.crawl_secs.max(1));
    config.idle_timeout = std::time::Duration::from_secs(args.idle_secs);
    config.max_connections = args.max_connections;
    config.max_connections_per_peer = args.max_connections_per_peer;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let honeypot = Honeypot::new(key.key, config, &metrics).map_err(anyhow::Error::msg)?;
    let local = honeypot.peer_id().to_base58();
    eprintln!(
        "honeypot: peer id {local} ({} key {}), {}",
        if key.created { "new" } else { "from" },
        key.path.unwrap_or_default().display(),
        if store.is_some() {
            format!("recording into {}", api::store::redact(&args.database_url))
        } else {
            "recording nothing".to_owned()
        }
    );
    args.telemetry
        .serve(registry, telemetry::Health::default())
        .await?;
    let json = args.json.json;
    let mut report = |e: &HoneypotEvent| {
        if json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        } else {
            println!("{e}");
        }
    };
    let sightings = store
        .clone()
        .map(|store| SqlSightings::new(store, honeypot.peer_id()));
    let left = honeypot
        .run_recording(sightings, &metrics, crate::stop_signal(), &mut report)
        .await;
    if left > 0 {
        eprintln!("honeypot: {left} sightings not written: the store did not take them in time");
    }
    if let Some(store) = store {
        store.close().await;
    }
    eprintln!("honeypot: stopped");
    Ok(ExitCode::SUCCESS)
}
