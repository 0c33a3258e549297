//! STUN messages on the wire (RFC 8489 §5), with the RFC 5780 attributes, on top of the
//! `stun_codec` crate.
//!
//! Untrusted bytes go through [`decode`], which checks the fixed header itself (length, the two
//! zero bits, the magic cookie, 4-byte alignment, a size limit) before handing the message to the
//! codec, and maps every failure to a [`DecodeError`]; it never panics.

use std::net::SocketAddr;

use bytecodec::{DecodeExt as _, EncodeExt as _};
use stun_codec::rfc5389::attributes::{
    ErrorCode, Fingerprint, MappedAddress, MessageIntegrity, Software, UnknownAttributes, Username,
    XorMappedAddress,
};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::rfc5780::attributes::{OtherAddress, ResponseOrigin};
use stun_codec::{MessageClass, MessageDecoder, MessageEncoder, TransactionId};

use crate::attrs::{ChangeRequest, ResponsePort};

/// The magic cookie of RFC 5389/8489 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 20;
/// Largest message natpunch accepts: a Binding request is tiny, and anything bigger than the
/// IPv6 minimum MTU is not a message a STUN client sends over UDP.
pub const MAX_MESSAGE_LEN: usize = 1280;

stun_codec::define_attribute_enums!(
    Attribute,
    AttributeDecoder,
    AttributeEncoder,
    [
        MappedAddress,
        XorMappedAddress,
        Username,
        MessageIntegrity,
        ErrorCode,
        UnknownAttributes,
        Software,
        Fingerprint,
        ChangeRequest,
        ResponseOrigin,
        ResponsePort,
        OtherAddress
    ]
);

/// A decoded STUN message.
pub type Message = stun_codec::Message<Attribute>;

/// Why bytes are not a usable STUN message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not STUN at all (first two bits set, or no magic cookie).
    #[error("not a STUN message")]
    NotStun,
    /// Shorter than the header, or shorter than the header's length field says.
    #[error("truncated STUN message: {len} bytes")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// Larger than [`MAX_MESSAGE_LEN`].
    #[error("oversized STUN message: {len} bytes")]
    Oversized {
        /// Bytes received.
        len: usize,
    },
    /// The header is fine but the body is not (bad attribute, bad fingerprint, trailing bytes).
    #[error("malformed STUN message: {0}")]
    Malformed(String),
}

/// Whether `bytes` start like a STUN message (RFC 7983 demultiplexing plus the magic cookie).
pub fn looks_like_stun(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[0] < 4 && bytes[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// Decodes one STUN message from a datagram.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::Oversized { len: bytes.len() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(if bytes.is_empty() || bytes[0] < 4 {
            DecodeError::Truncated { len: bytes.len() }
        } else {
            DecodeError::NotStun
        });
    }
    if !looks_like_stun(bytes) {
        return Err(DecodeError::NotStun);
    }
    let body_len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if body_len % 4 != 0 {
        return Err(DecodeError::Malformed(format!(
            "length {body_len} is not a multiple of 4"
        )));
    }
    match (HEADER_LEN + body_len).cmp(&bytes.len()) {
        std::cmp::Ordering::Greater => return Err(DecodeError::Truncated { len: bytes.len() }),
        std::cmp::Ordering::Less => {
            return Err(DecodeError::Malformed(format!(
                "{} bytes after the message",
                bytes.len() - HEADER_LEN - body_len
            )));
        }
        std::cmp::Ordering::Equal => {}
    }
    let mut decoder = MessageDecoder::<Attribute>::new();
    match decoder.decode_from_bytes(bytes) {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(broken)) => Err(DecodeError::Malformed(broken.error().to_string())),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

/// Encodes `message`, appending a FINGERPRINT attribute when `fingerprint` is set.
///
/// The fingerprint is computed over the encoded bytes here: stun_codec's `Fingerprint::new`
/// encodes the whole message a second time to get them, which doubled a server's encode work.
pub fn encode(message: Message, fingerprint: bool) -> Vec<u8> {
    // Encoding a message built from valid attribute values cannot fail; an empty datagram is
    // what a caller would send if it did, and receivers drop it as truncated.
    let Ok(mut bytes) = MessageEncoder::<Attribute>::new().encode_into_bytes(message) else {
        return Vec::new();
    };
    if fingerprint && bytes.len() >= HEADER_LEN {
        append_fingerprint(&mut bytes);
    }
    bytes
}

/// FINGERPRINT's attribute type (RFC 8489 §14.7).
const FINGERPRINT: u16 = 0x8028;
/// What the CRC-32 is XORed with (RFC 8489 §14.7): "STUN" in ASCII.
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// Appends FINGERPRINT to an encoded message: the header's length first counts the attribute,
/// then the CRC-32 of everything before it is taken.
fn append_fingerprint(bytes: &mut Vec<u8>) {
    const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    let length = (bytes.len() - HEADER_LEN + 8) as u16;
    bytes[2..4].copy_from_slice(&length.to_be_bytes());
    let value = CRC32.checksum(bytes) ^ FINGERPRINT_XOR;
    bytes.extend_from_slice(&FINGERPRINT.to_be_bytes());
    bytes.extend_from_slice(&4u16.to_be_bytes());
    bytes.extend_from_slice(&value.to_be_bytes());
}

/// A Binding request, optionally with CHANGE-REQUEST flags and a RESPONSE-PORT.
pub fn binding_request(
    id: [u8; 12],
    change: Option<(bool, bool)>,
    response_port: Option<u16>,
) -> Vec<u8> {
    let mut m = Message::new(MessageClass::Request, BINDING, TransactionId::new(id));
    if let Some((ip, port)) = change {
        m.add_attribute(ChangeRequest { ip, port });
    }
    if let Some(port) = response_port {
        m.add_attribute(ResponsePort(port));
    }
    encode(m, true)
}

/// What a Binding success response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingResponse {
    /// Transaction ID (matches the request's).
    pub transaction_id: [u8; 12],
    /// The client's reflexive address (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS).
    pub mapped: SocketAddr,
    /// RESPONSE-ORIGIN: where the response was sent from.
    pub response_origin: Option<SocketAddr>,
    /// OTHER-ADDRESS: the server's alternate address (RFC 5780 support).
    pub other_address: Option<SocketAddr>,
}

/// Why a datagram is not a usable Binding response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// Not a STUN message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A STUN message, but not a Binding response.
    #[error("not a Binding response")]
    NotBindingResponse,
    /// A Binding error response.
    #[error("Binding error {code}: {reason}")]
    Error {
        /// The error code.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
    /// A success response without a mapped address.
    #[error("Binding response without a mapped address")]
    NoMappedAddress,
}

/// Parses a Binding success response.
pub fn parse_binding_response(bytes: &[u8]) -> Result<BindingResponse, ResponseError> {
    let m = decode(bytes)?;
    if m.method() != BINDING {
        return Err(ResponseError::NotBindingResponse);
    }
    match m.class() {
        MessageClass::SuccessResponse => {}
        MessageClass::ErrorResponse => {
            let (code, reason) = m
                .get_attribute::<ErrorCode>()
                .map_or((0, String::new()), |e| {
                    (e.code(), e.reason_phrase().to_owned())
                });
            return Err(ResponseError::Error { code, reason });
        }
        _ => return Err(ResponseError::NotBindingResponse),
    }
    let mapped = m
        .get_attribute::<XorMappedAddress>()
        .map(XorMappedAddress::address)
        .or_else(|| {
            m.get_attribute::<MappedAddress>()
                .map(MappedAddress::address)
        })
        .ok_or(ResponseError::NoMappedAddress)?;
    Ok(BindingResponse {
        transaction_id: *m.transaction_id().as_bytes(),
        mapped,
        response_origin: m
            .get_attribute::<ResponseOrigin>()
            .map(ResponseOrigin::address),
        other_address: m.get_attribute::<OtherAddress>().map(OtherAddress::address),
    })
}

/// If `bytes` are a Binding request, its transaction ID (used to see one's own hairpinned
/// request come back).
pub fn binding_request_id(bytes: &[u8]) -> Option<[u8; 12]> {
    let m = decode(bytes).ok()?;
    (m.class() == MessageClass::Request && m.method() == BINDING)
        .then(|| *m.transaction_id().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_request_round_trips_with_rfc_5780_attributes() {
        let bytes = binding_request([7; 12], Some((true, false)), Some(40000));
        let m = decode(&bytes).expect("decodes");
        assert_eq!(m.class(), MessageClass::Request);
        assert_eq!(
            m.get_attribute::<ChangeRequest>(),
            Some(&ChangeRequest {
                ip: true,
                port: false
            })
        );
        assert_eq!(
            m.get_attribute::<ResponsePort>(),
            Some(&ResponsePort(40000))
        );
        assert!(m.get_attribute::<Fingerprint>().is_some());
        assert_eq!(binding_request_id(&bytes), Some([7; 12]));
    }

    #[test]
    fn our_fingerprint_equals_stun_codecs() {
        let message = || {
            let mut m = Message::new(
                MessageClass::SuccessResponse,
                BINDING,
                TransactionId::new([9; 12]),
            );
            m.add_attribute(Software::new("natpunch test".to_owned()).expect("software"));
            m.add_attribute(ResponsePort(3479));
            m
        };
        let mut theirs = message();
        theirs.add_attribute(Fingerprint::new(&theirs).expect("fingerprint"));
        let theirs = MessageEncoder::<Attribute>::new()
            .encode_into_bytes(theirs)
            .expect("encodes");
        assert_eq!(encode(message(), true), theirs);
        assert_eq!(encode(message(), false).len() + 8, theirs.len());
    }

    #[test]
    fn header_problems_are_named() {
        assert_eq!(decode(&[]).err(), Some(DecodeError::Truncated { len: 0 }));
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\nHost: x\r\n").err(),
            Some(DecodeError::NotStun)
        );
        assert_eq!(
            decode(&[0u8; 4000]).err(),
            Some(DecodeError::Oversized { len: 4000 })
        );
        let mut bytes = binding_request([1; 12], None, None);
        bytes[4] ^= 1;
        assert_eq!(
            decode(&bytes).err(),
            Some(DecodeError::NotStun),
            "bad cookie"
        );
        let bytes = binding_request([1; 12], None, None);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 4]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(matches!(decode(&longer), Err(DecodeError::Malformed(_))));
        let mut bad_fp = bytes;
        let last = bad_fp.len() - 1;
        bad_fp[last] ^= 0xff;
        assert!(
            matches!(decode(&bad_fp), Err(DecodeError::Malformed(_))),
            "bad fingerprint"
        );
    }

    #[test]
    fn truncations_and_bit_flips_never_panic() {
        let bytes = binding_request([9; 12], Some((true, true)), Some(1234));
        for len in 0..=bytes.len() {
            let _ = decode(&bytes[..len]);
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let _ = decode(&b);
                let _ = parse_binding_response(&b);
            }
        }
    }
}
