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
            port_allocation: args.port_allocation,
            port_delta: None,
        },
        stun: args.stun_servers(),
        nat_check: args.stun_server.first().copied(),
        port_mapping: !args.no_port_mapping,
        birthday: birthday(&args),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let report_key = key.key.clone();
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
    let reporter = match &args.report_to {
        Some(server) => Some(reporter(&args, server, report_key)?),
        None => None,
    };
    let json = args.json.json;
    let mut report = |e: DaemonEvent| {
        if let (Some(r), DaemonEvent::Connection(record)) = (&reporter, &e) {
            r.put(record);
        }
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

/// Where connection reports go: the spool, and a task that delivers it to the server.
struct Reporter {
    spool: measure::spool::Spool,
    wake: std::sync::Arc<tokio::sync::Notify>,
    api_key: String,
    /// Reports spooled by this process, for their idempotency keys.
    count: std::sync::atomic::AtomicU64,
}

impl Reporter {
    /// Spools `record`'s report (the connecting side's), for the delivering task.
    fn put(&self, record: &daemon::service::ConnectionRecord) {
        let n = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Unique per daemon (its peer ID), start time and connection.
        let key = format!("{}-{}-{n}", record.local, record.started_unix_ms);
        let Some(request) = measure::daemon::connection_report(record, &self.api_key, &key) else {
            return;
        };
        match self.spool.put(&request) {
            Ok(_) => self.wake.notify_one(),
            Err(e) => eprintln!("daemon: the report spool failed: {e}"),
        }
    }
}

/// Opens the spool and starts delivering it to `server`.
fn reporter(
    args: &DaemonArgs,
    server: &str,
    key: libp2p::identity::Keypair,
) -> anyhow::Result<Reporter> {
    use anyhow::Context as _;
    let api_key = measure::connect::api_key(args.api_key.clone())?;
    if let Some(path) = &api_key.saved_in {
        eprintln!("daemon: a new API key is saved in {}", path.display());
    }
    let dir = match &args.spool {
        Some(dir) => dir.clone(),
        None => crate::state_dir()?.join("daemon-spool"),
    };
    let spool = measure::spool::Spool::open(&dir)
        .with_context(|| format!("creating the spool {}", dir.display()))?;
    let channel = measure::connect::channel(server, args.ca_cert.as_deref())?;
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let (task_spool, task_wake, task_key) = (spool.clone(), wake.clone(), api_key.key.clone());
    eprintln!(
        "daemon: reporting connections to {server} (spool {}, {} waiting)",
        dir.display(),
        spool.len()
    );
    tokio::spawn(async move {
        let client = api::pb::punchr_service_client::PunchrServiceClient::new(channel);
        let say = |e: measure::client::ClientEvent| {
            eprintln!(
                "daemon: report: {}",
                serde_json::to_string(&e).unwrap_or_default()
            );
        };
        if let Err(e) =
            measure::client::deliver_forever(client, key, task_key, task_spool, task_wake, &say)
                .await
        {
            eprintln!("daemon: reports are not delivered: {e}");
        }
    });
    Ok(Reporter {
        spool,
        wake,
        api_key: api_key.key,
        count: std::sync::atomic::AtomicU64::new(0),
    })
}

/// Birthday probing and port prediction as the flags say.
fn birthday(args: &DaemonArgs) -> daemon::technique::birthday::Settings {
    daemon::technique::birthday::Settings {
        enabled: !args.no_birthday,
        sockets: args.birthday_sockets.into(),
        probes: usize::try_from(args.birthday_probes).unwrap_or(usize::MAX),
        rate: args.birthday_rate,
        deadline: std::time::Duration::from_millis(args.birthday_deadline_ms.into()),
        window: args.prediction_window,
        session_table: args.session_table.and_then(|n| usize::try_from(n).ok()),
    }
}
