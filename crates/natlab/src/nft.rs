//! Rendering a router's [`NatConfig`] to an nftables ruleset: a pure function.
//!
//! Plain `masquerade` cannot produce an endpoint-independent mapping: conntrack allocates per
//! flow and preserves ports only when it can. So the ruleset keeps the NAT's mapping table itself,
//! in dynamic nftables maps that the packet path fills and refreshes:
//!
//! Each table exists once per protocol (`mapping_udp`, `mapping_tcp`, …).
//!
//! * `mapping`: internal endpoint (plus the destination address for ADM, address and port for
//!   APDM) → external port. A new outbound flow first looks here; on a miss it gets a port from the
//!   allocation rule (preserve if free, random, or sequential) and a later chain learns the port
//!   conntrack really used. EIM is therefore real: every flow of one internal endpoint leaves
//!   on the same external port, whatever the allocation.
//! * `reverse`: external port → internal endpoint, for inbound traffic under EIF and ADF and for
//!   hairpinning.
//! * `contacted`: external port × remote address, the ADF permission list.
//! * `ports`: external ports held by live mappings, so that "preserve" does not hand a
//!   port that another internal endpoint holds (two LAN hosts on the same internal port: the
//!   second one gets a random port).
//!
//! Entries expire after the configured idle timeout and are refreshed by packets in both
//! directions (RFC 4787 REQ-6 requires outbound refresh and allows inbound refresh; conntrack
//! does both, and the tables follow it so that the two never disagree). The router's
//! conntrack timeouts (set separately, per namespace) equal those idle timeouts.
//!
//! APDF needs no map: conntrack only lets the exact remote endpoint's replies through.
//! Unsolicited inbound packets reach the router's own input hook and are dropped or rejected.
//!
//! A bounded session table with `drop` overflow is a connlimit rule in the forward chain:
//! `ct count over N` on new TCP and UDP flows from the LAN out of the WAN. The kernel keeps the
//! list of counted flows per rule and prunes flows whose conntrack entry is gone (and TCP
//! flows in TIME_WAIT or CLOSE) lazily, when a new flow is counted. `evict-oldest` has no
//! kernel counterpart: a userspace evictor does it ([`crate::session`]), with
//! [`forget_mapping`] for the tables.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::defaults;
use crate::nat::{Filtering, Mapping, NatConfig, PortAllocation, SessionOverflow, Unsolicited};
use crate::net::Ipv4Net;

/// Name of the nftables table the lab owns in each router namespace.
pub const TABLE: &str = "natlab";

/// Everything [`render`] needs to know about one router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterRules<'a> {
    /// The NAT behaviour.
    pub nat: &'a NatConfig,
    /// Interface towards the upstream network.
    pub wan_if: &'a str,
    /// The router's external address.
    pub wan_ip: Ipv4Addr,
    /// Interface towards the LAN.
    pub lan_if: &'a str,
    /// The LAN's network.
    pub lan_net: Ipv4Net,
}

/// Renders the complete `table ip natlab` for one router, to be loaded with `nft -f`.
///
/// The output starts by deleting any previous table of the same name, so loading it twice (or
/// after changing the WAN address) replaces the rules atomically.
pub fn render(r: &RouterRules<'_>) -> String {
    let nat = r.nat;
    let (wan, lan, wan_ip, lan_net) = (r.wan_if, r.lan_if, r.wan_ip, r.lan_net);
    let mut out = String::new();
    let mut line = |s: &str| {
        out.push_str(s);
        out.push('\n');
    };

    // The key of a mapping table: the internal endpoint, plus the remote for ADM and APDM.
    // `key_remote` is the remote as the nat chain sees it, before translation.
    // Tables are per protocol: nft 1.0 cannot linearise five-part keys with `th` fields.
    let (key_type, key_remote) = match nat.mapping {
        Mapping::AddressDependent => ("ipv4_addr . inet_service . ipv4_addr", " . ip daddr"),
        Mapping::AddressAndPortDependent => (
            "ipv4_addr . inet_service . ipv4_addr . inet_service",
            " . ip daddr . th dport",
        ),
        // `None` never reaches here (validated); treat it like EIM rather than panic.
        Mapping::EndpointIndependent | Mapping::None => ("ipv4_addr . inet_service", ""),
    };
    let protocols = [("udp", nat.udp_timeout_secs), ("tcp", nat.tcp_timeout_secs)];
    let adf = nat.filtering == Filtering::AddressDependent;
    let dynamic = "flags dynamic,timeout; size 65535;";

    line(&format!("table ip {TABLE}"));
    line(&format!("delete table ip {TABLE}"));
    line(&format!("table ip {TABLE} {{"));
    for (p, _) in protocols {
        line(&format!(
            "  map mapping_{p} {{ type {key_type} : inet_service; {dynamic} }}"
        ));
        line(&format!(
            "  map reverse_{p} {{ type inet_service : ipv4_addr . inet_service; {dynamic} }}"
        ));
        line(&format!(
            "  set ports_{p} {{ type inet_service; {dynamic} }}"
        ));
        if adf {
            line(&format!(
                "  set contacted_{p} {{ type inet_service . ipv4_addr; {dynamic} }}"
            ));
        }
    }

    // Inbound: translate unsolicited packets the filtering admits, and hairpinned ones.
    line("  chain prerouting {");
    line("    type nat hook prerouting priority dstnat; policy accept;");
    for (p, _) in protocols {
        let to_internal = format!("dnat ip to th dport map @reverse_{p}");
        match nat.filtering {
            Filtering::EndpointIndependent | Filtering::None => line(&format!(
                "    iifname \"{wan}\" meta l4proto {p} {to_internal}"
            )),
            Filtering::AddressDependent => line(&format!(
                "    iifname \"{wan}\" meta l4proto {p} th dport . ip saddr @contacted_{p} {to_internal}"
            )),
            Filtering::AddressAndPortDependent => {}
        }
        if nat.hairpin {
            line(&format!(
                "    iifname \"{lan}\" ip daddr {wan_ip} meta l4proto {p} {to_internal}"
            ));
        }
    }
    line("  }");

    // Outbound: translate new flows, through the mapping table first.
    line("  chain postrouting {");
    line("    type nat hook postrouting priority srcnat; policy accept;");
    line(&format!("    oifname \"{wan}\" jump allocate"));
    if nat.hairpin {
        line(&format!(
            "    oifname \"{lan}\" ip saddr {lan_net} ct status dnat jump allocate"
        ));
    }
    line("  }");
    line("  chain allocate {");
    for (p, _) in protocols {
        let m = format!("meta l4proto {p}");
        line(&format!(
            "    {m} snat ip to {wan_ip} : ip saddr . th sport{key_remote} map @mapping_{p}"
        ));
        if nat.port_allocation == PortAllocation::Preserve {
            line(&format!(
                "    {m} th sport != @ports_{p} snat ip to {wan_ip}"
            ));
        }
        match nat.port_allocation {
            PortAllocation::Preserve | PortAllocation::Random => {
                let (lo, hi) = defaults::RANDOM_PORTS;
                line(&format!(
                    "    {m} snat ip to {wan_ip} : {lo}-{hi} fully-random"
                ));
            }
            PortAllocation::Sequential => {
                // numgen yields a host-order integer; an inline map turns it into a port in
                // network byte order (storing numgen directly in a port field scrambles it).
                let first = defaults::SEQUENTIAL_FIRST_PORT;
                let n = defaults::SEQUENTIAL_PORTS;
                let mut ports = String::new();
                for i in 0..n {
                    let sep = if i == 0 { "" } else { ", " };
                    let _ = write!(ports, "{sep}{i} : {}", first + i);
                }
                line(&format!(
                    "    {m} snat ip to {wan_ip} : numgen inc mod {n} map {{ {ports} }}"
                ));
            }
        }
    }
    line(&format!("    snat ip to {wan_ip}"));
    line("  }");

    // After translation: learn and refresh the mapping each flow really got, from packets in
    // both directions (conntrack refreshes on both, so the tables do too). Each view names the
    // internal endpoint, the external port and the remote as that hook sees them. Only
    // translated flows count: the router's own traffic (such as the RST answering a rejected
    // SYN) must not teach the tables anything.
    let outbound = [
        (
            "original ct status snat",
            "ct original ip saddr . ct original proto-src",
            "th sport",
            ("ip daddr", "th dport"),
        ),
        (
            "reply ct status dnat",
            "ct reply ip saddr . ct reply proto-src",
            "th sport",
            ("ip daddr", "th dport"),
        ),
    ];
    let inbound = [
        (
            "reply ct status snat",
            "ct original ip saddr . ct original proto-src",
            "ct reply proto-dst",
            ("ct original ip daddr", "ct original proto-dst"),
        ),
        (
            "original ct status dnat",
            "ct reply ip saddr . ct reply proto-src",
            "ct original proto-dst",
            ("ct original ip saddr", "ct original proto-src"),
        ),
    ];
    for (chain, hook, iface, views) in [
        (
            "track_out",
            "postrouting priority srcnat + 10",
            format!("oifname \"{wan}\""),
            outbound,
        ),
        (
            "track_in",
            "prerouting priority dstnat + 10",
            format!("iifname \"{wan}\""),
            inbound,
        ),
    ] {
        line(&format!("  chain {chain} {{"));
        line(&format!("    type filter hook {hook}; policy accept;"));
        for (p, secs) in protocols {
            for (dir, int, ext, (rip, rport)) in views {
                let m = format!("{iface} meta l4proto {p} ct direction {dir}");
                let remote = match nat.mapping {
                    Mapping::AddressDependent => format!(" . {rip}"),
                    Mapping::AddressAndPortDependent => format!(" . {rip} . {rport}"),
                    Mapping::EndpointIndependent | Mapping::None => String::new(),
                };
                line(&format!(
                    "    {m} update @mapping_{p} {{ {int}{remote} timeout {secs}s : {ext} }}"
                ));
                line(&format!(
                    "    {m} update @reverse_{p} {{ {ext} timeout {secs}s : {int} }}"
                ));
                line(&format!(
                    "    {m} update @ports_{p} {{ {ext} timeout {secs}s }}"
                ));
                if adf {
                    line(&format!(
                        "    {m} update @contacted_{p} {{ {ext} . {rip} timeout {secs}s }}"
                    ));
                }
            }
        }
        line("  }");
    }

    line("  chain forward {");
    line("    type filter hook forward priority filter; policy drop;");
    line("    ct state established,related accept");
    if let (Some(max), SessionOverflow::Drop) = (nat.max_sessions, nat.session_overflow) {
        line(&format!(
            "    iifname \"{lan}\" oifname \"{wan}\" meta l4proto {{ tcp, udp }} ct state new ct count over {max} drop"
        ));
    }
    line(&format!("    iifname \"{lan}\" accept"));
    line("    ct status dnat accept");
    line("  }");

    // Unsolicited inbound packets are addressed to the router itself.
    line("  chain input {");
    line("    type filter hook input priority filter; policy accept;");
    line(&format!(
        "    iifname \"{wan}\" ct state established,related accept"
    ));
    match nat.unsolicited {
        Unsolicited::Drop => line(&format!("    iifname \"{wan}\" drop")),
        Unsolicited::Reject => {
            line(&format!(
                "    iifname \"{wan}\" meta l4proto tcp reject with tcp reset"
            ));
            line(&format!(
                "    iifname \"{wan}\" reject with icmp type port-unreachable"
            ));
        }
    }
    line("  }");
    line("}");
    out
}

/// The key of the mapping that internal endpoint `internal` uses towards `remote`, as the
/// `mapping_*` maps hold it (the remote's address for ADM, its address and port for APDM).
pub fn mapping_key(nat: &NatConfig, internal: SocketAddrV4, remote: SocketAddrV4) -> String {
    let (ip, port) = (internal.ip(), internal.port());
    let (rip, rport) = (remote.ip(), remote.port());
    match nat.mapping {
        Mapping::AddressDependent => format!("{ip} . {port} . {rip}"),
        Mapping::AddressAndPortDependent => format!("{ip} . {port} . {rip} . {rport}"),
        Mapping::EndpointIndependent | Mapping::None => format!("{ip} . {port}"),
    }
}

/// The nft commands that make a router forget the mapping of a flow of `protocol` (`udp` or
/// `tcp`) from `internal` to `remote` that left on `external_port`: its `mapping`, `reverse`,
/// `ports` and (ADF) `contacted` entries. One command per entry, to be run one by one: an
/// entry may have expired already, and nft refuses a whole batch for one missing element.
pub fn forget_mapping(
    nat: &NatConfig,
    protocol: &str,
    internal: SocketAddrV4,
    remote: SocketAddrV4,
    external_port: u16,
) -> Vec<String> {
    let delete = |set: &str, element: String| {
        format!("delete element ip {TABLE} {set}_{protocol} {{ {element} }}")
    };
    let mut commands = vec![
        delete("mapping", mapping_key(nat, internal, remote)),
        delete("reverse", external_port.to_string()),
        delete("ports", external_port.to_string()),
    ];
    if nat.filtering == Filtering::AddressDependent {
        commands.push(delete(
            "contacted",
            format!("{external_port} . {}", remote.ip()),
        ));
    }
    commands
}

/// The dynamic maps and sets that hold a router's NAT state, as `(kind, name)` with kind `map`
/// or `set` (what `nft flush KIND` needs); flushed between independent trials.
pub fn state_sets(nat: &NatConfig) -> Vec<(&'static str, String)> {
    let mut names = Vec::new();
    for p in ["udp", "tcp"] {
        names.extend([
            ("map", format!("mapping_{p}")),
            ("map", format!("reverse_{p}")),
            ("set", format!("ports_{p}")),
        ]);
        if nat.filtering == Filtering::AddressDependent {
            names.push(("set", format!("contacted_{p}")));
        }
    }
    names
}

/// The per-namespace conntrack settings that go with a ruleset: `(sysctl key, value)`.
pub fn conntrack_sysctls(nat: &NatConfig) -> [(&'static str, String); 3] {
    let udp = nat.udp_timeout_secs.to_string();
    [
        ("net.netfilter.nf_conntrack_udp_timeout", udp.clone()),
        // A UDP flow with replies uses the "stream" timeout: make both the configured idle time.
        ("net.netfilter.nf_conntrack_udp_timeout_stream", udp),
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            nat.tcp_timeout_secs.to_string(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::Preset;

    fn rules_for(nat: &NatConfig) -> String {
        render(&RouterRules {
            nat,
            wan_if: "wan",
            wan_ip: Ipv4Addr::new(11, 99, 0, 10),
            lan_if: "lan",
            lan_net: Ipv4Net::new(Ipv4Addr::new(192, 168, 1, 0), 24),
        })
    }

    fn preset(p: Preset) -> NatConfig {
        p.config().expect("router preset")
    }

    #[test]
    fn eim_keys_the_mapping_on_the_internal_endpoint_only() {
        let r = rules_for(&preset(Preset::PortRestricted));
        assert!(r.contains("map mapping_udp { type ipv4_addr . inet_service : inet_service;"));
        assert!(r.contains("map mapping_tcp { type ipv4_addr . inet_service : inet_service;"));
        assert!(r.contains(
            "meta l4proto udp snat ip to 11.99.0.10 : ip saddr . th sport map @mapping_udp"
        ));
    }

    #[test]
    fn adm_and_apdm_add_the_destination_to_the_key() {
        let mut c = preset(Preset::PortRestricted);
        c.mapping = Mapping::AddressDependent;
        let r = rules_for(&c);
        assert!(r.contains("type ipv4_addr . inet_service . ipv4_addr : inet_service"));
        assert!(r.contains("th sport . ip daddr map @mapping_udp"));
        let r = rules_for(&preset(Preset::Symmetric));
        assert!(
            r.contains("type ipv4_addr . inet_service . ipv4_addr . inet_service : inet_service")
        );
        assert!(r.contains("th sport . ip daddr . th dport map @mapping_tcp"));
        assert!(r.contains("ct original proto-src . ip daddr . th dport timeout 180s : th sport"));
        assert!(r.contains(
            "ct original proto-src . ct original ip daddr . ct original proto-dst timeout 180s : ct reply proto-dst"
        ));
    }

    #[test]
    fn filtering_decides_which_inbound_packets_are_translated() {
        let eif = rules_for(&preset(Preset::FullCone));
        assert!(
            eif.contains("iifname \"wan\" meta l4proto udp dnat ip to th dport map @reverse_udp")
        );
        assert!(!eif.contains("@contacted"));

        let adf = rules_for(&preset(Preset::RestrictedCone));
        assert!(adf.contains("meta l4proto tcp th dport . ip saddr @contacted_tcp dnat ip to"));
        assert!(adf.contains("update @contacted_udp { th sport . ip daddr timeout 120s }"));
        assert!(adf.contains(
            "update @contacted_udp { ct reply proto-dst . ct original ip daddr timeout 120s }"
        ));

        let apdf = rules_for(&preset(Preset::PortRestricted));
        assert!(!apdf.contains("iifname \"wan\" meta l4proto udp dnat"));
        assert!(!apdf.contains("@contacted"));
    }

    #[test]
    fn port_allocation_picks_the_fallback_rule() {
        let preserve = rules_for(&preset(Preset::PortRestricted));
        assert!(
            preserve.contains("meta l4proto udp th sport != @ports_udp snat ip to 11.99.0.10\n")
        );
        assert!(preserve.contains("1024-65535 fully-random"));

        let random = rules_for(&preset(Preset::Cgnat));
        assert!(!random.contains("@ports_udp snat"));
        assert!(random.contains("1024-65535 fully-random"));

        let mut c = preset(Preset::PortRestricted);
        c.port_allocation = PortAllocation::Sequential;
        let seq = rules_for(&c);
        assert!(seq.contains("numgen inc mod 1000 map { 0 : 20000, 1 : 20001,"));
        assert!(seq.contains("999 : 20999 }"));
        assert!(!seq.contains("fully-random"));
    }

    #[test]
    fn hairpin_adds_lan_side_translation_only_when_on() {
        let on = rules_for(&preset(Preset::PortRestricted));
        assert!(on.contains("iifname \"lan\" ip daddr 11.99.0.10 meta l4proto tcp dnat"));
        assert!(
            on.contains("oifname \"lan\" ip saddr 192.168.1.0/24 ct status dnat jump allocate")
        );
        let off = rules_for(&preset(Preset::Symmetric));
        assert!(!off.contains("iifname \"lan\" ip daddr"));
        assert!(!off.contains("oifname \"lan\""));
    }

    #[test]
    fn timeouts_apply_per_protocol() {
        let r = rules_for(&preset(Preset::Cgnat));
        assert!(r.contains(
            "meta l4proto udp ct direction original ct status snat update @ports_udp { th sport timeout 30s }"
        ));
        assert!(r.contains(
            "meta l4proto tcp ct direction reply ct status dnat update @ports_tcp { th sport timeout 7440s }"
        ));
        let sysctls = conntrack_sysctls(&preset(Preset::Cgnat));
        assert_eq!(
            sysctls[0],
            ("net.netfilter.nf_conntrack_udp_timeout", "30".to_owned())
        );
        assert_eq!(sysctls[1].1, "30");
    }

    #[test]
    fn inbound_packets_refresh_the_tables_too() {
        let r = rules_for(&preset(Preset::PortRestricted));
        assert!(
            r.contains("chain track_in {\n    type filter hook prerouting priority dstnat + 10;")
        );
        assert!(r.contains(
            "iifname \"wan\" meta l4proto udp ct direction reply ct status snat update @reverse_udp { ct reply proto-dst timeout 120s : ct original ip saddr . ct original proto-src }"
        ));
        assert!(r.contains(
            "iifname \"wan\" meta l4proto tcp ct direction original ct status dnat update @ports_tcp { ct original proto-dst timeout 7440s }"
        ));
    }

    #[test]
    fn unsolicited_inbound_is_dropped_or_rejected() {
        let drop = rules_for(&preset(Preset::PortRestricted));
        assert!(drop.contains("iifname \"wan\" drop"));
        assert!(!drop.contains("reject"));
        let mut c = preset(Preset::PortRestricted);
        c.unsolicited = Unsolicited::Reject;
        let reject = rules_for(&c);
        assert!(reject.contains("reject with tcp reset"));
        assert!(!reject.contains("iifname \"wan\" drop"));
    }

    #[test]
    fn every_state_set_is_declared() {
        for p in Preset::ALL.into_iter().filter_map(Preset::config) {
            let r = rules_for(&p);
            for (kind, name) in state_sets(&p) {
                assert!(
                    r.contains(&format!("  {kind} {name} {{ type ")),
                    "{kind} {name} missing"
                );
            }
        }
    }

    #[test]
    fn a_session_table_that_drops_is_a_connlimit_on_new_outbound_flows() {
        let unbounded = rules_for(&preset(Preset::Symmetric));
        assert!(!unbounded.contains("ct count"));
        let mut c = preset(Preset::Symmetric);
        c.max_sessions = Some(16);
        let r = rules_for(&c);
        assert!(r.contains(
            "    ct state established,related accept\n    iifname \"lan\" oifname \"wan\" meta l4proto { tcp, udp } ct state new ct count over 16 drop\n    iifname \"lan\" accept\n"
        ), "the limit sits between the established flows and the LAN's new ones:\n{r}");
        c.session_overflow = SessionOverflow::EvictOldest;
        assert!(
            !rules_for(&c).contains("ct count"),
            "evicting tables admit every flow; the evictor makes room"
        );
    }

    #[test]
    fn forgetting_a_mapping_deletes_each_of_its_entries() {
        let internal = SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 2), 40000);
        let remote = SocketAddrV4::new(Ipv4Addr::new(11, 99, 0, 11), 3478);
        let apdm = forget_mapping(&preset(Preset::Symmetric), "udp", internal, remote, 20005);
        assert_eq!(
            apdm,
            [
                "delete element ip natlab mapping_udp { 192.168.1.2 . 40000 . 11.99.0.11 . 3478 }",
                "delete element ip natlab reverse_udp { 20005 }",
                "delete element ip natlab ports_udp { 20005 }",
            ]
        );
        let adf = forget_mapping(
            &preset(Preset::RestrictedCone),
            "tcp",
            internal,
            remote,
            40000,
        );
        assert_eq!(
            adf[0],
            "delete element ip natlab mapping_tcp { 192.168.1.2 . 40000 }"
        );
        assert_eq!(
            adf[3],
            "delete element ip natlab contacted_tcp { 40000 . 11.99.0.11 }"
        );
        let mut adm = preset(Preset::PortRestricted);
        adm.mapping = Mapping::AddressDependent;
        assert_eq!(
            mapping_key(&adm, internal, remote),
            "192.168.1.2 . 40000 . 11.99.0.11"
        );
    }

    #[test]
    fn ruleset_replaces_any_previous_table() {
        let r = rules_for(&preset(Preset::PortRestricted));
        assert!(r.starts_with("table ip natlab\ndelete table ip natlab\ntable ip natlab {\n"));
        assert_eq!(r.matches('{').count(), r.matches('}').count());
    }
}
