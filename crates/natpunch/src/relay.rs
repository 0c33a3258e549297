//! `natpunch relay`: a circuit relay v2 server for hole punching.

use std::process::ExitCode;

use anyhow::Context as _;

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
    let (stop_stun, stun_stopped) = tokio::sync::watch::channel(false);
    if args.stun_port != 0 {
        let addr = std::net::SocketAddr::new(args.listen_ip, args.stun_port);
        let reflector = natcheck::reflector::Reflector::bind(addr)
            .await
            .with_context(|| {
                format!("binding the STUN reflector on {addr} (--stun-port 0 turns it off)")
            })?;
        eprintln!("relay: STUN reflector on {addr} (UDP and TCP)");
        tokio::spawn(reflector.run(stun_stopped));
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
    let _ = stop_stun.send(true);
    eprintln!("relay: stopping");
    Ok(ExitCode::SUCCESS)
}
