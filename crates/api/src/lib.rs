//! api: natpunch's measurement API, the punchr-compatible `PunchrService`.
//!
//! - [`pb`]: the messages and the gRPC service generated from `proto/punchr.proto`: proto2 with
//!   no package, the field tags, labels and enum numbers punchr's clients use, so that punchr's
//!   Go and Rust clients talk to natpunch's server unchanged. natpunch's own fields (idempotency
//!   key, technique, time to direct, NAT behaviour of both ends, transport) have tags from 100 up.
//! - [`report`]: validation of hole-punch reports, naming the first field that is wrong.
//! - [`store`]: the [`store::Store`] trait and its SQLite and PostgreSQL backend.
//! - [`postgres`]: a private PostgreSQL server (tests, benchmarks, lab campaigns).
//! - [`sample`]: a realistic report, for benchmarks and tests.
//! - [`server`]: the gRPC service on a store, its metrics, and the serving loops.

pub mod postgres;
pub mod report;
pub mod sample;
pub mod server;
pub mod store;

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
    use prost::Message as _;

    use super::pb;

    /// Protobuf varint.
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

    fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
        varint(field << 3, out);
        varint(v, out);
    }

    fn field_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
        varint((field << 3) | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn field_float(field: u64, f: f32, out: &mut Vec<u8>) {
        varint((field << 3) | 5, out);
        out.extend_from_slice(&f.to_le_bytes());
    }

    /// A TrackHolePunchRequest as punchr's Go client puts it on the wire (proto2, fields in tag
    /// order, unix-nanosecond timestamps, float-second durations), built byte by byte.
    #[test]
    fn a_report_from_a_punchr_client_decodes_field_by_field() {
        let started: u64 = 1_795_303_375_400_000_000;
        let mut attempt = Vec::new();
        field_varint(1, started + 100_000_000, &mut attempt);
        field_varint(3, started + 600_000_000, &mut attempt);
        field_float(4, 0.104, &mut attempt);
        field_float(5, 0.5, &mut attempt);
        field_varint(6, 6, &mut attempt); // SUCCESS
        field_bytes(9, &[4, 11, 99, 0, 11, 6, 0x0f, 0xa1], &mut attempt);

        let mut body = Vec::new();
        field_bytes(1, b"client-peer-id", &mut body);
        field_bytes(2, b"remote-peer-id", &mut body);
        field_varint(4, started, &mut body);
        field_varint(5, started + 80_000_000, &mut body);
        field_bytes(6, &attempt, &mut body);
        field_varint(8, 1, &mut body);
        field_varint(10, 6, &mut body); // HOLE_PUNCH_OUTCOME_SUCCESS
        field_varint(11, started + 700_000_000, &mut body);
        field_bytes(12, &[4, 192, 168, 1, 2, 6, 0x0f, 0xa0], &mut body);
        field_bytes(13, b"3b1c6a43-0000-4000-8000-000000000000", &mut body);
        field_varint(14, 4, &mut body);
        field_varint(14, 460, &mut body);

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
