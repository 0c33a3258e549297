//! NAT behaviour as typed data, in the vocabulary of RFC 4787 (UDP) and RFC 5382 (TCP).
//!
//! A [`NatConfig`] says what a router does (including, optionally, how many sessions its table
//! holds and what happens when it is full); [`Preset`] names the common combinations. Every value
//! serialises in kebab-case (`endpoint-independent`, `address-and-port-dependent`, `preserve`, …)
//! so that the lab, its self-test and `natpunch nat check` speak the same words.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub use behaviour::{Filtering, Mapping, PortAllocation};
use serde::{Deserialize, Serialize};

use crate::defaults;

/// What a router does with an unsolicited inbound packet that matches no mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unsolicited {
    /// Drop silently, as most home routers do; TCP simultaneous open survives this.
    Drop,
    /// Answer TCP with RST and UDP with ICMP port unreachable, as a plain Linux router does.
    Reject,
}

/// What a router whose session table is full does with a new outbound flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionOverflow {
    /// Drop the new flow: it gets no mapping, while the flows already in the table carry on.
    #[default]
    Drop,
    /// Let the new flow through and forget the oldest live flow: its conntrack entry and its
    /// mapping go, so its external port no longer reaches the host.
    EvictOldest,
}

impl SessionOverflow {
    /// The value's name as written in topology files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::EvictOldest => "evict-oldest",
        }
    }
}

impl fmt::Display for SessionOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`SessionOverflow`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown session overflow `{0}` (known: drop, evict-oldest)")]
pub struct UnknownSessionOverflow(pub String);

impl FromStr for SessionOverflow {
    type Err = UnknownSessionOverflow;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Drop, Self::EvictOldest]
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| UnknownSessionOverflow(s.to_owned()))
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// The complete behaviour of one NAT router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatConfig {
    /// Mapping behaviour (never [`Mapping::None`] on a router).
    pub mapping: Mapping,
    /// Filtering behaviour (never [`Filtering::None`] on a router).
    pub filtering: Filtering,
    /// External port choice for new mappings.
    pub port_allocation: PortAllocation,
    /// Whether a LAN host can reach another LAN host (or itself) through the external address.
    pub hairpin: bool,
    /// Idle time after which a UDP mapping and its conntrack entries are gone, in seconds.
    pub udp_timeout_secs: u32,
    /// Idle time after which an established TCP mapping is gone, in seconds.
    pub tcp_timeout_secs: u32,
    /// Answer to unsolicited inbound packets.
    pub unsolicited: Unsolicited,
    /// Size of the session table: how many TCP and UDP flows from the LAN through the router
    /// (conntrack entries, each holding a mapping) may live at once; `None` for no bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<u32>,
    /// What a new flow meets when `max_sessions` flows are live.
    #[serde(default, skip_serializing_if = "is_default")]
    pub session_overflow: SessionOverflow,
}

impl NatConfig {
    /// The UDP idle timeout as a [`Duration`].
    pub fn udp_timeout(&self) -> Duration {
        Duration::from_secs(self.udp_timeout_secs.into())
    }

    /// The established-TCP idle timeout as a [`Duration`].
    pub fn tcp_timeout(&self) -> Duration {
        Duration::from_secs(self.tcp_timeout_secs.into())
    }

    /// Checks that the combination is one a router can have.
    pub fn validate(&self) -> Result<(), NatConfigError> {
        if self.mapping == Mapping::None || self.filtering == Filtering::None {
            return Err(NatConfigError::NoTranslation);
        }
        for (what, secs) in [
            ("udp", self.udp_timeout_secs),
            ("tcp", self.tcp_timeout_secs),
        ] {
            if !(defaults::MIN_TIMEOUT_SECS..=defaults::MAX_TIMEOUT_SECS).contains(&secs) {
                return Err(NatConfigError::Timeout { what, secs });
            }
        }
        match self.max_sessions {
            Some(n) if !(1..=defaults::MAX_SESSIONS).contains(&n) => {
                return Err(NatConfigError::MaxSessions(n));
            }
            None if self.session_overflow != SessionOverflow::Drop => {
                return Err(NatConfigError::OverflowWithoutTable(self.session_overflow));
            }
            _ => {}
        }
        Ok(())
    }
}

/// A [`NatConfig`] that no router can have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NatConfigError {
    /// `none` is what a public host has; a router always translates and filters.
    #[error(
        "a router cannot have mapping or filtering `none`: leave `upstream` out to put a host directly on the internet"
    )]
    NoTranslation,
    /// A timeout outside the range the lab supports.
    #[error(
        "{what} timeout of {secs} s is out of range ({min}..={max} s)",
        min = defaults::MIN_TIMEOUT_SECS,
        max = defaults::MAX_TIMEOUT_SECS
    )]
    Timeout {
        /// `udp` or `tcp`.
        what: &'static str,
        /// The rejected value.
        secs: u32,
    },
    /// A session table size outside the range the lab supports.
    #[error(
        "max_sessions of {0} is out of range (1..={max}); leave it out for an unbounded table",
        max = defaults::MAX_SESSIONS
    )]
    MaxSessions(u32),
    /// An overflow behaviour for a table without a size.
    #[error("session_overflow `{0}` needs max_sessions: a table without a size never overflows")]
    OverflowWithoutTable(SessionOverflow),
}

/// The named NAT behaviours of the lab.
///
/// | preset | mapping | filtering | ports | hairpin | UDP idle | real-world analogue |
/// |---|---|---|---|---|---|---|
/// | `open` | none | none | – | – | – | a server with a public address |
/// | `full-cone` | EIM | EIF | preserve | on | 120 s | a router with UPnP/static forwarding, some games consoles' "NAT type 1" |
/// | `restricted-cone` | EIM | ADF | preserve | on | 120 s | older consumer routers |
/// | `port-restricted` | EIM | APDF | preserve | on | 120 s | most home routers (FritzBox, OpenWrt, UniFi), RFC 4787-compliant CPE |
/// | `symmetric` | APDM | APDF | random | off | 180 s | enterprise firewalls, cloud NAT gateways, many mobile carrier NATs |
/// | `symmetric-sequential` | APDM | APDF | sequential | off | 180 s | older enterprise firewalls and some carrier NATs that give each new mapping the next port (+1): the NAT that port prediction aims at |
/// | `cgnat` | EIM | APDF | random | on | 30 s | an RFC 6888 carrier-grade NAT (100.64/10 inside) with the short idle timers measured on real CGNs |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// No NAT: the host sits on the lab internet with a public address.
    Open,
    /// EIM/EIF, port-preserving.
    FullCone,
    /// EIM/ADF, port-preserving.
    RestrictedCone,
    /// EIM/APDF, port-preserving: the common home router.
    PortRestricted,
    /// APDM/APDF with random ports: the NAT that defeats plain hole punching.
    Symmetric,
    /// APDM/APDF with sequential ports (+1 per new mapping): symmetric, but predictable.
    SymmetricSequential,
    /// EIM/APDF with random ports and a 30 s UDP idle timeout, meant to sit in front of home routers.
    Cgnat,
}

impl Preset {
    /// Every preset, in the order the self-test reports them.
    pub const ALL: [Self; 7] = [
        Self::Open,
        Self::FullCone,
        Self::RestrictedCone,
        Self::PortRestricted,
        Self::Symmetric,
        Self::SymmetricSequential,
        Self::Cgnat,
    ];

    /// The preset's name as written in topology files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::FullCone => "full-cone",
            Self::RestrictedCone => "restricted-cone",
            Self::PortRestricted => "port-restricted",
            Self::Symmetric => "symmetric",
            Self::SymmetricSequential => "symmetric-sequential",
            Self::Cgnat => "cgnat",
        }
    }

    /// The router configuration of the preset; `None` for [`Preset::Open`], which has no router.
    pub fn config(self) -> Option<NatConfig> {
        let home = NatConfig {
            mapping: Mapping::EndpointIndependent,
            filtering: Filtering::AddressAndPortDependent,
            port_allocation: PortAllocation::Preserve,
            hairpin: true,
            udp_timeout_secs: defaults::HOME_UDP_TIMEOUT_SECS,
            tcp_timeout_secs: defaults::TCP_ESTABLISHED_TIMEOUT_SECS,
            unsolicited: Unsolicited::Drop,
            max_sessions: None,
            session_overflow: SessionOverflow::Drop,
        };
        let symmetric = NatConfig {
            mapping: Mapping::AddressAndPortDependent,
            port_allocation: PortAllocation::Random,
            hairpin: false,
            udp_timeout_secs: defaults::ENTERPRISE_UDP_TIMEOUT_SECS,
            ..home
        };
        Some(match self {
            Self::Open => return None,
            Self::FullCone => NatConfig {
                filtering: Filtering::EndpointIndependent,
                ..home
            },
            Self::RestrictedCone => NatConfig {
                filtering: Filtering::AddressDependent,
                ..home
            },
            Self::PortRestricted => home,
            Self::Symmetric => symmetric,
            Self::SymmetricSequential => NatConfig {
                port_allocation: PortAllocation::Sequential,
                ..symmetric
            },
            Self::Cgnat => NatConfig {
                port_allocation: PortAllocation::Random,
                udp_timeout_secs: defaults::CGNAT_UDP_TIMEOUT_SECS,
                ..home
            },
        })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a preset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown NAT preset `{0}` (known: open, full-cone, restricted-cone, port-restricted, symmetric, symmetric-sequential, cgnat)"
)]
pub struct UnknownPreset(pub String);

impl FromStr for Preset {
    type Err = UnknownPreset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPreset(s.to_owned()))
    }
}

impl fmt::Display for Unsolicited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Drop => "drop",
            Self::Reject => "reject",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_their_names() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
            assert_eq!(
                serde_json::to_value(p).ok(),
                Some(serde_json::json!(p.name()))
            );
        }
        assert!("cone".parse::<Preset>().is_err());
    }

    #[test]
    fn every_router_preset_is_valid_and_open_has_no_router() {
        assert_eq!(Preset::Open.config(), None);
        for p in &Preset::ALL[1..] {
            let config = p.config().expect("router preset");
            assert_eq!(config.validate(), Ok(()), "{p}");
        }
    }

    #[test]
    fn validate_bounds_the_session_table() {
        let mut c = Preset::Symmetric.config().expect("router preset");
        for (max, ok) in [(Some(0), false), (Some(1), true), (Some(65_535), true)] {
            c.max_sessions = max;
            assert_eq!(c.validate().is_ok(), ok, "{max:?}");
        }
        c.max_sessions = Some(70_000);
        assert_eq!(
            c.validate().map_err(|e| e.to_string()),
            Err("max_sessions of 70000 is out of range (1..=65535); leave it out for an unbounded table".to_owned())
        );
        c.max_sessions = None;
        c.session_overflow = SessionOverflow::EvictOldest;
        assert_eq!(
            c.validate(),
            Err(NatConfigError::OverflowWithoutTable(
                SessionOverflow::EvictOldest
            ))
        );
    }

    #[test]
    fn session_overflow_reads_and_writes_its_kebab_case_names() {
        for o in [SessionOverflow::Drop, SessionOverflow::EvictOldest] {
            assert_eq!(o.name().parse::<SessionOverflow>(), Ok(o));
            assert_eq!(
                serde_json::to_value(o).ok(),
                Some(serde_json::json!(o.name()))
            );
        }
        assert_eq!(
            "evict"
                .parse::<SessionOverflow>()
                .map_err(|e| e.to_string()),
            Err("unknown session overflow `evict` (known: drop, evict-oldest)".to_owned())
        );
    }

    #[test]
    fn configs_without_a_session_table_serialise_as_before() {
        let c = Preset::Symmetric.config().expect("router preset");
        let json = serde_json::to_value(c).expect("json");
        assert!(json.get("max_sessions").is_none() && json.get("session_overflow").is_none());
        let mut old = json;
        if let Some(o) = old.as_object_mut() {
            o.remove("max_sessions");
        }
        assert_eq!(serde_json::from_value::<NatConfig>(old).ok(), Some(c));
    }

    #[test]
    fn validate_rejects_none_and_silly_timeouts() {
        let mut c = Preset::PortRestricted.config().expect("router preset");
        c.mapping = Mapping::None;
        assert_eq!(c.validate(), Err(NatConfigError::NoTranslation));
        let mut c = Preset::PortRestricted.config().expect("router preset");
        c.udp_timeout_secs = 0;
        assert!(matches!(
            c.validate(),
            Err(NatConfigError::Timeout { what: "udp", .. })
        ));
    }
}
