//! The vocabulary of NAT behaviour (RFC 4787 for UDP, RFC 5382 for TCP), shared by every part
//! of natpunch: the lab configures routers with it, `natpunch nat check` reports in it, and
//! measurement records store it. Every value serialises in kebab-case (`endpoint-independent`,
//! `address-and-port-dependent`, `none`, `preserve`, `random`, `sequential`).
//!
//! This crate holds types only: no I/O, no measurement.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a NAT chooses the external endpoint of an outbound flow (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No translation at all: the host's own address is its public address.
    None,
    /// EIM: one external endpoint per internal endpoint, whatever the destination.
    EndpointIndependent,
    /// ADM: a new external endpoint per destination IP address.
    AddressDependent,
    /// APDM: a new external endpoint per destination IP address and port ("symmetric").
    AddressAndPortDependent,
}

/// Which unsolicited inbound packets a NAT lets through to a mapped endpoint (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// No filtering at all (no NAT, no firewall).
    None,
    /// EIF: anyone may send to a mapped endpoint ("full cone").
    EndpointIndependent,
    /// ADF: only IP addresses the internal endpoint has sent to ("restricted cone").
    AddressDependent,
    /// APDF: only the exact IP address and port the internal endpoint has sent to.
    AddressAndPortDependent,
}

/// How a NAT picks the external port of a new mapping (RFC 4787 §4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortAllocation {
    /// Keep the internal port when it is free on the NAT; otherwise pick a random port.
    Preserve,
    /// A uniformly random port for every new mapping.
    Random,
    /// One more than the previous mapping's port (a global counter, Δ = 1).
    Sequential,
}

/// RFC 4787's abbreviation of a kebab-case behaviour name: the initials of its words without
/// "and", then the axis letter (`address-and-port-dependent`, `M` → `APDM`); `none` stays.
fn abbreviate(kebab: &str, axis: char) -> String {
    if kebab == "none" {
        return kebab.to_owned();
    }
    let mut short: String = kebab
        .split('-')
        .filter(|w| *w != "and")
        .filter_map(|w| w.chars().next())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    short.push(axis);
    short
}

impl Mapping {
    /// `EIM`, `ADM`, `APDM` or `none`.
    pub fn abbreviation(self) -> String {
        abbreviate(&self.to_string(), 'M')
    }
}

impl Filtering {
    /// `EIF`, `ADF`, `APDF` or `none`.
    pub fn abbreviation(self) -> String {
        abbreviate(&self.to_string(), 'F')
    }
}

/// Words in kebab-case for the axes, as used in tables and JSON.
macro_rules! kebab_display {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let value = serde_json::to_value(self).map_err(|_| fmt::Error)?;
                f.write_str(value.as_str().ok_or(fmt::Error)?)
            }
        }
    )*};
}
kebab_display!(Mapping, Filtering, PortAllocation);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_print_in_rfc_4787_kebab_case() {
        assert_eq!(
            Mapping::AddressAndPortDependent.to_string(),
            "address-and-port-dependent"
        );
        assert_eq!(
            Filtering::EndpointIndependent.to_string(),
            "endpoint-independent"
        );
        assert_eq!(PortAllocation::Sequential.to_string(), "sequential");
        assert_eq!(Mapping::None.to_string(), "none");
        assert_eq!(Mapping::AddressAndPortDependent.abbreviation(), "APDM");
        assert_eq!(Mapping::EndpointIndependent.abbreviation(), "EIM");
        assert_eq!(Filtering::AddressDependent.abbreviation(), "ADF");
        assert_eq!(Filtering::None.abbreviation(), "none");
    }

    #[test]
    fn values_round_trip_through_json() {
        for m in [
            Mapping::None,
            Mapping::EndpointIndependent,
            Mapping::AddressDependent,
            Mapping::AddressAndPortDependent,
        ] {
            let text = serde_json::to_string(&m).expect("encode");
            assert_eq!(serde_json::from_str::<Mapping>(&text).expect("decode"), m);
        }
        assert!(serde_json::from_str::<Filtering>("\"full-cone\"").is_err());
    }
}
