//! Finding the gateway to ask for mappings, and this host's address towards it.
//!
//! The gateway is the IPv4 default route's next hop (from `/proc/net/route`, which shows the
//! routing table of the caller's network namespace). The local address is the one the kernel
//! would use to reach the gateway: a connected UDP socket reveals it without sending anything.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

/// The default IPv4 gateway of this network namespace.
pub fn default_gateway() -> io::Result<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/route")?;
    parse_default_gateway(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no IPv4 default route with a gateway (see `ip route`): pass --gateway",
        )
    })
}

/// The default route's gateway from the text of `/proc/net/route`: the first line with
/// destination 0.0.0.0, mask 0.0.0.0 and the gateway flag. Addresses there are hexadecimal in
/// the kernel's (little-endian) byte order.
pub fn parse_default_gateway(text: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_iface, dest, gateway, flags, _, _, _, mask, ..] = fields[..] else {
            return None;
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let flags = hex(flags)?;
        let up_via_gateway = flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY;
        let gateway = Ipv4Addr::from(hex(gateway)?.swap_bytes());
        (hex(dest)? == 0 && hex(mask)? == 0 && up_via_gateway && !gateway.is_unspecified())
            .then_some(gateway)
    })
}

/// The local address this host uses towards `gateway` (no packet is sent).
pub fn local_addr_towards(gateway: Ipv4Addr) -> io::Result<Ipv4Addr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect((gateway, 9))?;
    match socket.local_addr()? {
        SocketAddr::V4(a) => Ok(*a.ip()),
        SocketAddr::V6(_) => Err(io::Error::other("an IPv4 socket reported an IPv6 address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
";

    #[test]
    fn finds_the_default_gateway_in_kernel_byte_order() {
        assert_eq!(
            parse_default_gateway(ROUTE),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
    }

    #[test]
    fn ignores_routes_without_gateway_and_garbage() {
        let no_default = ROUTE.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(parse_default_gateway(&no_default), None);
        let down = ROUTE.replace("\t0003\t", "\t0002\t");
        assert_eq!(parse_default_gateway(&down), None, "route not up");
        for junk in [
            "",
            "header only",
            "h\nx y z",
            "h\neth0 zz 0101A8C0 3 0 0 0 0",
        ] {
            assert_eq!(parse_default_gateway(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn local_address_towards_loopback_is_loopback() {
        let local = local_addr_towards(Ipv4Addr::LOCALHOST).expect("loopback exists");
        assert!(local.is_loopback(), "{local}");
    }
}
