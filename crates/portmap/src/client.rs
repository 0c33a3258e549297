//! Asking a gateway for mappings over the network: NAT-PMP, PCP and UPnP behind one interface.
//!
//! [`probe`] asks all three at once; [`map`] makes a mapping with the protocol chosen (or the
//! best the gateway offers: PCP, then NAT-PMP, then UPnP); [`delete`] releases one with the
//! protocol that made it. NAT-PMP and PCP requests are retransmitted after 250 ms, 500 ms,
//! 1 s … as RFC 6886 §3.1 and RFC 6887 §8.1.1 ask, up to a total wait the caller chooses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::keeper::Method;
use crate::upnp::{Igd, UpnpError};
use crate::{DecodeError, Protocol, SERVER_PORT, pcp, pmp};

/// First retransmission interval of NAT-PMP and PCP (doubling after each try).
pub const FIRST_RETRY: Duration = Duration::from_millis(250);

/// Where to ask, and from which address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Gateway {
    /// The gateway (NAT-PMP and PCP requests go to its port 5351).
    pub addr: Ipv4Addr,
    /// This host's address towards it.
    pub local: Ipv4Addr,
}

impl Gateway {
    /// The default gateway of this network namespace, or `addr` if given.
    pub fn find(addr: Option<Ipv4Addr>) -> std::io::Result<Self> {
        let addr = match addr {
            Some(a) => a,
            None => crate::gateway::default_gateway()?,
        };
        Ok(Self {
            addr,
            local: crate::gateway::local_addr_towards(addr)?,
        })
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No answer within the time allowed.
    #[error("{method}: no answer from {gateway} within {waited:?}")]
    Timeout {
        /// The protocol.
        method: Method,
        /// The gateway.
        gateway: Ipv4Addr,
        /// How long we waited.
        waited: Duration,
    },
    /// The gateway answered with an error.
    #[error("{method}: the gateway refused: {reason}")]
    Refused {
        /// The protocol.
        method: Method,
        /// The gateway's reason (result code and its name).
        reason: String,
    },
    /// A NAT-PMP-only gateway answered a PCP request.
    #[error("pcp: the gateway speaks only NAT-PMP")]
    NatPmpOnly,
    /// UPnP failed.
    #[error(transparent)]
    Upnp(#[from] UpnpError),
    /// None of the allowed protocols is offered.
    #[error("the gateway {0} offers none of the protocols allowed (see `natpunch map probe`)")]
    NoProtocol(Ipv4Addr),
    /// A socket problem.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What one protocol's probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offer {
    /// The gateway's epoch (NAT-PMP and PCP).
    pub epoch: Option<u32>,
    /// The external address, if the protocol tells it.
    pub external_ip: Option<Ipv4Addr>,
    /// For UPnP: the control address of the IGD.
    pub control: Option<SocketAddr>,
}

/// What the gateway offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    /// Where we asked.
    pub gateway: Gateway,
    /// PCP, if it answered.
    pub pcp: Option<Offer>,
    /// NAT-PMP, if it answered.
    pub nat_pmp: Option<Offer>,
    /// UPnP IGD, if one answered the search.
    pub upnp: Option<Offer>,
    /// The external address the gateway reports (NAT-PMP's, else UPnP's).
    pub external_ip: Option<Ipv4Addr>,
    /// The external address is private, shared (100.64/10) or otherwise not global: a mapping
    /// on this gateway is not reachable from the internet, another NAT sits in front of it.
    pub behind_another_nat: bool,
    /// What each protocol that did not answer said (timeouts, errors).
    pub problems: Vec<String>,
}

impl ProbeReport {
    /// The protocols offered, in natpunch's order of preference (PCP, NAT-PMP, UPnP).
    pub fn methods(&self) -> Vec<Method> {
        [
            (self.pcp.is_some(), Method::Pcp),
            (self.nat_pmp.is_some(), Method::NatPmp),
            (self.upnp.is_some(), Method::Upnp),
        ]
        .into_iter()
        .filter_map(|(on, m)| on.then_some(m))
        .collect()
    }
}

/// Whether a gateway's external address cannot be reached from the internet: RFC 1918,
/// 100.64/10 (shared, carrier-grade NAT), loopback, link-local, 0/8, benchmarking (198.18/15),
/// documentation and reserved space.
pub fn behind_another_nat(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || (a == 100 && (64..128).contains(&b))
        || ip.is_loopback()
        || ip.is_link_local()
        || a == 0
        || (a == 198 && (b == 18 || b == 19))
        || ip.is_documentation()
        || a >= 240
        || ip.is_broadcast()
        || ip.is_multicast()
}

/// The report for people: a row per protocol (with its epoch and control address when it has
/// them), the external address, and the problems of those that did not answer.
impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "gateway      {} (this host {})",
            self.gateway.addr, self.gateway.local
        )?;
        for (name, offer) in [
            ("pcp", &self.pcp),
            ("nat-pmp", &self.nat_pmp),
            ("upnp", &self.upnp),
        ] {
            let Some(o) = offer else {
                writeln!(f, "{name:<12} no")?;
                continue;
            };
            let mut parts = vec!["yes".to_owned()];
            if let Some(e) = o.epoch {
                parts.push(format!("epoch {e}"));
            }
            if let Some(c) = o.control {
                parts.push(format!("control {c}"));
            }
            writeln!(f, "{name:<12} {}", parts.join(", "))?;
        }
        match self.external_ip {
            Some(ip) if self.behind_another_nat => writeln!(
                f,
                "external ip  {ip} (not global: another NAT is in front of this router; mappings \
                 here are not reachable from the internet)"
            )?,
            Some(ip) => writeln!(f, "external ip  {ip}")?,
            None => writeln!(f, "external ip  unknown")?,
        }
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Asks the gateway, over all three protocols at once, what it offers. Waits at most `wait`
/// for each.
pub async fn probe(gateway: Gateway, wait: Duration) -> ProbeReport {
    let (pcp, pmp, upnp) = tokio::join!(
        probe_pcp(gateway, wait),
        probe_nat_pmp(gateway, wait),
        probe_upnp(gateway, wait)
    );
    let mut problems = Vec::new();
    // Each error names its protocol.
    let mut keep = |r: Result<Offer, ClientError>| match r {
        Ok(o) => Some(o),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let pcp = keep(pcp);
    let nat_pmp = keep(pmp);
    let upnp = keep(upnp);
    let external_ip = nat_pmp
        .as_ref()
        .and_then(|o| o.external_ip)
        .or_else(|| upnp.as_ref().and_then(|o| o.external_ip));
    ProbeReport {
        gateway,
        behind_another_nat: external_ip.is_some_and(behind_another_nat),
        pcp,
        nat_pmp,
        upnp,
        external_ip,
        problems,
    }
}

/// PCP's epoch, from an ANNOUNCE request.
pub async fn pcp_announce(gw: Gateway, wait: Duration) -> Result<u32, ClientError> {
    let request = pcp::announce_request(IpAddr::V4(gw.local));
    let response = pcp_exchange(gw, &request, wait, |r| r.opcode == pcp::Opcode::Announce).await?;
    Ok(response.epoch)
}

async fn probe_pcp(gw: Gateway, wait: Duration) -> Result<Offer, ClientError> {
    Ok(Offer {
        epoch: Some(pcp_announce(gw, wait).await?),
        external_ip: None,
        control: None,
    })
}

/// A PCP request and its successful answer: the first decodable response `ours` accepts.
/// A NAT-PMP-only gateway's answer and PCP result codes other than SUCCESS are errors.
async fn pcp_exchange(
    gw: Gateway,
    request: &[u8],
    wait: Duration,
    ours: impl Fn(&pcp::Response) -> bool,
) -> Result<pcp::Response, ClientError> {
    let response = exchange(
        gw,
        Method::Pcp,
        request,
        wait,
        |bytes| match pcp::decode_response(bytes) {
            Ok(r) if ours(&r) => Some(Ok(r)),
            Err(DecodeError::NatPmpOnly { .. }) => Some(Err(ClientError::NatPmpOnly)),
            _ => None,
        },
    )
    .await??;
    if response.result != pcp::ResultCode::Success {
        return Err(ClientError::Refused {
            method: Method::Pcp,
            reason: response.result.to_string(),
        });
    }
    Ok(response)
}

/// NAT-PMP's external address and epoch.
pub async fn nat_pmp_external_address(
    gw: Gateway,
    wait: Duration,
) -> Result<(Ipv4Addr, u32), ClientError> {
    let request = pmp::external_address_request();
    let response = exchange(
        gw,
        Method::NatPmp,
        &request,
        wait,
        |bytes| match pmp::decode_response(bytes) {
            Ok(r @ pmp::Response::ExternalAddress(_)) => Some(r),
            Ok(r @ pmp::Response::Failure(_)) => Some(r),
            _ => None,
        },
    )
    .await?;
    match response {
        pmp::Response::ExternalAddress(a) => Ok((a.external_ip, a.epoch)),
        pmp::Response::Failure(f) => Err(ClientError::Refused {
            method: Method::NatPmp,
            reason: f.result.to_string(),
        }),
        pmp::Response::Mapping(_) => Err(ClientError::Refused {
            method: Method::NatPmp,
            reason: "a mapping answer to an address request".into(),
        }),
    }
}

async fn probe_nat_pmp(gw: Gateway, wait: Duration) -> Result<Offer, ClientError> {
    let (ip, epoch) = nat_pmp_external_address(gw, wait).await?;
    Ok(Offer {
        epoch: Some(epoch),
        external_ip: Some(ip),
        control: None,
    })
}

async fn probe_upnp(gw: Gateway, wait: Duration) -> Result<Offer, ClientError> {
    let igd = Igd::discover(gw.local, wait).await?;
    let external_ip = igd.external_ip().await.ok();
    Ok(Offer {
        epoch: None,
        external_ip,
        control: Some(igd.addr()),
    })
}

/// A mapping to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRequest {
    /// UDP or TCP.
    pub protocol: Protocol,
    /// The port on this host.
    pub internal_port: u16,
    /// The external port to ask for (`None`: the internal port).
    pub external_port: Option<u16>,
    /// The lifetime to ask for, in seconds.
    pub lifetime_secs: u32,
}

/// A mapping the gateway made: everything needed to renew or delete it later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapped {
    /// The protocol that made it.
    pub method: Method,
    /// `udp` or `tcp`.
    pub protocol: String,
    /// The gateway.
    pub gateway: Ipv4Addr,
    /// This host's address and port.
    pub internal: SocketAddrV4,
    /// The external address, when known.
    pub external_ip: Option<Ipv4Addr>,
    /// The external port.
    pub external_port: u16,
    /// The granted lifetime in seconds (0: permanent).
    pub lifetime_secs: u32,
    /// The gateway's epoch in the answer (NAT-PMP, PCP).
    pub epoch: Option<u32>,
    /// The PCP nonce, in hex (needed to renew or delete a PCP mapping).
    pub nonce: Option<String>,
}

/// One line: `udp 203.0.113.5:16000 -> 192.168.1.10:6000 (7200 s, via pcp)`; the external
/// address is `?` when unknown and a lifetime of 0 reads `permanent`.
impl std::fmt::Display for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let external = self.external_ip.map_or_else(
            || format!("?:{}", self.external_port),
            |ip| SocketAddrV4::new(ip, self.external_port).to_string(),
        );
        let lifetime = if self.lifetime_secs == 0 {
            "permanent".to_owned()
        } else {
            format!("{} s", self.lifetime_secs)
        };
        write!(
            f,
            "{} {external} -> {} ({lifetime}, via {})",
            self.protocol, self.internal, self.method
        )
    }
}

impl Mapped {
    /// The mapping's transport protocol.
    pub fn transport(&self) -> Protocol {
        if self.protocol == "tcp" {
            Protocol::Tcp
        } else {
            Protocol::Udp
        }
    }

    /// The PCP nonce as bytes.
    pub fn nonce_bytes(&self) -> Option<[u8; 12]> {
        let hex = self.nonce.as_deref()?;
        let mut out = [0u8; 12];
        if hex.len() != 24 {
            return None;
        }
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Twelve random bytes for a PCP nonce (from the kernel).
pub fn random_nonce() -> std::io::Result<[u8; 12]> {
    use std::io::Read as _;
    let mut nonce = [0u8; 12];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

/// Makes (or renews) a mapping with `method`. For PCP pass the nonce of the mapping being
/// renewed, or a fresh one.
pub async fn map(
    gw: Gateway,
    method: Method,
    req: MapRequest,
    nonce: [u8; 12],
    wait: Duration,
) -> Result<Mapped, ClientError> {
    let suggested = req.external_port.unwrap_or(req.internal_port);
    let internal = SocketAddrV4::new(gw.local, req.internal_port);
    let base = |external_ip, external_port, lifetime_secs, epoch, nonce| Mapped {
        method,
        protocol: req.protocol.to_string(),
        gateway: gw.addr,
        internal,
        external_ip,
        external_port,
        lifetime_secs,
        epoch,
        nonce,
    };
    match method {
        Method::Pcp => {
            let m = pcp_map(
                gw,
                req.protocol,
                req.internal_port,
                suggested,
                req.lifetime_secs,
                nonce,
                wait,
            )
            .await?;
            let ip = match m.1.external_ip {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(ip) => ip.to_ipv4_mapped(),
            };
            Ok(base(
                ip,
                m.1.external_port,
                m.0.lifetime_secs,
                Some(m.0.epoch),
                Some(hex(&nonce)),
            ))
        }
        Method::NatPmp => {
            let request = pmp::map_request(
                req.protocol,
                req.internal_port,
                suggested,
                req.lifetime_secs,
            );
            let m = pmp_map(gw, &request, req.protocol, req.internal_port, wait).await?;
            let ip = nat_pmp_external_address(gw, wait)
                .await
                .ok()
                .map(|(ip, _)| ip);
            Ok(base(
                ip,
                m.external_port,
                m.lifetime_secs,
                Some(m.epoch),
                None,
            ))
        }
        Method::Upnp => {
            let igd = Igd::discover(gw.local, wait).await?;
            let granted = igd
                .add(
                    req.protocol,
                    req.internal_port,
                    Some(suggested),
                    req.lifetime_secs,
                )
                .await?;
            let ip = igd.external_ip().await.ok();
            Ok(base(
                ip,
                granted.external_port,
                granted.lease_secs,
                None,
                None,
            ))
        }
    }
}

/// Releases a mapping with the protocol that made it.
pub async fn delete(gw: Gateway, m: &Mapped, wait: Duration) -> Result<(), ClientError> {
    let protocol = m.transport();
    match m.method {
        Method::Pcp => {
            let nonce = m.nonce_bytes().ok_or_else(|| ClientError::Refused {
                method: Method::Pcp,
                reason: "the record of this mapping has no nonce; it cannot be deleted".into(),
            })?;
            pcp_map(
                gw,
                protocol,
                m.internal.port(),
                m.external_port,
                0,
                nonce,
                wait,
            )
            .await?;
            Ok(())
        }
        Method::NatPmp => {
            let request = pmp::delete_request(protocol, m.internal.port());
            pmp_map(gw, &request, protocol, m.internal.port(), wait).await?;
            Ok(())
        }
        Method::Upnp => {
            let igd = Igd::discover(gw.local, wait).await?;
            Ok(igd.delete(protocol, m.external_port).await?)
        }
    }
}

async fn pcp_map(
    gw: Gateway,
    protocol: Protocol,
    internal_port: u16,
    suggested: u16,
    lifetime_secs: u32,
    nonce: [u8; 12],
    wait: Duration,
) -> Result<(pcp::Response, pcp::Mapping), ClientError> {
    let request = pcp::map_request(&pcp::MapRequest {
        nonce,
        protocol,
        internal_port,
        suggested_external_port: suggested,
        suggested_external_ip: None,
        lifetime_secs,
        client_ip: IpAddr::V4(gw.local),
        prefer_failure: false,
    });
    // Only the answer to this request: same nonce, protocol and internal port.
    let response = pcp_exchange(gw, &request, wait, |r| {
        r.opcode == pcp::Opcode::Map
            && r.mapping.as_ref().is_none_or(|m| {
                m.nonce == nonce && m.protocol == protocol && m.internal_port == internal_port
            })
    })
    .await?;
    let mapping = response.mapping.ok_or_else(|| ClientError::Refused {
        method: Method::Pcp,
        reason: "a MAP answer without its mapping".into(),
    })?;
    Ok((response, mapping))
}

async fn pmp_map(
    gw: Gateway,
    request: &[u8],
    protocol: Protocol,
    internal_port: u16,
    wait: Duration,
) -> Result<pmp::Mapping, ClientError> {
    let response = exchange(
        gw,
        Method::NatPmp,
        request,
        wait,
        |bytes| match pmp::decode_response(bytes) {
            Ok(pmp::Response::Mapping(m))
                if m.protocol == protocol && m.internal_port == internal_port =>
            {
                Some(Ok(m))
            }
            Ok(pmp::Response::Failure(f)) => Some(Err(f)),
            _ => None,
        },
    )
    .await?;
    match response {
        Ok(m) if m.result == pmp::ResultCode::Success => Ok(m),
        Ok(m) => Err(ClientError::Refused {
            method: Method::NatPmp,
            reason: m.result.to_string(),
        }),
        Err(f) => Err(ClientError::Refused {
            method: Method::NatPmp,
            reason: f.result.to_string(),
        }),
    }
}

/// Sends `request` to the gateway's port 5351 from a fresh socket and retransmits after 250 ms,
/// 500 ms, 1 s … until `accept` takes an answer from the gateway or `wait` has passed.
async fn exchange<T>(
    gw: Gateway,
    method: Method,
    request: &[u8],
    wait: Duration,
    accept: impl Fn(&[u8]) -> Option<T>,
) -> Result<T, ClientError> {
    let socket = UdpSocket::bind(SocketAddrV4::new(gw.local, 0)).await?;
    let to = SocketAddrV4::new(gw.addr, SERVER_PORT);
    let deadline = Instant::now() + wait;
    let mut interval = FIRST_RETRY;
    let mut buf = [0u8; 1100];
    loop {
        socket.send_to(request, to).await?;
        let next = (Instant::now() + interval).min(deadline);
        loop {
            match tokio::time::timeout_at(next, socket.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) if from.ip() == IpAddr::V4(gw.addr) => {
                    if let Some(answer) = buf.get(..n).and_then(&accept) {
                        return Ok(answer);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        if Instant::now() >= deadline {
            return Err(ClientError::Timeout {
                method,
                gateway: gw.addr,
                waited: wait,
            });
        }
        interval = interval.saturating_mul(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_behind_another_nat() {
        for ip in [
            "10.1.2.3",
            "100.64.0.5",
            "100.127.255.1",
            "192.168.1.1",
            "172.16.0.1",
            "169.254.1.1",
            "198.18.0.1",
            "0.1.2.3",
            "240.0.0.1",
            "127.0.0.1",
        ] {
            assert!(behind_another_nat(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "11.99.0.10",
            "100.63.255.255",
            "100.128.0.1",
            "8.8.8.8",
            "198.20.0.1",
        ] {
            assert!(!behind_another_nat(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn nonces_round_trip_through_their_hex_record() {
        let nonce = [0xab, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xff];
        let m = Mapped {
            method: Method::Pcp,
            protocol: "udp".into(),
            gateway: Ipv4Addr::new(192, 168, 1, 1),
            internal: SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 2), 6000),
            external_ip: None,
            external_port: 6000,
            lifetime_secs: 600,
            epoch: Some(1),
            nonce: Some(hex(&nonce)),
        };
        assert_eq!(m.nonce_bytes(), Some(nonce));
        let bad = Mapped {
            nonce: Some("zz".repeat(12)),
            ..m
        };
        assert_eq!(bad.nonce_bytes(), None);
    }
}
