//! Throughput tests over the connection left after the hole punch: natpunch's perf protocol
//! (an 8-byte big-endian length, that many bytes, a 1-byte ack). The dialer sends one when
//! asked; every peer receives at most [`MAX_PERF_SINKS`] at once.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{PeerId, StreamProtocol};
use tracing::Instrument as _;

use super::defaults::MAX_PERF_SINKS;
use super::{Peer, PeerEvent};

/// natpunch's throughput protocol.
pub const PERF: StreamProtocol = StreamProtocol::new("/natpunch/perf/1.0.0");
/// The most a throughput test may send.
pub const MAX_PERF_BYTES: u64 = 1 << 30;

impl Peer {
    /// Sends `bytes` to `target` over the one connection left (closing the relayed ones when a
    /// direct one exists) and reports the throughput.
    pub(super) async fn perf(
        &mut self,
        target: PeerId,
        bytes: u64,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        report: &mut impl FnMut(PeerEvent),
    ) {
        let direct = self
            .remotes
            .get(&target)
            .is_some_and(|r| !r.directs.is_empty());
        if direct {
            let relayed: Vec<ConnectionId> = self
                .relayed_conns
                .iter()
                .filter(|(_, p)| **p == target)
                .map(|(c, _)| *c)
                .collect();
            for c in relayed {
                self.swarm.close_connection(c);
            }
            // Wait until they are gone, so that the transfer cannot pick one of them.
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            while self.relayed_conns.values().any(|p| *p == target) {
                tokio::select! {
                    () = stop.as_mut() => return,
                    () = tokio::time::sleep_until(until) => break,
                    event = self.swarm.select_next_some() => {
                        if let SwarmEvent::ConnectionClosed {
                            peer_id,
                            connection_id,
                            num_established,
                            ..
                        } = event
                        {
                            self.relayed_conns.remove(&connection_id);
                            self.remotes.on_closed(peer_id, connection_id, num_established);
                        }
                    }
                }
            }
        }
        let mut control = self.control.clone();
        let transfer = perf_send(&mut control, target, bytes.min(MAX_PERF_BYTES));
        tokio::pin!(transfer);
        let result = loop {
            tokio::select! {
                () = stop.as_mut() => return,
                r = &mut transfer => break r,
                _ = self.swarm.select_next_some() => {}
            }
        };
        match result {
            Ok(secs) => report(PeerEvent::Throughput {
                connection: if direct { "direct" } else { "relayed" }.into(),
                bytes,
                secs,
                mbit_s: bytes as f64 * 8.0 / secs.max(1e-9) / 1e6,
            }),
            Err(e) => tracing::warn!("throughput test: {e}"),
        }
    }

    /// A remote opened a throughput test: receive it, unless [`MAX_PERF_SINKS`] already run.
    pub(super) fn on_perf_stream(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if self.perf_sinks.len() >= MAX_PERF_SINKS {
            tracing::debug!(%peer, "{MAX_PERF_SINKS} throughput tests running: refusing one");
            return;
        }
        let span = tracing::debug_span!("perf sink", %peer);
        self.perf_sinks.spawn(
            async move {
                if let Err(e) = perf_sink(stream).await {
                    tracing::debug!("throughput test: {e}");
                }
            }
            .instrument(span),
        );
    }
}

/// Receives one throughput test: the length, the bytes, then a 1-byte ack.
async fn perf_sink(mut stream: libp2p::Stream) -> std::io::Result<()> {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).await?;
    let len = u64::from_be_bytes(len).min(MAX_PERF_BYTES);
    let copied = futures::io::copy(&mut (&mut stream).take(len), &mut futures::io::sink()).await?;
    if copied == len {
        stream.write_all(&[1]).await?;
    }
    stream.close().await
}

/// Sends one throughput test and returns its duration in seconds.
async fn perf_send(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    bytes: u64,
) -> std::io::Result<f64> {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = control
        .open_stream(peer, PERF)
        .await
        .map_err(std::io::Error::other)?;
    let start = Instant::now();
    stream.write_all(&bytes.to_be_bytes()).await?;
    let chunk = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        stream.write_all(chunk.get(..n).unwrap_or_default()).await?;
        left -= n as u64;
    }
    stream.flush().await?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await?;
    Ok(start.elapsed().as_secs_f64())
}
