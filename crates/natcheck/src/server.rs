//! The RFC 5780 STUN server on four UDP sockets: the tokio shell around [`stun::Server`].
//!
//! The primary address also answers plain Binding requests over TCP (RFC 8489 §6.2.2, framed by
//! the message length), so a client whose UDP gets no answer can tell a blocked network from a
//! server that is not there.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use stun::{Counters, Server};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The addresses do not make an RFC 5780 server.
    #[error(transparent)]
    Config(#[from] stun::server::ConfigError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr} (is the address configured on this host?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A bound server; [`StunServer::run`] answers requests until told to stop.
#[derive(Debug)]
pub struct StunServer {
    server: Server,
    sockets: Arc<Vec<UdpSocket>>,
    tcp: TcpListener,
}

/// TCP connections served at once; more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection that sends no complete request for this long is closed.
const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest request taken over TCP (a Binding request is well under 100 bytes).
const MAX_TCP_MESSAGE: usize = 1280;

impl StunServer {
    /// Binds the four addresses of an RFC 5780 server on `primary` and `alternate`.
    pub async fn bind(
        primary: SocketAddr,
        alternate: SocketAddr,
        software: &str,
    ) -> Result<Self, ServerError> {
        let server = Server::new(primary, alternate, software)?;
        let mut sockets = Vec::with_capacity(4);
        for addr in server.endpoints() {
            sockets.push(
                UdpSocket::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            );
        }
        let tcp = TcpListener::bind(primary)
            .await
            .map_err(|source| ServerError::Bind {
                addr: primary,
                source,
            })?;
        Ok(Self {
            server,
            sockets: Arc::new(sockets),
            tcp,
        })
    }

    /// The four addresses the server listens on.
    pub fn endpoints(&self) -> [SocketAddr; 4] {
        self.server.endpoints()
    }

    /// Answers requests on all four sockets until `stop` changes to `true`; returns what the
    /// server saw.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Counters {
        let mut tasks = JoinSet::new();
        for index in 0..self.sockets.len() {
            let sockets = Arc::clone(&self.sockets);
            let mut server = self.server.clone();
            let mut stop = stop.clone();
            tasks.spawn(async move {
                let mut buf = vec![0u8; 2048];
                let local = server.endpoints()[index];
                loop {
                    tokio::select! {
                        received = sockets[index].recv_from(&mut buf) => {
                            let Ok((n, from)) = received else { continue };
                            let Some(t) = server.handle(local, from, &buf[..n]) else { continue };
                            let out = server.endpoints().iter().position(|e| *e == t.from).unwrap_or(index);
                            if let Err(e) = sockets[out].send_to(&t.payload, t.to).await {
                                tracing::debug!(to = %t.to, "send failed: {e}");
                            }
                        }
                        _ = async { stop.wait_for(|s| *s).await.is_ok() } => break,
                    }
                }
                server.counters()
            });
        }
        tasks.spawn(serve_tcp(self.tcp, self.server.clone(), stop.clone()));
        let _stopped = async { stop.wait_for(|s| *s).await.is_ok() }.await;
        let mut total = Counters::default();
        while let Some(result) = tasks.join_next().await {
            if let Ok(c) = result {
                total += c;
            }
        }
        total
    }
}

/// Accepts TCP connections on the primary address, at most [`MAX_TCP_CONNECTIONS`] at once,
/// until `stop`; returns what they saw.
async fn serve_tcp(
    listener: TcpListener,
    server: Server,
    mut stop: watch::Receiver<bool>,
) -> Counters {
    let mut connections = JoinSet::new();
    let mut total = Counters::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, from)) = accepted else {
                    // Out of descriptors (EMFILE) and the like: wait rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                if connections.len() >= MAX_TCP_CONNECTIONS {
                    tracing::debug!(%from, "too many TCP connections: closed");
                    continue;
                }
                connections.spawn(serve_tcp_connection(stream, from, server.clone(), stop.clone()));
            }
            Some(Ok(c)) = connections.join_next(), if !connections.is_empty() => total += c,
            _ = async { stop.wait_for(|s| *s).await.is_ok() } => break,
        }
    }
    while let Some(result) = connections.join_next().await {
        if let Ok(c) = result {
            total += c;
        }
    }
    total
}

/// Answers the requests of one TCP connection until it closes, idles or sends garbage. Only
/// answers that go back the way they came are sent: TCP cannot honour CHANGE-REQUEST or
/// RESPONSE-PORT.
async fn serve_tcp_connection(
    mut stream: TcpStream,
    from: SocketAddr,
    mut server: Server,
    mut stop: watch::Receiver<bool>,
) -> Counters {
    let Ok(local) = stream.local_addr() else {
        return server.counters();
    };
    let mut buf = vec![0u8; MAX_TCP_MESSAGE];
    loop {
        let read = tokio::time::timeout(TCP_IDLE, async {
            stream.read_exact(&mut buf[..20]).await?;
            let len = 20 + usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            if len <= MAX_TCP_MESSAGE {
                stream.read_exact(&mut buf[20..len]).await?;
            }
            Ok::<_, io::Error>(len)
        });
        let len = tokio::select! {
            read = read => match read {
                Ok(Ok(len)) => len,
                _ => break,
            },
            _ = async { stop.wait_for(|s| *s).await.is_ok() } => break,
        };
        if len > MAX_TCP_MESSAGE {
            // Counted by what its header says (not STUN, or a message longer than sent).
            let _ = server.handle(local, from, &buf[..20]);
            break;
        }
        let Some(t) = server.handle(local, from, &buf[..len]) else {
            break;
        };
        if t.from != local || t.to != from || stream.write_all(&t.payload).await.is_err() {
            break;
        }
    }
    server.counters()
}
