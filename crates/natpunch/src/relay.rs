//! `natpunch relay`: a circuit relay v2 server for hole punching.

use std::process::ExitCode;

use p2p::relay::{Relay, RelayEvent};

use crate::args::{LoadKey as _, ServeTelemetry as _};
use cli::relay::RelayArgs;

pub(crate) fn run(args: RelayArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: RelayArgs) -> anyhow::Result<ExitCode> {
    let key = args.identity.load()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let mut relay = Relay::new(key.key, args.config(), &mut registry)?;
    eprintln!(
        "relay: peer id {} ({} key {})",
        relay.peer_id(),
        if key.created { "new" } else { "from" },
        key.path.unwrap_or_default().display()
    );
    if let Some(addr) = args.telemetry.serve(registry, relay.health()).await? {
        eprintln!("relay: metrics on http://{addr}/metrics");
    }
    let json = args.json.json;
    let mut report = |e: RelayEvent| {
        if let RelayEvent::NoExternalAddress { message } = &e {
            eprintln!("relay: warning: {message}");
        }
        if json {
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
        } else {
            println!("{e}");
        }
    };
    relay.run(crate::stop_signal(), &mut report).await;
    eprintln!("relay: stopping");
    Ok(ExitCode::SUCCESS)
}
