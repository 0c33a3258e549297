//! portmap: asking the router for port mappings, and keeping them through renewals, reboots
//! and address changes: NAT-PMP (RFC 6886), PCP (RFC 6887) and UPnP IGD.
//!
//! Sans-IO parts (bytes and times in, decisions out; tested without a network):
//! * [`pmp`]: NAT-PMP (version 0): external-address and map requests; decoding their responses,
//!   failures included.
//! * [`pcp`]: PCP (version 2): ANNOUNCE and MAP requests (with PREFER_FAILURE); decoding ANNOUNCE,
//!   MAP and PEER responses, with their options handed back undecoded. A NAT-PMP-only gateway's
//!   "unsupported version" answer is an error of its own, [`DecodeError::NatPmpOnly`], so that
//!   the caller can fall back to NAT-PMP.
//! * [`decode_announcement`]: the datagrams gateways multicast to 224.0.0.1:5350 (and ff02::1)
//!   after a reboot or an external address change, in either protocol.
//! * [`epoch`]: [`EpochTracker`] compares each response's epoch with the client's own clock.
//! * [`keeper`]: the lifecycle of held mappings: renew at half the lifetime asking for the same
//!   port, retry with backoff, re-create everything when the epoch says the gateway lost state.
//!
//! Every decoder takes untrusted bytes and never panics; every failure has a [`DecodeError`]
//! kind.
//!
//! IO parts (tokio):
//! * [`gateway`]: the default gateway and this host's address towards it.
//! * [`upnp`]: UPnP IGD on igd-next, with the retries real routers need (lease 0 on 725/402,
//!   any port on 718, 714 on delete is success).
//! * [`client`]: probe all three protocols at once; map and delete with any of them.
//! * [`hold`]: the keeper driven over the network, listening for announcements and SSDP
//!   NOTIFYs, releasing every mapping at the end.
//! * [`record`]: the mappings this host made, kept in a file between runs (PCP needs the
//!   nonce to renew or delete, NAT-PMP cannot list), and the choice of protocol.
//!
//! What it does not do: IPv6 mappings and pinholes, PCP PEER requests, the THIRD_PARTY and
//! FILTER options, PCP authentication (RFC 7652), the server side.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

pub mod client;
pub mod epoch;
pub mod gateway;
pub mod hold;
pub mod keeper;
pub mod pcp;
pub mod pmp;
pub mod record;
pub mod upnp;
mod wire;

pub use epoch::{EpochCheck, EpochTracker, Loss, Rule};

/// The UDP port NAT-PMP and PCP servers listen on (requests go to the gateway's address).
pub const SERVER_PORT: u16 = 5351;
/// The UDP port clients listen on for unsolicited announcements.
pub const ANNOUNCE_PORT: u16 = 5350;
/// Where IPv4 gateways multicast announcements (all-hosts).
pub const ANNOUNCE_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
/// Where IPv6 PCP servers multicast announcements (all-nodes, link-local).
pub const ANNOUNCE_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// UDP: NAT-PMP opcode 1, IANA protocol number 17.
    Udp,
    /// TCP: NAT-PMP opcode 2, IANA protocol number 6.
    Tcp,
}

impl Protocol {
    /// The IANA protocol number PCP carries (17 for UDP, 6 for TCP).
    pub const fn iana_number(self) -> u8 {
        match self {
            Self::Udp => 17,
            Self::Tcp => 6,
        }
    }

    /// The protocol with this IANA number, if it is UDP or TCP.
    pub const fn from_iana_number(number: u8) -> Option<Self> {
        match number {
            17 => Some(Self::Udp),
            6 => Some(Self::Tcp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

/// Why bytes are not a usable NAT-PMP or PCP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than the message's fixed part.
    #[error("truncated: {len} bytes, at least {needed} expected")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// The smallest length this message could have, as far as it was read.
        needed: usize,
    },
    /// A PCP message longer than [`pcp::MAX_MESSAGE_LEN`].
    #[error("oversized PCP message: {len} bytes, at most 1100 allowed")]
    Oversized {
        /// Bytes received.
        len: usize,
    },
    /// A PCP message whose length is not a multiple of 4.
    #[error("PCP message length {len} is not a multiple of 4")]
    Unaligned {
        /// Bytes received.
        len: usize,
    },
    /// The version byte is not the decoder's (0 for NAT-PMP, 2 for PCP). Version 2 given to the
    /// NAT-PMP decoder means a PCP server answered; version 1 given to the PCP decoder is a
    /// server of the pre-RFC PCP drafts.
    #[error("protocol version {version} is not the one expected")]
    WrongVersion {
        /// The version byte.
        version: u8,
    },
    /// A request (NAT-PMP opcode below 128, or PCP R bit clear), not a response.
    #[error("a request (opcode byte {opcode}), not a response")]
    NotAResponse {
        /// The opcode byte as received.
        opcode: u8,
    },
    /// An opcode this crate does not know.
    #[error("unknown opcode {opcode}")]
    UnknownOpcode {
        /// The opcode (NAT-PMP: the response opcode, 128 and up; PCP: without the R bit).
        opcode: u8,
    },
    /// A PCP MAP or PEER response for a protocol other than UDP and TCP.
    #[error("unsupported protocol number {protocol}")]
    UnknownProtocol {
        /// The IANA protocol number.
        protocol: u8,
    },
    /// A PCP option that runs past the end of the message.
    #[error("malformed PCP option at byte {offset}")]
    MalformedOption {
        /// Where the option starts.
        offset: usize,
    },
    /// The PCP decoder got a NAT-PMP "unsupported version" answer (version 0, result 1): the
    /// gateway speaks NAT-PMP only, and the client should fall back to [`pmp`].
    #[error(
        "the gateway speaks NAT-PMP only (it answered PCP with version 0 'unsupported version')"
    )]
    NatPmpOnly {
        /// The gateway's seconds since start of epoch.
        epoch: u32,
    },
    /// A valid message, but not an announcement (see [`decode_announcement`]).
    #[error("not an announcement")]
    NotAnnouncement,
}

/// An unsolicited message a gateway multicasts to port [`ANNOUNCE_PORT`] after it rebooted or
/// its external address changed. Either kind is a reason to check the epoch at once (and, when
/// [`EpochTracker::observe`] says [`EpochCheck::Lost`], to re-create every mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Announcement {
    /// A NAT-PMP external-address notification (RFC 6886 §3.2.1): opcode 128, result 0.
    NatPmp {
        /// Seconds since start of epoch.
        epoch: u32,
        /// The gateway's (new) external address.
        external_ip: Ipv4Addr,
    },
    /// A PCP ANNOUNCE response (RFC 6887 §14.1), result SUCCESS.
    Pcp {
        /// The server's epoch time.
        epoch: u32,
    },
}

impl Announcement {
    /// The gateway's epoch, whichever protocol announced it.
    pub const fn epoch(&self) -> u32 {
        match self {
            Self::NatPmp { epoch, .. } | Self::Pcp { epoch } => *epoch,
        }
    }
}

/// Decodes a datagram received on [`ANNOUNCE_PORT`]: a NAT-PMP external-address notification or
/// a PCP ANNOUNCE response, told apart by the version byte. Other valid messages, and the two
/// kinds with a non-zero result, are [`DecodeError::NotAnnouncement`].
///
/// Check the source address too: only the gateway's announcements count.
pub fn decode_announcement(bytes: &[u8]) -> Result<Announcement, DecodeError> {
    match bytes.first() {
        None => Err(DecodeError::Truncated {
            len: 0,
            needed: pmp::HEADER_LEN,
        }),
        Some(&pmp::VERSION) => match pmp::decode_response(bytes)? {
            pmp::Response::ExternalAddress(a) if a.result == pmp::ResultCode::Success => {
                Ok(Announcement::NatPmp {
                    epoch: a.epoch,
                    external_ip: a.external_ip,
                })
            }
            _ => Err(DecodeError::NotAnnouncement),
        },
        Some(&pcp::VERSION) => {
            let response = pcp::decode_response(bytes)?;
            if response.opcode == pcp::Opcode::Announce && response.is_success() {
                Ok(Announcement::Pcp {
                    epoch: response.epoch,
                })
            } else {
                Err(DecodeError::NotAnnouncement)
            }
        }
        Some(&version) => Err(DecodeError::WrongVersion { version }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// miniupnpd's notification after the lab's external address change to 11.22.33.5.
    const PMP_NOTIFICATION: [u8; 12] = [0, 128, 0, 0, 0, 0, 0, 5, 11, 22, 33, 5];

    /// An unsolicited PCP ANNOUNCE response with epoch 0 (a server that just lost its state).
    const PCP_ANNOUNCE: [u8; 24] = [
        2, 0x80, 0, 0, // version, R | ANNOUNCE, reserved, SUCCESS
        0, 0, 0, 0, // lifetime
        0, 0, 0, 0, // epoch
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // reserved
    ];

    #[test]
    fn protocol_numbers() {
        assert_eq!(Protocol::Udp.iana_number(), 17);
        assert_eq!(Protocol::Tcp.iana_number(), 6);
        assert_eq!(Protocol::from_iana_number(17), Some(Protocol::Udp));
        assert_eq!(Protocol::from_iana_number(6), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_iana_number(132), None);
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
    }

    #[test]
    fn both_kinds_of_announcement_decode() {
        assert_eq!(
            decode_announcement(&PMP_NOTIFICATION),
            Ok(Announcement::NatPmp {
                epoch: 5,
                external_ip: Ipv4Addr::new(11, 22, 33, 5)
            })
        );
        let mut pcp = PCP_ANNOUNCE;
        pcp[8..12].copy_from_slice(&316u32.to_be_bytes());
        assert_eq!(
            decode_announcement(&pcp),
            Ok(Announcement::Pcp { epoch: 316 })
        );
        assert_eq!(decode_announcement(&pcp).map(|a| a.epoch()), Ok(316));
        assert_eq!(
            decode_announcement(&PMP_NOTIFICATION).map(|a| a.epoch()),
            Ok(5)
        );
    }

    #[test]
    fn other_messages_are_not_announcements() {
        // A NAT-PMP map response.
        let map = [
            0, 129, 0, 0, 0, 0, 0, 9, 0x17, 0x70, 0x65, 0x90, 0, 0, 0x0e, 0x10,
        ];
        assert_eq!(decode_announcement(&map), Err(DecodeError::NotAnnouncement));
        // An external-address answer with result 3, network failure.
        let mut failed = PMP_NOTIFICATION;
        failed[3] = 3;
        assert_eq!(
            decode_announcement(&failed),
            Err(DecodeError::NotAnnouncement)
        );
        // A PCP ANNOUNCE answer with NO_RESOURCES.
        let mut pcp = PCP_ANNOUNCE;
        pcp[3] = 8;
        assert_eq!(decode_announcement(&pcp), Err(DecodeError::NotAnnouncement));
        // A NAT-PMP request, a PCP request, another version, nothing.
        assert_eq!(
            decode_announcement(&[0, 0]),
            Err(DecodeError::NotAResponse { opcode: 0 })
        );
        let mut request = PCP_ANNOUNCE;
        request[1] = 0;
        assert_eq!(
            decode_announcement(&request),
            Err(DecodeError::NotAResponse { opcode: 0 })
        );
        let mut v1 = PCP_ANNOUNCE;
        v1[0] = 1;
        assert_eq!(
            decode_announcement(&v1),
            Err(DecodeError::WrongVersion { version: 1 })
        );
        assert_eq!(
            decode_announcement(&[]),
            Err(DecodeError::Truncated { len: 0, needed: 8 })
        );
    }

    #[test]
    fn truncated_announcements_are_errors() {
        for len in 0..PMP_NOTIFICATION.len() {
            assert!(
                decode_announcement(&PMP_NOTIFICATION[..len]).is_err(),
                "{len}"
            );
        }
        for len in 0..PCP_ANNOUNCE.len() {
            assert!(decode_announcement(&PCP_ANNOUNCE[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn announcements_serialise_with_a_kind() {
        let json = serde_json::to_value(Announcement::NatPmp {
            epoch: 5,
            external_ip: Ipv4Addr::new(11, 22, 33, 5),
        })
        .expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"kind": "nat-pmp", "epoch": 5, "external_ip": "11.22.33.5"})
        );
    }
}
