//! Unsigned varints as the multiformats specs write them (multiaddr protocol codes and value
//! lengths, multihash codes and digest lengths): seven bits a byte, least significant group
//! first, the high bit set on every byte but the last; at most 9 bytes (63 bits) and the
//! shortest encoding only.

/// The most bytes a varint may take (the unsigned-varint spec's limit).
const MAX_BYTES: usize = 9;

/// A varint that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    /// The input ends inside it.
    #[error("a varint is cut short")]
    Truncated,
    /// It runs past 9 bytes.
    #[error("a varint is longer than 9 bytes")]
    TooLong,
    /// A shorter encoding of the same number exists.
    #[error("a varint is not minimally encoded")]
    NotMinimal,
}

/// Reads a varint from the front of `bytes`; returns it and the bytes after it.
pub(crate) fn read(bytes: &[u8]) -> Result<(u64, &[u8]), VarintError> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate() {
        if i == MAX_BYTES {
            return Err(VarintError::TooLong);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(VarintError::NotMinimal);
            }
            return Ok((value, bytes.get(i + 1..).unwrap_or_default()));
        }
    }
    Err(VarintError::Truncated)
}

/// Appends `value` to `out`.
pub(crate) fn write(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings_round_trip() {
        for (value, bytes) in [
            (0u64, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (421, &[0xa5, 0x03]),
            (16_384, &[0x80, 0x80, 0x01]),
            (
                (1 << 63) - 1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            ),
        ] {
            let mut out = Vec::new();
            write(value, &mut out);
            assert_eq!(out, bytes, "{value}");
            assert_eq!(read(bytes), Ok((value, &[][..])), "{value}");
        }
    }

    #[test]
    fn malformed_varints_are_refused() {
        assert_eq!(read(&[]), Err(VarintError::Truncated));
        assert_eq!(read(&[0x80]), Err(VarintError::Truncated));
        assert_eq!(read(&[0x81, 0x00]), Err(VarintError::NotMinimal));
        assert_eq!(read(&[0xff; 10]), Err(VarintError::TooLong));
        assert_eq!(read(&[0x05, 0xaa]), Ok((5, &[0xaa][..])));
    }
}
