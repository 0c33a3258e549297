//! Reading big-endian fields from untrusted bytes without indexing, and the 128-bit address
//! fields PCP uses for both families.

use std::net::{IpAddr, Ipv6Addr};

/// A cursor over a datagram: every read returns the field, or `None` when the datagram ends
/// first (and then consumes nothing).
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
    len: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self {
            rest: bytes,
            len: bytes.len(),
        }
    }

    /// How many bytes have been read.
    pub(crate) fn offset(&self) -> usize {
        self.len.saturating_sub(self.rest.len())
    }

    /// How many bytes are left.
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.rest.split_first_chunk::<N>()?;
        self.rest = tail;
        Some(*head)
    }

    pub(crate) fn slice(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// A 128-bit PCP address field; IPv4-mapped addresses come back as IPv4.
    pub(crate) fn ip(&mut self) -> Option<IpAddr> {
        self.array().map(ip_from_wire)
    }
}

/// The 128-bit form of an address: IPv6 as it is, IPv4 as `::ffff:a.b.c.d` (RFC 6887 §5).
pub(crate) fn ip_to_wire(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 128-bit field holds: IPv4-mapped addresses (including the IPv4 all-zeros
/// address `::ffff:0.0.0.0`) become IPv4, everything else stays IPv6.
pub(crate) fn ip_from_wire(octets: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(octets);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn reads_stop_at_the_end_without_consuming() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u32(), None);
        assert_eq!(r.offset(), 2);
        assert_eq!(r.slice(2), None);
        assert_eq!(r.u8(), Some(3));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.slice(0), Some(&[][..]));
    }

    #[test]
    fn addresses_map_both_ways() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 168, 50, 2));
        let wire = ip_to_wire(v4);
        assert_eq!(
            wire,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 50, 2]
        );
        assert_eq!(ip_from_wire(wire), v4);
        assert_eq!(ip_from_wire([0; 16]), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        let v6: IpAddr = "2001:db8::7".parse().expect("address");
        assert_eq!(ip_from_wire(ip_to_wire(v6)), v6);
    }
}
