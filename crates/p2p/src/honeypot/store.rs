//! The honeypot's sightings in the measurement store (`api`'s SQLite or PostgreSQL store), and
//! the run that writes them while the DHT server runs.

use std::future::Future;

use api::multiaddr::{Multiaddr, MultiaddrError};
use api::report::Addr;
use api::store::{ConnectionEvent, SqlStore, Store as _};
use libp2p::PeerId;

use super::{Honeypot, HoneypotEvent, Metrics, RecordError, Recorder, RecorderConfig};
use super::{Sighting, SightingStore};

/// A sighting's address that is not a multiaddr: the store will never take it.
#[derive(Debug, thiserror::Error)]
#[error("address {address}: {error}")]
pub struct BadAddress {
    /// The address as the peer gave it.
    pub address: String,
    /// Why it is not one.
    pub error: MultiaddrError,
}

/// The measurement store as the honeypot's writer sees it: sightings become connection events
/// of this honeypot.
#[derive(Debug, Clone)]
pub struct SqlSightings {
    store: SqlStore,
    /// The honeypot's peer ID (base58).
    local: String,
}

impl SqlSightings {
    /// Sightings of the honeypot `local` into `store`.
    pub fn new(store: SqlStore, local: PeerId) -> Self {
        Self {
            store,
            local: local.to_base58(),
        }
    }
}

impl SightingStore for SqlSightings {
    async fn record(&self, s: &Sighting) -> Result<(), RecordError> {
        let event =
            connection_event(&self.local, s).map_err(|e| RecordError::Refused(e.to_string()))?;
        self.store
            .record_connection(&event, api::server::now_ns())
            .await
            .map(drop)
            .map_err(|e| RecordError::Failed(e.to_string()))
    }
}

/// The store's form of a sighting by the honeypot `local` (base58).
pub fn connection_event(local: &str, s: &Sighting) -> Result<ConnectionEvent, BadAddress> {
    let parse = |a: &str| {
        a.parse::<Multiaddr>()
            .map(|m| Addr::of(&m))
            .map_err(|error| BadAddress {
                address: a.to_owned(),
                error,
            })
    };
    Ok(ConnectionEvent {
        local: local.to_owned(),
        remote: s.peer_id.clone(),
        agent_version: Some(s.agent_version.clone()),
        protocols: s.protocols.clone(),
        conn_addr: parse(&s.conn_addr)?,
        addrs: s
            .listen_addrs
            .iter()
            .map(|a| parse(a))
            .collect::<Result<_, _>>()?,
        opened_at: s.opened_at,
    })
}

impl Honeypot {
    /// Runs until `stop` as [`Honeypot::run`] does, and writes every sighting into `store`
    /// (when there is one) through a [`Recorder`] on a task of its own, so that a slow database
    /// never stalls the swarm. What was seen before the stop is written before this returns,
    /// if the store takes it in time; the number of sightings it did not take is returned.
    pub async fn run_recording(
        self,
        store: Option<impl SightingStore>,
        metrics: &Metrics,
        stop: impl Future<Output = ()>,
        report: &mut impl FnMut(&HoneypotEvent),
    ) -> usize {
        let mut recorder =
            store.map(|store| Recorder::start(store, RecorderConfig::default(), metrics));
        let mut each = |e: HoneypotEvent| {
            report(&e);
            if let (HoneypotEvent::Seen(s), Some(recorder)) = (e, recorder.as_mut()) {
                recorder.offer(s);
            }
        };
        self.run(stop, &mut each).await;
        match recorder {
            Some(recorder) => recorder.close().await,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(conn_addr: &str) -> Sighting {
        Sighting {
            peer_id: "12D3KooWtarget".into(),
            agent_version: "go-ipfs/0.9".into(),
            protocols: vec!["/libp2p/dcutr".into()],
            listen_addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()],
            relay_addrs: Vec::new(),
            conn_addr: conn_addr.into(),
            dcutr: true,
            opened_at: 7,
        }
    }

    #[test]
    fn a_sighting_becomes_a_connection_event_of_the_honeypot() {
        let e = connection_event("12D3KooWhoneypot", &sighting("/ip4/8.8.8.8/udp/1/quic-v1"))
            .expect("valid");
        assert_eq!(e.local, "12D3KooWhoneypot");
        assert_eq!(e.remote, "12D3KooWtarget");
        assert_eq!(e.agent_version.as_deref(), Some("go-ipfs/0.9"));
        assert_eq!(
            e.conn_addr,
            Addr::of(&"/ip4/8.8.8.8/udp/1/quic-v1".parse().expect("addr"))
        );
        assert_eq!(e.addrs.len(), 1);
        assert_eq!(e.opened_at, 7);
    }

    #[test]
    fn a_sighting_with_a_bad_address_is_refused_with_the_address_named() {
        let e = connection_event("h", &sighting("not an address")).expect_err("bad");
        assert!(e.to_string().starts_with("address not an address: "), "{e}");
    }
}
