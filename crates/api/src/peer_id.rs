//! Peer IDs as libp2p's peer-ID spec defines them: the multihash of a host's public key (the
//! key itself under the identity code when its protobuf form is at most 42 bytes, its SHA-256
//! otherwise), shown as base58btc text (`12D3KooW…`, `Qm…`).
//!
//! The server only checks, stores and returns peer IDs: it never sees the key behind one, so
//! this type holds the multihash bytes and does not decode the key. The CIDv1 text form
//! (`bafz…`) is not read.

use std::fmt;
use std::str::FromStr;

use crate::varint::{self, VarintError};

/// The multihash code of the identity "hash" (the digest is the input).
const IDENTITY: u64 = 0x00;
/// The multihash code of SHA-256.
const SHA2_256: u64 = 0x12;
/// SHA-256's digest length.
const SHA2_256_LEN: usize = 32;
/// The longest key an identity peer ID inlines (libp2p's peer-ID spec).
const MAX_INLINE_KEY: usize = 42;
/// The longest multihash digest read (512 bits, as multiaddr's certhash allows).
const MAX_DIGEST: usize = 64;
/// The longest base58 text read: a peer ID is at most 44 bytes (two varint bytes and a 42-byte
/// key), under 61 characters in base58.
const MAX_TEXT: usize = 128;

/// A multihash that is not a well-formed peer ID, or text that does not hold one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// The multihash code or digest length cannot be read.
    #[error("multihash header: {0}")]
    Header(VarintError),
    /// The digest length is above 64 bytes.
    #[error("multihash digest of {0} bytes, more than 64")]
    DigestTooLong(u64),
    /// The bytes end before the digest does, or go on after it.
    #[error("multihash digest announces {announced} bytes, {actual} follow")]
    DigestLength {
        /// The length in the header.
        announced: u64,
        /// The bytes after the header.
        actual: usize,
    },
    /// The hash is neither identity nor SHA-256.
    #[error("multihash code {0:#x} is neither identity (0x00) nor sha2-256 (0x12)")]
    Code(u64),
    /// An identity peer ID inlines a key longer than 42 bytes.
    #[error("identity multihash of {0} bytes, at most 42")]
    InlineKeyTooLong(usize),
    /// A SHA-256 peer ID's digest is not 32 bytes.
    #[error("sha2-256 multihash of {0} bytes, not 32")]
    Sha256Length(usize),
    /// The text is longer than any peer ID's.
    #[error("longer than 128 characters")]
    TextTooLong,
    /// The text is not base58btc.
    #[error("not base58btc")]
    NotBase58,
}

/// Splits a multihash into its code and digest; `bytes` must hold exactly one.
pub(crate) fn multihash(bytes: &[u8]) -> Result<(u64, &[u8]), PeerIdError> {
    let (code, rest) = varint::read(bytes).map_err(PeerIdError::Header)?;
    let (len, digest) = varint::read(rest).map_err(PeerIdError::Header)?;
    if len > MAX_DIGEST as u64 {
        return Err(PeerIdError::DigestTooLong(len));
    }
    if len != digest.len() as u64 {
        return Err(PeerIdError::DigestLength {
            announced: len,
            actual: digest.len(),
        });
    }
    Ok((code, digest))
}

/// A libp2p peer ID: a checked multihash.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(Vec<u8>);

impl PeerId {
    /// Checks that `bytes` is one identity multihash of at most 42 bytes or one SHA-256
    /// multihash, and nothing more.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PeerIdError> {
        let (code, digest) = multihash(bytes)?;
        match code {
            IDENTITY if digest.len() > MAX_INLINE_KEY => {
                Err(PeerIdError::InlineKeyTooLong(digest.len()))
            }
            SHA2_256 if digest.len() != SHA2_256_LEN => {
                Err(PeerIdError::Sha256Length(digest.len()))
            }
            IDENTITY | SHA2_256 => Ok(Self(bytes.to_vec())),
            other => Err(PeerIdError::Code(other)),
        }
    }

    /// The peer ID of an Ed25519 public key: the identity multihash (36 bytes) of the key's
    /// protobuf form (key type 1, then the 32 key bytes).
    pub fn ed25519(key: [u8; 32]) -> Self {
        let mut bytes = vec![IDENTITY as u8, 36, 0x08, 0x01, 0x12, 32];
        bytes.extend(key);
        Self(bytes)
    }

    /// The binary form (the multihash).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The binary form, owned.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(&self.0).into_string())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    /// Reads the base58btc text form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_TEXT {
            return Err(PeerIdError::TextTooLong);
        }
        let bytes = bs58::decode(s)
            .into_vec()
            .map_err(|_| PeerIdError::NotBase58)?;
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identity_and_sha256_multihashes_of_the_right_length_are_peer_ids() {
        let mut sha = vec![0x12, 0x20];
        sha.extend([7; 32]);
        assert!(PeerId::from_bytes(&sha).is_ok());
        assert!(PeerId::from_bytes(&[0x00, 0x00]).is_ok(), "empty identity");
        let mut inline = vec![0x00, 42];
        inline.extend([1; 42]);
        assert!(PeerId::from_bytes(&inline).is_ok());
        inline[1] = 43;
        inline.push(1);
        assert_eq!(
            PeerId::from_bytes(&inline),
            Err(PeerIdError::InlineKeyTooLong(43))
        );
        assert_eq!(
            PeerId::from_bytes(&[0x12, 0x01, 0xaa]),
            Err(PeerIdError::Sha256Length(1))
        );
        assert_eq!(
            PeerId::from_bytes(&[0x13, 0x01, 0xaa]),
            Err(PeerIdError::Code(0x13))
        );
        assert_eq!(
            PeerId::from_bytes(&[0x00, 0x02, 0xaa]),
            Err(PeerIdError::DigestLength {
                announced: 2,
                actual: 1
            })
        );
        assert_eq!(
            PeerId::from_bytes(&[0x00, 0x01, 0xaa, 0xbb]),
            Err(PeerIdError::DigestLength {
                announced: 1,
                actual: 2
            })
        );
        assert_eq!(
            PeerId::from_bytes(&[0x00, 0x80, 0x01]),
            Err(PeerIdError::DigestTooLong(128))
        );
        assert_eq!(
            PeerId::from_bytes(&[]),
            Err(PeerIdError::Header(VarintError::Truncated))
        );
    }

    #[test]
    fn text_that_is_not_a_peer_id_is_refused() {
        assert_eq!("0OIl".parse::<PeerId>(), Err(PeerIdError::NotBase58));
        assert_eq!(
            "1".repeat(129).parse::<PeerId>(),
            Err(PeerIdError::TextTooLong)
        );
        assert!("".parse::<PeerId>().is_err());
    }
}
