//! The RFC 5780 STUN server on four UDP sockets: the tokio shell around [`stun::Server`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use stun::{Counters, Server};
use tokio::net::UdpSocket;
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
}

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
        Ok(Self {
            server,
            sockets: Arc::new(sockets),
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
