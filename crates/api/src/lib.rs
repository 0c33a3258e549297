//! api: natpunch's measurement API, the punchr-compatible `PunchrService`.
//!
//! - [`pb`]: the messages and the gRPC service generated from `proto/punchr.proto`: proto2 with
//!   no package, the field tags, labels and enum numbers punchr's clients use, so that punchr's
//!   Go and Rust clients talk to natpunch's server unchanged. natpunch's own fields (idempotency
//!   key, technique, time to direct, NAT behaviour of both ends, transport) have tags from 100 up.
//! - [`report`]: validation of hole-punch reports, naming the first field that is wrong.
//! - [`multiaddr`], [`peer_id`]: the binary and text forms of the multiaddrs and peer IDs that
//!   reports carry (multiformats multiaddr and multihash specs, libp2p's peer-ID spec), checked
//!   without panicking on what the network sends.
//! - [`store`]: the [`store::Store`] trait and its SQLite and PostgreSQL backend.
//! - [`postgres`]: a private PostgreSQL server (tests, benchmarks, lab campaigns).
//! - [`sample`]: a realistic report, for benchmarks and tests.
//! - [`server`]: the gRPC service on a store, its metrics, the serving loops and the live
//!   dashboard on the telemetry port.
//! - [`stats`]: the Wilson score interval.
//! - [`vantage`]: the remote's NAT from what two vantage points (relay, honeypot) saw of it.
//!
//! It does not punch, dial or speak any libp2p protocol, and it links no libp2p crate
//! (`cargo tree -p api | grep libp2p` shows nothing): the measurement client is the `measure`
//! crate; multiaddrs and peer IDs are this crate's own types, which read and write the same
//! bytes and text as libp2p's (callers holding libp2p's types convert through the binary form).
//! It does not check that a peer ID matches a key, nor resolve or dial an address.

pub mod multiaddr;
pub mod peer_id;
pub mod postgres;
pub mod report;
pub mod sample;
pub mod server;
pub mod stats;
pub mod store;
pub mod vantage;
mod varint;

/// The generated PunchrService messages, enums, client and server.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod pb {
    tonic::include_proto!("_");
}

#[cfg(test)]
mod tests {
    use super::pb;

    #[test]
    fn enum_numbers_are_punchrs() {
        use pb::{
            HolePunchAttemptOutcome as A, HolePunchOutcome as O, LatencyMeasurementType as L,
        };
        let outcomes = [
            O::Unknown,
            O::NoConnection,
            O::NoStream,
            O::ConnectionReversed,
            O::Cancelled,
            O::Failed,
            O::Success,
        ];
        for (n, o) in outcomes.iter().enumerate() {
            assert_eq!(*o as usize, n);
        }
        let attempts = [
            A::Unknown,
            A::DirectDial,
            A::ProtocolError,
            A::Cancelled,
            A::Timeout,
            A::Failed,
            A::Success,
        ];
        for (n, a) in attempts.iter().enumerate() {
            assert_eq!(*a as usize, n);
        }
        assert_eq!(L::ToRelay as i32, 0);
        assert_eq!(L::ToRemoteThroughRelay as i32, 1);
        assert_eq!(L::ToRemoteAfterHolePunch as i32, 2);
    }

    #[test]
    fn the_service_paths_have_no_package() {
        use pb::punchr_service_server::PunchrServiceServer;
        assert_eq!(
            <PunchrServiceServer<()> as tonic::server::NamedService>::NAME,
            "PunchrService"
        );
    }
}
