//! Multiaddrs, binary and text, as the multiformats multiaddr spec and its protocol table
//! (`protocols.csv`) define them: a sequence of components, each an unsigned-varint protocol
//! code followed by its value (fixed size, or a varint length then that many bytes). The text
//! form is `/name/value/name/…`.
//!
//! Every protocol rust-libp2p's `multiaddr` 0.19 knows is read, so that what clients report and
//! the honeypot records reads the same as before; anything else is refused, naming the code.
//! Reading never panics and never allocates by a length read from the input: a value's length
//! is checked against the bytes that are there before it is used.
//!
//! Values that would not read back from the text form are refused in the binary form too (a
//! `/` inside a DNS name or Unix path, an onion port of 0, a garlic address of a length its
//! text form does not allow), so that bytes → text → bytes gives the same bytes.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use data_encoding::{BASE32, BASE32_NOPAD, BASE64, BASE64_NOPAD, BASE64URL, BASE64URL_NOPAD};

use crate::peer_id::{self, PeerId};
use crate::varint::{self, VarintError};

/// How a protocol's value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No value (`/quic-v1`, `/p2p-circuit`).
    Flag,
    /// A big-endian u16 port.
    Port,
    /// Four address bytes.
    Ip4,
    /// Sixteen address bytes.
    Ip6,
    /// A prefix length, one byte.
    Cidr,
    /// A big-endian u64 (`/memory`).
    Memory,
    /// A Tor onion service: the hash (10 or 35 bytes) then a big-endian u16 port; text
    /// `base32:port`.
    Onion(usize),
    /// Length-prefixed UTF-8 shown as is (DNS names, Unix paths, zones, SNI).
    Name,
    /// Length-prefixed UTF-8 shown percent-encoded (HTTP and WebSocket paths).
    Path,
    /// A length-prefixed peer ID, shown in base58btc.
    Peer,
    /// A length-prefixed multihash, shown in multibase (base64url).
    Certhash,
    /// A length-prefixed I2P address, shown in I2P's base64 (`-` and `~` for `+` and `/`).
    Garlic64,
    /// A length-prefixed I2P address, shown in lowercase base32.
    Garlic32,
}

/// One entry of the protocol table.
#[derive(Debug, PartialEq, Eq)]
struct Protocol {
    code: u32,
    name: &'static str,
    kind: Kind,
}

const fn p(code: u32, name: &'static str, kind: Kind) -> Protocol {
    Protocol { code, name, kind }
}

/// The protocols read and written, from the multiaddr protocol table; `x-parity-ws` and
/// `x-parity-wss` (WebSocket with a path) are rust-libp2p's own codes.
const PROTOCOLS: [Protocol; 42] = [
    p(4, "ip4", Kind::Ip4),
    p(6, "tcp", Kind::Port),
    p(33, "dccp", Kind::Port),
    p(41, "ip6", Kind::Ip6),
    p(42, "ip6zone", Kind::Name),
    p(43, "ipcidr", Kind::Cidr),
    p(53, "dns", Kind::Name),
    p(54, "dns4", Kind::Name),
    p(55, "dns6", Kind::Name),
    p(56, "dnsaddr", Kind::Name),
    p(132, "sctp", Kind::Port),
    p(273, "udp", Kind::Port),
    p(275, "p2p-webrtc-star", Kind::Flag),
    p(276, "p2p-webrtc-direct", Kind::Flag),
    p(277, "p2p-stardust", Kind::Flag),
    p(280, "webrtc-direct", Kind::Flag),
    p(281, "webrtc", Kind::Flag),
    p(290, "p2p-circuit", Kind::Flag),
    p(301, "udt", Kind::Flag),
    p(302, "utp", Kind::Flag),
    p(400, "unix", Kind::Name),
    p(421, "p2p", Kind::Peer),
    p(443, "https", Kind::Flag),
    p(444, "onion", Kind::Onion(10)),
    p(445, "onion3", Kind::Onion(35)),
    p(446, "garlic64", Kind::Garlic64),
    p(447, "garlic32", Kind::Garlic32),
    p(448, "tls", Kind::Flag),
    p(449, "sni", Kind::Name),
    p(454, "noise", Kind::Flag),
    p(460, "quic", Kind::Flag),
    p(461, "quic-v1", Kind::Flag),
    p(465, "webtransport", Kind::Flag),
    p(466, "certhash", Kind::Certhash),
    p(477, "ws", Kind::Flag),
    p(478, "wss", Kind::Flag),
    p(479, "p2p-websocket-star", Kind::Flag),
    p(480, "http", Kind::Flag),
    p(481, "http-path", Kind::Path),
    p(777, "memory", Kind::Memory),
    p(4770, "x-parity-ws", Kind::Path),
    p(4780, "x-parity-wss", Kind::Path),
];

fn by_code(code: u64) -> Option<&'static Protocol> {
    PROTOCOLS.iter().find(|p| u64::from(p.code) == code)
}

fn by_name(name: &str) -> Option<&'static Protocol> {
    // `/ipfs/` is the old name of `/p2p/`, still read.
    let name = if name == "ipfs" { "p2p" } else { name };
    PROTOCOLS.iter().find(|p| p.name == name)
}

/// Bytes or text that are not a multiaddr this module reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultiaddrError {
    /// A protocol code or value length cannot be read.
    #[error("at byte {at}: {reason}")]
    Varint {
        /// Where the varint starts.
        at: usize,
        /// What is wrong with it.
        reason: VarintError,
    },
    /// A protocol code not in the table.
    #[error("unknown protocol code {0}")]
    UnknownCode(u64),
    /// A protocol name not in the table (text form).
    #[error("unknown protocol name {0:?}")]
    UnknownName(String),
    /// The input ends inside a value.
    #[error("/{0}: value cut short")]
    Truncated(&'static str),
    /// A value that is not what its protocol holds.
    #[error("/{protocol}: {reason}")]
    Value {
        /// The protocol's name.
        protocol: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The text form does not start with `/`.
    #[error("does not start with /")]
    NoLeadingSlash,
}

fn bad(protocol: &'static Protocol, reason: impl Into<String>) -> MultiaddrError {
    MultiaddrError::Value {
        protocol: protocol.name,
        reason: reason.into(),
    }
}

/// A checked multiaddr, held in its binary form.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Multiaddr(Vec<u8>);

/// One component of a [`Multiaddr`]: a protocol and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component<'a> {
    protocol: &'static Protocol,
    value: &'a [u8],
}

impl Component<'_> {
    /// The protocol's name in the text form (`ip4`, `quic-v1`, `p2p-circuit`, …).
    pub fn name(&self) -> &'static str {
        self.protocol.name
    }

    /// The address of an `ip4` or `ip6` component.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.protocol.kind {
            Kind::Ip4 => <[u8; 4]>::try_from(self.value)
                .ok()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            Kind::Ip6 => <[u8; 16]>::try_from(self.value)
                .ok()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            _ => None,
        }
    }
}

/// Takes `n` bytes from the front of `bytes`.
fn take<'a>(
    bytes: &'a [u8],
    n: u64,
    protocol: &'static Protocol,
) -> Result<(&'a [u8], &'a [u8]), MultiaddrError> {
    match usize::try_from(n) {
        Ok(n) if n <= bytes.len() => Ok(bytes.split_at(n)),
        _ => Err(MultiaddrError::Truncated(protocol.name)),
    }
}

fn port(value: &[u8]) -> u16 {
    value
        .first_chunk::<2>()
        .map_or(0, |b| u16::from_be_bytes(*b))
}

/// The value length the text form of a garlic address allows, from the length of its text
/// (base64 without padding, 516 to 616 characters; base32 without padding, 52 or 55 and up).
fn garlic_len_ok(kind: Kind, n: usize) -> bool {
    match kind {
        Kind::Garlic64 => (516..=616).contains(&n.saturating_mul(4).div_ceil(3)),
        _ => {
            let text = n.saturating_mul(8).div_ceil(5);
            text == 52 || text >= 55
        }
    }
}

/// Checks a value read from the binary form, by its protocol.
fn check(protocol: &'static Protocol, value: &[u8]) -> Result<(), MultiaddrError> {
    match protocol.kind {
        Kind::Name => {
            let s = std::str::from_utf8(value).map_err(|_| bad(protocol, "not UTF-8"))?;
            if s.contains('/') {
                return Err(bad(protocol, "contains /"));
            }
        }
        Kind::Path => {
            std::str::from_utf8(value).map_err(|_| bad(protocol, "not UTF-8"))?;
        }
        Kind::Peer => {
            PeerId::from_bytes(value).map_err(|e| bad(protocol, format!("not a peer ID: {e}")))?;
        }
        Kind::Certhash => {
            peer_id::multihash(value)
                .map_err(|e| bad(protocol, format!("not a multihash: {e}")))?;
        }
        Kind::Onion(hash) => {
            if port(value.get(hash..).unwrap_or_default()) == 0 {
                return Err(bad(protocol, "port 0"));
            }
        }
        Kind::Garlic64 | Kind::Garlic32 => {
            if !garlic_len_ok(protocol.kind, value.len()) {
                return Err(bad(
                    protocol,
                    format!("{} bytes, not an I2P address length", value.len()),
                ));
            }
        }
        Kind::Flag | Kind::Port | Kind::Ip4 | Kind::Ip6 | Kind::Cidr | Kind::Memory => {}
    }
    Ok(())
}

/// Reads the first component of `bytes` (at offset `at` of the whole address); returns it and
/// the bytes after it.
fn read_component(bytes: &[u8], at: usize) -> Result<(Component<'_>, &[u8]), MultiaddrError> {
    let (code, rest) =
        varint::read(bytes).map_err(|reason| MultiaddrError::Varint { at, reason })?;
    let protocol = by_code(code).ok_or(MultiaddrError::UnknownCode(code))?;
    let fixed = match protocol.kind {
        Kind::Flag => Some(0),
        Kind::Port => Some(2),
        Kind::Ip4 => Some(4),
        Kind::Ip6 => Some(16),
        Kind::Cidr => Some(1),
        Kind::Memory => Some(8),
        Kind::Onion(hash) => Some(hash as u64 + 2),
        Kind::Name | Kind::Path | Kind::Peer | Kind::Certhash | Kind::Garlic64 | Kind::Garlic32 => {
            None
        }
    };
    let (value, rest) = match fixed {
        Some(n) => take(rest, n, protocol)?,
        None => {
            let len_at = at + (bytes.len() - rest.len());
            let (n, rest) = varint::read(rest)
                .map_err(|reason| MultiaddrError::Varint { at: len_at, reason })?;
            take(rest, n, protocol)?
        }
    };
    check(protocol, value)?;
    Ok((Component { protocol, value }, rest))
}

impl Multiaddr {
    /// Checks that `bytes` is a sequence of components of known protocols with well-formed
    /// values, and nothing else. Empty bytes are the empty multiaddr.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MultiaddrError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let (_, after) = read_component(rest, bytes.len() - rest.len())?;
            rest = after;
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The binary form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The binary form, owned.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.clone()
    }

    /// The components, in order.
    pub fn iter(&self) -> Components<'_> {
        Components(&self.0)
    }
}

/// The components of a [`Multiaddr`].
#[derive(Debug, Clone)]
pub struct Components<'a>(&'a [u8]);

impl<'a> Iterator for Components<'a> {
    type Item = Component<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        // The bytes were checked when the multiaddr was made, so this reads without error.
        let (component, rest) = read_component(self.0, 0).ok()?;
        self.0 = rest;
        Some(component)
    }
}

impl<'a> IntoIterator for &'a Multiaddr {
    type Item = Component<'a>;
    type IntoIter = Components<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Bytes a path value shows percent-encoded: controls, non-ASCII, and the characters that
/// would end the segment or read as URL syntax (what rust-libp2p encodes).
fn needs_escape(b: u8) -> bool {
    !(0x20..0x7f).contains(&b) || b" \"#%/<>?`{}".contains(&b)
}

fn write_path(f: &mut fmt::Formatter<'_>, value: &[u8]) -> fmt::Result {
    for &b in value {
        if needs_escape(b) {
            write!(f, "%{b:02X}")?;
        } else {
            f.write_char(char::from(b))?;
        }
    }
    Ok(())
}

/// Undoes percent-encoding: `%` and two hex digits is a byte, any other `%` stays as is.
fn unescape(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

impl fmt::Display for Component<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.value;
        write!(f, "/{}", self.protocol.name)?;
        match self.protocol.kind {
            Kind::Flag => Ok(()),
            Kind::Port => write!(f, "/{}", port(value)),
            Kind::Ip4 | Kind::Ip6 => match self.ip() {
                Some(ip) => write!(f, "/{ip}"),
                None => Err(fmt::Error),
            },
            Kind::Cidr => write!(f, "/{}", value.first().copied().unwrap_or_default()),
            Kind::Memory => {
                let n = value
                    .first_chunk::<8>()
                    .map_or(0, |b| u64::from_be_bytes(*b));
                write!(f, "/{n}")
            }
            Kind::Onion(hash) => {
                let (h, p) = value.split_at(hash.min(value.len()));
                write!(f, "/{}:{}", BASE32.encode(h).to_lowercase(), port(p))
            }
            Kind::Name => write!(f, "/{}", String::from_utf8_lossy(value)),
            Kind::Path => {
                f.write_char('/')?;
                write_path(f, value)
            }
            Kind::Peer => write!(f, "/{}", bs58::encode(value).into_string()),
            Kind::Certhash => write!(f, "/u{}", BASE64URL_NOPAD.encode(value)),
            Kind::Garlic64 => {
                let text = BASE64_NOPAD
                    .encode(value)
                    .replace('+', "-")
                    .replace('/', "~");
                write!(f, "/{text}")
            }
            Kind::Garlic32 => write!(f, "/{}", BASE32_NOPAD.encode(value).to_lowercase()),
        }
    }
}

impl fmt::Display for Multiaddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.iter().try_for_each(|c| c.fmt(f))
    }
}

impl fmt::Debug for Multiaddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Multiaddr({self})")
    }
}

/// Decodes multibase text: the first character names the base. The bases read are those a
/// certhash is written in (base64url, rust-libp2p's and go-libp2p's choice) and the other
/// RFC 4648 ones.
fn multibase(s: &str) -> Option<Vec<u8>> {
    let mut chars = s.chars();
    let base = chars.next()?;
    let body = chars.as_str().as_bytes();
    match base {
        'u' => BASE64URL_NOPAD.decode(body).ok(),
        'U' => BASE64URL.decode(body).ok(),
        'm' => BASE64_NOPAD.decode(body).ok(),
        'M' => BASE64.decode(body).ok(),
        'f' => data_encoding::HEXLOWER.decode(body).ok(),
        'F' => data_encoding::HEXUPPER.decode(body).ok(),
        'b' if !body.iter().any(u8::is_ascii_uppercase) => {
            BASE32_NOPAD.decode(&body.to_ascii_uppercase()).ok()
        }
        'B' => BASE32_NOPAD.decode(body).ok(),
        'c' if !body.iter().any(u8::is_ascii_uppercase) => {
            BASE32.decode(&body.to_ascii_uppercase()).ok()
        }
        'C' => BASE32.decode(body).ok(),
        'z' => bs58::decode(body).into_vec().ok(),
        _ => None,
    }
}

/// Appends the binary value of `protocol` read from its text `value`.
fn write_value(
    protocol: &'static Protocol,
    value: &str,
    out: &mut Vec<u8>,
) -> Result<(), MultiaddrError> {
    let sized = |bytes: &[u8], out: &mut Vec<u8>| {
        varint::write(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    };
    match protocol.kind {
        Kind::Flag => {}
        Kind::Port => {
            let n: u16 = value.parse().map_err(|_| bad(protocol, "not a port"))?;
            out.extend(n.to_be_bytes());
        }
        Kind::Ip4 => {
            let a: Ipv4Addr = value
                .parse()
                .map_err(|_| bad(protocol, "not an IPv4 address"))?;
            out.extend(a.octets());
        }
        Kind::Ip6 => {
            let a: Ipv6Addr = value
                .parse()
                .map_err(|_| bad(protocol, "not an IPv6 address"))?;
            out.extend(a.octets());
        }
        Kind::Cidr => out.push(
            value
                .parse()
                .map_err(|_| bad(protocol, "not a prefix length"))?,
        ),
        Kind::Memory => {
            let n: u64 = value.parse().map_err(|_| bad(protocol, "not a number"))?;
            out.extend(n.to_be_bytes());
        }
        Kind::Onion(hash) => {
            let (b32, port) = value
                .split_once(':')
                .ok_or_else(|| bad(protocol, "no :port"))?;
            let port: u16 = port.parse().map_err(|_| bad(protocol, "not a port"))?;
            if port == 0 {
                return Err(bad(protocol, "port 0"));
            }
            if b32.len() != (hash * 8).div_ceil(5) {
                return Err(bad(protocol, "wrong address length"));
            }
            let h = BASE32
                .decode(b32.to_ascii_uppercase().as_bytes())
                .map_err(|_| bad(protocol, "not base32"))?;
            out.extend(h);
            out.extend(port.to_be_bytes());
        }
        Kind::Name => sized(value.as_bytes(), out),
        Kind::Path => {
            let bytes = unescape(value);
            std::str::from_utf8(&bytes).map_err(|_| bad(protocol, "not UTF-8"))?;
            sized(&bytes, out);
        }
        Kind::Peer => {
            let id: PeerId = value
                .parse()
                .map_err(|e| bad(protocol, format!("not a peer ID: {e}")))?;
            sized(id.as_bytes(), out);
        }
        Kind::Certhash => {
            let bytes = multibase(value).ok_or_else(|| bad(protocol, "not multibase"))?;
            peer_id::multihash(&bytes)
                .map_err(|e| bad(protocol, format!("not a multihash: {e}")))?;
            sized(&bytes, out);
        }
        Kind::Garlic64 => {
            if !(516..=616).contains(&value.len()) {
                return Err(bad(protocol, "not an I2P address length"));
            }
            let b64 = value.replace('-', "+").replace('~', "/");
            let bytes = BASE64_NOPAD
                .decode(b64.as_bytes())
                .map_err(|_| bad(protocol, "not I2P base64"))?;
            sized(&bytes, out);
        }
        Kind::Garlic32 => {
            if value.len() < 55 && value.len() != 52 {
                return Err(bad(protocol, "not an I2P address length"));
            }
            if value.bytes().any(|c| c.is_ascii_uppercase()) {
                return Err(bad(protocol, "not lowercase base32"));
            }
            let bytes = BASE32_NOPAD
                .decode(value.to_ascii_uppercase().as_bytes())
                .map_err(|_| bad(protocol, "not base32"))?;
            sized(&bytes, out);
        }
    }
    Ok(())
}

impl FromStr for Multiaddr {
    type Err = MultiaddrError;

    /// Reads the text form: `/name/value/…`; the empty string is the empty multiaddr.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        if parts.next() != Some("") {
            return Err(MultiaddrError::NoLeadingSlash);
        }
        let mut out = Vec::new();
        while let Some(name) = parts.next() {
            let protocol =
                by_name(name).ok_or_else(|| MultiaddrError::UnknownName(name.to_owned()))?;
            varint::write(u64::from(protocol.code), &mut out);
            if protocol.kind != Kind::Flag {
                let value = parts
                    .next()
                    .ok_or(MultiaddrError::Truncated(protocol.name))?;
                write_value(protocol, value, &mut out)?;
            }
        }
        // The text rules are the binary ones (a name holds no `/`, an onion port is not 0),
        // but checking the result keeps the two from drifting apart.
        Self::from_bytes(&out)
    }
}
