//! PCP (RFC 6887): version 2, requests to the server's UDP port 5351, at most 1100 bytes.
//!
//! Every message is a 24-byte header, an opcode-specific body, then options; every address
//! field is 128 bits, IPv4 as `::ffff:a.b.c.d`.
//!
//! | opcode | request body | response body |
//! |---|---|---|
//! | ANNOUNCE (0) | none | none |
//! | MAP (1) | 36 bytes: nonce, protocol, internal port, suggested external port and address | the same with the assigned ones |
//! | PEER (2) | 56 bytes: MAP's, then the remote peer's port and address | the same |
//!
//! This crate sends ANNOUNCE and MAP. It also decodes PEER responses (the layout is fixed and
//! costs nothing to read, so a stray answer gets a name rather than an error), but it does not
//! build PEER requests.
//!
//! How [`decode_response`] checks a datagram, in order:
//! 1. Version 0 is a NAT-PMP gateway answering: its "unsupported version" (result 1, at least
//!    8 bytes) is [`DecodeError::NatPmpOnly`], the signal to fall back to NAT-PMP; anything else
//!    is [`DecodeError::WrongVersion`], as is every version but 2.
//! 2. Length: at most 1100 bytes, at least 24, a multiple of 4.
//! 3. The R bit must be set; the opcode must be ANNOUNCE, MAP or PEER.
//! 4. The body: a success must carry its opcode's whole body. An error response may carry none
//!    (exactly the 24-byte header) since a server cannot echo what it could not parse; part of a
//!    body is [`DecodeError::Truncated`]. The protocol must be UDP or TCP.
//! 5. Options: each is code, reserved byte, 16-bit length, data padded to a multiple of 4. They
//!    are returned undecoded; one that runs past the end is [`DecodeError::MalformedOption`].
//!    (miniupnpd answers in the request's buffer, so options a client sent come back.)
//!
//! Result code 1 (UNSUPP_VERSION) from a PCP server is an ordinary response with
//! [`ResultCode::UnsuppVersion`].

use std::fmt;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Serialize;

use crate::wire::{Reader, ip_to_wire};
use crate::{DecodeError, Protocol, pmp};

/// The PCP version byte.
pub const VERSION: u8 = 2;
/// Length of the request and response headers.
pub const HEADER_LEN: usize = 24;
/// Largest PCP message (RFC 6887 §7).
pub const MAX_MESSAGE_LEN: usize = 1100;
/// Length of a MAP body.
pub const MAP_BODY_LEN: usize = 36;
/// Length of a PEER body.
pub const PEER_BODY_LEN: usize = 56;

/// Option code of THIRD_PARTY (RFC 6887 §13.1): map for another host.
pub const OPTION_THIRD_PARTY: u8 = 1;
/// Option code of PREFER_FAILURE (RFC 6887 §13.2): fail rather than assign another port or
/// address than the suggested ones.
pub const OPTION_PREFER_FAILURE: u8 = 2;
/// Option code of FILTER (RFC 6887 §13.3): accept inbound packets from given peers only.
pub const OPTION_FILTER: u8 = 3;

/// The R bit of the second byte: set in responses.
const RESPONSE_BIT: u8 = 0x80;

/// A PCP opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Opcode {
    /// 0: learn the server's epoch; also the server's unsolicited "I lost my state".
    Announce,
    /// 1: an inbound mapping.
    Map,
    /// 2: an outbound mapping, or learning an existing one's external endpoint.
    Peer,
}

impl Opcode {
    /// The opcode on the wire (without the R bit).
    pub const fn code(self) -> u8 {
        match self {
            Self::Announce => 0,
            Self::Map => 1,
            Self::Peer => 2,
        }
    }

    /// The opcode with this code, if this crate knows it.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Announce),
            1 => Some(Self::Map),
            2 => Some(Self::Peer),
            _ => None,
        }
    }

    const fn body_len(self) -> usize {
        match self {
            Self::Announce => 0,
            Self::Map => MAP_BODY_LEN,
            Self::Peer => PEER_BODY_LEN,
        }
    }
}

/// A PCP result code (RFC 6887 §7.4). Codes without a name are [`ResultCode::Other`].
///
/// In an error response the lifetime says how long the error is expected to hold: RFC 6887
/// calls NETWORK_FAILURE, NO_RESOURCES and USER_EX_QUOTA "short lifetime" errors (try again
/// soon) and NOT_AUTHORIZED, the malformed and unsupported ones and ADDRESS_MISMATCH "long
/// lifetime" ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultCode {
    /// 0 SUCCESS.
    Success,
    /// 1 UNSUPP_VERSION: the server does not speak the request's version.
    UnsuppVersion,
    /// 2 NOT_AUTHORIZED: disabled for this client, or against the server's policy (also a
    /// delete with another nonce than the mapping's).
    NotAuthorized,
    /// 3 MALFORMED_REQUEST.
    MalformedRequest,
    /// 4 UNSUPP_OPCODE.
    UnsuppOpcode,
    /// 5 UNSUPP_OPTION: a mandatory-to-process option the server does not know.
    UnsuppOption,
    /// 6 MALFORMED_OPTION.
    MalformedOption,
    /// 7 NETWORK_FAILURE: for example the server has no external address yet.
    NetworkFailure,
    /// 8 NO_RESOURCES: the server cannot create more state now.
    NoResources,
    /// 9 UNSUPP_PROTOCOL.
    UnsuppProtocol,
    /// 10 USER_EX_QUOTA: this client has too many mappings.
    UserExQuota,
    /// 11 CANNOT_PROVIDE_EXTERNAL: the suggested external port or address cannot be provided
    /// (only to MAP with PREFER_FAILURE, MAP for SCTP, and PEER).
    CannotProvideExternal,
    /// 12 ADDRESS_MISMATCH: the client address in the request is not the packet's source (a NAT
    /// between client and server).
    AddressMismatch,
    /// 13 EXCESSIVE_REMOTE_PEERS: the server could not install the request's FILTER options.
    ExcessiveRemotePeers,
    /// Any other code (only codes without a variant above).
    Other(u8),
}

impl ResultCode {
    /// The code on the wire.
    pub const fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::UnsuppVersion => 1,
            Self::NotAuthorized => 2,
            Self::MalformedRequest => 3,
            Self::UnsuppOpcode => 4,
            Self::UnsuppOption => 5,
            Self::MalformedOption => 6,
            Self::NetworkFailure => 7,
            Self::NoResources => 8,
            Self::UnsuppProtocol => 9,
            Self::UserExQuota => 10,
            Self::CannotProvideExternal => 11,
            Self::AddressMismatch => 12,
            Self::ExcessiveRemotePeers => 13,
            Self::Other(code) => code,
        }
    }

    /// The RFC's name (`NO_RESOURCES`), or `UNKNOWN`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Success => "SUCCESS",
            Self::UnsuppVersion => "UNSUPP_VERSION",
            Self::NotAuthorized => "NOT_AUTHORIZED",
            Self::MalformedRequest => "MALFORMED_REQUEST",
            Self::UnsuppOpcode => "UNSUPP_OPCODE",
            Self::UnsuppOption => "UNSUPP_OPTION",
            Self::MalformedOption => "MALFORMED_OPTION",
            Self::NetworkFailure => "NETWORK_FAILURE",
            Self::NoResources => "NO_RESOURCES",
            Self::UnsuppProtocol => "UNSUPP_PROTOCOL",
            Self::UserExQuota => "USER_EX_QUOTA",
            Self::CannotProvideExternal => "CANNOT_PROVIDE_EXTERNAL",
            Self::AddressMismatch => "ADDRESS_MISMATCH",
            Self::ExcessiveRemotePeers => "EXCESSIVE_REMOTE_PEERS",
            Self::Other(_) => "UNKNOWN",
        }
    }
}

impl From<u8> for ResultCode {
    fn from(code: u8) -> Self {
        match code {
            0 => Self::Success,
            1 => Self::UnsuppVersion,
            2 => Self::NotAuthorized,
            3 => Self::MalformedRequest,
            4 => Self::UnsuppOpcode,
            5 => Self::UnsuppOption,
            6 => Self::MalformedOption,
            7 => Self::NetworkFailure,
            8 => Self::NoResources,
            9 => Self::UnsuppProtocol,
            10 => Self::UserExQuota,
            11 => Self::CannotProvideExternal,
            12 => Self::AddressMismatch,
            13 => Self::ExcessiveRemotePeers,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// The request header (RFC 6887 §7.1): version, R bit clear and opcode, reserved, requested
/// lifetime, the client's address.
fn request_header(opcode: Opcode, lifetime_secs: u32, client_ip: IpAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[VERSION, opcode.code(), 0, 0]);
    out.extend_from_slice(&lifetime_secs.to_be_bytes());
    out.extend_from_slice(&ip_to_wire(client_ip));
}

/// An ANNOUNCE request (RFC 6887 §14.1): the header alone, lifetime 0. The answer gives the
/// server's epoch; a NAT-PMP-only gateway answers [`DecodeError::NatPmpOnly`].
///
/// `client_ip` is the address the request leaves from (the server answers ADDRESS_MISMATCH to
/// MAP requests when a NAT between them changed it).
pub fn announce_request(client_ip: IpAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    request_header(Opcode::Announce, 0, client_ip, &mut out);
    out
}

/// What a MAP request asks for (RFC 6887 §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapRequest {
    /// 96 random bits naming the mapping. Send the same nonce to renew and to delete it; a new
    /// nonce for an existing mapping is refused (NOT_AUTHORIZED) by a strict server.
    pub nonce: [u8; 12],
    /// UDP or TCP.
    pub protocol: Protocol,
    /// The client's port.
    pub internal_port: u16,
    /// The external port wanted, 0 for any. To renew, the port the server assigned.
    pub suggested_external_port: u16,
    /// The external address wanted. `None` sends the all-zeros address of `client_ip`'s family
    /// (`::ffff:0.0.0.0` for IPv4, `::` for IPv6), which lets the server choose; an IPv6 client
    /// behind NAT64 that wants an IPv4 mapping passes `Some(0.0.0.0)`.
    pub suggested_external_ip: Option<IpAddr>,
    /// The lifetime wanted, in seconds; the server may grant less or more. 0 deletes the
    /// mapping.
    pub lifetime_secs: u32,
    /// The address the request leaves from.
    pub client_ip: IpAddr,
    /// Add PREFER_FAILURE: CANNOT_PROVIDE_EXTERNAL rather than another port or address. Only
    /// meaningful with a suggested port (miniupnpd answers MALFORMED_OPTION when the port is 0
    /// and the address the wildcard).
    pub prefer_failure: bool,
}

/// A MAP request (RFC 6887 §11.1): 60 bytes, 64 with PREFER_FAILURE.
pub fn map_request(req: &MapRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + MAP_BODY_LEN + 4);
    request_header(Opcode::Map, req.lifetime_secs, req.client_ip, &mut out);
    out.extend_from_slice(&req.nonce);
    out.extend_from_slice(&[req.protocol.iana_number(), 0, 0, 0]);
    out.extend_from_slice(&req.internal_port.to_be_bytes());
    out.extend_from_slice(&req.suggested_external_port.to_be_bytes());
    let wildcard = match req.client_ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    out.extend_from_slice(&ip_to_wire(req.suggested_external_ip.unwrap_or(wildcard)));
    if req.prefer_failure {
        out.extend_from_slice(&[OPTION_PREFER_FAILURE, 0, 0, 0]);
    }
    out
}

/// The body of a MAP or PEER response (RFC 6887 §11.1, §12.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Mapping {
    /// The request's nonce, echoed.
    #[serde(serialize_with = "hex")]
    pub nonce: [u8; 12],
    /// The request's protocol, echoed.
    pub protocol: Protocol,
    /// The request's internal port, echoed.
    pub internal_port: u16,
    /// The assigned external port (in an error response: whatever the server copied back).
    pub external_port: u16,
    /// The assigned external address (IPv4-mapped addresses come back as IPv4).
    pub external_ip: IpAddr,
    /// PEER only: the remote peer's address and port.
    pub remote_peer: Option<SocketAddr>,
}

impl Mapping {
    /// The assigned external endpoint.
    pub const fn external_addr(&self) -> SocketAddr {
        SocketAddr::new(self.external_ip, self.external_port)
    }

    /// Whether this answers `req` (RFC 6887 §11.4: same nonce, protocol and internal port).
    /// Check the source address too: only the server's answers count.
    pub fn answers(&self, req: &MapRequest) -> bool {
        self.nonce == req.nonce
            && self.protocol == req.protocol
            && self.internal_port == req.internal_port
    }
}

/// An option of a response, undecoded (RFC 6887 §7.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PcpOption {
    /// The option code (128 and up: optional to process).
    pub code: u8,
    /// The data, without padding.
    #[serde(serialize_with = "hex")]
    pub data: Vec<u8>,
}

/// A decoded PCP response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Response {
    /// The opcode answered.
    pub opcode: Opcode,
    /// The result.
    pub result: ResultCode,
    /// On success, the lifetime granted in seconds; on error, how long the error holds.
    pub lifetime_secs: u32,
    /// The server's epoch time, for [`crate::EpochTracker::observe`].
    pub epoch: u32,
    /// The MAP or PEER body: `None` for ANNOUNCE, and for an error response without one.
    pub mapping: Option<Mapping>,
    /// The options after the body, in order.
    pub options: Vec<PcpOption>,
}

impl Response {
    /// Whether the result is SUCCESS.
    pub fn is_success(&self) -> bool {
        self.result == ResultCode::Success
    }
}

/// Decodes a PCP response from a datagram (the checks are listed in the module documentation).
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let len = bytes.len();
    let truncated = |needed| DecodeError::Truncated { len, needed };
    match bytes.first() {
        None => return Err(truncated(HEADER_LEN)),
        Some(&pmp::VERSION) => return Err(nat_pmp_answer(bytes)),
        Some(&VERSION) => {}
        Some(&version) => return Err(DecodeError::WrongVersion { version }),
    }
    if len > MAX_MESSAGE_LEN {
        return Err(DecodeError::Oversized { len });
    }
    if len < HEADER_LEN {
        return Err(truncated(HEADER_LEN));
    }
    if !len.is_multiple_of(4) {
        return Err(DecodeError::Unaligned { len });
    }
    let mut r = Reader::new(bytes);
    // The header reads cannot fail: the length was checked.
    let [_version, r_opcode, _reserved, result] = r.array().ok_or(truncated(HEADER_LEN))?;
    if r_opcode & RESPONSE_BIT == 0 {
        return Err(DecodeError::NotAResponse { opcode: r_opcode });
    }
    let code = r_opcode & !RESPONSE_BIT;
    let opcode = Opcode::from_code(code).ok_or(DecodeError::UnknownOpcode { opcode: code })?;
    let result = ResultCode::from(result);
    let (Some(lifetime_secs), Some(epoch), Some(_reserved)) = (r.u32(), r.u32(), r.array::<12>())
    else {
        return Err(truncated(HEADER_LEN));
    };

    let body_len = opcode.body_len();
    let mapping = if body_len == 0 || (r.remaining() == 0 && result != ResultCode::Success) {
        None
    } else {
        Some(decode_mapping(
            &mut r,
            opcode,
            truncated(HEADER_LEN + body_len),
        )?)
    };
    let options = decode_options(&mut r)?;
    Ok(Response {
        opcode,
        result,
        lifetime_secs,
        epoch,
        mapping,
        options,
    })
}

/// What a version-0 datagram given to the PCP decoder means: a NAT-PMP gateway's "unsupported
/// version" (RFC 6886 §3.5: version 0, result 1, SSSoE; its diagram shows opcode 0, miniupnpd
/// sends 128 plus the request's opcode byte, so the opcode is not checked), or nothing PCP.
fn nat_pmp_answer(bytes: &[u8]) -> DecodeError {
    let mut r = Reader::new(bytes);
    match (r.u8(), r.u8(), r.u16(), r.u32()) {
        (Some(pmp::VERSION), Some(_opcode), Some(1), Some(epoch)) => {
            DecodeError::NatPmpOnly { epoch }
        }
        _ => DecodeError::WrongVersion {
            version: pmp::VERSION,
        },
    }
}

/// A MAP or PEER body; `truncated` when the message ends first.
fn decode_mapping(
    r: &mut Reader<'_>,
    opcode: Opcode,
    truncated: DecodeError,
) -> Result<Mapping, DecodeError> {
    let nonce = r.array::<12>().ok_or(truncated.clone())?;
    let [protocol, _, _, _] = r.array::<4>().ok_or(truncated.clone())?;
    let (Some(internal_port), Some(external_port), Some(external_ip)) = (r.u16(), r.u16(), r.ip())
    else {
        return Err(truncated);
    };
    let remote_peer = match opcode {
        Opcode::Peer => {
            let (Some(port), Some(_reserved), Some(ip)) = (r.u16(), r.u16(), r.ip()) else {
                return Err(truncated);
            };
            Some(SocketAddr::new(ip, port))
        }
        Opcode::Map | Opcode::Announce => None,
    };
    let protocol =
        Protocol::from_iana_number(protocol).ok_or(DecodeError::UnknownProtocol { protocol })?;
    Ok(Mapping {
        nonce,
        protocol,
        internal_port,
        external_port,
        external_ip,
        remote_peer,
    })
}

/// The options after the body, until the end of the message.
fn decode_options(r: &mut Reader<'_>) -> Result<Vec<PcpOption>, DecodeError> {
    let mut options = Vec::new();
    while r.remaining() > 0 {
        let offset = r.offset();
        let malformed = DecodeError::MalformedOption { offset };
        let [code, _reserved, l0, l1] = r.array().ok_or(malformed.clone())?;
        let data_len = usize::from(u16::from_be_bytes([l0, l1]));
        // At most 65535 + 3: no overflow, and padding never underflows.
        let padding = data_len.next_multiple_of(4) - data_len;
        let data = r.slice(data_len).ok_or(malformed.clone())?;
        r.slice(padding).ok_or(malformed)?;
        options.push(PcpOption {
            code,
            data: data.to_vec(),
        });
    }
    Ok(options)
}

/// Serialises bytes as lowercase hex (nonces, option data).
fn hex<S: serde::Serializer>(bytes: &impl AsRef<[u8]>, serializer: S) -> Result<S::Ok, S::Error> {
    let bytes = bytes.as_ref();
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(text, "{b:02x}");
    }
    serializer.serialize_str(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 50, 2));

    fn udp_6000() -> MapRequest {
        MapRequest {
            nonce: NONCE,
            protocol: Protocol::Udp,
            internal_port: 6000,
            suggested_external_port: 26000,
            suggested_external_ip: None,
            lifetime_secs: 600,
            client_ip: CLIENT,
            prefer_failure: false,
        }
    }

    /// The header of a success response: R | opcode, lifetime 600, epoch 316.
    fn response_header(opcode: u8, result: u8) -> Vec<u8> {
        let mut b = vec![2, 0x80 | opcode, 0, result];
        b.extend_from_slice(&[0, 0, 0x02, 0x58]); // lifetime 600
        b.extend_from_slice(&[0, 0, 0x01, 0x3c]); // epoch 316
        b.extend_from_slice(&[0; 12]);
        b
    }

    /// The MAP body answering [`udp_6000`]: 26000 on 11.22.33.1.
    const MAP_BODY: [u8; 36] = [
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, // nonce
        17, 0, 0, 0, // UDP, reserved
        0x17, 0x70, 0x65, 0x90, // internal 6000, assigned external 26000
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 11, 22, 33, 1, // ::ffff:11.22.33.1
    ];

    /// A MAP success without options (60 bytes).
    fn map_response() -> Vec<u8> {
        let mut b = response_header(1, 0);
        b.extend_from_slice(&MAP_BODY);
        b
    }

    /// A MAP success with PREFER_FAILURE echoed and an unknown optional option (code 0x80,
    /// 5 bytes of data, 3 of padding): 76 bytes.
    fn map_response_with_options() -> Vec<u8> {
        let mut b = map_response();
        b.extend_from_slice(&[2, 0, 0, 0]);
        b.extend_from_slice(&[0x80, 0, 0, 5, 0xa, 0xb, 0xc, 0xd, 0xe, 0, 0, 0]);
        b
    }

    #[test]
    fn announce_request_has_the_rfc_layout() {
        assert_eq!(
            announce_request(CLIENT),
            [
                2, 0, 0, 0, // version, ANNOUNCE, reserved
                0, 0, 0, 0, // lifetime 0
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 50, 2, // client
            ]
        );
    }

    #[test]
    fn map_request_has_the_rfc_layout() {
        let expected = [
            2, 1, 0, 0, // version, MAP, reserved
            0, 0, 0x02, 0x58, // lifetime 600
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 50, 2, // client
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, // nonce
            17, 0, 0, 0, // UDP, reserved
            0x17, 0x70, 0x65, 0x90, // internal 6000, suggested 26000
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, // ::ffff:0.0.0.0
        ];
        assert_eq!(map_request(&udp_6000()), expected);

        let mut with = udp_6000();
        with.prefer_failure = true;
        with.suggested_external_ip = Some(IpAddr::V4(Ipv4Addr::new(11, 22, 33, 1)));
        let bytes = map_request(&with);
        assert_eq!(bytes.len(), 64);
        assert_eq!(bytes[56..], [11, 22, 33, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn ipv6_clients_get_the_ipv6_wildcard() {
        let mut req = udp_6000();
        req.protocol = Protocol::Tcp;
        req.lifetime_secs = 0;
        req.client_ip = "2001:db8::2".parse().expect("address");
        let bytes = map_request(&req);
        assert_eq!(bytes[4..8], [0, 0, 0, 0], "lifetime 0 deletes");
        assert_eq!(
            bytes[8..24],
            "2001:db8::2".parse::<Ipv6Addr>().expect("v6").octets()
        );
        assert_eq!(bytes[36], 6, "TCP");
        assert_eq!(bytes[44..60], [0; 16], "::");
    }

    #[test]
    fn map_response_decodes() {
        let response = decode_response(&map_response()).expect("decodes");
        let mapping = Mapping {
            nonce: NONCE,
            protocol: Protocol::Udp,
            internal_port: 6000,
            external_port: 26000,
            external_ip: IpAddr::V4(Ipv4Addr::new(11, 22, 33, 1)),
            remote_peer: None,
        };
        assert_eq!(
            response,
            Response {
                opcode: Opcode::Map,
                result: ResultCode::Success,
                lifetime_secs: 600,
                epoch: 316,
                mapping: Some(mapping),
                options: vec![],
            }
        );
        assert!(response.is_success());
        assert!(mapping.answers(&udp_6000()));
        assert_eq!(
            mapping.external_addr(),
            "11.22.33.1:26000".parse().expect("addr")
        );
        let mut other = udp_6000();
        other.nonce[0] = 0xff;
        assert!(!mapping.answers(&other));
    }

    #[test]
    fn options_are_skipped_and_kept() {
        let response = decode_response(&map_response_with_options()).expect("decodes");
        assert_eq!(
            response.options,
            [
                PcpOption {
                    code: OPTION_PREFER_FAILURE,
                    data: vec![]
                },
                PcpOption {
                    code: 0x80,
                    data: vec![0xa, 0xb, 0xc, 0xd, 0xe]
                },
            ]
        );
        assert_eq!(response.mapping.map(|m| m.external_port), Some(26000));
    }

    #[test]
    fn malformed_options_are_rejected() {
        // Length 100, but 4 bytes of data follow.
        let mut b = map_response();
        b.extend_from_slice(&[0x80, 0, 0, 100, 1, 2, 3, 4]);
        assert_eq!(
            decode_response(&b),
            Err(DecodeError::MalformedOption { offset: 60 })
        );
        // Length 5, one byte short. (Data that fits always has room for its padding: the
        // message length and every option start are multiples of 4.)
        let mut b = map_response_with_options();
        b.extend_from_slice(&[0x80, 0, 0, 5, 1, 2, 3, 4]);
        assert_eq!(
            decode_response(&b),
            Err(DecodeError::MalformedOption { offset: 76 })
        );
    }

    #[test]
    fn announce_response_decodes() {
        assert_eq!(
            decode_response(&response_header(0, 0)),
            Ok(Response {
                opcode: Opcode::Announce,
                result: ResultCode::Success,
                lifetime_secs: 600,
                epoch: 316,
                mapping: None,
                options: vec![],
            })
        );
    }

    #[test]
    fn peer_response_decodes() {
        let mut b = response_header(2, 0);
        b.extend_from_slice(&MAP_BODY);
        b.extend_from_slice(&[0x0d, 0x96, 0, 0]); // remote port 3478, reserved
        b.extend_from_slice(&"2001:db8::99".parse::<Ipv6Addr>().expect("v6").octets());
        assert_eq!(b.len(), HEADER_LEN + PEER_BODY_LEN);
        let response = decode_response(&b).expect("decodes");
        assert_eq!(response.opcode, Opcode::Peer);
        assert_eq!(
            response.mapping.and_then(|m| m.remote_peer),
            Some("[2001:db8::99]:3478".parse().expect("addr"))
        );
    }

    #[test]
    fn error_responses_decode_with_or_without_a_body() {
        // miniupnpd echoes the request: a whole body with NOT_AUTHORIZED.
        let mut echoed = response_header(1, 2);
        echoed.extend_from_slice(&MAP_BODY);
        let response = decode_response(&echoed).expect("decodes");
        assert_eq!(response.result, ResultCode::NotAuthorized);
        assert_eq!(response.mapping.map(|m| m.nonce), Some(NONCE));
        // A header alone is fine for an error...
        let response = decode_response(&response_header(1, 3)).expect("decodes");
        assert_eq!(response.result, ResultCode::MalformedRequest);
        assert_eq!(response.mapping, None);
        // ...but not for a success.
        assert_eq!(
            decode_response(&response_header(1, 0)),
            Err(DecodeError::Truncated {
                len: 24,
                needed: 60
            })
        );
        // Part of a body is truncated whatever the result.
        let mut part = response_header(1, 3);
        part.extend_from_slice(&MAP_BODY[..12]);
        assert_eq!(
            decode_response(&part),
            Err(DecodeError::Truncated {
                len: 36,
                needed: 60
            })
        );
    }

    #[test]
    fn unsupported_version_from_either_kind_of_server() {
        // A NAT-PMP-only gateway: 8 bytes, opcode 128 + 1 (miniupnpd) or 0 (RFC 6886's diagram).
        for opcode in [129, 0] {
            assert_eq!(
                decode_response(&[0, opcode, 0, 1, 0, 0, 0x01, 0x05]),
                Err(DecodeError::NatPmpOnly { epoch: 261 })
            );
        }
        // Other NAT-PMP messages are just the wrong version.
        assert_eq!(
            decode_response(&[0, 128, 0, 0, 0, 0, 0, 5, 11, 22, 33, 5]),
            Err(DecodeError::WrongVersion { version: 0 })
        );
        assert_eq!(
            decode_response(&[0, 129, 0, 1]),
            Err(DecodeError::WrongVersion { version: 0 })
        );
        // A PCP server: an ordinary response.
        let mut echoed = response_header(1, 1);
        echoed.extend_from_slice(&MAP_BODY);
        assert_eq!(
            decode_response(&echoed).map(|r| r.result),
            Ok(ResultCode::UnsuppVersion)
        );
        // A server of the version-1 drafts.
        let mut v1 = response_header(1, 1);
        v1[0] = 1;
        assert_eq!(
            decode_response(&v1),
            Err(DecodeError::WrongVersion { version: 1 })
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let whole = map_response();
        for len in 0..whole.len() {
            assert!(decode_response(&whole[..len]).is_err(), "{len}");
        }
        // With options, only the cuts between options are whole messages.
        let whole = map_response_with_options();
        for len in 0..whole.len() {
            let decoded = decode_response(&whole[..len]);
            assert_eq!(
                decoded.is_ok(),
                len == 60 || len == 64,
                "{len}: {decoded:?}"
            );
        }
        let announce = response_header(0, 0);
        for len in 0..announce.len() {
            assert!(decode_response(&announce[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn header_problems_are_named() {
        assert_eq!(
            decode_response(&[]),
            Err(DecodeError::Truncated { len: 0, needed: 24 })
        );
        assert_eq!(
            decode_response(&map_request(&udp_6000())),
            Err(DecodeError::NotAResponse { opcode: 1 })
        );
        let mut odd = map_response();
        odd.push(0);
        assert_eq!(
            decode_response(&odd),
            Err(DecodeError::Unaligned { len: 61 })
        );
        let mut big = map_response();
        big.resize(MAX_MESSAGE_LEN + 4, 0);
        assert_eq!(
            decode_response(&big),
            Err(DecodeError::Oversized { len: 1104 })
        );
        let mut opcode3 = response_header(3, 0);
        opcode3.extend_from_slice(&MAP_BODY);
        assert_eq!(
            decode_response(&opcode3),
            Err(DecodeError::UnknownOpcode { opcode: 3 })
        );
        let mut sctp = map_response();
        sctp[HEADER_LEN + 12] = 132;
        assert_eq!(
            decode_response(&sctp),
            Err(DecodeError::UnknownProtocol { protocol: 132 })
        );
    }

    #[test]
    fn the_largest_message_decodes() {
        let mut b = map_response();
        let data_len = MAX_MESSAGE_LEN - b.len() - 4;
        b.extend_from_slice(&[0x81, 0]);
        b.extend_from_slice(&u16::try_from(data_len).expect("fits").to_be_bytes());
        b.resize(MAX_MESSAGE_LEN, 7);
        let response = decode_response(&b).expect("decodes");
        assert_eq!(response.options.len(), 1);
        assert_eq!(response.options[0].data.len(), 1036);
    }

    #[test]
    fn result_codes_round_trip() {
        for code in 0..=u8::MAX {
            assert_eq!(ResultCode::from(code).code(), code);
        }
        assert_eq!(ResultCode::from(13), ResultCode::ExcessiveRemotePeers);
        assert_eq!(ResultCode::from(14), ResultCode::Other(14));
        assert_eq!(ResultCode::NoResources.to_string(), "NO_RESOURCES (8)");
        for code in 0..=3 {
            assert_eq!(
                Opcode::from_code(code).map(Opcode::code),
                (code < 3).then_some(code)
            );
        }
    }

    #[test]
    fn bit_flips_never_panic() {
        let bytes = map_response_with_options();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let _ = decode_response(&b);
            }
        }
    }

    #[test]
    fn responses_serialise_for_the_cli() {
        let response = decode_response(&map_response_with_options()).expect("decodes");
        assert_eq!(
            serde_json::to_value(response).expect("serialises"),
            serde_json::json!({
                "opcode": "map",
                "result": "success",
                "lifetime_secs": 600,
                "epoch": 316,
                "mapping": {
                    "nonce": "0102030405060708090a0b0c",
                    "protocol": "udp",
                    "internal_port": 6000,
                    "external_port": 26000,
                    "external_ip": "11.22.33.1",
                    "remote_peer": null,
                },
                "options": [
                    {"code": 2, "data": ""},
                    {"code": 128, "data": "0a0b0c0d0e"},
                ],
            })
        );
    }
}
