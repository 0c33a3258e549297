//! This peer's own QUIC socket, for the easy side's birthday probes.
//!
//! The probes must leave from the very socket the QUIC endpoint listens on: a NAT that filters
//! by port lets the hard side's port in only towards the socket that sent to it, and only the
//! endpoint's socket can then carry the QUIC connection. rust-libp2p's QUIC transport does not
//! lend its socket, so the peer finds it among its own file descriptors (the only UDP socket
//! bound to the listen port, which no other socket can share) and sends from a duplicate.
//! Sending never disturbs the endpoint: it only reads, and sends datagrams of its own.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{BorrowedFd, RawFd};

use nix::sys::socket::{
    SockType, SockaddrLike as _, SockaddrStorage, getsockname, getsockopt, sockopt,
};

/// A duplicate of this process's UDP socket bound to `port` on any IPv4 address, if there is
/// one (Linux: the descriptors are listed in `/proc/self/fd`).
pub(super) fn find(port: u16) -> Option<UdpSocket> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    for entry in entries.flatten() {
        let Some(raw) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if !bound_to(raw, port) {
            continue;
        }
        #[expect(
            unsafe_code,
            reason = "borrowed only to duplicate it; a descriptor closed meanwhile fails the dup"
        )]
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let Ok(owned) = nix::unistd::dup(fd) else {
            continue;
        };
        // The duplicate is ours: check it again, in case the number was reused meanwhile, and
        // that it is UDP (a TCP listener may have the same port).
        if getsockopt(&owned, sockopt::SockType) != Ok(SockType::Datagram) {
            continue;
        }
        let socket = UdpSocket::from(owned);
        if socket
            .local_addr()
            .is_ok_and(|a| a == SocketAddr::from(([0, 0, 0, 0], port)))
            && socket.set_nonblocking(true).is_ok()
        {
            return Some(socket);
        }
    }
    None
}

/// Whether descriptor `raw` is a socket bound to `0.0.0.0:port`.
fn bound_to(raw: RawFd, port: u16) -> bool {
    let Ok(addr) = getsockname::<SockaddrStorage>(raw) else {
        return false;
    };
    let Some(v4) = addr.as_sockaddr_in() else {
        return false;
    };
    v4.port() == port && v4.ip().is_unspecified() && addr.family().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_udp_socket_of_a_port_a_tcp_listener_shares() {
        // A TCP listener and a UDP socket on one port (tried again while someone else has the
        // port for UDP).
        let (tcp, udp, port) = (0..20)
            .find_map(|_| {
                let tcp = std::net::TcpListener::bind("0.0.0.0:0").ok()?;
                let port = tcp.local_addr().ok()?.port();
                let udp = UdpSocket::bind(("0.0.0.0", port)).ok()?;
                Some((tcp, udp, port))
            })
            .expect("a port free for both");
        let found = find(port).expect("found");
        assert_eq!(found.local_addr().ok(), udp.local_addr().ok());
        // What the duplicate sends leaves from the port itself.
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("receiver");
        found
            .send_to(b"probe", receiver.local_addr().expect("addr"))
            .expect("sent");
        let mut buf = [0u8; 8];
        let (n, from) = receiver.recv_from(&mut buf).expect("received");
        assert_eq!((&buf[..n], from.port()), (&b"probe"[..], port));
        drop((udp, found));
        assert!(find(port).is_none(), "no UDP socket left on {port}");
        drop(tcp);
    }
}
