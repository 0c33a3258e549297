//! NAT-PMP (RFC 6886): version 0, requests to the gateway's UDP port 5351.
//!
//! Responses have no length field; each opcode fixes the length (RFC 6886 §3.2, §3.3):
//!
//! | response | bytes | fields after version, opcode, result (16 bits), seconds since start of epoch |
//! |---|---|---|
//! | external address (opcode 128) | 12 | external IPv4 address |
//! | map UDP / TCP (opcodes 129 / 130) | 16 | internal port, mapped external port, lifetime |
//!
//! How [`decode_response`] treats lengths:
//! * A success needs the whole response; shorter is [`DecodeError::Truncated`].
//! * A failure (non-zero result) of the full length decodes as its opcode's response, whose
//!   fields then say what the gateway copied back (RFC 6886 §3.5 wants the internal port there).
//! * A failure that carries only the 8-byte header (what RFC 6886 §3.5 prescribes for
//!   "unsupported version", and what miniupnpd sends for "unsupported opcode") decodes as
//!   [`Response::Failure`].
//! * Bytes after the fixed length are ignored: the format has no length field to check them
//!   against, and future gateways could append fields.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::wire::Reader;
use crate::{DecodeError, Protocol};

/// The NAT-PMP version byte.
pub const VERSION: u8 = 0;
/// Length of the part every response shares: version, opcode, result code, epoch.
pub const HEADER_LEN: usize = 8;
/// Length of an external-address response.
pub const EXTERNAL_ADDRESS_RESPONSE_LEN: usize = 12;
/// Length of a map response.
pub const MAP_RESPONSE_LEN: usize = 16;

/// Request opcode: external address.
const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Request opcode: map UDP.
const OP_MAP_UDP: u8 = 1;
/// Request opcode: map TCP.
const OP_MAP_TCP: u8 = 2;
/// Added to the request opcode in a response.
const RESPONSE_BIT: u8 = 128;

const fn map_opcode(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Udp => OP_MAP_UDP,
        Protocol::Tcp => OP_MAP_TCP,
    }
}

/// The external-address request (RFC 6886 §3.2): two bytes, version and opcode 0.
pub const fn external_address_request() -> [u8; 2] {
    [VERSION, OP_EXTERNAL_ADDRESS]
}

/// A map request (RFC 6886 §3.3), also used to renew (send the mapped external port as the
/// suggestion) and to delete.
///
/// `lifetime_secs` 0 deletes the mapping of `internal_port`; the suggested external port is
/// then sent as 0 whatever `suggested_external_port` says, as RFC 6886 §3.4 requires. Internal
/// port 0 with lifetime 0 deletes all of this host's mappings for `protocol` (see
/// [`delete_all_request`]). RFC 6886 recommends a lifetime of 7200 s.
pub const fn map_request(
    protocol: Protocol,
    internal_port: u16,
    suggested_external_port: u16,
    lifetime_secs: u32,
) -> [u8; 12] {
    let suggested = if lifetime_secs == 0 {
        0
    } else {
        suggested_external_port
    };
    let [i0, i1] = internal_port.to_be_bytes();
    let [e0, e1] = suggested.to_be_bytes();
    let [l0, l1, l2, l3] = lifetime_secs.to_be_bytes();
    [
        VERSION,
        map_opcode(protocol),
        0,
        0,
        i0,
        i1,
        e0,
        e1,
        l0,
        l1,
        l2,
        l3,
    ]
}

/// Deletes the mapping of `internal_port` (RFC 6886 §3.4): a map request with lifetime 0.
pub const fn delete_request(protocol: Protocol, internal_port: u16) -> [u8; 12] {
    map_request(protocol, internal_port, 0, 0)
}

/// Deletes every mapping this host holds for `protocol` (RFC 6886 §3.4): internal port,
/// suggested external port and lifetime all 0.
pub const fn delete_all_request(protocol: Protocol) -> [u8; 12] {
    map_request(protocol, 0, 0, 0)
}

/// A NAT-PMP result code (RFC 6886 §3.5). Codes without a name are [`ResultCode::Other`];
/// RFC 6886 says to treat them as fatal errors of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultCode {
    /// 0: success.
    Success,
    /// 1: the gateway does not speak this version.
    UnsupportedVersion,
    /// 2: not authorized or refused (for example mapping disabled, or a static mapping).
    NotAuthorized,
    /// 3: network failure (for example the gateway has no external address yet).
    NetworkFailure,
    /// 4: out of resources (no more mappings, no free port).
    OutOfResources,
    /// 5: unsupported opcode.
    UnsupportedOpcode,
    /// Any other code (only codes without a variant above).
    Other(u16),
}

impl ResultCode {
    /// The code on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Self::Success => 0,
            Self::UnsupportedVersion => 1,
            Self::NotAuthorized => 2,
            Self::NetworkFailure => 3,
            Self::OutOfResources => 4,
            Self::UnsupportedOpcode => 5,
            Self::Other(code) => code,
        }
    }
}

impl From<u16> for ResultCode {
    fn from(code: u16) -> Self {
        match code {
            0 => Self::Success,
            1 => Self::UnsupportedVersion,
            2 => Self::NotAuthorized,
            3 => Self::NetworkFailure,
            4 => Self::OutOfResources,
            5 => Self::UnsupportedOpcode,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Success => "success",
            Self::UnsupportedVersion => "unsupported version",
            Self::NotAuthorized => "not authorized/refused",
            Self::NetworkFailure => "network failure",
            Self::OutOfResources => "out of resources",
            Self::UnsupportedOpcode => "unsupported opcode",
            Self::Other(_) => "unknown result",
        };
        write!(f, "{name} ({})", self.code())
    }
}

/// What a request asked for, as its response's opcode tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Opcode 0 (response 128): the external address.
    ExternalAddress,
    /// Opcode 1 or 2 (response 129 or 130): a mapping.
    Map(Protocol),
}

/// An external-address response (RFC 6886 §3.2), and also the gateway's announcement of a new
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExternalAddress {
    /// The result.
    pub result: ResultCode,
    /// Seconds since start of epoch (SSSoE): the gateway's mapping table's age.
    pub epoch: u32,
    /// The gateway's external address; meaningless unless `result` is success (gateways send
    /// 0.0.0.0).
    pub external_ip: Ipv4Addr,
}

/// A map response (RFC 6886 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mapping {
    /// UDP (opcode 129) or TCP (opcode 130).
    pub protocol: Protocol,
    /// The result.
    pub result: ResultCode,
    /// Seconds since start of epoch (SSSoE).
    pub epoch: u32,
    /// The internal port the request named: which request this answers.
    pub internal_port: u16,
    /// The external port the gateway mapped (0 after a delete or a failure).
    pub external_port: u16,
    /// The lifetime granted, in seconds (0 after a delete or a failure).
    pub lifetime_secs: u32,
}

/// A failure that carries only the 8-byte header (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// What the failed request asked for.
    pub operation: Operation,
    /// The result (never success).
    pub result: ResultCode,
    /// Seconds since start of epoch (SSSoE).
    pub epoch: u32,
}

/// A decoded NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Response {
    /// Opcode 128, 12 bytes.
    ExternalAddress(ExternalAddress),
    /// Opcode 129 or 130, 16 bytes.
    Mapping(Mapping),
    /// A failure of any of them, header only.
    Failure(Failure),
}

impl Response {
    /// The result code.
    pub const fn result(&self) -> ResultCode {
        match self {
            Self::ExternalAddress(r) => r.result,
            Self::Mapping(r) => r.result,
            Self::Failure(r) => r.result,
        }
    }

    /// Seconds since start of epoch, for [`crate::EpochTracker::observe`].
    pub const fn epoch(&self) -> u32 {
        match self {
            Self::ExternalAddress(r) => r.epoch,
            Self::Mapping(r) => r.epoch,
            Self::Failure(r) => r.epoch,
        }
    }

    /// What the answered request asked for.
    pub const fn operation(&self) -> Operation {
        match self {
            Self::ExternalAddress(_) => Operation::ExternalAddress,
            Self::Mapping(r) => Operation::Map(r.protocol),
            Self::Failure(r) => r.operation,
        }
    }
}

/// Decodes a NAT-PMP response from a datagram (lengths: see the module documentation).
///
/// Fields are checked in wire order, so the error names the first thing wrong: the version
/// ([`DecodeError::WrongVersion`]; 2 means a PCP server answered), a request's opcode
/// ([`DecodeError::NotAResponse`]), an opcode above 130 ([`DecodeError::UnknownOpcode`]), then
/// the length ([`DecodeError::Truncated`]).
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let truncated = |needed| DecodeError::Truncated {
        len: bytes.len(),
        needed,
    };
    let mut r = Reader::new(bytes);
    let version = r.u8().ok_or(truncated(HEADER_LEN))?;
    if version != VERSION {
        return Err(DecodeError::WrongVersion { version });
    }
    let opcode = r.u8().ok_or(truncated(HEADER_LEN))?;
    let (operation, full_len) = match opcode.checked_sub(RESPONSE_BIT) {
        None => return Err(DecodeError::NotAResponse { opcode }),
        Some(OP_EXTERNAL_ADDRESS) => (Operation::ExternalAddress, EXTERNAL_ADDRESS_RESPONSE_LEN),
        Some(OP_MAP_UDP) => (Operation::Map(Protocol::Udp), MAP_RESPONSE_LEN),
        Some(OP_MAP_TCP) => (Operation::Map(Protocol::Tcp), MAP_RESPONSE_LEN),
        Some(_) => return Err(DecodeError::UnknownOpcode { opcode }),
    };
    let (Some(result), Some(epoch)) = (r.u16(), r.u32()) else {
        return Err(truncated(HEADER_LEN));
    };
    let result = ResultCode::from(result);
    if bytes.len() < full_len {
        return if result == ResultCode::Success {
            Err(truncated(full_len))
        } else {
            Ok(Response::Failure(Failure {
                operation,
                result,
                epoch,
            }))
        };
    }
    match operation {
        Operation::ExternalAddress => {
            let octets: [u8; 4] = r.array().ok_or(truncated(full_len))?;
            Ok(Response::ExternalAddress(ExternalAddress {
                result,
                epoch,
                external_ip: Ipv4Addr::from(octets),
            }))
        }
        Operation::Map(protocol) => {
            let (Some(internal_port), Some(external_port), Some(lifetime_secs)) =
                (r.u16(), r.u16(), r.u32())
            else {
                return Err(truncated(full_len));
            };
            Ok(Response::Mapping(Mapping {
                protocol,
                result,
                epoch,
                internal_port,
                external_port,
                lifetime_secs,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer to "map UDP 6000, suggest 26000, 3600 s": mapped 26000 for 3600 s, SSSoE 1234.
    const MAP_UDP_6000: [u8; 16] = [
        0, 129, 0, 0, // version, opcode 128 + 1, result success
        0, 0, 0x04, 0xd2, // SSSoE 1234
        0x17, 0x70, // internal port 6000
        0x65, 0x90, // mapped external port 26000
        0, 0, 0x0e, 0x10, // lifetime 3600
    ];

    /// natpmpc's answer in the lab: 11.22.33.1, epoch 261.
    const EXTERNAL_ADDRESS: [u8; 12] = [0, 128, 0, 0, 0, 0, 0x01, 0x05, 11, 22, 33, 1];

    #[test]
    fn requests_have_the_rfc_layout() {
        assert_eq!(external_address_request(), [0, 0]);
        assert_eq!(
            map_request(Protocol::Udp, 6000, 26000, 3600),
            [0, 1, 0, 0, 0x17, 0x70, 0x65, 0x90, 0, 0, 0x0e, 0x10]
        );
        assert_eq!(
            map_request(Protocol::Tcp, 8080, 0, 7200),
            [0, 2, 0, 0, 0x1f, 0x90, 0, 0, 0, 0, 0x1c, 0x20]
        );
    }

    #[test]
    fn deletes_send_no_suggested_port() {
        let delete = [0, 2, 0, 0, 0x17, 0x70, 0, 0, 0, 0, 0, 0];
        assert_eq!(map_request(Protocol::Tcp, 6000, 26000, 0), delete);
        assert_eq!(delete_request(Protocol::Tcp, 6000), delete);
        assert_eq!(
            delete_all_request(Protocol::Udp),
            [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn map_response_decodes() {
        let response = decode_response(&MAP_UDP_6000).expect("decodes");
        assert_eq!(
            response,
            Response::Mapping(Mapping {
                protocol: Protocol::Udp,
                result: ResultCode::Success,
                epoch: 1234,
                internal_port: 6000,
                external_port: 26000,
                lifetime_secs: 3600,
            })
        );
        assert_eq!(response.result(), ResultCode::Success);
        assert_eq!(response.epoch(), 1234);
        assert_eq!(response.operation(), Operation::Map(Protocol::Udp));
    }

    #[test]
    fn external_address_response_decodes() {
        assert_eq!(
            decode_response(&EXTERNAL_ADDRESS),
            Ok(Response::ExternalAddress(ExternalAddress {
                result: ResultCode::Success,
                epoch: 261,
                external_ip: Ipv4Addr::new(11, 22, 33, 1),
            }))
        );
    }

    #[test]
    fn full_length_failures_decode_with_their_fields() {
        // TCP 6000 refused: result 2, the internal port echoed, no port, no lifetime.
        let refused = [0, 130, 0, 2, 0, 0, 0, 9, 0x17, 0x70, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode_response(&refused),
            Ok(Response::Mapping(Mapping {
                protocol: Protocol::Tcp,
                result: ResultCode::NotAuthorized,
                epoch: 9,
                internal_port: 6000,
                external_port: 0,
                lifetime_secs: 0,
            }))
        );
        // No external address yet: result 3, 0.0.0.0.
        let no_address = [0, 128, 0, 3, 0, 0, 0, 9, 0, 0, 0, 0];
        assert_eq!(
            decode_response(&no_address).map(|r| r.result()),
            Ok(ResultCode::NetworkFailure)
        );
    }

    #[test]
    fn header_only_failures_decode() {
        let unsupported_version = [0, 129, 0, 1, 0, 0, 0, 42];
        assert_eq!(
            decode_response(&unsupported_version),
            Ok(Response::Failure(Failure {
                operation: Operation::Map(Protocol::Udp),
                result: ResultCode::UnsupportedVersion,
                epoch: 42,
            }))
        );
        let unknown_code = [0, 128, 0x01, 0x00, 0, 0, 0, 1];
        assert_eq!(
            decode_response(&unknown_code).map(|r| r.result()),
            Ok(ResultCode::Other(256))
        );
        // A success must be whole.
        assert_eq!(
            decode_response(&[0, 129, 0, 0, 0, 0, 0, 42]),
            Err(DecodeError::Truncated { len: 8, needed: 16 })
        );
    }

    #[test]
    fn result_codes_round_trip() {
        for code in 0..=7u16 {
            assert_eq!(ResultCode::from(code).code(), code);
        }
        assert_eq!(ResultCode::from(4), ResultCode::OutOfResources);
        assert_eq!(ResultCode::from(9), ResultCode::Other(9));
        assert_eq!(
            ResultCode::NotAuthorized.to_string(),
            "not authorized/refused (2)"
        );
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut longer = MAP_UDP_6000.to_vec();
        longer.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(decode_response(&longer), decode_response(&MAP_UDP_6000));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for len in 0..MAP_UDP_6000.len() {
            let err = decode_response(&MAP_UDP_6000[..len]).expect_err("truncated");
            assert!(matches!(err, DecodeError::Truncated { .. }), "{len}: {err}");
        }
        for len in 0..EXTERNAL_ADDRESS.len() {
            let err = decode_response(&EXTERNAL_ADDRESS[..len]).expect_err("truncated");
            assert!(matches!(err, DecodeError::Truncated { .. }), "{len}: {err}");
        }
    }

    #[test]
    fn wrong_versions_requests_and_unknown_opcodes_are_named() {
        let mut pcp = MAP_UDP_6000;
        pcp[0] = 2;
        assert_eq!(
            decode_response(&pcp),
            Err(DecodeError::WrongVersion { version: 2 })
        );
        assert_eq!(
            decode_response(&map_request(Protocol::Udp, 1, 2, 3)),
            Err(DecodeError::NotAResponse { opcode: 1 })
        );
        assert_eq!(
            decode_response(&external_address_request()),
            Err(DecodeError::NotAResponse { opcode: 0 })
        );
        let mut unknown = MAP_UDP_6000;
        unknown[1] = 131;
        assert_eq!(
            decode_response(&unknown),
            Err(DecodeError::UnknownOpcode { opcode: 131 })
        );
    }

    #[test]
    fn bit_flips_never_panic() {
        for bytes in [&MAP_UDP_6000[..], &EXTERNAL_ADDRESS[..]] {
            for i in 0..bytes.len() {
                for bit in 0..8 {
                    let mut b = bytes.to_vec();
                    b[i] ^= 1 << bit;
                    let _ = decode_response(&b);
                }
            }
        }
    }

    #[test]
    fn responses_serialise_for_the_cli() {
        let response = decode_response(&MAP_UDP_6000).expect("decodes");
        assert_eq!(
            serde_json::to_value(response).expect("serialises"),
            serde_json::json!({
                "kind": "mapping",
                "protocol": "udp",
                "result": "success",
                "epoch": 1234,
                "internal_port": 6000,
                "external_port": 26000,
                "lifetime_secs": 3600,
            })
        );
    }
}
