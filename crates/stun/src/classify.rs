//! RFC 5780 classification: observations in, NAT behaviour out (pure functions).
//!
//! Every function answers `None` when the observations do not decide the question: natpunch
//! reports unknown values as unknown and never guesses.

use std::net::{IpAddr, SocketAddr};

use behaviour::{Filtering, Mapping, PortAllocation};
use serde::Serialize;

/// Mapping behaviour from RFC 5780 §4.3's three tests, all from one local socket bound to
/// `local_port`: test I to the primary address, test II to the alternate IP (primary port),
/// test III to the alternate address. `local_ips` are the host's own addresses.
pub fn mapping(
    local_ips: &[IpAddr],
    local_port: u16,
    test1: Option<SocketAddr>,
    test2: Option<SocketAddr>,
    test3: Option<SocketAddr>,
) -> Option<Mapping> {
    let t1 = test1?;
    if t1.port() == local_port && local_ips.contains(&t1.ip()) {
        return Some(Mapping::None);
    }
    let t2 = test2?;
    if t2 == t1 {
        return Some(Mapping::EndpointIndependent);
    }
    let t3 = test3?;
    Some(if t3 == t2 {
        Mapping::AddressDependent
    } else {
        Mapping::AddressAndPortDependent
    })
}

/// Filtering behaviour from RFC 5780 §4.4 on a fresh socket: whether the answer to a request
/// with CHANGE-REQUEST(IP and port) arrived, and whether one with CHANGE-REQUEST(port) arrived.
/// `None` for a test that could not run.
pub fn filtering(
    mapping: Option<Mapping>,
    change_both: Option<bool>,
    change_port: Option<bool>,
) -> Option<Filtering> {
    match change_both? {
        true if mapping == Some(Mapping::None) => Some(Filtering::None),
        true => Some(Filtering::EndpointIndependent),
        false => Some(if change_port? {
            Filtering::AddressDependent
        } else {
            Filtering::AddressAndPortDependent
        }),
    }
}

/// Port allocation from `(local port, mapped port)` pairs of fresh sockets, each mapped by one
/// request to the same server address, in the order they were made. Needs three pairs.
/// Returns the allocation and, for sequential allocation, the step between mappings.
///
/// Other hosts behind the same NAT take ports from the same sequence while the samples are
/// made, so gaps are allowed: mappings that all move the same way by at most
/// [`SEQUENTIAL_GAP`] ports are sequential, and the step is the smallest move seen.
pub fn port_allocation(samples: &[(u16, u16)]) -> (Option<PortAllocation>, Option<i32>) {
    if samples.len() < 3 {
        return (None, None);
    }
    if samples.iter().all(|(local, mapped)| local == mapped) {
        return (Some(PortAllocation::Preserve), None);
    }
    let deltas: Vec<i32> = samples
        .windows(2)
        .map(|w| i32::from(w[1].1) - i32::from(w[0].1))
        .collect();
    let sign = deltas[0].signum();
    let sequential = sign != 0
        && deltas
            .iter()
            .all(|d| d.signum() == sign && d.abs() <= SEQUENTIAL_GAP);
    match deltas.iter().copied().min_by_key(|d| d.abs()) {
        Some(step) if sequential => (Some(PortAllocation::Sequential), Some(step)),
        _ => (Some(PortAllocation::Random), None),
    }
}

/// The largest move between two consecutive mappings still read as sequential allocation.
pub const SEQUENTIAL_GAP: i32 = 16;

/// How hard a peer behind this NAT is to reach directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// No NAT and no filtering: others can connect directly.
    DirectlyReachable,
    /// Endpoint-independent mapping: hole punching works with the reflexive address.
    EasyToHolePunch,
    /// Endpoint-dependent mapping with a predictable next port.
    NeedsPortPrediction,
    /// Endpoint-dependent mapping with random ports: only birthday probing may work.
    NeedsBirthdayProbing,
    /// No UDP reaches the server: only a relay (over TCP) connects.
    RelayOnly,
    /// The tests did not decide.
    Unknown,
}

impl Verdict {
    /// One line for people.
    pub fn sentence(self) -> &'static str {
        match self {
            Self::DirectlyReachable => "directly reachable: no NAT, no filtering",
            Self::EasyToHolePunch => {
                "easy to hole-punch: each socket keeps one public address and port for every peer"
            }
            Self::NeedsPortPrediction => {
                "needs port prediction: the NAT maps per destination but allocates predictably"
            }
            Self::NeedsBirthdayProbing => {
                "needs birthday probing: the NAT maps per destination with random ports; expect a relay"
            }
            Self::RelayOnly => "relay only: UDP does not get through",
            Self::Unknown => "unknown: the tests did not decide",
        }
    }
}

/// The verdict from what was measured. `udp_works` is whether any Binding got an answer.
pub fn verdict(
    udp_works: bool,
    mapping: Option<Mapping>,
    filtering: Option<Filtering>,
    allocation: Option<PortAllocation>,
) -> Verdict {
    if !udp_works {
        return Verdict::RelayOnly;
    }
    match (mapping, allocation) {
        (Some(Mapping::None), _) if filtering == Some(Filtering::None) => {
            Verdict::DirectlyReachable
        }
        (Some(Mapping::None | Mapping::EndpointIndependent), _) => Verdict::EasyToHolePunch,
        (Some(_), Some(PortAllocation::Preserve | PortAllocation::Sequential)) => {
            Verdict::NeedsPortPrediction
        }
        (Some(_), Some(PortAllocation::Random)) => Verdict::NeedsBirthdayProbing,
        _ => Verdict::Unknown,
    }
}

/// Bounds on a mapping's idle lifetime from probes: `(idle seconds, still alive)` pairs.
/// Returns `(longest idle time seen alive, shortest seen dead)`; either may be missing.
pub fn lifetime_bounds(probes: &[(f64, bool)]) -> (Option<f64>, Option<f64>) {
    let alive = probes
        .iter()
        .filter(|(_, a)| *a)
        .map(|(t, _)| *t)
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    let dead = probes
        .iter()
        .filter(|(_, a)| !*a)
        .map(|(t, _)| *t)
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.min(t))));
    (alive, dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn mapping_follows_rfc_5780_section_4_3() {
        let local: [IpAddr; 1] = ["192.168.1.2".parse().expect("ip")];
        let m = |t1, t2, t3| mapping(&local, 40000, t1, t2, t3);
        let x = Some(a("11.99.0.10:40000"));
        let y = Some(a("11.99.0.10:50000"));
        let z = Some(a("11.99.0.10:50001"));
        assert_eq!(m(x, x, x), Some(Mapping::EndpointIndependent));
        assert_eq!(m(x, y, y), Some(Mapping::AddressDependent));
        assert_eq!(m(x, y, z), Some(Mapping::AddressAndPortDependent));
        assert_eq!(
            m(Some(a("192.168.1.2:40000")), None, None),
            Some(Mapping::None)
        );
        assert_eq!(m(None, x, x), None, "no test I, no answer");
        assert_eq!(
            m(x, y, None),
            None,
            "test III lost: ADM or APDM is undecided"
        );
        assert_eq!(
            m(x, x, None),
            Some(Mapping::EndpointIndependent),
            "test III not needed"
        );
    }

    #[test]
    fn filtering_follows_rfc_5780_section_4_4() {
        let eim = Some(Mapping::EndpointIndependent);
        assert_eq!(
            filtering(eim, Some(true), None),
            Some(Filtering::EndpointIndependent)
        );
        assert_eq!(
            filtering(eim, Some(false), Some(true)),
            Some(Filtering::AddressDependent)
        );
        assert_eq!(
            filtering(eim, Some(false), Some(false)),
            Some(Filtering::AddressAndPortDependent)
        );
        assert_eq!(
            filtering(Some(Mapping::None), Some(true), None),
            Some(Filtering::None)
        );
        assert_eq!(filtering(eim, None, Some(true)), None);
        assert_eq!(filtering(eim, Some(false), None), None);
    }

    #[test]
    fn port_allocation_tells_preserve_sequential_and_random() {
        assert_eq!(
            port_allocation(&[(1, 1), (2, 2), (3, 3)]),
            (Some(PortAllocation::Preserve), None)
        );
        assert_eq!(
            port_allocation(&[(40000, 20004), (40100, 20005), (40200, 20006)]),
            (Some(PortAllocation::Sequential), Some(1))
        );
        assert_eq!(
            port_allocation(&[(1, 20010), (2, 20008), (3, 20006)]),
            (Some(PortAllocation::Sequential), Some(-2))
        );
        assert_eq!(
            port_allocation(&[(1, 20011), (2, 20012), (3, 20014), (4, 20015), (5, 20017)]),
            (Some(PortAllocation::Sequential), Some(1)),
            "another host's mappings leave gaps in the sequence"
        );
        assert_eq!(
            port_allocation(&[(1, 20011), (2, 20012), (3, 20010)]).0,
            Some(PortAllocation::Random),
            "a sequence that turns back is no sequence"
        );
        assert_eq!(
            port_allocation(&[(1, 20011), (2, 20012), (3, 20030)]).0,
            Some(PortAllocation::Random),
            "a gap beyond 16 ports"
        );
        assert_eq!(
            port_allocation(&[(1, 5000), (2, 61000), (3, 1200)]).0,
            Some(PortAllocation::Random)
        );
        assert_eq!(
            port_allocation(&[(1, 5000), (2, 5001)]),
            (None, None),
            "too few samples"
        );
    }

    #[test]
    fn verdicts_match_the_behaviour() {
        use PortAllocation::*;
        let v = |m, f, p| verdict(true, Some(m), Some(f), Some(p));
        assert_eq!(
            v(Mapping::None, Filtering::None, Preserve),
            Verdict::DirectlyReachable
        );
        assert_eq!(
            v(
                Mapping::EndpointIndependent,
                Filtering::AddressAndPortDependent,
                Random
            ),
            Verdict::EasyToHolePunch
        );
        assert_eq!(
            v(
                Mapping::AddressAndPortDependent,
                Filtering::AddressAndPortDependent,
                Random
            ),
            Verdict::NeedsBirthdayProbing
        );
        assert_eq!(
            v(
                Mapping::AddressDependent,
                Filtering::AddressDependent,
                Sequential
            ),
            Verdict::NeedsPortPrediction
        );
        assert_eq!(verdict(false, None, None, None), Verdict::RelayOnly);
        assert_eq!(verdict(true, None, None, None), Verdict::Unknown);
    }

    #[test]
    fn lifetime_bounds_take_the_tightest_probes() {
        let probes = [
            (5.0, true),
            (10.0, true),
            (20.0, false),
            (15.0, false),
            (40.0, false),
        ];
        assert_eq!(lifetime_bounds(&probes), (Some(10.0), Some(15.0)));
        assert_eq!(lifetime_bounds(&[]), (None, None));
    }
}
