//! `natpunch relay`: a circuit relay v2 server for hole punching; with `--database-url`, a
//! vantage point too: where each reserving peer connects from goes into the measurement store.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use api::store::{ConnectionEvent, SqlStore, Store as _};
use tokio::sync::mpsc;

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
    let recorder = match &args.database_url {
        Some(url) => {
            let store = SqlStore::open(url)
                .await
                .with_context(|| format!("opening {}", api::store::redact(url)))?;
            eprintln!(
                "relay: recording where reserving peers connect from into {}",
                api::store::redact(url)
            );
            Some(Recorder::start(store, relay.peer_id().to_base58()))
        }
        None => None,
    };
    let json = args.json.json;
    let mut report = |e: RelayEvent| {
        if let RelayEvent::NoExternalAddress { message } = &e {
            eprintln!("relay: warning: {message}");
        }
        if let (RelayEvent::ReservationAccepted { peer, from, .. }, Some(recorder)) =
            (&e, &recorder)
        {
            for address in from {
                recorder.offer(peer, address);
            }
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
    if let Some(recorder) = recorder {
        recorder.close().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Observations waiting for the store; beyond, they are dropped and counted.
const QUEUED: usize = 1024;

/// How long the stop waits for the observations still queued.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Writes the relay's observations (a peer, the address its connection comes from) into the
/// store as connection events of the relay, on a task of its own: the relay never waits for
/// the database, and an observation it could not write is lost (the remote's NAT is then
/// `unknown`, not wrong).
struct Recorder {
    queue: mpsc::Sender<ConnectionEvent>,
    relay: String,
    dropped: std::cell::Cell<u64>,
    writer: tokio::task::JoinHandle<()>,
    store: SqlStore,
}

impl Recorder {
    fn start(store: SqlStore, relay: String) -> Self {
        let (queue, mut events) = mpsc::channel::<ConnectionEvent>(QUEUED);
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                // Each cause once, not once per observation.
                let mut last_error = String::new();
                while let Some(event) = events.recv().await {
                    if let Err(e) = store.record_connection(&event, api::server::now_ns()).await {
                        let e = e.to_string();
                        if e != last_error {
                            eprintln!(
                                "relay: recording where a peer connects from: {e} (the relay \
                                 goes on; such observations are lost until the database answers)"
                            );
                            last_error = e;
                        }
                    }
                }
            })
        };
        Self {
            queue,
            relay,
            dropped: std::cell::Cell::new(0),
            writer,
            store,
        }
    }

    /// Queues "`peer` connects from `address`"; an address that is no multiaddr is left out.
    fn offer(&self, peer: &str, address: &str) {
        let Ok(from) = address.parse::<api::multiaddr::Multiaddr>() else {
            return;
        };
        let event = ConnectionEvent {
            local: self.relay.clone(),
            remote: peer.to_owned(),
            agent_version: None,
            protocols: Vec::new(),
            conn_addr: api::report::Addr::of(&from),
            addrs: Vec::new(),
            opened_at: api::server::now_ns(),
        };
        if self.queue.try_send(event).is_err() {
            self.dropped.set(self.dropped.get() + 1);
        }
    }

    /// Writes what is queued (within [`CLOSE_WITHIN`]) and closes the store.
    async fn close(self) {
        drop(self.queue);
        if tokio::time::timeout(CLOSE_WITHIN, self.writer)
            .await
            .is_err()
        {
            eprintln!("relay: observations still queued at the stop were not written");
        }
        if self.dropped.get() > 0 {
            eprintln!(
                "relay: {} observations dropped: the store did not keep up",
                self.dropped.get()
            );
        }
        self.store.close().await;
    }
}
