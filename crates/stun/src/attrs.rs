//! The two RFC 5780 request attributes, written here because `stun_codec` 0.4 gets them wrong:
//! its CHANGE-REQUEST decoder reads the flags from bits 1 and 0 (they are bits 2 and 1, RFC 5780
//! §7.2), and its RESPONSE-PORT encoder always writes port 0 (§7.5). Both would make a server
//! misread clients and a client unable to ask for anything. Everything else comes from
//! `stun_codec`.

use std::marker::PhantomData;

use bytecodec::fixnum::{U32beDecoder, U32beEncoder};
use bytecodec::{ByteCount, Decode, Encode, Eos, Result, SizedEncode, TryTaggedDecode};
use stun_codec::{Attribute, AttributeType};

/// An attribute whose value is one 32-bit word.
pub trait WordAttribute: Sized {
    /// Attribute type.
    const CODEPOINT: u16;
    /// The attribute from its value.
    fn from_word(word: u32) -> Self;
    /// The attribute's value.
    fn to_word(&self) -> u32;
}

/// Decoder of a [`WordAttribute`].
#[derive(Debug)]
pub struct WordDecoder<T>(U32beDecoder, PhantomData<T>);

impl<T> Default for WordDecoder<T> {
    fn default() -> Self {
        Self(U32beDecoder::default(), PhantomData)
    }
}

impl<T: WordAttribute> Decode for WordDecoder<T> {
    type Item = T;

    fn decode(&mut self, buf: &[u8], eos: Eos) -> Result<usize> {
        self.0.decode(buf, eos)
    }

    fn finish_decoding(&mut self) -> Result<T> {
        self.0.finish_decoding().map(T::from_word)
    }

    fn requiring_bytes(&self) -> ByteCount {
        self.0.requiring_bytes()
    }

    fn is_idle(&self) -> bool {
        self.0.is_idle()
    }
}

impl<T: WordAttribute> TryTaggedDecode for WordDecoder<T> {
    type Tag = AttributeType;

    fn try_start_decoding(&mut self, tag: AttributeType) -> Result<bool> {
        Ok(tag.as_u16() == T::CODEPOINT)
    }
}

/// Encoder of a [`WordAttribute`].
#[derive(Debug)]
pub struct WordEncoder<T>(U32beEncoder, PhantomData<T>);

impl<T> Default for WordEncoder<T> {
    fn default() -> Self {
        Self(U32beEncoder::default(), PhantomData)
    }
}

impl<T: WordAttribute> Encode for WordEncoder<T> {
    type Item = T;

    fn encode(&mut self, buf: &mut [u8], eos: Eos) -> Result<usize> {
        self.0.encode(buf, eos)
    }

    fn start_encoding(&mut self, item: T) -> Result<()> {
        self.0.start_encoding(item.to_word())
    }

    fn requiring_bytes(&self) -> ByteCount {
        self.0.requiring_bytes()
    }

    fn is_idle(&self) -> bool {
        self.0.is_idle()
    }
}

impl<T: WordAttribute> SizedEncode for WordEncoder<T> {
    fn exact_requiring_bytes(&self) -> u64 {
        self.0.exact_requiring_bytes()
    }
}

/// CHANGE-REQUEST (RFC 5780 §7.2): ask the server to answer from its other IP and/or port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeRequest {
    /// Answer from the other IP address (flag 0x04).
    pub ip: bool,
    /// Answer from the other port (flag 0x02).
    pub port: bool,
}

impl WordAttribute for ChangeRequest {
    const CODEPOINT: u16 = 0x0003;

    fn from_word(word: u32) -> Self {
        Self {
            ip: word & 0x4 != 0,
            port: word & 0x2 != 0,
        }
    }

    fn to_word(&self) -> u32 {
        (u32::from(self.ip) << 2) | (u32::from(self.port) << 1)
    }
}

/// RESPONSE-PORT (RFC 5780 §7.5): send the answer to this port of the request's source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponsePort(pub u16);

impl WordAttribute for ResponsePort {
    const CODEPOINT: u16 = 0x0027;

    fn from_word(word: u32) -> Self {
        Self((word >> 16) as u16)
    }

    fn to_word(&self) -> u32 {
        u32::from(self.0) << 16
    }
}

macro_rules! word_attribute {
    ($($ty:ty),*) => {$(
        impl $ty {
            /// The attribute type (what `stun_codec`'s attribute enums look for).
            pub const CODEPOINT: u16 = <Self as WordAttribute>::CODEPOINT;
        }

        impl Attribute for $ty {
            type Decoder = WordDecoder<Self>;
            type Encoder = WordEncoder<Self>;

            fn get_type(&self) -> AttributeType {
                AttributeType::new(<Self as WordAttribute>::CODEPOINT)
            }
        }
    )*};
}
word_attribute!(ChangeRequest, ResponsePort);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_request_flags_sit_in_bits_2_and_1() {
        assert_eq!(
            ChangeRequest {
                ip: true,
                port: false
            }
            .to_word(),
            0x4
        );
        assert_eq!(
            ChangeRequest {
                ip: false,
                port: true
            }
            .to_word(),
            0x2
        );
        for (ip, port) in [(false, false), (true, false), (false, true), (true, true)] {
            let c = ChangeRequest { ip, port };
            assert_eq!(ChangeRequest::from_word(c.to_word()), c);
        }
    }

    #[test]
    fn response_port_is_the_high_half_word() {
        assert_eq!(ResponsePort(0x1234).to_word(), 0x1234_0000);
        assert_eq!(ResponsePort::from_word(0xabcd_0000), ResponsePort(0xabcd));
    }
}
