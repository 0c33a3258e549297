//! The measurement API on both real backends: a SQLite file and a PostgreSQL server (a private
//! one started for the test). The PostgreSQL half needs root and is ignored by a plain
//! `cargo test`; `./test` runs it, and under `CI=true` a missing PostgreSQL fails it.

#[path = "api/multiaddr.rs"]
mod multiaddr;

use std::time::Duration;

use api::multiaddr::Multiaddr;
use api::pb;
use api::pb::punchr_service_client::PunchrServiceClient;
use api::peer_id::PeerId;
use api::postgres::TempPostgres;
use api::report::{Addr, Report};
use api::sample::{self, relay_addr};
use api::server::{Config, Service, now_ns};
use api::store::{Allocated, Backend, ConnectionEvent, Host, Rules, SqlStore, Store as _, Tracked};
use sqlx::Row as _;
use tonic::Code;

const MIN: i64 = 60_000_000_000;

fn peer() -> PeerId {
    sample::peer_id()
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("natpunch-api-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `scenario` on a fresh SQLite file.
async fn on_sqlite<F, Fut>(scenario: F)
where
    F: Fn(SqlStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = TempDir::new("sqlite");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("sqlite store");
    scenario(store.clone()).await;
    store.close().await;
}

/// Runs `scenario` on a fresh database of a private PostgreSQL server.
async fn on_postgresql<F, Fut>(scenario: F)
where
    F: Fn(SqlStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let pg = TempPostgres::start().unwrap_or_else(|e| panic!("a private PostgreSQL server: {e}"));
    let url = pg.new_database().expect("database");
    let store = SqlStore::open(&url).await.expect("postgres store");
    assert_eq!(store.backend(), Backend::Postgres);
    scenario(store.clone()).await;
    store.close().await;
}

/// Tests `scenario` (an `async fn(SqlStore)`) on both backends, as `scenario::sqlite` and
/// `scenario::postgresql`; the second needs root (the server runs as the postgres user), so
/// it is ignored by a plain `cargo test` and run by `./test`.
macro_rules! on_both_backends {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test]
            async fn sqlite() {
                super::on_sqlite(super::$scenario).await;
            }

            #[tokio::test]
            #[ignore = "needs root and PostgreSQL (a private server runs as the postgres user): ./test runs it"]
            async fn postgresql() {
                super::on_postgresql(super::$scenario).await;
            }
        }
    };
}

fn register_request(host: &PeerId) -> pb::RegisterRequest {
    pb::RegisterRequest {
        client_id: host.to_bytes(),
        agent_version: "test".into(),
        protocols: vec![],
        api_key: "key".into(),
    }
}

async fn register(store: &SqlStore, key: &str, host: &PeerId) -> i64 {
    store
        .register(
            key,
            true,
            Host {
                peer: &host.to_string(),
                agent_version: "natpunch/test",
                protocols: &["/ipfs/id/1.0.0".to_owned()],
            },
            now_ns(),
        )
        .await
        .expect("register")
        .expect("open registration")
}

async fn seen(store: &SqlStore, honeypot: &PeerId, remote: &PeerId, addrs: &[Multiaddr], at: i64) {
    let conn: Multiaddr = "/ip4/203.0.113.50/tcp/4001".parse().expect("maddr");
    store
        .record_connection(
            &ConnectionEvent {
                local: honeypot.to_string(),
                remote: remote.to_string(),
                agent_version: Some("remote/1".into()),
                protocols: vec!["/libp2p/dcutr".into()],
                conn_addr: Addr::of(&conn),
                addrs: addrs.iter().map(Addr::of).collect(),
                opened_at: at,
            },
            at,
        )
        .await
        .expect("connection event");
}

on_both_backends!(registration_is_open_to_new_keys_unless_closed);
async fn registration_is_open_to_new_keys_unless_closed(store: SqlStore) {
    let host = peer();
    let id = register(&store, "key-a", &host).await;
    assert_eq!(
        register(&store, "key-a", &host).await,
        id,
        "the same peer row"
    );
    assert!(store.authorize("key-a").await.expect("auth").is_some());
    let closed = store
        .register(
            "key-b",
            false,
            Host {
                peer: &peer().to_string(),
                agent_version: "x",
                protocols: &[],
            },
            now_ns(),
        )
        .await
        .expect("register");
    assert_eq!(closed, None, "closed registration refuses an unknown key");
    assert_eq!(
        store.authorize("key-b").await.expect("auth"),
        None,
        "and stores it not"
    );
    // The same host under a second key is a second client of the same peer.
    assert_eq!(register(&store, "key-c", &host).await, id);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM clients")
        .fetch_one(store.pool())
        .await
        .expect("clients");
    assert_eq!(n, 2);
}

on_both_backends!(allocation_follows_recency_cap_and_per_client_dedup);
async fn allocation_follows_recency_cap_and_per_client_dedup(store: SqlStore) {
    let now = now_ns();
    let (h1, h2, other) = (peer(), peer(), peer());
    register(&store, "a", &h1).await;
    register(&store, "a", &h2).await;
    register(&store, "b", &other).await;
    let honeypot = peer();
    let (fresh, old, relay) = (peer(), peer(), peer());
    let direct: Multiaddr = "/ip4/203.0.113.9/tcp/4001".parse().expect("maddr");
    let (m1, m2) = (relay_addr(&relay, 1), relay_addr(&relay, 2));
    seen(
        &store,
        &honeypot,
        &fresh,
        &[m1.clone(), direct.clone()],
        now - 5 * MIN,
    )
    .await;
    seen(
        &store,
        &honeypot,
        &old,
        &[relay_addr(&relay, 3)],
        now - 11 * MIN,
    )
    .await;
    let hosts = |a: &PeerId, b: &PeerId| vec![a.to_string(), b.to_string()];
    let rules = Rules::default();
    let auth_a = store.authorize("a").await.expect("auth").expect("a");
    let auth_b = store.authorize("b").await.expect("auth").expect("b");

    // Only the peer seen within 10 minutes, only its relay address.
    let Allocated::Served(first) = store
        .allocate(auth_a, &hosts(&h1, &h2), rules, now)
        .await
        .expect("allocate")
    else {
        panic!("the fresh peer is served");
    };
    assert_eq!(first.remote, fresh.to_string());
    assert_eq!(first.addrs, vec![m1.to_string()], "relay addresses only");
    // Not again to the same client, from its other host either.
    assert_eq!(
        store
            .allocate(auth_a, &hosts(&h2, &h1), rules, now)
            .await
            .expect("allocate"),
        Allocated::NoneLeft
    );
    // Another client gets it.
    assert!(matches!(
        store.allocate(auth_b, &[other.to_string()], rules, now).await.expect("allocate"),
        Allocated::Served(a) if a.remote == fresh.to_string()
    ));
    // A new relay address of the same peer is served to the first client again.
    seen(
        &store,
        &honeypot,
        &fresh,
        &[m1.clone(), m2.clone()],
        now - MIN,
    )
    .await;
    let Allocated::Served(again) = store
        .allocate(auth_a, &hosts(&h1, &h2), rules, now)
        .await
        .expect("allocate")
    else {
        panic!("the untried address is served");
    };
    assert_eq!(again.addrs, vec![m2.to_string()]);
    // After the dedup window (and a fresh sighting) the first client gets it again.
    let later = now + 11 * MIN;
    seen(
        &store,
        &honeypot,
        &fresh,
        std::slice::from_ref(&m1),
        later - MIN,
    )
    .await;
    assert!(matches!(
        store
            .allocate(auth_a, &hosts(&h1, &h2), rules, later)
            .await
            .expect("allocate"),
        Allocated::Served(_)
    ));
    // Hosts that are not registered with the key.
    assert_eq!(
        store
            .allocate(auth_b, &hosts(&h1, &h2), rules, later)
            .await
            .expect("allocate"),
        Allocated::NotRegistered
    );

    // The per-remote cap: 3 per minute here, whoever asks.
    let capped = Rules {
        per_remote: 3,
        ..Rules::default()
    };
    let target = peer();
    let t = now + 30 * MIN;
    seen(
        &store,
        &honeypot,
        &target,
        &[relay_addr(&relay, 9)],
        t - MIN,
    )
    .await;
    let mut served = 0;
    for i in 0..5 {
        let host = peer();
        let key = format!("cap-{i}");
        register(&store, &key, &host).await;
        let auth = store.authorize(&key).await.expect("auth").expect("key");
        if let Allocated::Served(a) = store
            .allocate(auth, &[host.to_string()], capped, t)
            .await
            .expect("allocate")
        {
            assert_eq!(a.remote, target.to_string());
            served += 1;
        }
    }
    assert_eq!(served, 3, "three allocations within the minute, then none");
    let host = peer();
    register(&store, "cap-later", &host).await;
    let auth = store
        .authorize("cap-later")
        .await
        .expect("auth")
        .expect("key");
    assert!(
        matches!(
            store
                .allocate(auth, &[host.to_string()], capped, t + MIN + 1)
                .await
                .expect("allocate"),
            Allocated::Served(_)
        ),
        "a minute later the remote is served again"
    );
}

/// A column read back in a comparable form: timestamps as Unix microseconds, durations as
/// seconds, lists as text.
fn col(backend: Backend, expr: &str, kind: &str) -> String {
    match (backend, kind) {
        (Backend::Sqlite, "us") => format!("{expr} / 1000"),
        (Backend::Postgres, "us") => format!("(extract(epoch from {expr}) * 1000000)::bigint"),
        (Backend::Sqlite, "secs") => format!("CAST({expr} AS REAL)"),
        (Backend::Postgres, "secs") => format!("extract(epoch from {expr})::float8"),
        (Backend::Sqlite, "int") => format!("CAST({expr} AS INTEGER)"),
        (Backend::Postgres, "int") => format!("({expr})::int::int8"),
        (Backend::Sqlite, _) => format!("CAST({expr} AS TEXT)"),
        (Backend::Postgres, _) => format!("{expr}::text"),
    }
}

on_both_backends!(a_report_round_trips_with_every_field_and_a_retry_is_not_stored_twice);
async fn a_report_round_trips_with_every_field_and_a_retry_is_not_stored_twice(store: SqlStore) {
    let (client, remote, relay) = (peer(), peer(), peer());
    register(&store, "key", &client).await;
    let auth = store.authorize("key").await.expect("auth").expect("key");
    let report = Report::from_request(&sample::report(
        &client,
        &remote,
        &relay,
        "key",
        Some("k-1"),
    ))
    .expect("valid");
    let Tracked::Stored(id) = store.track(auth, &report, now_ns()).await.expect("track") else {
        panic!("stored");
    };
    assert_eq!(
        store.track(auth, &report, now_ns()).await.expect("retry"),
        Tracked::Duplicate(id)
    );
    let b = store.backend();
    let sql = format!(
        "SELECT {}, {}, {}, {}, {}, {}, technique, {}, client_nat, remote_nat, \
         transport, idempotency_key, {} FROM hole_punch_results WHERE id = $1",
        col(b, "connect_started_at", "us"),
        col(b, "connect_ended_at", "us"),
        col(b, "ended_at", "us"),
        col(b, "has_direct_conns", "int"),
        col(b, "outcome", "text"),
        col(b, "protocol_filters", "text"),
        col(b, "time_to_direct", "secs"),
        col(b, "listen_multi_addresses_set_id", "text"),
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("row");
    let t0_us = i64::try_from(sample::STARTED_AT / 1000).expect("µs");
    assert_eq!(row.get::<i64, _>(0), t0_us);
    assert_eq!(row.get::<i64, _>(1), t0_us + 80_000);
    assert_eq!(row.get::<i64, _>(2), t0_us + 3_600_000);
    assert_eq!(row.get::<i64, _>(3), 1);
    assert_eq!(row.get::<String, _>(4), "SUCCESS");
    let filters = row.get::<String, _>(5).replace(' ', "");
    assert!(filters == "[4,461]" || filters == "{4,461}", "{filters}");
    assert_eq!(row.get::<String, _>(6), "dcutr-quic");
    assert!((row.get::<f64, _>(7) - 0.27).abs() < 1e-6);
    assert_eq!(
        row.get::<String, _>(8),
        "endpoint-independent/address-and-port-dependent"
    );
    assert_eq!(
        row.get::<String, _>(9),
        "endpoint-independent/address-dependent"
    );
    assert_eq!(row.get::<String, _>(10), "quic");
    assert_eq!(row.get::<String, _>(11), "k-1");
    assert!(
        !row.get::<String, _>(12).is_empty(),
        "the listen set is linked"
    );

    let sql = format!(
        "SELECT {}, {}, {}, {}, {}, error, direct_dial_error FROM hole_punch_attempt \
         WHERE hole_punch_result_id = $1 ORDER BY opened_at",
        col(b, "opened_at", "us"),
        col(b, "started_at", "us"),
        col(b, "start_rtt", "secs"),
        col(b, "elapsed_time", "secs"),
        col(b, "outcome", "text"),
    );
    let attempts = sqlx::query(&sql)
        .bind(id)
        .fetch_all(store.pool())
        .await
        .expect("attempts");
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].get::<i64, _>(0), t0_us + 90_000);
    assert_eq!(attempts[0].get::<i64, _>(1), t0_us + 100_000);
    assert!((attempts[0].get::<f64, _>(2) - 0.104).abs() < 1e-6);
    assert!((attempts[0].get::<f64, _>(3) - 3.0).abs() < 1e-6);
    assert_eq!(attempts[0].get::<String, _>(4), "TIMEOUT");
    assert_eq!(
        attempts[0].get::<Option<String>, _>(5),
        None,
        "empty error is NULL"
    );
    assert_eq!(
        attempts[0].get::<Option<String>, _>(6).as_deref(),
        Some("dial timeout")
    );
    assert_eq!(attempts[1].get::<String, _>(4), "SUCCESS");

    let links = sqlx::query(&format!(
        "SELECT {}, count(*) FROM hole_punch_results_x_multi_addresses \
         WHERE hole_punch_result_id = $1 GROUP BY relationship ORDER BY 1",
        col(b, "relationship", "text")
    ))
    .bind(id)
    .fetch_all(store.pool())
    .await
    .expect("links");
    let links: Vec<(String, i64)> = links.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(links, vec![("FINAL".into(), 2), ("INITIAL".into(), 1)]);

    let lat = sqlx::query(&format!(
        "SELECT {}, rtt_avg, rtt_min, rtt_max, rtt_std, {} FROM latency_measurements \
         WHERE hole_punch_result_id = $1",
        col(b, "mtype", "text"),
        col(b, "rtts", "text"),
    ))
    .bind(id)
    .fetch_one(store.pool())
    .await
    .expect("latency");
    assert_eq!(lat.get::<String, _>(0), "TO_RELAY");
    assert!(
        (lat.get::<f64, _>(1) - 0.06).abs() < 1e-6,
        "the -1 is left out of the mean"
    );
    assert!(
        (lat.get::<f64, _>(2) - 0.05).abs() < 1e-6,
        "and out of the minimum"
    );
    assert!((lat.get::<f64, _>(3) - 0.07).abs() < 1e-6);
    assert!(lat.get::<Option<f64>, _>(4).is_some());
    assert!(
        lat.get::<String, _>(5).contains("-1"),
        "the sent values are kept"
    );

    let m = sqlx::query("SELECT internal_port, external_port, protocol, addr, addr_network FROM port_mappings WHERE hole_punch_result_id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("mapping");
    assert_eq!((m.get::<i32, _>(0), m.get::<i32, _>(1)), (4001, 40001));
    assert_eq!(m.get::<String, _>(2), "udp");
    assert_eq!(m.get::<String, _>(3), "198.51.100.2");
    let n = sqlx::query(&format!(
        "SELECT {}, router_html, router_html_error FROM network_information \
         WHERE hole_punch_result_id = $1",
        col(b, "supports_ipv6", "int")
    ))
    .bind(id)
    .fetch_one(store.pool())
    .await
    .expect("network");
    assert_eq!(n.get::<Option<i64>, _>(0), Some(0));
    assert_eq!(n.get::<Option<String>, _>(1), None);
    assert_eq!(
        n.get::<Option<String>, _>(2).as_deref(),
        Some("not checked")
    );
    let agent: (Option<String>,) =
        sqlx::query_as("SELECT agent_version FROM peers WHERE multi_hash = $1")
            .bind(relay.to_string())
            .fetch_one(store.pool())
            .await
            .expect("relay peer");
    assert_eq!(agent.0.as_deref(), Some("relay/1"));

    let counts = store.counts().await.expect("counts");
    assert_eq!(
        (
            counts.results,
            counts.attempts,
            counts.latencies,
            counts.mappings,
            counts.networks
        ),
        (1, 2, 1, 1, 1),
        "the retry added nothing"
    );
    let rows = store.results().await.expect("results");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].local.as_str(), rows[0].remote.as_str()),
        (client.to_string().as_str(), remote.to_string().as_str())
    );
    assert_eq!(rows[0].outcome, "SUCCESS");
    assert_eq!(rows[0].filters, vec![4, 461]);
    assert_eq!(rows[0].transport.as_deref(), Some("quic"));
    assert!((rows[0].time_to_direct.expect("time to direct") - 0.27).abs() < 1e-6);
    // Concurrent retries of a new report: one is stored, the rest acknowledged.
    let report = Report::from_request(&sample::report(
        &client,
        &remote,
        &relay,
        "key",
        Some("k-2"),
    ))
    .expect("valid");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, report) = (store.clone(), report.clone());
            tokio::spawn(async move { store.track(auth, &report, now_ns()).await })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        match t.await.expect("task").expect("track") {
            Tracked::Stored(_) => stored += 1,
            Tracked::Duplicate(_) => {}
            Tracked::NotRegistered => panic!("registered"),
        }
    }
    assert_eq!(stored, 1);
    assert_eq!(store.counts().await.expect("counts").results, 2);
    // A host registered with another key cannot report under this one.
    let stranger = peer();
    register(&store, "other", &stranger).await;
    let report = Report::from_request(&sample::report(&stranger, &remote, &relay, "key", None))
        .expect("valid");
    assert_eq!(
        store.track(auth, &report, now_ns()).await.expect("track"),
        Tracked::NotRegistered
    );
    assert_eq!(store.counts().await.expect("counts").results, 2);
}

/// Starts the gRPC service on `store` at a loopback port.
async fn serve(store: SqlStore, config: Config) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let mut registry = prometheus_client::registry::Registry::default();
    let service = Service::new(store, config, &mut registry);
    let task = tokio::spawn(async move {
        api::server::serve(service, listener, None, std::future::pending())
            .await
            .expect("serve");
    });
    (url, task)
}

on_both_backends!(reports_handed_in_together_share_a_transaction_and_each_gets_its_own_answer);
async fn reports_handed_in_together_share_a_transaction_and_each_gets_its_own_answer(
    store: SqlStore,
) {
    let (client, stranger, remote, relay) = (peer(), peer(), peer(), peer());
    register(&store, "key", &client).await;
    let auth = store.authorize("key").await.expect("auth").expect("key");
    let report = |host: &PeerId, key: Option<&str>| {
        Report::from_request(&sample::report(host, &remote, &relay, "key", key)).expect("valid")
    };
    // Handed in at once, so that the store's worker takes them as one batch: 16 with keys of
    // their own, two retries of the first racing it, one without a key, and one from a host
    // that never registered.
    let mut reports: Vec<Report> = (0..16)
        .map(|n| report(&client, Some(&format!("k-{n}"))))
        .collect();
    reports.push(report(&client, Some("k-0")));
    reports.push(report(&client, Some("k-0")));
    reports.push(report(&client, None));
    reports.push(report(&stranger, Some("s-0")));
    let before = store.counts().await.expect("counts");
    let answers: Vec<Tracked> =
        futures::future::join_all(reports.iter().map(|r| store.track(auth, r, now_ns())))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("every report answered");
    let stored: Vec<i64> = answers
        .iter()
        .filter_map(|a| match a {
            Tracked::Stored(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(stored.len(), 17, "{answers:?}");
    let distinct: std::collections::BTreeSet<_> = stored.iter().collect();
    assert_eq!(distinct.len(), 17, "one id each: {answers:?}");
    assert_eq!(answers[16], Tracked::Duplicate(stored[0]), "{answers:?}");
    assert_eq!(answers[17], Tracked::Duplicate(stored[0]), "{answers:?}");
    assert!(matches!(answers[18], Tracked::Stored(_)), "{answers:?}");
    assert_eq!(answers[19], Tracked::NotRegistered, "{answers:?}");
    let after = store.counts().await.expect("counts");
    let one = &reports[0];
    assert_eq!(after.results - before.results, 17);
    let per = |n: usize| 17 * i64::try_from(n).expect("small");
    assert_eq!(after.attempts - before.attempts, per(one.attempts.len()));
    assert_eq!(after.latencies - before.latencies, per(one.latencies.len()));
    assert_eq!(after.mappings - before.mappings, per(one.mappings.len()));
    assert_eq!(after.networks - before.networks, 17);
    // Each stored result has its own rows, not its neighbours'.
    for id in &stored {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM hole_punch_attempt WHERE hole_punch_result_id = $1), \
             (SELECT count(*) FROM latency_measurements WHERE hole_punch_result_id = $1), \
             (SELECT count(*) FROM port_mappings WHERE hole_punch_result_id = $1), \
             (SELECT count(*) FROM hole_punch_results_x_multi_addresses \
              WHERE hole_punch_result_id = $1)",
        )
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("row counts");
        let counts: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let addrs = one.open_addrs.len() + one.remote_addrs.len();
        assert_eq!(
            counts,
            (
                per(one.attempts.len()) / 17,
                per(one.latencies.len()) / 17,
                per(one.mappings.len()) / 17,
                per(addrs) / 17
            ),
            "result {id}"
        );
    }
    // A later batch finds the keys stored by this one.
    let again: Vec<Tracked> =
        futures::future::join_all(reports[..4].iter().map(|r| store.track(auth, r, now_ns())))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("answered");
    let want: Vec<Tracked> = stored[..4]
        .iter()
        .map(|id| Tracked::Duplicate(*id))
        .collect();
    assert_eq!(again, want);
    assert_eq!(store.counts().await.expect("counts").results, after.results);
}

/// PostgreSQL refuses a NUL character in text (SQLite stores it): the batch that holds such a
/// report fails, and its reports are stored again one by one, so that only that one fails.
#[tokio::test]
#[ignore = "needs root and PostgreSQL (a private server runs as the postgres user): ./test runs it"]
async fn a_report_the_database_refuses_costs_only_itself() {
    on_postgresql(async |store: SqlStore| {
        let (client, remote, relay) = (peer(), peer(), peer());
        register(&store, "key", &client).await;
        let auth = store.authorize("key").await.expect("auth").expect("key");
        let mut reports: Vec<Report> = (0..8)
            .map(|n| {
                let key = format!("k-{n}");
                Report::from_request(&sample::report(&client, &remote, &relay, "key", Some(&key)))
                    .expect("valid")
            })
            .collect();
        reports[3].error = Some("a NUL \u{0} in text".into());
        let answers =
            futures::future::join_all(reports.iter().map(|r| store.track(auth, r, now_ns()))).await;
        for (n, a) in answers.iter().enumerate() {
            match n {
                3 => assert!(a.is_err(), "the bad report: {a:?}"),
                _ => assert!(matches!(a, Ok(Tracked::Stored(_))), "report {n}: {a:?}"),
            }
        }
        assert_eq!(store.counts().await.expect("counts").results, 7);
    })
    .await;
}

on_both_backends!(the_dashboard_counts_what_is_stored);
async fn the_dashboard_counts_what_is_stored(store: SqlStore) {
    use api::store::dashboard::{TIME_BINS_MS, transport_of};
    use std::collections::BTreeMap;

    let (remote, relay) = (peer(), peer());
    let hosts = [peer(), peer()];
    for (host, agent) in hosts.iter().zip(["natpunch/1", "go-punchr/0.9"]) {
        store
            .register(
                "key",
                true,
                Host {
                    peer: &host.to_string(),
                    agent_version: agent,
                    protocols: &[],
                },
                now_ns(),
            )
            .await
            .expect("register")
            .expect("open");
    }
    let auth = store.authorize("key").await.expect("auth").expect("key");
    let nats = [
        Some("endpoint-independent"),
        Some("address-and-port-dependent"),
        None,
    ];
    let mut reports = Vec::new();
    for i in 0..30usize {
        let host = &hosts[i % 7 / 5];
        let key = format!("d-{i}");
        let mut r = Report::from_request(&sample::report(host, &remote, &relay, "key", Some(&key)))
            .expect("valid");
        r.client_nat = nats[i % 3].map(str::to_owned);
        r.remote_nat = (i % 2 == 0).then(|| "endpoint-independent".to_owned());
        r.protocols = if i % 4 == 0 { vec![4, 6] } else { vec![4, 461] };
        r.outcome = if i % 5 == 0 { "FAILED" } else { "SUCCESS" };
        r.time_to_direct = (i % 5 != 0).then_some(0.07 * i as f64);
        store.track(auth, &r, now_ns()).await.expect("stored");
        reports.push((
            r,
            if i % 7 / 5 == 0 {
                "natpunch/1"
            } else {
                "go-punchr/0.9"
            },
        ));
    }
    let d = store.dashboard(now_ns()).await.expect("dashboard");
    let successes = reports
        .iter()
        .filter(|(r, _)| r.outcome == "SUCCESS")
        .count();
    assert_eq!(d.results, 30);
    assert_eq!(d.successes, i64::try_from(successes).expect("small"));
    let rate = d.success_rate.expect("a rate");
    assert!((rate.value - successes as f64 / 30.0).abs() < 1e-9);
    assert!(rate.low < rate.value && rate.value < rate.high);
    assert!(
        (d.reports_per_sec - 0.5).abs() < 1e-9,
        "30 reports in the last minute"
    );
    let outcomes: BTreeMap<&str, i64> = d.outcomes.iter().map(|c| (c.name.as_str(), c.n)).collect();
    assert_eq!(outcomes, BTreeMap::from([("FAILED", 6), ("SUCCESS", 24)]));
    assert_eq!(d.over_time.iter().map(|b| b.n).sum::<i64>(), 30);
    assert_eq!(d.over_time.iter().map(|b| b.successes).sum::<i64>(), 24);
    // The matrix, counted here from the reports sent.
    let mut want: BTreeMap<(String, String, String), (i64, i64)> = BTreeMap::new();
    for (r, _) in &reports {
        let key = (
            r.client_nat.clone().unwrap_or_else(|| "unknown".into()),
            r.remote_nat.clone().unwrap_or_else(|| "unknown".into()),
            transport_of(&r.protocols, r.transport.as_deref()),
        );
        let cell = want.entry(key).or_default();
        cell.0 += 1;
        cell.1 += i64::from(r.outcome == "SUCCESS");
    }
    let got: BTreeMap<(String, String, String), (i64, i64)> = d
        .matrix
        .iter()
        .map(|c| {
            let key = (
                c.client_nat.clone(),
                c.remote_nat.clone(),
                c.transport.clone(),
            );
            (key, (c.n, c.successes))
        })
        .collect();
    assert_eq!(got, want);
    // Time to direct, binned here.
    let mut bins = vec![0i64; TIME_BINS_MS.len() + 1];
    for t in reports.iter().filter_map(|(r, _)| r.time_to_direct) {
        let k = TIME_BINS_MS
            .iter()
            .position(|&ms| t * 1000.0 < f64::from(ms))
            .unwrap_or(TIME_BINS_MS.len());
        bins[k] += 1;
    }
    assert_eq!(
        d.time_to_direct.iter().map(|c| c.n).collect::<Vec<_>>(),
        bins
    );
    let agents: BTreeMap<&str, (i64, i64)> = d
        .agents
        .iter()
        .map(|a| (a.agent_version.as_str(), (a.hosts, a.reports)))
        .collect();
    let go = i64::try_from(
        reports
            .iter()
            .filter(|(_, a)| *a == "go-punchr/0.9")
            .count(),
    )
    .expect("small");
    assert_eq!(
        agents,
        BTreeMap::from([("go-punchr/0.9", (1, go)), ("natpunch/1", (1, 30 - go))])
    );
}

on_both_backends!(the_remotes_nat_comes_from_what_the_relay_and_the_honeypot_saw);
async fn the_remotes_nat_comes_from_what_the_relay_and_the_honeypot_saw(store: SqlStore) {
    let (client, relay, honeypot) = (peer(), peer(), peer());
    register(&store, "key", &client).await;
    let auth = store.authorize("key").await.expect("auth").expect("key");
    let now = now_ns();
    let saw = |observer: &PeerId, remote: &PeerId, from: &str| {
        let conn: Multiaddr = from.parse().expect("maddr");
        ConnectionEvent {
            local: observer.to_string(),
            remote: remote.to_string(),
            agent_version: None,
            protocols: vec![],
            conn_addr: Addr::of(&conn),
            addrs: vec![],
            opened_at: now - 1_000_000_000,
        }
    };
    // (what the relay saw, what the honeypot saw, what the client said, what is stored)
    let cases = [
        (
            Some("/ip4/203.0.113.5/udp/40000/quic-v1"),
            Some("/ip4/203.0.113.5/udp/40000/quic-v1"),
            None,
            "endpoint-independent",
        ),
        (
            Some("/ip4/203.0.113.6/udp/40000/quic-v1"),
            Some("/ip4/203.0.113.6/udp/40002/quic-v1"),
            None,
            "endpoint-dependent",
        ),
        (
            Some("/ip4/203.0.113.7/udp/40000/quic-v1"),
            None,
            None,
            "unknown",
        ),
        (
            Some("/ip4/203.0.113.8/udp/40000/quic-v1"),
            Some("/ip4/203.0.113.8/tcp/40000"),
            None,
            "unknown",
        ),
        (
            Some("/ip4/203.0.113.9/udp/40000/quic-v1"),
            Some("/ip4/203.0.113.9/udp/40002/quic-v1"),
            Some("endpoint-independent/address-dependent"),
            "endpoint-independent/address-dependent",
        ),
    ];
    for (k, (relay_saw, honeypot_saw, said, want)) in cases.into_iter().enumerate() {
        let remote = peer();
        for (observer, from) in [(&relay, relay_saw), (&honeypot, honeypot_saw)] {
            if let Some(from) = from {
                store
                    .record_connection(&saw(observer, &remote, from), now)
                    .await
                    .expect("seen");
            }
        }
        let key = format!("nat-{k}");
        let mut report =
            Report::from_request(&sample::report(&client, &remote, &relay, "key", Some(&key)))
                .expect("valid");
        report.remote_nat = said.map(str::to_owned);
        let Tracked::Stored(id) = store.track(auth, &report, now).await.expect("track") else {
            panic!("stored");
        };
        let (stored,): (Option<String>,) =
            sqlx::query_as("SELECT remote_nat FROM hole_punch_results WHERE id = $1")
                .bind(id)
                .fetch_one(store.pool())
                .await
                .expect("row");
        assert_eq!(stored.as_deref(), Some(want), "case {k}");
    }
}

on_both_backends!(invalid_reports_are_refused_naming_the_field_and_store_nothing);
async fn invalid_reports_are_refused_naming_the_field_and_store_nothing(store: SqlStore) {
    let (url, task) = serve(store.clone(), Config::default()).await;
    let mut client = PunchrServiceClient::connect(url).await.expect("connect");
    let (host, remote, relay) = (peer(), peer(), peer());
    client
        .register(register_request(&host))
        .await
        .expect("register");
    let before = store.counts().await.expect("counts");
    let good = sample::report(&host, &remote, &relay, "key", None);
    type Spoil = fn(&mut pb::TrackHolePunchRequest);
    let cases: Vec<(&str, Spoil)> = vec![
        ("client_id", |r| r.client_id = b"nope".to_vec()),
        ("remote_id", |r| r.remote_id.clear()),
        ("connect_started_at", |r| r.connect_started_at = 0),
        ("connect_ended_at", |r| r.connect_ended_at = 0),
        ("connect_ended_at", |r| {
            r.connect_ended_at = r.connect_started_at - 1
        }),
        ("ended_at", |r| r.ended_at = 0),
        ("outcome", |r| r.outcome = 42),
        ("listen_multi_addresses", |r| {
            r.listen_multi_addresses.clear()
        }),
        ("listen_multi_addresses[1]", |r| {
            r.listen_multi_addresses[1] = vec![0xff, 0x01]
        }),
        ("remote_multi_addresses[0]", |r| {
            r.remote_multi_addresses[0] = vec![0x04]
        }),
        ("hole_punch_attempts[1].opened_at", |r| {
            r.hole_punch_attempts[1].opened_at = 0
        }),
        ("hole_punch_attempts[0].ended_at", |r| {
            r.hole_punch_attempts[0].ended_at = 0
        }),
        ("hole_punch_attempts[1].elapsed_time", |r| {
            r.hole_punch_attempts[1].elapsed_time = f32::NAN
        }),
        ("hole_punch_attempts[0].outcome", |r| {
            r.hole_punch_attempts[0].outcome = -3
        }),
        ("hole_punch_attempts[0].multi_addresses[0]", |r| {
            r.hole_punch_attempts[0].multi_addresses[0] = vec![]
        }),
        ("latency_measurements[0].rtt_errs", |r| {
            r.latency_measurements[0].rtt_errs.pop();
        }),
        ("latency_measurements[0].rtts[2]", |r| {
            r.latency_measurements[0].rtts[2] = -0.5
        }),
        ("latency_measurements[0].mtype", |r| {
            r.latency_measurements[0].mtype = 9
        }),
        ("nat_mappings[0].external_port", |r| {
            r.nat_mappings[0].external_port = 70000
        }),
        ("idempotency_key", |r| {
            r.idempotency_key = Some(String::new())
        }),
        ("time_to_direct", |r| r.time_to_direct = Some(-1.0)),
    ];
    for (field, spoil) in cases {
        let mut r = good.clone();
        spoil(&mut r);
        let status = client.track_hole_punch(r).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            status.message()
        );
    }
    // Keys: missing, unknown.
    let mut r = good.clone();
    r.api_key.clear();
    let status = client.track_hole_punch(r).await.expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("unauthorized"));
    let mut r = good.clone();
    r.api_key = "unknown".into();
    assert_eq!(
        client
            .track_hole_punch(r)
            .await
            .expect_err("unknown")
            .code(),
        Code::Unauthenticated
    );
    // A host not registered with the key.
    let mut r = good.clone();
    r.client_id = peer().to_bytes();
    let status = client
        .track_hole_punch(r)
        .await
        .expect_err("not registered");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("please restart the client"));
    let after = store.counts().await.expect("counts");
    assert_eq!(after, before, "nothing stored");
    assert_eq!(after.results, 0);
    // The good one is stored.
    client.track_hole_punch(good).await.expect("valid report");
    assert_eq!(store.counts().await.expect("counts").results, 1);
    task.abort();
}

on_both_backends!(get_addr_info_serves_relay_addresses_with_a_filter_or_not_found);
async fn get_addr_info_serves_relay_addresses_with_a_filter_or_not_found(store: SqlStore) {
    let config = Config {
        filters: "ip4/quic-v1:1".parse().expect("filters"),
        ..Config::default()
    };
    let (url, task) = serve(store.clone(), config).await;
    let mut client = PunchrServiceClient::connect(url).await.expect("connect");
    let host = peer();
    let db_id = client
        .register(register_request(&host))
        .await
        .expect("register")
        .into_inner()
        .db_peer_id;
    assert!(db_id > 0);
    let ask = || pb::GetAddrInfoRequest {
        host_id: host.to_bytes(),
        all_host_ids: vec![host.to_bytes()],
        api_key: "key".into(),
    };
    let status = client.get_addr_info(ask()).await.expect_err("nothing yet");
    assert_eq!(status.code(), Code::NotFound);
    let (remote, relay) = (peer(), peer());
    let addr = relay_addr(&relay, 4001);
    seen(
        &store,
        &peer(),
        &remote,
        std::slice::from_ref(&addr),
        now_ns() - MIN,
    )
    .await;
    let got = client
        .get_addr_info(ask())
        .await
        .expect("served")
        .into_inner();
    assert_eq!(PeerId::from_bytes(&got.remote_id).expect("peer id"), remote);
    let addrs: Vec<Multiaddr> = got
        .multi_addresses
        .iter()
        .map(|b| Multiaddr::from_bytes(b).expect("maddr"))
        .collect();
    assert_eq!(addrs, vec![addr]);
    assert_eq!(got.protocols, vec![4, 461]);
    assert_eq!(
        client
            .get_addr_info(ask())
            .await
            .expect_err("served once")
            .code(),
        Code::NotFound
    );
    let mut stranger = ask();
    stranger.host_id = peer().to_bytes();
    stranger.all_host_ids = vec![stranger.host_id.clone()];
    let status = client
        .get_addr_info(stranger)
        .await
        .expect_err("unregistered");
    assert_eq!(status.code(), Code::FailedPrecondition);
    task.abort();
}

#[tokio::test]
async fn a_store_error_is_unavailable_not_success() {
    let dir = TempDir::new("closed");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("store");
    let (url, task) = serve(store.clone(), Config::default()).await;
    let mut client = PunchrServiceClient::connect(url).await.expect("connect");
    store.close().await;
    let status = client
        .register(register_request(&peer()))
        .await
        .expect_err("the pool is closed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The telemetry port says so too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let registry = prometheus_client::registry::Registry::default();
    let telemetry = tokio::spawn(api::server::serve_telemetry(listener, registry, store));
    let health = async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /health HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = health.await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    telemetry.abort();
    task.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Raw protobuf bytes in and out, to speak exactly as another implementation does.
mod raw {
    use bytes::{Buf as _, BufMut as _};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    /// A codec that passes message bytes through untouched.
    #[derive(Debug, Clone, Copy, Default)]
    pub(crate) struct Bytes;

    impl Encoder for Bytes {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Bytes {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let mut out = vec![0; src.remaining()];
            src.copy_to_slice(&mut out);
            Ok(Some(out))
        }
    }

    impl Codec for Bytes {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Self;
        type Decoder = Self;
        fn encoder(&mut self) -> Self {
            Self
        }
        fn decoder(&mut self) -> Self {
            Self
        }
    }

    /// Protobuf writer: fields appended in the order called (Go's proto2 marshaller writes
    /// them in tag order, repeated scalars unpacked).
    #[derive(Debug, Default)]
    pub(crate) struct Msg(pub(crate) Vec<u8>);

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    impl Msg {
        pub(crate) fn varint(mut self, field: u64, v: u64) -> Self {
            varint(field << 3, &mut self.0);
            varint(v, &mut self.0);
            self
        }
        pub(crate) fn bytes(mut self, field: u64, b: &[u8]) -> Self {
            varint((field << 3) | 2, &mut self.0);
            varint(b.len() as u64, &mut self.0);
            self.0.extend_from_slice(b);
            self
        }
        pub(crate) fn float(mut self, field: u64, f: f32) -> Self {
            varint((field << 3) | 5, &mut self.0);
            self.0.extend_from_slice(&f.to_le_bytes());
            self
        }
    }

    /// A decoded field: its number and its value (varint, or bytes for length-delimited).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Value {
        Varint(u64),
        Bytes(Vec<u8>),
    }

    /// Reads every field of `b` in order; only varint and length-delimited are expected.
    pub(crate) fn fields(mut b: &[u8]) -> Vec<(u64, Value)> {
        fn read_varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let byte = b[0];
                *b = &b[1..];
                v |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            v
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let key = read_varint(&mut b);
            let value = match key & 7 {
                0 => Value::Varint(read_varint(&mut b)),
                2 => {
                    let len = usize::try_from(read_varint(&mut b)).expect("length");
                    let v = b[..len].to_vec();
                    b = &b[len..];
                    Value::Bytes(v)
                }
                other => panic!("unexpected wire type {other}"),
            };
            out.push((key >> 3, value));
        }
        out
    }
}

#[tokio::test]
async fn a_punchr_client_on_the_wire_registers_gets_a_peer_and_reports() {
    use raw::{Msg, Value, fields};
    use tonic::codegen::http::uri::PathAndQuery;

    let dir = TempDir::new("wire");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("store");
    let config = Config {
        filters: "ip4/tcp:1".parse().expect("filters"),
        ..Config::default()
    };
    let (url, task) = serve(store.clone(), config).await;
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut call = async |path: &'static str, body: Vec<u8>| {
        grpc.ready().await.expect("ready");
        grpc.unary(
            tonic::Request::new(body),
            PathAndQuery::from_static(path),
            raw::Bytes,
        )
        .await
        .map(tonic::Response::into_inner)
    };

    let (host, remote, relay) = (peer(), peer(), peer());
    let key = "3b1c6a43-9f0e-4d6a-8c4e-000000000001";
    let register = Msg::default()
        .bytes(1, &host.to_bytes())
        .bytes(2, b"punchr/go-client/0.8.0")
        .bytes(3, b"/ipfs/id/1.0.0")
        .bytes(3, b"/libp2p/dcutr")
        .bytes(4, key.as_bytes());
    let answer = call("/PunchrService/Register", register.0)
        .await
        .expect("register");
    let [(1, Value::Varint(db_id))] = fields(&answer)[..] else {
        panic!("RegisterResponse is field 1, a varint: {answer:?}");
    };
    assert!(db_id > 0);

    let served = relay_addr(&relay, 4001);
    seen(
        &store,
        &peer(),
        &remote,
        std::slice::from_ref(&served),
        now_ns() - MIN,
    )
    .await;
    let ask = Msg::default()
        .bytes(1, &host.to_bytes())
        .bytes(2, &host.to_bytes())
        .bytes(3, key.as_bytes());
    let answer = call("/PunchrService/GetAddrInfo", ask.0)
        .await
        .expect("a peer");
    assert_eq!(
        fields(&answer),
        vec![
            (1, Value::Bytes(remote.to_bytes())),
            (2, Value::Bytes(served.to_vec())),
            // proto2 repeated scalars are unpacked: one field per code.
            (3, Value::Varint(4)),
            (3, Value::Varint(6)),
        ]
    );

    // The report, field by field as the Go client writes it.
    let t0 = sample::STARTED_AT;
    let direct: Multiaddr = "/ip4/198.51.100.20/tcp/4001".parse().expect("maddr");
    let attempt = Msg::default()
        .varint(1, t0 + 90_000_000)
        .varint(2, t0 + 100_000_000)
        .varint(3, t0 + 400_000_000)
        .float(4, 0.104)
        .float(5, 0.31)
        .varint(6, 6)
        .bytes(7, b"")
        .bytes(8, b"")
        .bytes(9, &direct.to_vec());
    let latency = Msg::default()
        .bytes(1, &relay.to_bytes())
        .bytes(2, b"relay/1")
        .bytes(4, &served.to_vec())
        .float(5, 0.05)
        .float(5, -1.0)
        .bytes(6, b"")
        .bytes(6, b"timeout")
        .varint(7, 0);
    let network = Msg::default().varint(3, 0).bytes(4, b"no ipv6 route");
    let mapping = Msg::default()
        .varint(1, 4001)
        .varint(2, 40001)
        .bytes(3, b"tcp")
        .bytes(4, b"198.51.100.2")
        .bytes(5, b"ip4");
    let report = Msg::default()
        .bytes(1, &host.to_bytes())
        .bytes(2, &remote.to_bytes())
        .bytes(3, &served.to_vec())
        .varint(4, t0)
        .varint(5, t0 + 80_000_000)
        .bytes(6, &attempt.0)
        .bytes(7, &direct.to_vec())
        .varint(8, 1)
        .varint(10, 6)
        .varint(11, t0 + 500_000_000)
        .bytes(
            12,
            &"/ip4/192.168.1.2/tcp/4001"
                .parse::<Multiaddr>()
                .expect("maddr")
                .to_vec(),
        )
        .bytes(13, key.as_bytes())
        .varint(14, 4)
        .varint(14, 6)
        .bytes(15, &latency.0)
        .bytes(16, &network.0)
        .bytes(17, &mapping.0);
    let answer = call("/PunchrService/TrackHolePunch", report.0.clone())
        .await
        .expect("stored");
    assert!(answer.is_empty(), "TrackHolePunchResponse is empty");
    let counts = store.counts().await.expect("counts");
    assert_eq!(
        (
            counts.results,
            counts.attempts,
            counts.latencies,
            counts.mappings,
            counts.networks
        ),
        (1, 1, 1, 1, 1)
    );
    let (avg, min): (f64, f64) =
        sqlx::query_as("SELECT rtt_avg, rtt_min FROM latency_measurements")
            .fetch_one(store.pool())
            .await
            .expect("latency");
    assert!(
        (avg - 0.05).abs() < 1e-6 && (min - 0.05).abs() < 1e-6,
        "the -1 is not counted"
    );
    // Without an idempotency key a resent report is a new report, as with punchr.
    call("/PunchrService/TrackHolePunch", report.0)
        .await
        .expect("stored again");
    assert_eq!(store.counts().await.expect("counts").results, 2);
    // A report missing its required timestamps is refused (punchr answered success).
    let incomplete = Msg::default()
        .bytes(1, &host.to_bytes())
        .bytes(2, &remote.to_bytes())
        .varint(8, 0)
        .varint(10, 5)
        .bytes(13, key.as_bytes());
    let status = call("/PunchrService/TrackHolePunch", incomplete.0)
        .await
        .expect_err("incomplete");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "connect_started_at: missing");
    // Undecodable bytes are refused by the codec.
    let status = call("/PunchrService/TrackHolePunch", vec![0x0a, 0xff])
        .await
        .expect_err("garbage");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(store.counts().await.expect("counts").results, 2);
    task.abort();
}

/// A TrackHolePunchRequest as punchr's Go client puts it on the wire (proto2, fields in tag
/// order, unix-nanosecond timestamps, float-second durations), built byte by byte, decodes field
/// by field and encodes back to the same bytes.
#[test]
fn a_report_from_a_punchr_client_decodes_field_by_field() {
    use prost::Message as _;
    use raw::Msg;

    let started = sample::STARTED_AT;
    let attempt = Msg::default()
        .varint(1, started + 100_000_000)
        .varint(3, started + 600_000_000)
        .float(4, 0.104)
        .float(5, 0.5)
        .varint(6, 6)
        .bytes(9, &[4, 11, 99, 0, 11, 6, 0x0f, 0xa1]);
    let body = Msg::default()
        .bytes(1, b"client-peer-id")
        .bytes(2, b"remote-peer-id")
        .varint(4, started)
        .varint(5, started + 80_000_000)
        .bytes(6, &attempt.0)
        .varint(8, 1)
        .varint(10, 6)
        .varint(11, started + 700_000_000)
        .bytes(12, &[4, 192, 168, 1, 2, 6, 0x0f, 0xa0])
        .bytes(13, b"3b1c6a43-0000-4000-8000-000000000000")
        .varint(14, 4)
        .varint(14, 460)
        .0;
    let r = pb::TrackHolePunchRequest::decode(body.as_slice()).expect("decodes");
    assert_eq!(r.client_id, b"client-peer-id");
    assert_eq!(r.connect_started_at, started);
    assert_eq!(r.connect_ended_at, started + 80_000_000);
    assert!(r.has_direct_conns);
    assert_eq!(r.outcome(), pb::HolePunchOutcome::Success);
    assert_eq!(r.protocols, [4, 460]);
    assert_eq!(
        r.idempotency_key, None,
        "punchr's clients send no natpunch fields"
    );
    let a = &r.hole_punch_attempts[0];
    assert_eq!(a.outcome(), pb::HolePunchAttemptOutcome::Success);
    assert_eq!(a.start_rtt, Some(0.104));
    assert_eq!(a.elapsed_time, 0.5);
    assert_eq!(a.started_at, None);
    // Encoding gives the same bytes back: same tags, same wire types, same order.
    assert_eq!(r.encode_to_vec(), body);
}

on_both_backends!(reports_from_punchrs_rust_client_get_their_durations_in_seconds);
async fn reports_from_punchrs_rust_client_get_their_durations_in_seconds(store: SqlStore) {
    let (client, remote, relay) = (peer(), peer(), peer());
    store
        .register(
            "rust",
            true,
            Host {
                peer: &client.to_string(),
                agent_version: "punchr/rust-client/0.2.1",
                protocols: &[],
            },
            now_ns(),
        )
        .await
        .expect("register");
    let auth = store.authorize("rust").await.expect("auth").expect("key");
    let mut request = sample::report(&client, &remote, &relay, "rust", None);
    // (ended - started) / 1000 from nanoseconds: 300 ms sent as 300000.
    for a in &mut request.hole_punch_attempts {
        a.elapsed_time *= 1e6;
    }
    let report = Report::from_request(&request).expect("valid");
    let Tracked::Stored(id) = store.track(auth, &report, now_ns()).await.expect("track") else {
        panic!("stored");
    };
    let sql = format!(
        "SELECT {} FROM hole_punch_attempt WHERE hole_punch_result_id = $1 ORDER BY opened_at",
        col(store.backend(), "elapsed_time", "secs")
    );
    let rows = sqlx::query(&sql)
        .bind(id)
        .fetch_all(store.pool())
        .await
        .expect("attempts");
    let secs: Vec<f64> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        (secs[0] - 3.0).abs() < 1e-3 && (secs[1] - 0.3).abs() < 1e-3,
        "{secs:?}"
    );
}

#[tokio::test]
async fn get_addr_info_holds_punchrs_rust_client_until_a_peer_turns_up() {
    let dir = TempDir::new("rust-wait");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("store");
    let config = Config {
        rust_client_wait: Duration::from_secs(5),
        ..Config::default()
    };
    let (url, task) = serve(store.clone(), config).await;
    let mut client = PunchrServiceClient::connect(url).await.expect("connect");
    let (go, rust) = (peer(), peer());
    for (host, agent) in [
        (&go, "punchr/go-client/0.8.0"),
        (&rust, "punchr/rust-client/0.2.1"),
    ] {
        let mut r = register_request(host);
        r.agent_version = agent.into();
        client.register(r).await.expect("register");
    }
    let ask = |host: &PeerId| pb::GetAddrInfoRequest {
        host_id: host.to_bytes(),
        all_host_ids: vec![host.to_bytes()],
        api_key: "key".into(),
    };
    // The Go client gets NotFound at once, as from punchr.
    let started = std::time::Instant::now();
    let status = client.get_addr_info(ask(&go)).await.expect_err("nothing");
    assert_eq!(status.code(), Code::NotFound);
    assert!(started.elapsed() < Duration::from_secs(1));
    // The Rust client's request waits; a peer seen meanwhile is served.
    let later = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            seen(
                &store,
                &peer(),
                &peer(),
                &[relay_addr(&peer(), 4001)],
                now_ns(),
            )
            .await;
        })
    };
    let started = std::time::Instant::now();
    let got = client
        .get_addr_info(ask(&rust))
        .await
        .expect("served after waiting");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(!got.into_inner().multi_addresses.is_empty());
    later.await.expect("task");
    task.abort();
}

on_both_backends!(register_refuses_an_oversized_agent_version_or_protocol_list_naming_the_field_and_stores_nothing);
async fn register_refuses_an_oversized_agent_version_or_protocol_list_naming_the_field_and_stores_nothing(
    store: SqlStore,
) {
    use api::report::{
        MAX_AGENT_VERSION as AGENT, MAX_PROTOCOL as PROTOCOL, MAX_PROTOCOLS as PROTOCOLS,
    };
    let (url, task) = serve(store.clone(), Config::default()).await;
    let mut client = PunchrServiceClient::connect(url).await.expect("connect");
    type Spoil = fn(&mut pb::RegisterRequest);
    let cases: Vec<(String, Spoil)> = vec![
        (format!("agent_version: longer than {AGENT} bytes"), |r| {
            r.agent_version = "v".repeat(AGENT + 1);
        }),
        (format!("protocols: more than {PROTOCOLS} entries"), |r| {
            r.protocols = vec!["/ipfs/id/1.0.0".into(); PROTOCOLS + 1];
        }),
        (format!("protocols[3]: longer than {PROTOCOL} bytes"), |r| {
            r.protocols = vec!["/ipfs/id/1.0.0".into(); 4];
            r.protocols[3] = format!("/{}", "p".repeat(PROTOCOL));
        }),
    ];
    for (message, spoil) in cases {
        let mut r = register_request(&peer());
        spoil(&mut r);
        let status = client.register(r).await.expect_err(&message);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), message);
    }
    // Nothing stored: not the key (registration is open), not the host.
    assert_eq!(store.authorize("key").await.expect("auth"), None);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM peers")
        .fetch_one(store.pool())
        .await
        .expect("peers");
    assert_eq!(n, 0, "no peer stored");
    // A message beyond what the server decodes is refused before it is read whole.
    let mut r = register_request(&peer());
    r.agent_version = "v".repeat(api::server::MAX_MESSAGE);
    let status = client.register(r).await.expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // At the caps a host registers, stored as sent.
    let host = peer();
    let mut r = register_request(&host);
    r.agent_version = "v".repeat(AGENT);
    r.protocols = (0..PROTOCOLS)
        .map(|i| format!("/{i:0>width$}", width = PROTOCOL - 1))
        .collect();
    client.register(r).await.expect("at the caps");
    let agent = store
        .agent_of(&host.to_string())
        .await
        .expect("agent")
        .expect("stored");
    assert_eq!(agent.len(), AGENT);
    task.abort();
}

on_both_backends!(
    get_addr_info_refuses_more_host_ids_than_a_client_runs_and_counts_duplicates_once
);
async fn get_addr_info_refuses_more_host_ids_than_a_client_runs_and_counts_duplicates_once(
    store: SqlStore,
) {
    use api::report::MAX_HOSTS as HOSTS;
    let (url, task) = serve(store.clone(), Config::default()).await;
    let mut client = PunchrServiceClient::connect(url).await.expect("connect");
    let (h1, h2) = (peer(), peer());
    for h in [&h1, &h2] {
        client
            .register(register_request(h))
            .await
            .expect("register");
    }
    let ask = |all: Vec<Vec<u8>>| pb::GetAddrInfoRequest {
        host_id: h1.to_bytes(),
        all_host_ids: all,
        api_key: "key".into(),
    };
    // One beyond the cap.
    let status = client
        .get_addr_info(ask(vec![h1.to_bytes(); HOSTS + 1]))
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        format!("all_host_ids: more than {HOSTS} entries")
    );
    // An entry longer than any peer ID is named.
    let mut all = vec![h1.to_bytes(), h2.to_bytes(), vec![0x12; 4096]];
    let status = client
        .get_addr_info(ask(all.clone()))
        .await
        .expect_err("not a peer ID");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "all_host_ids[2]: not a peer ID");
    // Within the cap, duplicates count once: both hosts are the client's.
    all = std::iter::repeat_n([h1.to_bytes(), h2.to_bytes()], HOSTS / 2)
        .flatten()
        .collect();
    let status = client
        .get_addr_info(ask(all.clone()))
        .await
        .expect_err("nothing seen yet");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let (remote, relay) = (peer(), peer());
    let addr = relay_addr(&relay, 4001);
    seen(
        &store,
        &peer(),
        &remote,
        std::slice::from_ref(&addr),
        now_ns() - MIN,
    )
    .await;
    let got = client
        .get_addr_info(ask(all.clone()))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(PeerId::from_bytes(&got.remote_id).expect("peer id"), remote);
    // Not again to the client, whichever of its hosts asks.
    let mut other = ask(all);
    other.host_id = h2.to_bytes();
    let status = client.get_addr_info(other).await.expect_err("served once");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    task.abort();
}

/// At the defaults, a held request of punchr's Rust client (which exits on any error) ends with
/// `NotFound`, which the client can tell from a failure, before the server's request timeout
/// would cancel it.
#[tokio::test]
async fn get_addr_info_at_the_defaults_answers_punchrs_rust_client_not_found_before_the_request_timeout()
 {
    use api::server::REQUEST_TIMEOUT;
    let dir = TempDir::new("rust-timeout");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("store");
    let (url, task) = serve(store.clone(), Config::default()).await;
    let mut client = PunchrServiceClient::connect(url).await.expect("connect");
    let host = peer();
    let mut r = register_request(&host);
    r.agent_version = "punchr/rust-client/0.2.1".into();
    client.register(r).await.expect("register");
    let started = std::time::Instant::now();
    let status = client
        .get_addr_info(pb::GetAddrInfoRequest {
            host_id: host.to_bytes(),
            all_host_ids: vec![host.to_bytes()],
            api_key: "key".into(),
        })
        .await
        .expect_err("no peer to punch");
    let took = started.elapsed();
    assert_eq!(status.code(), Code::NotFound, "{status:?} after {took:?}");
    assert!(took < REQUEST_TIMEOUT, "{took:?}");
    let wait = Config::default().rust_client_wait;
    assert!(
        took >= wait,
        "held for the whole wait ({wait:?}) first: {took:?}"
    );
    task.abort();
}

/// Transport labels of the results metric come from reports: only known transports are kept, so
/// that clients cannot add time series without end.
#[tokio::test]
async fn the_results_metric_keeps_known_transports_only() {
    use pb::punchr_service_server::PunchrService as _;
    let dir = TempDir::new("metric-labels");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("store");
    let mut registry = prometheus_client::registry::Registry::default();
    let service = Service::new(store, Config::default(), &mut registry);
    let (host, remote, relay) = (peer(), peer(), peer());
    service
        .register(tonic::Request::new(register_request(&host)))
        .await
        .expect("register");
    for transport in ["quic", "carrier-pigeon-1", "carrier-pigeon-2"] {
        let mut r = sample::report(&host, &remote, &relay, "key", None);
        r.transport = Some(transport.into());
        service
            .track_hole_punch(tonic::Request::new(r))
            .await
            .expect("stored");
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains(r#"natpunch_server_results_total{outcome="SUCCESS",transport="quic"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"natpunch_server_results_total{outcome="SUCCESS",transport="other"} 2"#),
        "{text}"
    );
    assert!(!text.contains("carrier-pigeon"), "{text}");
}

/// Held requests are capped: one beyond the cap is answered `NotFound` at once instead of
/// looking into the store every second.
#[tokio::test]
async fn get_addr_info_holds_a_bounded_number_of_requests() {
    use api::server::MAX_HELD as HELD;
    use pb::punchr_service_server::PunchrService as _;
    let dir = TempDir::new("held");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("store");
    let mut registry = prometheus_client::registry::Registry::default();
    let wait = Duration::from_secs(4);
    let config = Config {
        rust_client_wait: wait,
        ..Config::default()
    };
    let service = Service::new(store, config, &mut registry);
    let host = peer();
    let mut r = register_request(&host);
    r.agent_version = "punchr/rust-client/0.2.1".into();
    service
        .register(tonic::Request::new(r))
        .await
        .expect("register");
    let started = std::time::Instant::now();
    let asks: Vec<_> = (0..=HELD)
        .map(|_| {
            let service = service.clone();
            let host = host.clone();
            tokio::spawn(async move {
                let status = service
                    .get_addr_info(tonic::Request::new(pb::GetAddrInfoRequest {
                        host_id: host.to_bytes(),
                        all_host_ids: vec![host.to_bytes()],
                        api_key: "key".into(),
                    }))
                    .await
                    .expect_err("no peer");
                (status.code(), started.elapsed())
            })
        })
        .collect();
    let mut quick = 0;
    for ask in asks {
        let (code, took) = ask.await.expect("task");
        assert_eq!(code, Code::NotFound);
        if took < wait / 2 {
            quick += 1;
        }
    }
    assert_eq!(quick, 1, "one answered at once, {HELD} held");
}

/// Every table and column of a store, from the database's own catalogue (the migration
/// bookkeeping left out).
async fn tables_and_columns(store: &SqlStore) -> std::collections::BTreeSet<(String, String)> {
    let sql = match store.backend() {
        Backend::Sqlite => {
            "SELECT m.name AS t, p.name AS c FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND m.name NOT LIKE '\\_sqlx%' ESCAPE '\\'"
        }
        Backend::Postgres => {
            "SELECT CAST(table_name AS TEXT) AS t, CAST(column_name AS TEXT) AS c \
             FROM information_schema.columns WHERE table_schema = current_schema() \
             AND table_name NOT LIKE '\\_sqlx%' ESCAPE '\\'"
        }
    };
    sqlx::query(sql)
        .fetch_all(store.pool())
        .await
        .expect("the catalogue")
        .iter()
        .map(|r| {
            (
                r.try_get::<String, _>("t").expect("table"),
                r.try_get::<String, _>("c").expect("column"),
            )
        })
        .collect()
}

/// The schema is one template rendered per backend; a table or column that reaches one backend
/// and not the other (a line marked for one backend only) shows up here, not in a campaign on
/// the other backend.
#[tokio::test]
#[ignore = "needs root and PostgreSQL (a private server runs as the postgres user): ./test runs it"]
async fn sqlite_and_postgresql_have_the_same_tables_and_columns() {
    let dir = TempDir::new("schema");
    let sqlite = SqlStore::open(&format!("sqlite://{}", dir.0.join("natpunch.db").display()))
        .await
        .expect("sqlite store");
    let pg = TempPostgres::start().unwrap_or_else(|e| panic!("a private PostgreSQL server: {e}"));
    let postgres = SqlStore::open(&pg.new_database().expect("database"))
        .await
        .expect("postgres store");
    let (lite, post) = (
        tables_and_columns(&sqlite).await,
        tables_and_columns(&postgres).await,
    );
    assert!(lite.len() > 50, "{lite:?}");
    let only = |a: &std::collections::BTreeSet<_>, b| a.difference(b).cloned().collect::<Vec<_>>();
    assert_eq!(
        (only(&lite, &post), only(&post, &lite)),
        (vec![], vec![]),
        "(only in SQLite, only in PostgreSQL)"
    );
    sqlite.close().await;
    postgres.close().await;
}
