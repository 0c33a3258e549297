//! Small address types the lab plans with.

use std::fmt;
use std::net::Ipv4Addr;

/// An IPv4 network (`addr/prefix`), normalised to its network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// The network containing `addr` with the given prefix length (clamped to 32).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        let mask = Self::mask_bits(prefix);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        }
    }

    fn mask_bits(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The `n`th address of the network (0 is the network address), if it lies inside it.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }

    /// Whether `ip` lies inside the network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_bits(self.prefix) == u32::from(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_indexes() {
        let n = Ipv4Net::new(Ipv4Addr::new(192, 168, 7, 99), 24);
        assert_eq!(n.to_string(), "192.168.7.0/24");
        assert_eq!(n.nth(1), Some(Ipv4Addr::new(192, 168, 7, 1)));
        assert_eq!(n.nth(256), None);
        assert!(n.contains(Ipv4Addr::new(192, 168, 7, 200)));
        assert!(!n.contains(Ipv4Addr::new(192, 168, 8, 1)));
        assert!(Ipv4Net::new(Ipv4Addr::new(1, 2, 3, 4), 0).contains(Ipv4Addr::new(9, 9, 9, 9)));
    }
}
