//! telemetry: the telemetry port of natpunch's long-running roles (relay, honeypot, server,
//! client): `GET /metrics` (Prometheus text format, from a `prometheus-client` registry),
//! `GET /health` (ok, or 503 with the problem in words), and any [`Pages`] a role adds (the
//! measurement server's dashboard).
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, a bounded request
//! head, a short read deadline. Anything else gets 404, 405 or 400.
//!
//! [`metrics::Registrar`] declares a role's metrics in one line each (name, help, kind), with
//! the latency histogram the roles share.
//!
//! It does not do TLS, authentication, keep-alive, chunked bodies or paths beyond those;
//! put it on a loopback or private address, or behind a proxy that adds what is missing. It
//! depends on tokio and prometheus-client only, so that every role (the measurement server too,
//! which has no libp2p) can serve it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

pub mod metrics;

/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Requests answered at once; more connections are closed unanswered.
const MAX_CONNECTIONS: usize = 32;
/// The pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What `/health` answers: ok, or the problem in words (then 503). Cloned handles share one
/// state, so the part of a process that knows the problem sets it.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<Option<String>>>);

impl Health {
    /// Sets the problem (`None`: healthy).
    pub fn set(&self, problem: Option<String>) {
        if let Ok(mut p) = self.0.lock() {
            *p = problem;
        }
    }

    /// The problem, if there is one.
    pub fn problem(&self) -> Option<String> {
        self.0.lock().ok().and_then(|p| p.clone())
    }
}

/// A page a role serves beside `/metrics` and `/health`.
#[derive(Debug, Clone)]
pub struct Page {
    /// Status line, e.g. `200 OK`.
    pub status: &'static str,
    /// `Content-Type`.
    pub kind: &'static str,
    /// The body.
    pub body: String,
}

/// A role's other pages: the answer to `GET` of a path (its query left out), or `None` for 404.
pub type Pages =
    Arc<dyn Fn(&str) -> Pin<Box<dyn Future<Output = Option<Page>> + Send>> + Send + Sync>;

/// Serves `registry` on `listener` until the task is dropped; `/health` is always ok.
pub async fn serve(listener: TcpListener, registry: Arc<Mutex<Registry>>) {
    serve_health(listener, registry, Health::default()).await;
}

/// Serves `registry` on `listener` until the task is dropped; `/health` answers 503 while
/// `healthy` is false (a process that depends on a database sets it from its checks).
pub async fn serve_with_health(
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    healthy: Arc<AtomicBool>,
) {
    serve_checked(listener, registry, unhealthy_when_false(healthy), None).await;
}

/// [`serve_with_health`], with `pages` answering the paths other than `/metrics` and
/// `/health`.
pub async fn serve_with_pages(
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    healthy: Arc<AtomicBool>,
    pages: Pages,
) {
    serve_checked(
        listener,
        registry,
        unhealthy_when_false(healthy),
        Some(pages),
    )
    .await;
}

/// `/health`'s problem: "unhealthy" while `healthy` is false.
fn unhealthy_when_false(healthy: Arc<AtomicBool>) -> impl Fn() -> Option<String> {
    move || (!healthy.load(Ordering::Relaxed)).then(|| "unhealthy".to_owned())
}

/// Serves `registry` on `listener` until the task is dropped; `/health` answers 503 with the
/// problem while `health` has one.
pub async fn serve_health(listener: TcpListener, registry: Arc<Mutex<Registry>>, health: Health) {
    serve_checked(listener, registry, move || health.problem(), None).await;
}

async fn serve_checked(
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    problem: impl Fn() -> Option<String>,
    pages: Option<Pages>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors (EMFILE) and the like: wait rather than spin.
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        // Each answer takes at most the read deadline; beyond the permits, close at once.
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue;
        };
        let registry = Arc::clone(&registry);
        let problem = problem();
        let pages = pages.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &registry, problem, pages).await;
            drop(permit);
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    registry: &Mutex<Registry>,
    problem: Option<String>,
    pages: Option<Pages>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_DEADLINE, read).await.is_err() {
        return Ok(());
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let page = match (method, path, pages) {
        ("GET", p, Some(pages)) if p != "/metrics" && p != "/health" => pages(p).await,
        _ => None,
    };
    let (status, kind, body) = match (method, path, page) {
        (_, _, Some(page)) => (page.status, page.kind, page.body),
        ("GET", "/metrics", None) => {
            let mut text = String::new();
            let encoded = match registry.lock() {
                Ok(r) => prometheus_client::encoding::text::encode(&mut text, &r).is_ok(),
                Err(_) => false,
            };
            if encoded {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            } else {
                (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".into(),
                )
            }
        }
        ("GET", "/health", None) => match problem {
            None => ("200 OK", "text/plain", "ok\n".into()),
            Some(p) => ("503 Service Unavailable", "text/plain", format!("{p}\n")),
        },
        ("GET", _, None) => ("404 Not Found", "text/plain", "not found\n".into()),
        ("", _, None) => ("400 Bad Request", "text/plain", "bad request\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn metrics_health_and_errors() {
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("natpunch_test_things", "Things", counter.clone());
        counter.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(serve(listener, Arc::new(Mutex::new(registry))));
        let metrics = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("natpunch_test_things_total 3"),
            "{metrics}"
        );
        let health = get(addr, b"GET /health HTTP/1.1\r\n\r\n").await;
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
            "{health}"
        );
        assert!(
            get(addr, b"POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .contains("405")
        );
        assert!(
            get(addr, b"GET /nope HTTP/1.1\r\n\r\n")
                .await
                .contains("404")
        );
        assert!(get(addr, b"\r\n\r\n").await.contains("400"));
        task.abort();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let healthy = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(Mutex::new(Registry::default()));
        let task = tokio::spawn(serve_with_health(listener, registry, Arc::clone(&healthy)));
        assert!(
            get(addr, b"GET /health HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 503")
        );
        healthy.store(true, Ordering::Relaxed);
        assert!(
            get(addr, b"GET /health HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 200")
        );
        task.abort();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let health = Health::default();
        health.set(Some("no external address".into()));
        let registry = Arc::new(Mutex::new(Registry::default()));
        let task = tokio::spawn(serve_health(listener, registry, health.clone()));
        let answer = get(addr, b"GET /health HTTP/1.1\r\n\r\n").await;
        assert!(
            answer.starts_with("HTTP/1.1 503") && answer.ends_with("no external address\n"),
            "{answer}"
        );
        health.set(None);
        assert!(
            get(addr, b"GET /health HTTP/1.1\r\n\r\n")
                .await
                .ends_with("ok\n")
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_roles_pages_answer_other_paths_without_their_query() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pages: Pages = Arc::new(|path: &str| {
            let page = (path == "/").then(|| Page {
                status: "200 OK",
                kind: "text/html",
                body: "<p>dashboard</p>".into(),
            });
            Box::pin(async move { page })
        });
        let registry = Arc::new(Mutex::new(Registry::default()));
        let healthy = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(serve_with_pages(listener, registry, healthy, pages));
        let home = get(addr, b"GET /?refresh=1 HTTP/1.1\r\n\r\n").await;
        assert!(
            home.starts_with("HTTP/1.1 200") && home.contains("text/html"),
            "{home}"
        );
        assert!(home.ends_with("<p>dashboard</p>"), "{home}");
        assert!(
            get(addr, b"GET /other HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            get(addr, b"GET /health HTTP/1.1\r\n\r\n")
                .await
                .ends_with("ok\n")
        );
        task.abort();
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_bound_are_closed_unanswered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(serve(listener, Arc::new(Mutex::new(Registry::default()))));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Let the server take them all before the next one comes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = async {
            let mut s = TcpStream::connect(addr).await?;
            let _ = s.write_all(b"GET /health HTTP/1.1\r\n\r\n").await;
            let mut out = String::new();
            s.read_to_string(&mut out).await.map(|_| out)
        };
        let answer = refused.await;
        assert!(
            answer.as_ref().map_or(true, String::is_empty),
            "closed without an answer: {answer:?}"
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            get(addr, b"GET /health HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 200")
        );
        task.abort();
    }
}
