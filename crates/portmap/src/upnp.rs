//! UPnP IGD port mapping on igd-next, with the retries real routers need.
//!
//! igd-next speaks SSDP and SOAP; this module adds the policy around it:
//! * the external port asked for is the previous one (or the internal port), so a renewal keeps
//!   it; only on 718 ConflictInMappingEntry does it fall back to AddAnyPortMapping;
//! * a lease that the router rejects with 725 OnlyPermanentLeasesSupported or 402 InvalidArgs is
//!   asked again as 0 (permanent);
//! * deleting a mapping that is already gone (714) counts as success;
//! * an external address in private, shared (100.64/10) or other non-global space is flagged as
//!   "behind another NAT".

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use igd_next::aio::Gateway;
use igd_next::aio::tokio::Tokio;
use igd_next::{
    AddAnyPortError, AddPortError, GetExternalIpError, GetGenericPortMappingEntryError,
    PortMappingProtocol, RemovePortError, RequestError, SearchOptions,
};

use crate::Protocol;

/// The description natpunch gives its UPnP mappings.
pub const DESCRIPTION: &str = "natpunch";

/// A UPnP failure, with the router's error code where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpnpError {
    /// No IGD answered the SSDP search.
    #[error("no UPnP IGD answered within {0:?}")]
    NotFound(Duration),
    /// The search failed for another reason.
    #[error("UPnP search: {0}")]
    Search(String),
    /// The router refused the request.
    #[error("UPnP router refused: {code} {text}")]
    Refused {
        /// UPnP error code (606 not authorized, 718 conflict, 728 no ports, …).
        code: u16,
        /// What it means.
        text: String,
    },
    /// A transport or parsing problem.
    #[error("UPnP request: {0}")]
    Request(String),
}

impl UpnpError {
    fn refused(code: u16, text: &str) -> Self {
        Self::Refused {
            code,
            text: text.to_owned(),
        }
    }

    fn from_request(e: RequestError) -> Self {
        match e {
            RequestError::ErrorCode(code, text) => Self::Refused { code, text },
            other => Self::Request(other.to_string()),
        }
    }
}

/// A mapping the router granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The external port.
    pub external_port: u16,
    /// The lease asked for and accepted; 0 means permanent (IGDv2 routers make that 7 days).
    pub lease_secs: u32,
}

/// One entry of the router's mapping table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// UDP or TCP.
    pub protocol: Protocol,
    /// External port.
    pub external_port: u16,
    /// Internal client, as the router reports it.
    pub internal_client: String,
    /// Internal port.
    pub internal_port: u16,
    /// Remaining or configured lease in seconds (0: permanent).
    pub lease_secs: u32,
    /// The description the mapping was made with.
    pub description: String,
}

/// `udp 16000 -> 192.168.1.10:6000 lease 7200 s "natpunch"`.
impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} -> {}:{} lease {} s \"{}\"",
            self.protocol,
            self.external_port,
            self.internal_client,
            self.internal_port,
            self.lease_secs,
            self.description
        )
    }
}

/// An IGD found by SSDP, and our address towards it.
#[derive(Debug, Clone)]
pub struct Igd {
    gateway: Gateway<Tokio>,
    local: Ipv4Addr,
}

impl Igd {
    /// Searches for an IGD from `local` (SSDP to 239.255.255.250:1900), waiting up to `timeout`.
    pub async fn discover(local: Ipv4Addr, timeout: Duration) -> Result<Self, UpnpError> {
        let mut options = SearchOptions::default();
        options.bind_addr = SocketAddr::new(IpAddr::V4(local), 0);
        options.timeout = Some(timeout);
        options.single_search_timeout = Some(timeout);
        let gateway = igd_next::aio::tokio::search_gateway(options)
            .await
            .map_err(|e| match e {
                igd_next::SearchError::NoResponseWithinTimeout => UpnpError::NotFound(timeout),
                other => UpnpError::Search(other.to_string()),
            })?;
        Ok(Self { gateway, local })
    }

    /// The IGD's control address (where its SOAP requests go).
    pub fn addr(&self) -> SocketAddr {
        self.gateway.addr
    }

    /// The external address the IGD reports.
    pub async fn external_ip(&self) -> Result<Ipv4Addr, UpnpError> {
        match self.gateway.get_external_ip().await {
            Ok(IpAddr::V4(ip)) => Ok(ip),
            Ok(IpAddr::V6(ip)) => Err(UpnpError::Request(format!(
                "the IGD reported an IPv6 external address ({ip})"
            ))),
            Err(GetExternalIpError::ActionNotAuthorized) => {
                Err(UpnpError::refused(606, "Action not authorized"))
            }
            Err(GetExternalIpError::RequestError(e)) => Err(UpnpError::from_request(e)),
        }
    }

    /// Maps `internal_port` on this host, asking for `external_port` (the previous one when
    /// renewing; the internal port if `None`). Falls back to any free port on a conflict and to
    /// a permanent lease when the router refuses a limited one.
    pub async fn add(
        &self,
        protocol: Protocol,
        internal_port: u16,
        external_port: Option<u16>,
        lease_secs: u32,
    ) -> Result<Granted, UpnpError> {
        let local = SocketAddr::V4(SocketAddrV4::new(self.local, internal_port));
        let wanted = external_port.filter(|p| *p != 0).unwrap_or(internal_port);
        let proto = igd_protocol(protocol);
        let mut lease = lease_secs;
        loop {
            let tried = self
                .gateway
                .add_port(proto, wanted, local, lease, DESCRIPTION)
                .await;
            match tried {
                Ok(()) => {
                    return Ok(Granted {
                        external_port: wanted,
                        lease_secs: lease,
                    });
                }
                Err(e) if lease != 0 && wants_permanent(&e) => lease = 0,
                Err(AddPortError::PortInUse) => break,
                Err(e) => return Err(add_port_error(e)),
            }
        }
        // 718: someone else holds the port. Any port will do.
        loop {
            let tried = self
                .gateway
                .add_any_port(proto, local, lease, DESCRIPTION)
                .await;
            match tried {
                Ok(port) => {
                    return Ok(Granted {
                        external_port: port,
                        lease_secs: lease,
                    });
                }
                Err(AddAnyPortError::OnlyPermanentLeasesSupported) if lease != 0 => lease = 0,
                Err(AddAnyPortError::RequestError(RequestError::ErrorCode(402, _)))
                    if lease != 0 =>
                {
                    lease = 0;
                }
                Err(e) => return Err(add_any_port_error(e)),
            }
        }
    }

    /// Deletes the mapping of `external_port`; one that is already gone counts as deleted.
    pub async fn delete(&self, protocol: Protocol, external_port: u16) -> Result<(), UpnpError> {
        match self
            .gateway
            .remove_port(igd_protocol(protocol), external_port)
            .await
        {
            Ok(()) | Err(RemovePortError::NoSuchPortMapping) => Ok(()),
            Err(RemovePortError::ActionNotAuthorized) => {
                Err(UpnpError::refused(606, "Action not authorized"))
            }
            Err(RemovePortError::RequestError(e)) => Err(UpnpError::from_request(e)),
        }
    }

    /// The router's mapping table (every client's), in index order.
    pub async fn list(&self) -> Result<Vec<Entry>, UpnpError> {
        let mut entries = Vec::new();
        for index in 0.. {
            match self.gateway.get_generic_port_mapping_entry(index).await {
                Ok(e) => entries.push(Entry {
                    protocol: match e.protocol {
                        PortMappingProtocol::TCP => Protocol::Tcp,
                        PortMappingProtocol::UDP => Protocol::Udp,
                    },
                    external_port: e.external_port,
                    internal_client: e.internal_client,
                    internal_port: e.internal_port,
                    lease_secs: e.lease_duration,
                    description: e.port_mapping_description,
                }),
                // 713 ends the table.
                Err(GetGenericPortMappingEntryError::SpecifiedArrayIndexInvalid) => break,
                Err(GetGenericPortMappingEntryError::ActionNotAuthorized) => {
                    return Err(UpnpError::refused(606, "Action not authorized"));
                }
                Err(GetGenericPortMappingEntryError::RequestError(e)) => {
                    return Err(UpnpError::from_request(e));
                }
            }
            if index >= MAX_ENTRIES {
                break;
            }
        }
        Ok(entries)
    }
}

/// Most entries read from a router's table (a bound against a router that never says 713).
const MAX_ENTRIES: u32 = 4096;

fn igd_protocol(p: Protocol) -> PortMappingProtocol {
    match p {
        Protocol::Udp => PortMappingProtocol::UDP,
        Protocol::Tcp => PortMappingProtocol::TCP,
    }
}

/// 725, or 402 from routers that reject any limited lease as an invalid argument.
fn wants_permanent(e: &AddPortError) -> bool {
    matches!(
        e,
        AddPortError::OnlyPermanentLeasesSupported
            | AddPortError::RequestError(RequestError::ErrorCode(402, _))
    )
}

fn add_port_error(e: AddPortError) -> UpnpError {
    match e {
        AddPortError::ActionNotAuthorized => UpnpError::refused(606, "Action not authorized"),
        AddPortError::PortInUse => UpnpError::refused(718, "ConflictInMappingEntry"),
        AddPortError::SamePortValuesRequired => UpnpError::refused(724, "SamePortValuesRequired"),
        AddPortError::OnlyPermanentLeasesSupported => {
            UpnpError::refused(725, "OnlyPermanentLeasesSupported")
        }
        AddPortError::DescriptionTooLong => UpnpError::refused(605, "StringArgumentTooLong"),
        AddPortError::InternalPortZeroInvalid | AddPortError::ExternalPortZeroInvalid => {
            UpnpError::Request("port 0 cannot be mapped".into())
        }
        AddPortError::RequestError(e) => UpnpError::from_request(e),
    }
}

fn add_any_port_error(e: AddAnyPortError) -> UpnpError {
    match e {
        AddAnyPortError::ActionNotAuthorized => UpnpError::refused(606, "Action not authorized"),
        AddAnyPortError::NoPortsAvailable => UpnpError::refused(728, "NoPortMapsAvailable"),
        AddAnyPortError::ExternalPortInUse => UpnpError::refused(718, "ConflictInMappingEntry"),
        AddAnyPortError::OnlyPermanentLeasesSupported => {
            UpnpError::refused(725, "OnlyPermanentLeasesSupported")
        }
        AddAnyPortError::DescriptionTooLong => UpnpError::refused(605, "StringArgumentTooLong"),
        AddAnyPortError::InternalPortZeroInvalid => {
            UpnpError::Request("port 0 cannot be mapped".into())
        }
        AddAnyPortError::RequestError(e) => UpnpError::from_request(e),
    }
}
