//! The RFC 5780 server as a sans-IO state machine.
//!
//! The server owns four transport addresses: two IP addresses × two ports. The I/O shell
//! receives a datagram on one of them and calls [`Server::handle`] with the address it arrived
//! on; the returned [`Transmit`] says which of the four addresses to send the answer from and to
//! whom. CHANGE-REQUEST picks the source (other IP, other port, or both), RESPONSE-PORT the
//! destination port; every success response carries XOR-MAPPED-ADDRESS, MAPPED-ADDRESS,
//! RESPONSE-ORIGIN, OTHER-ADDRESS, SOFTWARE and FINGERPRINT. Everything that is not a valid
//! request is counted and dropped, or answered with the RFC 8489 error it deserves.

use std::net::SocketAddr;

use serde::Serialize;
use stun_codec::rfc5389::attributes::{
    ErrorCode, MappedAddress, Software, UnknownAttributes, XorMappedAddress,
};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::rfc5780::attributes::{OtherAddress, ResponseOrigin};
use stun_codec::{Attribute as _, MessageClass, TransactionId};

use crate::attrs::{ChangeRequest, ResponsePort};
use crate::message::{self, DecodeError, Message};

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Which of the server's addresses sends it.
    pub from: SocketAddr,
    /// Where to.
    pub to: SocketAddr,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// What the server has seen. Every datagram lands in exactly one of the first eight counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Binding requests answered with a success response.
    pub answered: u64,
    /// Requests answered with an error response (unknown method, unknown required attribute).
    pub errors_sent: u64,
    /// STUN messages that are not requests (responses, indications): dropped.
    pub ignored: u64,
    /// Datagrams that are not STUN at all.
    pub not_stun: u64,
    /// Datagrams shorter than the message they announce.
    pub truncated: u64,
    /// Datagrams larger than any STUN request.
    pub oversized: u64,
    /// STUN headers with a broken body (attributes, fingerprint, length).
    pub malformed: u64,
    /// Datagrams that arrived on an address that is not one of the server's.
    pub wrong_address: u64,
}

impl Counters {
    /// Total datagrams seen.
    pub fn total(&self) -> u64 {
        self.answered
            + self.errors_sent
            + self.ignored
            + self.not_stun
            + self.truncated
            + self.oversized
            + self.malformed
            + self.wrong_address
    }
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Self) {
        self.answered += o.answered;
        self.errors_sent += o.errors_sent;
        self.ignored += o.ignored;
        self.not_stun += o.not_stun;
        self.truncated += o.truncated;
        self.oversized += o.oversized;
        self.malformed += o.malformed;
        self.wrong_address += o.wrong_address;
    }
}

/// A server configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// RFC 5780 needs two different IP addresses and two different ports.
    #[error(
        "primary {primary} and alternate {alternate} must differ in both IP address and port (RFC 5780 §4)"
    )]
    NotDistinct {
        /// Primary address.
        primary: SocketAddr,
        /// Alternate address.
        alternate: SocketAddr,
    },
}

/// The server state: its addresses, its software name and its counters.
#[derive(Debug, Clone)]
pub struct Server {
    primary: SocketAddr,
    alternate: SocketAddr,
    software: String,
    counters: Counters,
}

impl Server {
    /// A server on `primary` and `alternate`, which must differ in IP address (of one family)
    /// and in port.
    pub fn new(
        primary: SocketAddr,
        alternate: SocketAddr,
        software: &str,
    ) -> Result<Self, ConfigError> {
        if primary.ip() == alternate.ip()
            || primary.port() == alternate.port()
            || primary.is_ipv4() != alternate.is_ipv4()
        {
            return Err(ConfigError::NotDistinct { primary, alternate });
        }
        Ok(Self {
            primary,
            alternate,
            software: software.to_owned(),
            counters: Counters::default(),
        })
    }

    /// The four addresses to listen on: primary, primary IP with alternate port, alternate IP
    /// with primary port, alternate.
    pub fn endpoints(&self) -> [SocketAddr; 4] {
        let (p, a) = (self.primary, self.alternate);
        [
            p,
            SocketAddr::new(p.ip(), a.port()),
            SocketAddr::new(a.ip(), p.port()),
            a,
        ]
    }

    /// What the server has seen so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// `local` with its IP and/or port swapped for the other one.
    fn changed(&self, local: SocketAddr, ip: bool, port: bool) -> SocketAddr {
        let other_ip = if local.ip() == self.primary.ip() {
            self.alternate.ip()
        } else {
            self.primary.ip()
        };
        let other_port = if local.port() == self.primary.port() {
            self.alternate.port()
        } else {
            self.primary.port()
        };
        SocketAddr::new(
            if ip { other_ip } else { local.ip() },
            if port { other_port } else { local.port() },
        )
    }

    /// Handles a datagram that arrived on `local` from `from`; returns the answer, if any.
    pub fn handle(
        &mut self,
        local: SocketAddr,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Option<Transmit> {
        if !self.endpoints().contains(&local) {
            self.counters.wrong_address += 1;
            return None;
        }
        let request = match message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                let c = &mut self.counters;
                match e {
                    DecodeError::NotStun => c.not_stun += 1,
                    DecodeError::Truncated { .. } => c.truncated += 1,
                    DecodeError::Oversized { .. } => c.oversized += 1,
                    DecodeError::Malformed(_) => c.malformed += 1,
                }
                return None;
            }
        };
        if request.class() != MessageClass::Request {
            self.counters.ignored += 1;
            return None;
        }
        let id = request.transaction_id();
        let unknown: Vec<_> = request
            .unknown_attributes()
            .map(|a| a.get_type())
            .filter(|t| t.is_comprehension_required())
            .collect();
        if request.method() != BINDING || !unknown.is_empty() {
            self.counters.errors_sent += 1;
            let mut answer = Message::new(MessageClass::ErrorResponse, request.method(), id);
            let (code, reason) = if unknown.is_empty() {
                (400, "Bad Request: only Binding is served")
            } else {
                (420, "Unknown Attribute")
            };
            if let Ok(e) = ErrorCode::new(code, reason.to_owned()) {
                answer.add_attribute(e);
            }
            if !unknown.is_empty() {
                answer.add_attribute(UnknownAttributes::new(unknown));
            }
            return Some(Transmit {
                from: local,
                to: from,
                payload: message::encode(answer, true),
            });
        }
        let (change_ip, change_port) = request
            .get_attribute::<ChangeRequest>()
            .map_or((false, false), |c| (c.ip, c.port));
        let source = self.changed(local, change_ip, change_port);
        let to = request
            .get_attribute::<ResponsePort>()
            .map_or(from, |p| SocketAddr::new(from.ip(), p.0));
        self.counters.answered += 1;
        Some(Transmit {
            from: source,
            to,
            payload: self.success(id, from, source, local),
        })
    }

    fn success(
        &self,
        id: TransactionId,
        client: SocketAddr,
        source: SocketAddr,
        local: SocketAddr,
    ) -> Vec<u8> {
        let mut answer = Message::new(MessageClass::SuccessResponse, BINDING, id);
        answer.add_attribute(XorMappedAddress::new(client));
        answer.add_attribute(MappedAddress::new(client));
        answer.add_attribute(ResponseOrigin::new(source));
        answer.add_attribute(OtherAddress::new(self.changed(local, true, true)));
        if let Ok(s) = Software::new(self.software.clone()) {
            answer.add_attribute(s);
        }
        message::encode(answer, true)
    }
}

/// The answer of a plain reflector (no RFC 5780 tests) to `bytes` from `from`: a Binding
/// success response carrying `from` (XOR-MAPPED-ADDRESS and MAPPED-ADDRESS) to a Binding
/// request, nothing to anything else. A relay answers this on its STUN port so that a daemon
/// behind it learns which external port its NAT gave a fresh socket.
pub fn reflect(bytes: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let request = message::decode(bytes).ok()?;
    if request.class() != MessageClass::Request || request.method() != BINDING {
        return None;
    }
    let mut answer = Message::new(
        MessageClass::SuccessResponse,
        BINDING,
        request.transaction_id(),
    );
    answer.add_attribute(XorMappedAddress::new(from));
    answer.add_attribute(MappedAddress::new(from));
    Some(message::encode(answer, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{binding_request, parse_binding_response};

    #[test]
    fn the_reflector_answers_a_binding_request_with_the_senders_address_and_nothing_else() {
        let from = addr(CLIENT);
        let answer = reflect(&binding_request([9; 12], None, None), from).expect("answered");
        let parsed = parse_binding_response(&answer).expect("a binding response");
        assert_eq!((parsed.transaction_id, parsed.mapped), ([9; 12], from));
        assert_eq!(reflect(&answer, from), None, "a response is not answered");
        assert_eq!(reflect(b"not stun at all, really", from), None);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn server() -> Server {
        Server::new(
            addr("11.99.0.11:3478"),
            addr("11.99.0.12:3479"),
            "natpunch test",
        )
        .expect("valid")
    }

    const CLIENT: &str = "11.99.0.10:40000";

    #[test]
    fn endpoints_are_two_ips_by_two_ports() {
        let s = server();
        let e = s.endpoints().map(|a| a.to_string());
        assert_eq!(
            e,
            [
                "11.99.0.11:3478",
                "11.99.0.11:3479",
                "11.99.0.12:3478",
                "11.99.0.12:3479"
            ]
        );
        assert!(
            Server::new(addr("1.1.1.1:1"), addr("1.1.1.1:2"), "").is_err(),
            "same IP"
        );
        assert!(
            Server::new(addr("1.1.1.1:1"), addr("2.2.2.2:1"), "").is_err(),
            "same port"
        );
    }

    #[test]
    fn plain_binding_is_answered_from_where_it_arrived_with_every_attribute() {
        let mut s = server();
        let local = addr("11.99.0.11:3478");
        let t = s
            .handle(local, addr(CLIENT), &binding_request([1; 12], None, None))
            .expect("answer");
        assert_eq!((t.from, t.to), (local, addr(CLIENT)));
        let r = parse_binding_response(&t.payload).expect("success response");
        assert_eq!(r.transaction_id, [1; 12]);
        assert_eq!(r.mapped, addr(CLIENT));
        assert_eq!(r.response_origin, Some(local));
        assert_eq!(r.other_address, Some(addr("11.99.0.12:3479")));
        assert_eq!(s.counters().answered, 1);
    }

    #[test]
    fn change_request_picks_the_source_and_response_port_the_destination() {
        let mut s = server();
        let local = addr("11.99.0.11:3478");
        let cases = [
            ((true, true), "11.99.0.12:3479"),
            ((false, true), "11.99.0.11:3479"),
            ((true, false), "11.99.0.12:3478"),
            ((false, false), "11.99.0.11:3478"),
        ];
        for (change, from) in cases {
            let t = s
                .handle(
                    local,
                    addr(CLIENT),
                    &binding_request([2; 12], Some(change), None),
                )
                .expect("answer");
            assert_eq!(t.from, addr(from), "{change:?}");
            assert_eq!(
                parse_binding_response(&t.payload)
                    .expect("ok")
                    .response_origin,
                Some(addr(from))
            );
        }
        // Received on the alternate address: "other" is the primary.
        let t = s.handle(
            addr("11.99.0.12:3479"),
            addr(CLIENT),
            &binding_request([3; 12], Some((true, true)), None),
        );
        let t = t.expect("answer");
        assert_eq!(t.from, addr("11.99.0.11:3478"));
        assert_eq!(
            parse_binding_response(&t.payload)
                .expect("ok")
                .other_address,
            Some(addr("11.99.0.11:3478"))
        );
        let t = s
            .handle(
                local,
                addr(CLIENT),
                &binding_request([4; 12], None, Some(50000)),
            )
            .expect("answer");
        assert_eq!(t.to, addr("11.99.0.10:50000"));
        assert_eq!(
            parse_binding_response(&t.payload).expect("ok").mapped,
            addr(CLIENT),
            "mapped is the real source"
        );
    }

    #[test]
    fn garbage_is_counted_by_kind_and_never_answered() {
        let mut s = server();
        let local = addr("11.99.0.11:3478");
        let from = addr(CLIENT);
        let good = binding_request([5; 12], None, None);
        assert!(s.handle(local, from, b"hello world, not stun").is_none());
        assert!(s.handle(local, from, &good[..good.len() - 8]).is_none());
        assert!(s.handle(local, from, &[0u8; 2000]).is_none());
        let mut bad_fp = good.clone();
        let n = bad_fp.len();
        bad_fp[n - 1] ^= 1;
        assert!(s.handle(local, from, &bad_fp).is_none());
        assert!(s.handle(addr("9.9.9.9:1"), from, &good).is_none());
        let response = s.handle(local, from, &good).expect("answer").payload;
        assert!(
            s.handle(local, from, &response).is_none(),
            "responses are not answered"
        );
        let c = s.counters();
        assert_eq!(
            (
                c.not_stun,
                c.truncated,
                c.oversized,
                c.malformed,
                c.wrong_address,
                c.ignored,
                c.answered
            ),
            (1, 1, 1, 1, 1, 1, 1)
        );
        assert_eq!(c.total(), 7);
    }

    #[test]
    fn unknown_required_attributes_get_420() {
        let mut s = server();
        // A Binding request with comprehension-required attribute 0x7777 (4 bytes of value).
        let mut bytes = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42];
        bytes.extend_from_slice(&[6; 12]);
        bytes.extend_from_slice(&[0x77, 0x77, 0x00, 0x04, 1, 2, 3, 4]);
        let t = s
            .handle(addr("11.99.0.11:3478"), addr(CLIENT), &bytes)
            .expect("error answer");
        let err = parse_binding_response(&t.payload).expect_err("error response");
        assert!(
            matches!(err, message::ResponseError::Error { code: 420, .. }),
            "{err}"
        );
        assert_eq!(s.counters().errors_sent, 1);
    }
}
