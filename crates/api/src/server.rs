//! The gRPC service: `PunchrService` on any [`Store`], with its Prometheus metrics.
//!
//! Status codes are precise where punchr's were plain errors, and keep the words punchr's
//! clients look for:
//! - a missing or unknown API key: `Unauthenticated`, with "unauthorized" in the message;
//! - an invalid request: `InvalidArgument`, naming the field; nothing is stored;
//! - a host not registered with the key: `FailedPrecondition`, "… please restart the client";
//! - nothing to hole-punch: `NotFound` (punchr's Go client backs off 30 s);
//! - the database failing: `Unavailable`, so that clients retry.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand::RngExt as _;
use telemetry::metrics::{Histograms, Registrar};
use tonic::{Request, Response, Status};

use crate::multiaddr::Multiaddr;
use crate::pb;
use crate::peer_id::PeerId;
use crate::report::{self, Report, peer_id};
use crate::store::{Allocated, Host, Rules, Store, StoreError, Tracked};

/// The longest API key accepted (punchr's are UUIDs, 36 characters).
const MAX_KEY: usize = 128;

/// How long a request may run before the server cancels it (`Cancelled`, "Timeout expired"):
/// punchr's clients set no deadline of their own.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What a held GetAddrInfo leaves of [`REQUEST_TIMEOUT`] for its last look into the store and
/// its answer: a store answers in milliseconds, so 5 s is ample.
const HOLD_MARGIN: Duration = Duration::from_secs(5);
/// The longest time GetAddrInfo holds a request of punchr's Rust client, and the default: its
/// `NotFound` comes before [`REQUEST_TIMEOUT`] would cancel the request.
pub const MAX_RUST_CLIENT_WAIT: Duration =
    Duration::from_secs(REQUEST_TIMEOUT.as_secs() - HOLD_MARGIN.as_secs());
/// How often a held GetAddrInfo looks for a peer again.
const HOLD_POLL: Duration = Duration::from_secs(1);
/// At most this many GetAddrInfo requests are held at once; more are answered `NotFound` at
/// once. Each looks into the store every second, and punchr's Rust client is a one-host
/// demonstration client: 256 is far more than it is run with and little load for the store.
pub const MAX_HELD: usize = 256;
/// The largest request message decoded (a larger one is refused, `OutOfRange`): grpc-go's
/// default, which punchr's server had, and tonic's; a report with a whole router page fits.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// At most this many requests at once on one HTTP/2 connection (hyper's default, which tonic's
/// builder replaces with no limit); punchr's clients have one in flight per host.
const MAX_STREAMS: u32 = 200;
/// An idle HTTP/2 connection is pinged this often and closed when the ping is not answered
/// (within tonic's 20 s), so that connections of vanished clients do not stay open.
const KEEPALIVE: Duration = Duration::from_secs(60);

/// Protocol filters handed out with allocations, each with its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Filters(Vec<(f64, Vec<i32>)>);

/// punchr's mix of filters (four at 15 % each, none at 40 %), with QUIC as quic-v1 (461): the
/// draft-29 code (460) that punchr used is gone from current libp2p releases.
pub const DEFAULT_FILTERS: &str = "ip4/tcp:15,ip4/quic-v1:15,ip6/tcp:15,ip6/quic-v1:15,none:40";

impl Default for Filters {
    fn default() -> Self {
        DEFAULT_FILTERS
            .parse()
            .unwrap_or_else(|_| Self(vec![(1.0, Vec::new())]))
    }
}

/// Multiaddr protocol names a filter may use, with their codes.
const PROTOCOL_NAMES: [(&str, i32); 7] = [
    ("ip4", 4),
    ("ip6", 41),
    ("tcp", 6),
    ("udp", 273),
    ("quic", 460),
    ("quic-v1", 461),
    ("webtransport", 465),
];

impl std::str::FromStr for Filters {
    type Err = String;

    /// `FILTER:WEIGHT,…`, where FILTER is protocols joined by `/` (names such as `ip4/quic-v1`
    /// or codes such as `4/461`) or `none`; e.g. `ip4/tcp:15,ip4/quic:15,none:70`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (filter, weight) = part
                .rsplit_once(':')
                .ok_or_else(|| format!("{part:?}: expected FILTER:WEIGHT"))?;
            let weight: f64 = weight
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                .ok_or_else(|| format!("{part:?}: the weight is not a number ≥ 0"))?;
            let mut codes = Vec::new();
            if filter != "none" && !filter.is_empty() {
                for name in filter.split('/').filter(|n| !n.is_empty()) {
                    let code = PROTOCOL_NAMES
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, c)| *c)
                        .or_else(|| name.parse().ok())
                        .ok_or_else(|| format!("{part:?}: unknown protocol {name:?}"))?;
                    codes.push(code);
                }
            }
            out.push((weight, codes));
        }
        if out.iter().map(|(w, _)| w).sum::<f64>() <= 0.0 {
            return Err("no filter has a weight above 0".into());
        }
        Ok(Self(out))
    }
}

impl std::fmt::Display for Filters {
    /// As [`FromStr`](std::str::FromStr) reads it, the protocols by their codes: `4/6:15,none:40`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (weight, codes)) in self.0.iter().enumerate() {
            let filter = if codes.is_empty() {
                "none".to_owned()
            } else {
                codes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("/")
            };
            let comma = if i == 0 { "" } else { "," };
            write!(f, "{comma}{filter}:{weight}")?;
        }
        Ok(())
    }
}

impl Filters {
    /// Draws one filter.
    pub fn pick(&self) -> Vec<i32> {
        let total: f64 = self.0.iter().map(|(w, _)| w).sum();
        let mut x = rand::rng().random_range(0.0..total);
        for (w, codes) in &self.0 {
            if x < *w {
                return codes.clone();
            }
            x -= w;
        }
        self.0.last().map(|(_, c)| c.clone()).unwrap_or_default()
    }
}

/// How the service behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Register refuses unknown API keys instead of creating anonymous ones.
    pub closed_registration: bool,
    /// The allocation rules.
    pub rules: Rules,
    /// The protocol filters handed out.
    pub filters: Filters,
    /// How long GetAddrInfo waits for a peer before `NotFound` when the asking host is punchr's
    /// Rust client, which exits on any error, `NotFound` included. At most
    /// [`MAX_RUST_CLIENT_WAIT`]: [`Service::new`] lowers a longer one, with a warning.
    pub rust_client_wait: Duration,
}

impl Config {
    /// This config with its hold lowered to [`MAX_RUST_CLIENT_WAIT`] (and a warning) when longer.
    fn within_bounds(mut self) -> Self {
        if self.rust_client_wait > MAX_RUST_CLIENT_WAIT {
            tracing::warn!(
                asked_secs = self.rust_client_wait.as_secs_f64(),
                used_secs = MAX_RUST_CLIENT_WAIT.as_secs(),
                request_timeout_secs = REQUEST_TIMEOUT.as_secs(),
                "the Rust client's GetAddrInfo hold is lowered so that it ends with NotFound \
                 before the request timeout"
            );
            self.rust_client_wait = MAX_RUST_CLIENT_WAIT;
        }
        self
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            closed_registration: false,
            rules: Rules::default(),
            filters: Filters::default(),
            rust_client_wait: MAX_RUST_CLIENT_WAIT,
        }
    }
}

/// The agent version prefix of punchr's Rust client.
const RUST_CLIENT: &str = "punchr/rust-client/";

/// Metric labels.
type Labels = Vec<(&'static str, String)>;

/// The transport label of a stored result: a transport that `report::Addr` knows, empty when
/// none was sent, `other` for anything else, so that clients cannot add time series without end.
fn transport_label(transport: Option<&str>) -> &str {
    const KNOWN: [&str; 6] = [
        "tcp",
        "quic",
        "quic-v1",
        "ws",
        "webtransport",
        "webrtc-direct",
    ];
    match transport {
        None => "",
        Some(t) if KNOWN.contains(&t) => t,
        Some(_) => "other",
    }
}

/// The service's metrics.
#[derive(Debug, Clone)]
struct Metrics {
    requests: Family<Labels, Counter>,
    durations: Histograms<Labels>,
    results: Family<Labels, Counter>,
    duplicates: Counter,
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let mut r = Registrar::with_prefix(registry, "natpunch_server");
        Self {
            requests: r.counters("requests", "gRPC requests by method and status code"),
            durations: r.latencies(
                "request_duration_seconds",
                "gRPC request handling time by method",
            ),
            results: r.counters(
                "results",
                "Stored hole-punch results by outcome and transport",
            ),
            duplicates: r.counter(
                "duplicate_reports",
                "Reports acknowledged without storing, their idempotency key being stored already",
            ),
        }
    }

    fn observe<T>(&self, method: &str, start: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.requests
            .get_or_create(&vec![("method", method.to_owned()), ("code", code)])
            .inc();
        self.durations
            .get_or_create(&vec![("method", method.to_owned())])
            .observe(start.elapsed().as_secs_f64());
    }
}

/// `PunchrService` on `S`.
#[derive(Debug, Clone)]
pub struct Service<S> {
    store: S,
    config: Arc<Config>,
    metrics: Metrics,
    /// Permits for held GetAddrInfo requests, [`MAX_HELD`] of them.
    held: Arc<tokio::sync::Semaphore>,
}

/// Unix nanoseconds now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn unavailable(e: &StoreError) -> Status {
    tracing::warn!(error = %e, "database");
    Status::unavailable(format!("database unavailable: {e}"))
}

impl<S: Store> Service<S> {
    /// A service on `store`, with its metrics registered in `registry`.
    pub fn new(store: S, config: Config, registry: &mut Registry) -> Self {
        Self {
            store,
            config: Arc::new(config.within_bounds()),
            metrics: Metrics::new(registry),
            held: Arc::new(tokio::sync::Semaphore::new(MAX_HELD)),
        }
    }

    /// The gRPC server for this service, decoding messages of up to [`MAX_MESSAGE`] bytes.
    pub fn into_server(self) -> pb::punchr_service_server::PunchrServiceServer<Self> {
        pb::punchr_service_server::PunchrServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
    }

    fn check_key_shape(key: &str) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::unauthenticated(
                "unauthorized: the API key is missing",
            ));
        }
        if key.len() > MAX_KEY {
            return Err(Status::invalid_argument("api_key: longer than 128 bytes"));
        }
        Ok(())
    }

    async fn authorize(&self, key: &str) -> Result<i64, Status> {
        Self::check_key_shape(key)?;
        self.store
            .authorize(key)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| Status::unauthenticated("unauthorized: unknown API key"))
    }

    async fn do_register(&self, r: pb::RegisterRequest) -> Result<pb::RegisterResponse, Status> {
        Self::check_key_shape(&r.api_key)?;
        let peer = peer_id(&r.client_id, "client_id")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        report::registration(&r).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let host = Host {
            peer: &peer,
            agent_version: &r.agent_version,
            protocols: &r.protocols,
        };
        let open = !self.config.closed_registration;
        match self.store.register(&r.api_key, open, host, now_ns()).await {
            Ok(Some(db_peer_id)) => Ok(pb::RegisterResponse { db_peer_id }),
            Ok(None) => Err(Status::unauthenticated(
                "unauthorized: unknown API key (registration is closed)",
            )),
            Err(e) => Err(unavailable(&e)),
        }
    }

    async fn do_get_addr_info(
        &self,
        r: pb::GetAddrInfoRequest,
    ) -> Result<pb::GetAddrInfoResponse, Status> {
        let auth = self.authorize(&r.api_key).await?;
        let hosts = report::host_ids(&r.host_id, &r.all_host_ids)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut allocated = self
            .store
            .allocate(auth, &hosts, self.config.rules, now_ns())
            .await
            .map_err(|e| unavailable(&e))?;
        if allocated == Allocated::NoneLeft {
            let agent = self
                .store
                .agent_of(&hosts[0])
                .await
                .map_err(|e| unavailable(&e))?;
            // Punchr's Rust client ends on NotFound: hold its request until a peer turns up or
            // the wait is over, which is before the request timeout would cancel it. Beyond
            // MAX_HELD held requests, NotFound at once.
            let rust_client = agent.is_some_and(|a| a.starts_with(RUST_CLIENT));
            let held = match rust_client.then(|| self.held.try_acquire()) {
                Some(Ok(permit)) => Some(permit),
                Some(Err(_)) => {
                    tracing::debug!(max = MAX_HELD, "GetAddrInfo holds enough requests already");
                    None
                }
                None => None,
            };
            if let Some(_permit) = held {
                let until = tokio::time::Instant::now() + self.config.rust_client_wait;
                loop {
                    let now = tokio::time::Instant::now();
                    if allocated != Allocated::NoneLeft || now >= until {
                        break;
                    }
                    tokio::time::sleep_until((now + HOLD_POLL).min(until)).await;
                    allocated = self
                        .store
                        .allocate(auth, &hosts, self.config.rules, now_ns())
                        .await
                        .map_err(|e| unavailable(&e))?;
                }
            }
        }
        match allocated {
            Allocated::Served(a) => {
                let remote: PeerId = a
                    .remote
                    .parse()
                    .map_err(|_| Status::internal("a stored peer ID does not parse"))?;
                let multi_addresses = a
                    .addrs
                    .iter()
                    .filter_map(|m| m.parse::<Multiaddr>().ok())
                    .map(|m| m.to_vec())
                    .collect();
                Ok(pb::GetAddrInfoResponse {
                    remote_id: remote.to_bytes(),
                    multi_addresses,
                    protocols: self.config.filters.pick(),
                })
            }
            Allocated::NoneLeft => Err(Status::not_found("no peers to hole punch")),
            Allocated::NotRegistered => Err(Status::failed_precondition(
                "host_id: not registered with this API key, please restart the client",
            )),
        }
    }

    async fn do_track(
        &self,
        r: pb::TrackHolePunchRequest,
    ) -> Result<pb::TrackHolePunchResponse, Status> {
        let auth = self.authorize(&r.api_key).await?;
        let report =
            Report::from_request(&r).map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.store.track(auth, &report, now_ns()).await {
            Ok(Tracked::Stored(_)) => {
                let transport = transport_label(report.transport.as_deref()).to_owned();
                self.metrics
                    .results
                    .get_or_create(&vec![
                        ("outcome", report.outcome.to_owned()),
                        ("transport", transport),
                    ])
                    .inc();
                Ok(pb::TrackHolePunchResponse {})
            }
            Ok(Tracked::Duplicate(_)) => {
                self.metrics.duplicates.inc();
                Ok(pb::TrackHolePunchResponse {})
            }
            Ok(Tracked::NotRegistered) => Err(Status::failed_precondition(
                "client_id: not registered with this API key, please restart the client",
            )),
            Err(e) => Err(unavailable(&e)),
        }
    }
}

#[tonic::async_trait]
impl<S: Store> pb::punchr_service_server::PunchrService for Service<S> {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let start = Instant::now();
        let result = self.do_register(request.into_inner()).await;
        self.metrics.observe("Register", start, &result);
        result.map(Response::new)
    }

    async fn get_addr_info(
        &self,
        request: Request<pb::GetAddrInfoRequest>,
    ) -> Result<Response<pb::GetAddrInfoResponse>, Status> {
        let start = Instant::now();
        let result = self.do_get_addr_info(request.into_inner()).await;
        self.metrics.observe("GetAddrInfo", start, &result);
        result.map(Response::new)
    }

    async fn track_hole_punch(
        &self,
        request: Request<pb::TrackHolePunchRequest>,
    ) -> Result<Response<pb::TrackHolePunchResponse>, Status> {
        let start = Instant::now();
        let result = self.do_track(request.into_inner()).await;
        self.metrics.observe("TrackHolePunch", start, &result);
        result.map(Response::new)
    }
}

/// TLS material for the server, PEM encoded.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// The private key.
    pub key: Vec<u8>,
}

/// Installs the process's TLS crypto provider (ring) unless one is installed already. libp2p's
/// QUIC brings a second provider into the build, so rustls cannot pick one by itself; every
/// TLS user of the process (the server here, a client in tests) needs this first.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves `service` on `listener` (with TLS when given) until `shutdown` completes; requests
/// in flight are finished first. A request runs at most [`REQUEST_TIMEOUT`].
pub async fn serve<S: Store>(
    service: Service<S>,
    listener: tokio::net::TcpListener,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE));
    if let Some(tls) = tls {
        install_tls_provider();
        let identity = tonic::transport::Identity::from_pem(tls.cert, tls.key);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    builder
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// How long a counted dashboard is shown before it is counted again, however many viewers ask.
const DASHBOARD_TTL: Duration = Duration::from_secs(5);

/// The dashboard page: self-contained (no external hosts), it fetches `dashboard.json`.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// Serves `/metrics` and `/health` for `registry` on `listener` until dropped, with the live
/// dashboard on `/` (its figures on `/dashboard.json`); `/health` says 503 while `store` does
/// not answer (checked every 5 s).
pub async fn serve_telemetry(
    listener: tokio::net::TcpListener,
    registry: Registry,
    store: crate::store::SqlStore,
) {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let check = {
        let healthy = Arc::clone(&healthy);
        let store = store.clone();
        async move {
            loop {
                healthy.store(store.ping().await, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    // One count at a time, kept for DASHBOARD_TTL: viewers cost the database nothing more.
    let counted: Arc<tokio::sync::Mutex<Option<(Instant, String)>>> = Arc::default();
    let pages: telemetry::Pages = Arc::new(move |path: &str| {
        let (store, counted) = (store.clone(), Arc::clone(&counted));
        let path = path.to_owned();
        Box::pin(async move {
            match path.as_str() {
                "/" => Some(telemetry::Page {
                    status: "200 OK",
                    kind: "text/html; charset=utf-8",
                    body: DASHBOARD_HTML.to_owned(),
                }),
                "/dashboard.json" => Some(dashboard_json(&store, &counted).await),
                _ => None,
            }
        })
    });
    let serve =
        telemetry::serve_with_pages(listener, Arc::new(Mutex::new(registry)), healthy, pages);
    tokio::join!(check, serve);
}

/// The dashboard's figures as JSON, counted again when older than [`DASHBOARD_TTL`]; 503 with
/// the cause when the database does not answer.
async fn dashboard_json(
    store: &crate::store::SqlStore,
    counted: &tokio::sync::Mutex<Option<(Instant, String)>>,
) -> telemetry::Page {
    let mut counted = counted.lock().await;
    if let Some((at, body)) = counted.as_ref()
        && at.elapsed() < DASHBOARD_TTL
    {
        return json_page("200 OK", body.clone());
    }
    match store.dashboard(now_ns()).await {
        Ok(d) => {
            let body = serde_json::to_string(&d).unwrap_or_default();
            *counted = Some((Instant::now(), body.clone()));
            json_page("200 OK", body)
        }
        Err(e) => json_page(
            "503 Service Unavailable",
            serde_json::json!({ "error": e.to_string() }).to_string(),
        ),
    }
}

fn json_page(status: &'static str, body: String) -> telemetry::Page {
    telemetry::Page {
        status,
        kind: "application/json",
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rust_clients_hold_ends_before_the_request_timeout() {
        assert!(Config::default().rust_client_wait < REQUEST_TIMEOUT);
        let longer = Config {
            rust_client_wait: REQUEST_TIMEOUT * 2,
            ..Config::default()
        };
        assert_eq!(
            longer.within_bounds().rust_client_wait,
            MAX_RUST_CLIENT_WAIT
        );
        let shorter = Config {
            rust_client_wait: Duration::from_secs(3),
            ..Config::default()
        };
        assert_eq!(
            shorter.within_bounds().rust_client_wait,
            Duration::from_secs(3)
        );
    }

    #[test]
    fn filters_parse_names_and_codes_and_draw_by_weight() {
        let f: Filters = "ip4/tcp:1,4/461:0,none:0".parse().expect("filters");
        assert_eq!(f.0[0], (1.0, vec![4, 6]));
        assert_eq!(f.0[1], (0.0, vec![4, 461]));
        for _ in 0..50 {
            assert_eq!(f.pick(), vec![4, 6], "only the weighted filter is drawn");
        }
        assert!("ip4/tcp".parse::<Filters>().is_err());
        assert!("ip4/carrier-pigeon:1".parse::<Filters>().is_err());
        assert!("none:0".parse::<Filters>().is_err());
        let d = Filters::default();
        assert_eq!(d.0.len(), 5, "the default spec parses");
        assert!(d.0.iter().any(|(_, c)| c.contains(&461)));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..400 {
            seen.insert(d.pick());
        }
        assert_eq!(seen.len(), 5, "every default filter is drawn: {seen:?}");
    }
}
