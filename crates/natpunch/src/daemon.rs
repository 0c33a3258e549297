//! `natpunch daemon`: the connectivity daemon (its API: `docs/daemon-api.md`).

use std::process::ExitCode;

use daemon::service::{Daemon, DaemonConfig, DaemonEvent};
use daemon::signal::NatInfo;

use crate::args::{LoadKey as _, ServeTelemetry as _};
use cli::daemon::DaemonArgs;

pub(crate) fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let key = args.identity.load()?;
    let uid = nix::unistd::getuid().as_raw();
    // Where natpunch-client (and so natpunch connect and accept) looks by default.
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(natpunch_client::default_socket);
    let nutss_ttl = match args.nutss_ttl {
        0 => None,
        _ if uid != 0 => {
            eprintln!(
                "daemon: NUTSS is off: its nft rule needs root (--nutss-ttl 0 says so quietly)"
            );
            None
        }
        ttl => Some(ttl),
    };
    // Held while the daemon runs: the ICMP time-exceeded replies NUTSS draws must not kill its
    // sockets.
    let _icmp = match nutss_ttl {
        Some(_) => Some(daemon::technique::IcmpGuard::install()?),
        None => None,
    };
    let config = DaemonConfig {
        relays: args.relay.clone(),
        listen_ip: args.listen_ip,
        socket: socket.clone(),
        nutss_ttl,
        nat: NatInfo {
            mapping: args.mapping,
            filtering: args.filtering,
        },
        stun: args.stun_servers(),
        port_mapping: !args.no_port_mapping,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let mut d = Daemon::new(key.key, config, &mut registry)?;
    eprintln!(
        "daemon: peer id {} ({} key {})",
        d.peer_id(),
        if key.created { "new" } else { "from" },
        key.path.unwrap_or_default().display()
    );
    if let Some(addr) = args.telemetry.serve(registry, d.health()).await? {
        eprintln!("daemon: metrics on http://{addr}/metrics");
    }
    let json = args.json.json;
    let mut report = |e: DaemonEvent| {
        if json {
            println!("{}", serde_json::to_string(&e).unwrap_or_default());
        } else {
            println!("{e}");
        }
    };
    d.run(crate::stop_signal(), &mut report).await;
    drop(d);
    let _ = std::fs::remove_file(&socket);
    eprintln!("daemon: stopped");
    Ok(ExitCode::SUCCESS)
}
