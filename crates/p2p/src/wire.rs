//! The DCUtR wire messages (`/libp2p/dcutr`), encoded and decoded without any I/O.
//!
//! # Framing
//!
//! On a DCUtR stream every message is one frame: an unsigned varint (LEB128, least significant
//! group first, the high bit of each byte saying "more follows") holding the byte length of
//! the body, then the body itself, a protobuf (proto2) message:
//!
//! ```text
//! message HolePunch {
//!   enum Type { CONNECT = 100; SYNC = 300; }
//!   required Type type = 1;        // tag 0x08: field 1, wire type 0 (varint)
//!   repeated bytes ObsAddrs = 2;   // tag 0x12: field 2, wire type 2 (length-delimited)
//! }
//! ```
//!
//! The observed addresses are binary multiaddrs; this module carries them as opaque bytes.
//!
//! natpunch adds two fields that other implementations skip as unknown (proto2 parsers skip
//! unknown fields):
//!
//! ```text
//!   optional bool reversed = 1000;      // tag 0xc0 0x3e: who dials in this attempt
//!   optional MappingClass mapping = 1001; // tag 0xc8 0x3e: the sender's NAT mapping class
//!   enum MappingClass { NONE = 1; ENDPOINT_INDEPENDENT = 2; ADDRESS_DEPENDENT = 3;
//!                       ADDRESS_AND_PORT_DEPENDENT = 4; }
//! ```
//!
//! `mapping` is sent only on `/natpunch/dcutr/1.1.0` streams; a value this module does not
//! know (0, 5 and up) decodes as "not said", so a newer peer's class never breaks an older one.
//!
//! Birthday probing over QUIC ([`crate::birthday`]) adds three fields and a message type, all
//! sent only on `/natpunch/dcutr/1.1.0` streams and only to a remote whose CONNECT said
//! `birthday`:
//!
//! ```text
//!   optional bool birthday = 1002; // CONNECT: the sender takes part in birthday probing
//!   optional bytes token = 1003;   // SYNC: this attempt probes, with this 16-byte token
//!   optional uint32 probe = 1004;  // HIT: the easy side's probe that reached the sender
//!   optional uint32 next_port = 1005; // any: the port the sender's NAT gives its next mapping
//!   enum Type { ...; HIT = 1000;   // the hard side's socket heard probe `probe`
//!                    NEXT = 1001; } // `next_port`, learnt after the sender's last message
//! ```
//!
//! `next_port` is port prediction: a NAT that maps per destination but allocates ports in
//! order gives the hard side's sockets the ports from there, so the easy side probes those
//! first. The hard side sends it on its next handshake message (CONNECT or SYNC), or alone in
//! a NEXT message when it learnt it after its last one.
//!
//! A `token` not 16 bytes long, a `probe` beyond 32 bits, or a `next_port` of 0 or beyond 16
//! bits decodes as "not said".
//!
//! # Limits and strictness
//!
//! * A body longer than [`MAX_MESSAGE`] (4096 bytes, the spec's limit) is refused, both when
//!   encoding a frame and when decoding; a frame reader refuses such a frame as soon as its
//!   length prefix is complete, before any of the body arrives.
//! * A varint may be at most 10 bytes long and must fit in 64 bits.
//! * Fields may come in any order; unknown fields of wire types 0 (varint), 1 (fixed64),
//!   2 (length-delimited) and 5 (fixed32) are skipped. Groups (wire types 3 and 4), wire
//!   types 6 and 7, field number 0 and known fields with the wrong wire type are errors.
//! * `type` is required and must be CONNECT or SYNC. As in protobuf, when it appears more
//!   than once the last occurrence counts.
//! * Encoding is canonical (fields in order, minimal varints), so decoding and re-encoding a
//!   message drops unknown fields but otherwise preserves it.
//!
//! Nothing here panics, whatever the input.

use behaviour::Mapping;
use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The largest message body accepted or produced, in bytes (the DCUtR spec's limit).
pub const MAX_MESSAGE: usize = 4096;

/// The longest varint accepted: 10 bytes carry 64 bits.
const MAX_VARINT_LEN: usize = 10;
/// The largest protobuf field number (29 bits).
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;
/// The tag of field 1 (`type`), wire type 0.
const TAG_TYPE: u8 = 1 << 3;
/// natpunch's `reversed` field number (wire type 0).
const FIELD_REVERSED: u64 = 1000;
/// natpunch's `mapping` field number (wire type 0), sent on `/natpunch/dcutr/1.1.0` only.
const FIELD_MAPPING: u64 = 1001;
/// natpunch's `birthday` field number (wire type 0).
const FIELD_BIRTHDAY: u64 = 1002;
/// natpunch's `token` field number (wire type 2).
const FIELD_TOKEN: u64 = 1003;
/// natpunch's `probe` field number (wire type 0).
const FIELD_PROBE: u64 = 1004;
/// natpunch's `next_port` field number (wire type 0).
const FIELD_NEXT_PORT: u64 = 1005;
/// The tag of field 2 (`ObsAddrs`), wire type 2.
const TAG_OBS_ADDRS: u8 = (2 << 3) | 2;
/// The protobuf enum number of CONNECT.
const CONNECT: u64 = 100;
/// The protobuf enum number of SYNC.
const SYNC: u64 = 300;
/// The protobuf enum number of natpunch's HIT.
const HIT: u64 = 1000;
/// The protobuf enum number of natpunch's NEXT.
const NEXT: u64 = 1001;

/// Which DCUtR message this is (the protobuf `HolePunch.Type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `CONNECT` (100): sent by both sides, carrying their observed addresses.
    Connect,
    /// `SYNC` (300): sent by the initiator to start the simultaneous dial.
    Sync,
    /// natpunch's `HIT` (1000): the hard side of birthday probing heard a probe.
    Hit,
    /// natpunch's `NEXT` (1001): the hard side's predicted port, learnt after its last
    /// handshake message.
    Next,
}

impl Kind {
    /// The protobuf enum number.
    const fn number(&self) -> u64 {
        match self {
            Self::Connect => CONNECT,
            Self::Sync => SYNC,
            Self::Hit => HIT,
            Self::Next => NEXT,
        }
    }
}

/// One DCUtR message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolePunch {
    /// CONNECT or SYNC.
    pub kind: Kind,
    /// The observed addresses (`ObsAddrs`), each a binary multiaddr, in wire order.
    pub addrs: Vec<Vec<u8>>,
    /// natpunch's extension (field 1000, a varint, sent only when true): in this attempt the
    /// listener (B) dials as the connection's dialer and the dialer (A) does not dial. Other
    /// implementations skip the field, as proto2 parsers skip unknown fields.
    pub reversed: bool,
    /// natpunch's extension (field 1001, a varint enum, sent only when known): how the
    /// sender's NAT maps (RFC 4787), so that the driver can choose the first attempt's form.
    pub mapping: Option<Mapping>,
    /// natpunch's extension (field 1002, sent only when true): the sender of this CONNECT
    /// takes part in birthday probing over QUIC.
    pub birthday: bool,
    /// natpunch's extension (field 1003): this SYNC's attempt probes, with this token.
    pub token: Option<[u8; 16]>,
    /// natpunch's extension (field 1004): the probe a HIT reports.
    pub probe: Option<u32>,
    /// natpunch's extension (field 1005): the port the sender's NAT is expected to give its
    /// next mapping (port prediction), on any message.
    pub next_port: Option<u16>,
}

impl HolePunch {
    /// A message of `kind` with `addrs` and none of natpunch's extensions.
    pub fn new(kind: Kind, addrs: Vec<Vec<u8>>) -> Self {
        Self {
            kind,
            addrs,
            reversed: false,
            mapping: None,
            birthday: false,
            token: None,
            probe: None,
            next_port: None,
        }
    }
}

/// The wire number of a mapping class (`MappingClass` in the module doc).
fn mapping_number(m: Mapping) -> u64 {
    match m {
        Mapping::None => 1,
        Mapping::EndpointIndependent => 2,
        Mapping::AddressDependent => 3,
        Mapping::AddressAndPortDependent => 4,
    }
}

/// The mapping class of a wire number; `None` for a number this version does not know.
fn mapping_of(number: u64) -> Option<Mapping> {
    match number {
        1 => Some(Mapping::None),
        2 => Some(Mapping::EndpointIndependent),
        3 => Some(Mapping::AddressDependent),
        4 => Some(Mapping::AddressAndPortDependent),
        _ => None,
    }
}

/// Why bytes are not a valid DCUtR message or frame.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The body is (or is declared to be) longer than [`MAX_MESSAGE`].
    #[error("message of {len} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge {
        /// The body's length, as found or declared.
        len: u64,
    },
    /// The input ends inside a varint or a field.
    #[error("message truncated in the middle of a field")]
    Truncated,
    /// A varint is longer than 10 bytes or does not fit in 64 bits.
    #[error("malformed varint: longer than 10 bytes or overflowing 64 bits")]
    BadVarint,
    /// A field uses a wire type this message cannot carry (groups, or the undefined 6 and 7).
    #[error("unsupported protobuf wire type {wire_type} (only 0, 1, 2 and 5 are accepted)")]
    BadWireType {
        /// The wire type (the tag's low three bits).
        wire_type: u8,
    },
    /// A field number is 0 or above protobuf's maximum.
    #[error("invalid protobuf field number {field}")]
    BadFieldNumber {
        /// The field number found.
        field: u64,
    },
    /// A known field (`type` or `ObsAddrs`) is encoded with the wrong wire type.
    #[error("field {field} has wire type {wire_type}, expected {expected}")]
    WrongWireType {
        /// The field number.
        field: u64,
        /// The wire type found.
        wire_type: u8,
        /// The wire type the field requires.
        expected: u8,
    },
    /// The required `type` field is absent.
    #[error("required field `type` is missing")]
    MissingType,
    /// `type` holds a number that is none of CONNECT (100), SYNC (300), HIT (1000) and
    /// NEXT (1001).
    #[error(
        "unknown HolePunch type {0} (expected CONNECT = 100, SYNC = 300, HIT = 1000 or NEXT = 1001)"
    )]
    UnknownType(u64),
}

impl HolePunch {
    /// The protobuf body (no length prefix), canonically encoded. Never fails; the size limit
    /// is enforced by [`HolePunch::to_frame`].
    pub fn encode(&self) -> Vec<u8> {
        let capacity = self
            .addrs
            .iter()
            .map(|a| a.len().saturating_add(1 + MAX_VARINT_LEN))
            .fold(3, usize::saturating_add);
        let mut out = Vec::with_capacity(capacity);
        out.push(TAG_TYPE);
        put_varint(&mut out, self.kind.number());
        for addr in &self.addrs {
            out.push(TAG_OBS_ADDRS);
            put_varint(&mut out, len_u64(addr.len()));
            out.extend_from_slice(addr);
        }
        if self.reversed {
            put_varint(&mut out, FIELD_REVERSED << 3);
            put_varint(&mut out, 1);
        }
        if let Some(m) = self.mapping {
            put_varint(&mut out, FIELD_MAPPING << 3);
            put_varint(&mut out, mapping_number(m));
        }
        if self.birthday {
            put_varint(&mut out, FIELD_BIRTHDAY << 3);
            put_varint(&mut out, 1);
        }
        if let Some(token) = self.token {
            put_varint(&mut out, (FIELD_TOKEN << 3) | 2);
            put_varint(&mut out, len_u64(token.len()));
            out.extend_from_slice(&token);
        }
        if let Some(probe) = self.probe {
            put_varint(&mut out, FIELD_PROBE << 3);
            put_varint(&mut out, u64::from(probe));
        }
        if let Some(port) = self.next_port {
            put_varint(&mut out, FIELD_NEXT_PORT << 3);
            put_varint(&mut out, u64::from(port));
        }
        out
    }

    /// Decodes a protobuf body (no length prefix). See the module documentation for what is
    /// accepted.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        if body.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge {
                len: len_u64(body.len()),
            });
        }
        let mut rest = body;
        let mut kind = None;
        let mut addrs = Vec::new();
        let mut reversed = false;
        let mut mapping = None;
        let mut birthday = false;
        let mut token = None;
        let mut probe = None;
        let mut next_port = None;
        while !rest.is_empty() {
            let (tag, after_tag) = read_varint(rest)?;
            rest = after_tag;
            let field = tag >> 3;
            let wire_type = (tag & 0b111) as u8;
            if !matches!(wire_type, 0 | 1 | 2 | 5) {
                return Err(WireError::BadWireType { wire_type });
            }
            if field == 0 || field > MAX_FIELD_NUMBER {
                return Err(WireError::BadFieldNumber { field });
            }
            match (field, wire_type) {
                (1, 0) => {
                    let (number, after) = read_varint(rest)?;
                    kind = Some(number);
                    rest = after;
                }
                (2, 2) => {
                    let (addr, after) = read_delimited(rest)?;
                    addrs.push(addr.to_vec());
                    rest = after;
                }
                (FIELD_REVERSED, 0) => {
                    let (value, after) = read_varint(rest)?;
                    reversed = value != 0;
                    rest = after;
                }
                (FIELD_MAPPING, 0) => {
                    let (value, after) = read_varint(rest)?;
                    mapping = mapping_of(value);
                    rest = after;
                }
                (FIELD_BIRTHDAY, 0) => {
                    let (value, after) = read_varint(rest)?;
                    birthday = value != 0;
                    rest = after;
                }
                (FIELD_TOKEN, 2) => {
                    let (bytes, after) = read_delimited(rest)?;
                    token = <[u8; 16]>::try_from(bytes).ok();
                    rest = after;
                }
                (FIELD_PROBE, 0) => {
                    let (value, after) = read_varint(rest)?;
                    probe = u32::try_from(value).ok();
                    rest = after;
                }
                (FIELD_NEXT_PORT, 0) => {
                    let (value, after) = read_varint(rest)?;
                    next_port = u16::try_from(value).ok().filter(|p| *p != 0);
                    rest = after;
                }
                (1 | 2, _) => {
                    return Err(WireError::WrongWireType {
                        field,
                        wire_type,
                        expected: if field == 1 { 0 } else { 2 },
                    });
                }
                _ => rest = skip_field(rest, wire_type)?,
            }
        }
        let kind = match kind {
            None => return Err(WireError::MissingType),
            Some(CONNECT) => Kind::Connect,
            Some(SYNC) => Kind::Sync,
            Some(HIT) => Kind::Hit,
            Some(NEXT) => Kind::Next,
            Some(other) => return Err(WireError::UnknownType(other)),
        };
        Ok(Self {
            kind,
            addrs,
            reversed,
            mapping,
            birthday,
            token,
            probe,
            next_port,
        })
    }

    /// The message as a frame: the body's length as a varint, then the body.
    ///
    /// # Errors
    ///
    /// [`WireError::TooLarge`] if the body exceeds [`MAX_MESSAGE`].
    pub fn to_frame(&self) -> Result<Vec<u8>, WireError> {
        let body = self.encode();
        if body.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge {
                len: len_u64(body.len()),
            });
        }
        let mut frame = Vec::with_capacity(body.len().saturating_add(MAX_VARINT_LEN));
        put_varint(&mut frame, len_u64(body.len()));
        frame.extend_from_slice(&body);
        Ok(frame)
    }
}

/// Incremental frame splitter for a byte stream: feed bytes, take complete messages.
///
/// A bad length prefix or a declared length above [`MAX_MESSAGE`] leaves the stream without
/// frame boundaries, so it is fatal: that error is returned from then on and further pushed
/// bytes are dropped. A body that does not decode is not fatal: its frame is consumed and the
/// next call goes on with the following frame.
///
/// The reader never allocates on the strength of a declared length; it holds only the bytes
/// pushed and not yet consumed, plus at most as many already-consumed bytes awaiting
/// compaction.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Pushed bytes; those before `start` are consumed.
    buf: Vec<u8>,
    /// Where the unconsumed bytes begin in `buf`.
    start: usize,
    /// The fatal framing error, once one happened.
    failed: Option<WireError>,
}

impl FrameReader {
    /// A reader with nothing buffered (the same as `FrameReader::default()`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the stream. Dropped once the reader has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// How many pushed bytes are not yet consumed (the start of an incomplete frame).
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }

    /// The next complete message, if any; Err on a bad length prefix or a declared length
    /// above [`MAX_MESSAGE`] (without waiting for the body), or a body that does not decode.
    ///
    /// Call it until it returns `Ok(None)` after every [`FrameReader::push`]: one push may
    /// complete several frames.
    pub fn next_message(&mut self) -> Result<Option<HolePunch>, WireError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let (len, body_and_more) = match read_varint(pending) {
            Ok(prefix) => prefix,
            Err(WireError::Truncated) => return Ok(None),
            Err(error) => return Err(self.fail(error)),
        };
        let len = match frame_len(len) {
            Ok(len) => len,
            Err(error) => return Err(self.fail(error)),
        };
        let Some(body) = body_and_more.get(..len) else {
            return Ok(None);
        };
        let result = HolePunch::decode(body);
        // `body_and_more` is a suffix of `pending` at least `len` long: no overflow.
        let prefix_len = pending.len().saturating_sub(body_and_more.len());
        self.consume(prefix_len.saturating_add(len));
        result.map(Some)
    }

    /// Marks `n` more bytes consumed, compacting the buffer once the consumed part is at
    /// least half of it.
    fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Records a fatal framing error and releases the buffer.
    fn fail(&mut self, error: WireError) -> WireError {
        self.failed = Some(error.clone());
        self.buf = Vec::new();
        self.start = 0;
        error
    }
}

/// Writes `m` as one frame and flushes.
///
/// # Errors
///
/// The writer's errors; [`std::io::ErrorKind::InvalidInput`] if the message exceeds
/// [`MAX_MESSAGE`] (nothing is written then).
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, m: &HolePunch) -> std::io::Result<()> {
    let frame = m
        .to_frame()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame).await?;
    w.flush().await
}

/// Reads exactly one frame: the length prefix byte by byte, then the body. Never reads past
/// the frame, so the stream can be handed on afterwards.
///
/// # Errors
///
/// The reader's errors; [`std::io::ErrorKind::UnexpectedEof`] if the stream ends before a
/// full frame; [`std::io::ErrorKind::InvalidData`] (carrying the [`WireError`]) for a bad
/// prefix, a declared length above [`MAX_MESSAGE`] (refused before reading the body), or a
/// body that does not decode.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<HolePunch> {
    let invalid = |e: WireError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut prefix = Vec::with_capacity(MAX_VARINT_LEN);
    let len = loop {
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte).await?;
        let [byte] = byte;
        prefix.push(byte);
        match read_varint(&prefix) {
            Ok((len, _)) => break len,
            Err(WireError::Truncated) => {}
            Err(error) => return Err(invalid(error)),
        }
    };
    let len = frame_len(len).map_err(invalid)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    HolePunch::decode(&body).map_err(invalid)
}

/// A declared frame length, checked against [`MAX_MESSAGE`].
fn frame_len(len: u64) -> Result<usize, WireError> {
    match usize::try_from(len) {
        Ok(n) if n <= MAX_MESSAGE => Ok(n),
        _ => Err(WireError::TooLarge { len }),
    }
}

/// A length as `u64` (lossless on every supported platform; saturates otherwise).
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Appends `value` as a minimal varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a varint from the start of `buf`: its value and the bytes after it.
///
/// [`WireError::Truncated`] if `buf` ends before the varint does (more bytes could complete
/// it); [`WireError::BadVarint`] if it runs past 10 bytes or overflows 64 bits.
fn read_varint(buf: &[u8]) -> Result<(u64, &[u8]), WireError> {
    let mut value = 0u64;
    let mut rest = buf;
    // Ten 7-bit groups at most: shifts 0, 7, ..., 63.
    for shift in (0u32..64).step_by(7) {
        let Some((&byte, tail)) = rest.split_first() else {
            return Err(WireError::Truncated);
        };
        rest = tail;
        // The tenth byte holds bit 63 only: anything more overflows or continues past 10 bytes.
        if shift == 63 && byte > 1 {
            return Err(WireError::BadVarint);
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
    // Not reached: the tenth byte either ends the varint or fails the check above.
    Err(WireError::BadVarint)
}

/// Reads a length-delimited value: the value and the bytes after it.
fn read_delimited(buf: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let (len, rest) = read_varint(buf)?;
    let len = usize::try_from(len).map_err(|_| WireError::Truncated)?;
    rest.split_at_checked(len).ok_or(WireError::Truncated)
}

/// Skips the value of an unknown field of `wire_type` (0, 1, 2 or 5); the bytes after it.
fn skip_field(buf: &[u8], wire_type: u8) -> Result<&[u8], WireError> {
    let fixed = |n: usize| buf.get(n..).ok_or(WireError::Truncated);
    match wire_type {
        0 => read_varint(buf).map(|(_, rest)| rest),
        1 => fixed(8),
        2 => read_delimited(buf).map(|(_, rest)| rest),
        5 => fixed(4),
        _ => Err(WireError::BadWireType { wire_type }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::io::Cursor;

    /// /ip4/11.99.0.10/tcp/8080 as a binary multiaddr.
    const ADDR: [u8; 8] = [4, 11, 99, 0, 10, 6, 0x1f, 0x90];

    fn connect(addrs: &[&[u8]]) -> HolePunch {
        HolePunch {
            kind: Kind::Connect,
            addrs: addrs.iter().map(|a| a.to_vec()).collect(),
            reversed: false,
            mapping: None,
            birthday: false,
            token: None,
            probe: None,
            next_port: None,
        }
    }

    fn round_trip(m: &HolePunch) {
        assert_eq!(HolePunch::decode(&m.encode()).as_ref(), Ok(m));
        let frame = m.to_frame().expect("within the limit");
        let mut reader = FrameReader::new();
        reader.push(&frame);
        assert_eq!(reader.next_message(), Ok(Some(m.clone())));
        assert_eq!(reader.next_message(), Ok(None));
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn round_trips() {
        round_trip(&connect(&[]));
        round_trip(&connect(&[&ADDR]));
        round_trip(&connect(&[&ADDR, &[], &[41, 0, 0x10], &[], &[0xff; 300]]));
        round_trip(&HolePunch {
            kind: Kind::Sync,
            addrs: Vec::new(),
            reversed: false,
            mapping: None,
            birthday: false,
            token: None,
            probe: None,
            next_port: None,
        });
        round_trip(&HolePunch {
            kind: Kind::Sync,
            addrs: vec![ADDR.to_vec()],
            reversed: false,
            mapping: None,
            birthday: false,
            token: None,
            probe: None,
            next_port: None,
        });
    }

    #[test]
    fn encoding_is_byte_exact() {
        // Field 1 (type), wire type 0: tag = 1 << 3 | 0 = 0x08; CONNECT = 100 < 128, so its
        // varint is the single byte 0x64.
        // Field 2 (ObsAddrs), wire type 2: tag = 2 << 3 | 2 = 0x12; length 8 is the single
        // byte 0x08, then the 8 bytes of /ip4/11.99.0.10/tcp/8080 (code 4, four octets,
        // code 6, port 8080 = 0x1f90 big-endian).
        // Body: 12 bytes. Frame: the length 12 = 0x0c, then the body.
        let expected_body = [0x08, 0x64, 0x12, 0x08, 4, 11, 99, 0, 10, 6, 0x1f, 0x90];
        let m = connect(&[&ADDR]);
        assert_eq!(m.encode(), expected_body);
        let frame = m.to_frame().expect("within the limit");
        assert_eq!(frame.first(), Some(&0x0c));
        assert_eq!(frame.get(1..), Some(&expected_body[..]));

        // SYNC = 300 = 0b10_0101100: low seven bits 0x2c with the continuation bit (0xac),
        // then 300 >> 7 = 2.
        let sync = HolePunch {
            kind: Kind::Sync,
            addrs: Vec::new(),
            reversed: false,
            mapping: None,
            birthday: false,
            token: None,
            probe: None,
            next_port: None,
        };
        assert_eq!(sync.encode(), [0x08, 0xac, 0x02]);
        assert_eq!(sync.to_frame(), Ok(vec![0x03, 0x08, 0xac, 0x02]));
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped() {
        let mut body = vec![0x08, 0x64];
        body.extend([0x18, 0x96, 0x01]); // field 3, varint 150
        body.extend([0x12, 0x01, 0xaa]); // ObsAddrs [0xaa]
        body.extend([0x21, 1, 2, 3, 4, 5, 6, 7, 8]); // field 4, fixed64
        body.extend([0x2a, 0x03, b'a', b'b', b'c']); // field 5, length-delimited
        body.extend([0x35, 1, 2, 3, 4]); // field 6, fixed32
        body.extend([0x80, 0x01, 0x00]); // field 16 (two-byte tag), varint 0
        body.extend([0x12, 0x00]); // ObsAddrs []
        body.extend([0xfa, 0xff, 0xff, 0xff, 0x0f, 0x00]); // field 2^29 - 1, empty bytes
        assert_eq!(
            HolePunch::decode(&body),
            Ok(connect(&[&[0xaa], &[]])),
            "{body:02x?}"
        );
    }

    #[test]
    fn the_reversed_extension_round_trips_and_is_a_plain_unknown_field_elsewhere() {
        let m = HolePunch {
            reversed: true,
            mapping: None,
            ..connect(&[&ADDR])
        };
        round_trip(&m);
        // Field 1000, wire type 0: tag 8000 = 0xc0 0x3e, then the value 1.
        assert_eq!(m.encode().get(12..), Some(&[0xc0, 0x3e, 0x01][..]));
        // Without it, the encoding is the spec's, byte for byte.
        assert_eq!(connect(&[&ADDR]).encode().len(), 12);
    }

    #[test]
    fn the_mapping_class_round_trips_and_unknown_numbers_are_not_said() {
        for m in [
            Mapping::None,
            Mapping::EndpointIndependent,
            Mapping::AddressDependent,
            Mapping::AddressAndPortDependent,
        ] {
            let with = HolePunch {
                mapping: Some(m),
                ..connect(&[&ADDR])
            };
            round_trip(&with);
            // Field 1001, wire type 0: tag 8008 = 0xc8 0x3e, then the class's number.
            assert_eq!(
                with.encode().get(12..),
                Some(&[0xc8, 0x3e, u8::try_from(mapping_number(m)).expect("small")][..])
            );
        }
        // Numbers this version does not know, a long varint among them: decoded, not said.
        for value in [&[0x00][..], &[0x05], &[0xff, 0xff, 0x03]] {
            let mut body = vec![0x08, 0x64, 0xc8, 0x3e];
            body.extend_from_slice(value);
            assert_eq!(HolePunch::decode(&body), Ok(connect(&[])), "{body:02x?}");
        }
        // The field with another wire type is an unknown field, skipped.
        assert_eq!(
            HolePunch::decode(&[0x08, 0x64, 0xca, 0x3e, 0x01, 0x04]),
            Ok(connect(&[]))
        );
        // Cut inside its value: truncated, not a panic.
        assert_eq!(
            HolePunch::decode(&[0x08, 0x64, 0xc8, 0x3e, 0x80]),
            Err(WireError::Truncated)
        );
        // Both extensions with a SYNC.
        round_trip(&HolePunch {
            kind: Kind::Sync,
            addrs: Vec::new(),
            reversed: true,
            mapping: Some(Mapping::AddressAndPortDependent),
            birthday: false,
            token: None,
            probe: None,
            next_port: None,
        });
    }

    /// The fuzz target's checks (`fuzz/fuzz_targets/dcutr_decode.rs`) on 50,000 mutations of
    /// messages carrying both natpunch fields: truncated, bytes flipped, bytes inserted. None
    /// panics; every body accepted re-encodes canonically to the same message.
    #[test]
    fn mutated_messages_with_the_natpunch_fields_never_panic_and_round_trip() {
        // xorshift64: deterministic, so a failure reproduces.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let classes = [
            None,
            Some(Mapping::None),
            Some(Mapping::EndpointIndependent),
            Some(Mapping::AddressDependent),
            Some(Mapping::AddressAndPortDependent),
        ];
        let mut accepted = 0;
        for i in 0..50_000_usize {
            let seed = HolePunch {
                kind: if i % 2 == 0 {
                    Kind::Connect
                } else {
                    Kind::Sync
                },
                addrs: vec![ADDR.to_vec(); i % 3],
                reversed: i % 5 == 0,
                mapping: classes[i % classes.len()],
                birthday: false,
                token: None,
                probe: None,
                next_port: None,
            };
            let mut body = seed.encode();
            for _ in 0..(1 + next() % 3) {
                let r = usize::try_from(next() % 1024).expect("small");
                match next() % 3 {
                    0 => body.truncate(r % (body.len() + 1)),
                    1 if !body.is_empty() => {
                        let at = r % body.len();
                        body[at] ^= u8::try_from(next() % 255 + 1).expect("byte");
                    }
                    _ => body.insert(r % (body.len() + 1), (next() % 256) as u8),
                }
            }
            if let Ok(m) = HolePunch::decode(&body) {
                accepted += 1;
                assert!(m.encode().len() <= body.len(), "{body:02x?}");
                round_trip(&m);
            }
            let mut reader = FrameReader::new();
            reader.push(&body);
            while let Ok(Some(_)) = reader.next_message() {}
        }
        assert!(
            accepted > 1000,
            "the mutations keep some messages valid: {accepted}"
        );
    }

    #[test]
    fn fields_in_reverse_order() {
        let body = [0x12, 0x01, 0xbb, 0x12, 0x01, 0xaa, 0x08, 0xac, 0x02];
        assert_eq!(
            HolePunch::decode(&body),
            Ok(HolePunch {
                kind: Kind::Sync,
                addrs: vec![vec![0xbb], vec![0xaa]],
                reversed: false,
                mapping: None,
                birthday: false,
                token: None,
                probe: None,
                next_port: None,
            })
        );
    }

    #[test]
    fn last_type_wins_and_non_minimal_varints_are_accepted() {
        assert_eq!(
            HolePunch::decode(&[0x08, 0x64, 0x08, 0xac, 0x02]).map(|m| m.kind),
            Ok(Kind::Sync)
        );
        assert_eq!(
            HolePunch::decode(&[0x08, 0xe4, 0x80, 0x00]),
            Ok(connect(&[]))
        );
    }

    #[test]
    fn every_error_from_a_crafted_input() {
        use WireError::*;
        let cases: &[(&[u8], WireError)] = &[
            (&[], MissingType),
            (&[0x12, 0x01, 0xaa], MissingType),
            (&[0x08, 0xc8, 0x01], UnknownType(200)),
            (&[0x08, 0x00], UnknownType(0)),
            (&[0x08], Truncated),
            (&[0x08, 0xe4], Truncated),
            (&[0x80], Truncated),
            (&[0x08, 0x64, 0x12, 0x05, 1, 2], Truncated),
            (&[0x08, 0x64, 0x12], Truncated),
            (&[0x08, 0x64, 0x21, 1, 2, 3, 4, 5, 6, 7], Truncated),
            (&[0x08, 0x64, 0x35, 1, 2, 3], Truncated),
            (&[0x08, 0x64, 0x2a, 0x02, 1], Truncated),
            (&[0x08, 0x64, 0x18], Truncated),
            // a length that fits u64 but not the input
            (
                &[
                    0x08, 0x64, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                Truncated,
            ),
            // eleven bytes
            (
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00,
                ],
                BadVarint,
            ),
            // ten bytes, overflowing
            (
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
                ],
                BadVarint,
            ),
            (&[0x08, 0x64, 0x1b], BadWireType { wire_type: 3 }),
            (&[0x08, 0x64, 0x1c], BadWireType { wire_type: 4 }),
            (&[0x08, 0x64, 0x1e, 0x00], BadWireType { wire_type: 6 }),
            (&[0x0f, 0x00], BadWireType { wire_type: 7 }),
            (&[0x00, 0x00], BadFieldNumber { field: 0 }),
            (
                &[0x80, 0x80, 0x80, 0x80, 0x10, 0x00],
                BadFieldNumber { field: 1 << 29 },
            ),
            (
                &[0x0a, 0x00],
                WrongWireType {
                    field: 1,
                    wire_type: 2,
                    expected: 0,
                },
            ),
            (
                &[0x08, 0x64, 0x10, 0x01],
                WrongWireType {
                    field: 2,
                    wire_type: 0,
                    expected: 2,
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                HolePunch::decode(input).as_ref(),
                Err(expected),
                "{input:02x?}"
            );
        }

        let mut big = vec![0x08, 0x64, 0x12, 0xf6, 0x1f];
        big.resize(big.len() + 4086, 0);
        assert_eq!(big.len(), 4091);
        assert!(HolePunch::decode(&big).is_ok());
        big.extend([0x18, 0x01, 0x18, 0x01, 0x18, 0x01]);
        assert_eq!(HolePunch::decode(&big), Err(TooLarge { len: 4097 }));

        let m = connect(&[&[0; MAX_MESSAGE]]);
        // 2 (type) + 1 (tag) + 2 (length 4096) + 4096
        assert_eq!(m.to_frame(), Err(TooLarge { len: 4101 }));
        let largest = connect(&[&[0; MAX_MESSAGE - 5]]);
        assert_eq!(largest.encode().len(), MAX_MESSAGE);
        assert!(largest.to_frame().is_ok());
    }

    #[test]
    fn the_birthday_extensions_round_trip_and_a_bad_token_is_not_said() {
        let mut connect = connect(&[&ADDR]);
        connect.birthday = true;
        round_trip(&connect);
        let mut sync = HolePunch::new(Kind::Sync, Vec::new());
        sync.token = Some([0xab; 16]);
        round_trip(&sync);
        let mut hit = HolePunch::new(Kind::Hit, Vec::new());
        hit.probe = Some(u32::MAX);
        round_trip(&hit);
        // HIT is type 1000: tag 0x08, varint 0xe8 0x07; probe is field 1004: tag 0xe0 0x3e.
        assert_eq!(
            HolePunch::new(Kind::Hit, Vec::new()).encode(),
            [0x08, 0xe8, 0x07]
        );
        assert!(hit.encode().starts_with(&[0x08, 0xe8, 0x07, 0xe0, 0x3e]));
        // A 15-byte token (field 1003, wire type 2: tag 0xda 0x3e) and a probe beyond 32 bits
        // are not said.
        let mut body = vec![0x08, 0xac, 0x02, 0xda, 0x3e, 15];
        body.extend_from_slice(&[1; 15]);
        body.extend_from_slice(&[0xe0, 0x3e, 0x80, 0x80, 0x80, 0x80, 0x10]);
        let m = HolePunch::decode(&body).expect("decodes");
        assert_eq!((m.kind, m.token, m.probe), (Kind::Sync, None, None));
    }

    #[test]
    fn the_predicted_port_rides_any_message_and_next_carries_it_alone() {
        let mut with_port = connect(&[&ADDR]);
        with_port.next_port = Some(40_002);
        round_trip(&with_port);
        let mut next = HolePunch::new(Kind::Next, Vec::new());
        next.next_port = Some(u16::MAX);
        round_trip(&next);
        // NEXT is type 1001: varint 0xe9 0x07; next_port is field 1005: tag 0xe8 0x3e.
        assert_eq!(
            next.encode(),
            [0x08, 0xe9, 0x07, 0xe8, 0x3e, 0xff, 0xff, 0x03]
        );
        // Port 0 and a port beyond 16 bits are not said.
        for value in [&[0x00][..], &[0x80, 0x80, 0x04]] {
            let mut body = vec![0x08, 0xe9, 0x07, 0xe8, 0x3e];
            body.extend_from_slice(value);
            let m = HolePunch::decode(&body).expect("decodes");
            assert_eq!((m.kind, m.next_port), (Kind::Next, None));
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            WireError::UnknownType(200).to_string(),
            "unknown HolePunch type 200 (expected CONNECT = 100, SYNC = 300, HIT = 1000 or NEXT = 1001)"
        );
        assert_eq!(
            WireError::TooLarge { len: 5000 }.to_string(),
            "message of 5000 bytes exceeds the 4096-byte limit"
        );
        assert_eq!(
            WireError::BadWireType { wire_type: 3 }.to_string(),
            "unsupported protobuf wire type 3 (only 0, 1, 2 and 5 are accepted)"
        );
    }

    fn messages() -> Vec<HolePunch> {
        vec![
            connect(&[&ADDR, &[]]),
            HolePunch {
                kind: Kind::Sync,
                addrs: Vec::new(),
                reversed: false,
                mapping: None,
                birthday: false,
                token: None,
                probe: None,
                next_port: None,
            },
            connect(&[&[7; 200]]),
            connect(&[]),
        ]
    }

    fn stream() -> Vec<u8> {
        messages()
            .iter()
            .flat_map(|m| m.to_frame().expect("within the limit"))
            .collect()
    }

    #[test]
    fn frame_reader_byte_by_byte() {
        let longest = messages()
            .iter()
            .map(|m| m.to_frame().expect("within the limit").len())
            .max()
            .unwrap_or_default();
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        for byte in stream() {
            reader.push(&[byte]);
            while let Some(m) = reader.next_message().expect("valid stream") {
                got.push(m);
            }
            assert!(reader.buffered() < longest);
        }
        assert_eq!(got, messages());
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn frame_reader_in_one_push_and_in_chunks() {
        let bytes = stream();
        for chunk in [1, 2, 3, 7, 100, bytes.len()] {
            let mut reader = FrameReader::default();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                reader.push(piece);
                while let Some(m) = reader.next_message().expect("valid stream") {
                    got.push(m);
                }
            }
            assert_eq!(got, messages(), "chunks of {chunk}");
        }
    }

    #[test]
    fn frame_reader_refuses_a_large_frame_at_its_prefix() {
        // 5000 = 0x1388: low seven bits 0x08 | 0x80 = 0x88, then 5000 >> 7 = 39 = 0x27.
        let mut reader = FrameReader::new();
        reader.push(&[0x88]);
        assert_eq!(reader.next_message(), Ok(None));
        reader.push(&[0x27]);
        assert_eq!(
            reader.next_message(),
            Err(WireError::TooLarge { len: 5000 })
        );
        // Fatal: the stream has no frame boundaries any more.
        reader.push(&[0; 100]);
        assert_eq!(reader.buffered(), 0);
        assert_eq!(
            reader.next_message(),
            Err(WireError::TooLarge { len: 5000 })
        );
    }

    #[test]
    fn frame_reader_bad_prefix_is_fatal_bad_body_is_not() {
        let mut reader = FrameReader::new();
        reader.push(&[0xff; 10]);
        assert_eq!(reader.next_message(), Err(WireError::BadVarint));

        let mut reader = FrameReader::new();
        reader.push(&[0x02, 0x08, 0xc8]); // a truncated varint inside the body
        reader.push(&[0x02, 0x08, 0x07]); // unknown type 7
        reader.push(&connect(&[&ADDR]).to_frame().expect("within the limit"));
        assert_eq!(reader.next_message(), Err(WireError::Truncated));
        assert_eq!(reader.next_message(), Err(WireError::UnknownType(7)));
        assert_eq!(reader.next_message(), Ok(Some(connect(&[&ADDR]))));
        assert_eq!(reader.next_message(), Ok(None));
    }

    #[test]
    fn async_write_then_read() {
        block_on(async {
            let mut written = Vec::new();
            for m in messages() {
                write_message(&mut written, &m)
                    .await
                    .expect("writes to a Vec");
            }
            assert_eq!(written, stream());

            let first_len = messages()[0].to_frame().expect("within the limit").len();
            let mut cursor = Cursor::new(written);
            let first = read_message(&mut cursor).await.expect("a frame");
            assert_eq!(first, messages()[0]);
            // Nothing past the frame was read.
            assert_eq!(cursor.position(), first_len as u64);
            let mut rest = Vec::new();
            for _ in 1..messages().len() {
                rest.push(read_message(&mut cursor).await.expect("a frame"));
            }
            assert_eq!(rest, messages()[1..]);
            let eof = read_message(&mut cursor).await.expect_err("end of stream");
            assert_eq!(eof.kind(), std::io::ErrorKind::UnexpectedEof);

            let too_big = connect(&[&[0; MAX_MESSAGE]]);
            let mut sink = Vec::new();
            let error = write_message(&mut sink, &too_big)
                .await
                .expect_err("too large");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
            assert!(sink.is_empty());
        });
    }

    #[test]
    fn async_read_errors() {
        block_on(async {
            let frame = connect(&[&ADDR]).to_frame().expect("within the limit");
            for cut in 0..frame.len() {
                let mut cursor = Cursor::new(frame.get(..cut).expect("in range"));
                let error = read_message(&mut cursor).await.expect_err("truncated");
                assert_eq!(
                    error.kind(),
                    std::io::ErrorKind::UnexpectedEof,
                    "cut at {cut}"
                );
            }
            // A two-byte prefix, 0x80 0x01 = 128, whose body never comes.
            let mut cursor = Cursor::new(vec![0x80, 0x01]);
            let error = read_message(&mut cursor).await.expect_err("truncated");
            assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);

            // Refused at the prefix: the body is never read.
            let mut bytes = vec![0x88, 0x27];
            bytes.resize(5002, 0);
            let mut cursor = Cursor::new(bytes);
            let error = read_message(&mut cursor).await.expect_err("too large");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            assert_eq!(
                error.to_string(),
                "message of 5000 bytes exceeds the 4096-byte limit"
            );
            assert_eq!(cursor.position(), 2);

            let mut cursor = Cursor::new(vec![0xff; 12]);
            let error = read_message(&mut cursor).await.expect_err("bad varint");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            assert_eq!(cursor.position(), 10);

            let mut cursor = Cursor::new(vec![0x03, 0x08, 0xc8, 0x01, 0x02, 0x08, 0x64]);
            let error = read_message(&mut cursor).await.expect_err("unknown type");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            assert_eq!(
                error.to_string(),
                "unknown HolePunch type 200 (expected CONNECT = 100, SYNC = 300, HIT = 1000 or NEXT = 1001)"
            );
            // The framing survives: the next frame reads.
            assert_eq!(
                read_message(&mut cursor).await.expect("a frame"),
                connect(&[])
            );

            let mut cursor = Cursor::new(vec![0x02, 0x08, 0xc8]);
            let error = read_message(&mut cursor).await.expect_err("bad body");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            assert_eq!(
                error.to_string(),
                "message truncated in the middle of a field"
            );
        });
    }
}
