//! Lab tests: real namespaces, nftables and conntrack. They need root, so they are `#[ignore]`d
//! by default (a plain `cargo test` lists them as ignored); `./test` runs them, and a run
//! without root or the lab's programs fails naming what is missing.
//!
//! Vocabulary (RFC 4787): EIM/ADM/APDM = endpoint-independent / address-dependent /
//! address-and-port-dependent mapping; EIF/ADF/APDF likewise for filtering. A "reflector" on a
//! public host with two addresses and two ports tells a host behind a NAT how it is seen.

use std::net::UdpSocket;
use std::time::Duration;

use natlab::lab::{self, LabState, ProcessId};
use natlab::probe::SessionTable;
use natlab::probe::{self, Reflector};
use natlab::selftest::{self, SelftestOptions, expected_through};
use natlab::{
    Filtering, Lab, LabOptions, LinkCondition, Mapping, NatConfig, PortAllocation, Preset,
    SessionOverflow, Topology, Unsolicited, netns,
};

const PORTS: [u16; 2] = [3478, 3479];

fn preset(p: Preset) -> NatConfig {
    p.config().expect("router preset")
}

/// A lab with a reflector and one host `h` behind `chain` (outermost router first).
fn lab_behind(chain: &[NatConfig]) -> (Lab, Reflector) {
    let mut t = Topology::default().host("reflector", None, 2);
    let mut upstream: Option<String> = None;
    for (i, nat) in chain.iter().enumerate() {
        let name = format!("r{i}");
        t = t.router(&name, *nat, upstream.as_deref());
        upstream = Some(name);
    }
    t = t.host("h", upstream.as_deref(), 1);
    let lab = Lab::build(&t, LabOptions::default()).expect("lab builds");
    let reflector = Reflector::start(&lab, "reflector", PORTS).expect("reflector starts");
    (lab, reflector)
}

fn measure(lab: &Lab, reflector: &Reflector) -> (probe::UdpBehaviour, probe::TcpBehaviour) {
    let ip = lab.node("h").expect("h").addr();
    lab.run_in("h", || {
        let udp = probe::measure_udp(reflector, ip).expect("udp measurement");
        let tcp = probe::measure_tcp(reflector, ip).expect("tcp measurement");
        (udp, tcp)
    })
    .expect("enter h")
}

/// Builds a lab behind `chain` (outermost first), measures UDP and TCP from inside and compares
/// with what the configuration says.
fn assert_behaves_as_configured(chain: &[NatConfig]) {
    let (lab, reflector) = lab_behind(chain);
    let (udp, tcp) = measure(&lab, &reflector);
    let inner_first: Vec<NatConfig> = chain.iter().rev().copied().collect();
    let (want_udp, want_tcp) = expected_through(&inner_first);
    assert_eq!(
        (udp.mapping, udp.filtering, udp.port_allocation, udp.hairpin),
        (
            want_udp.mapping,
            want_udp.filtering,
            want_udp.port_allocation,
            want_udp.hairpin
        ),
        "udp behaviour"
    );
    assert_eq!(
        (tcp.mapping, tcp.filtering, tcp.unsolicited),
        (want_tcp.mapping, want_tcp.filtering, want_tcp.unsolicited),
        "tcp behaviour"
    );
    assert_eq!(
        udp.public_ip,
        lab.public_addr("h").expect("public address"),
        "seen from the outermost router"
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn preset_open_is_no_nat() {
    testkit::require::lab("preset_open_is_no_nat");
    assert_behaves_as_configured(&[]);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn preset_full_cone_is_eim_eif() {
    testkit::require::lab("preset_full_cone_is_eim_eif");
    assert_behaves_as_configured(&[preset(Preset::FullCone)]);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn preset_restricted_cone_is_eim_adf() {
    testkit::require::lab("preset_restricted_cone_is_eim_adf");
    assert_behaves_as_configured(&[preset(Preset::RestrictedCone)]);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn preset_port_restricted_is_eim_apdf_with_hairpin() {
    testkit::require::lab("preset_port_restricted_is_eim_apdf_with_hairpin");
    assert_behaves_as_configured(&[preset(Preset::PortRestricted)]);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn preset_symmetric_is_apdm_apdf_random_without_hairpin() {
    testkit::require::lab("preset_symmetric_is_apdm_apdf_random_without_hairpin");
    assert_behaves_as_configured(&[preset(Preset::Symmetric)]);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn preset_symmetric_sequential_is_apdm_apdf_sequential_without_hairpin() {
    testkit::require::lab("preset_symmetric_sequential_is_apdm_apdf_sequential_without_hairpin");
    assert_behaves_as_configured(&[preset(Preset::SymmetricSequential)]);
}

/// Port prediction relies on this: behind `symmetric-sequential`, every new mapping (a new
/// socket, or an old socket towards a new destination) leaves on the port after the previous
/// mapping's, while an existing mapping keeps its port.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn symmetric_sequential_gives_each_new_mapping_the_next_port() {
    testkit::require::lab("symmetric_sequential_gives_each_new_mapping_the_next_port");
    let (lab, reflector) = lab_behind(&[preset(Preset::SymmetricSequential)]);
    let ep = reflector.endpoints();
    let destinations = [
        ep.primary,
        ep.same_ip_other_port,
        ep.other_ip,
        ep.other_ip_other_port,
    ];
    let (ports, again) = lab
        .run_in("h", || -> std::io::Result<_> {
            let mut ports = Vec::new();
            // Eight sockets, each towards the next reflector endpoint in turn.
            let mut sockets = Vec::new();
            for i in 0..8 {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                ports.push(probe::udp_mapping(&s, destinations[i % 4])?.port());
                sockets.push(s);
            }
            // One socket towards every destination: four more mappings.
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for to in destinations {
                ports.push(probe::udp_mapping(&s, to)?.port());
            }
            // An existing mapping keeps its port.
            let again = probe::udp_mapping(&sockets[0], destinations[0])?.port();
            Ok((ports, again))
        })
        .expect("enter h")
        .expect("reflector answers");
    let steps: Vec<i32> = ports
        .windows(2)
        .map(|w| i32::from(w[1]) - i32::from(w[0]))
        .collect();
    assert!(
        steps.iter().all(|d| *d == 1),
        "external ports {ports:?} (steps {steps:?}) are not consecutive"
    );
    eprintln!("external ports: {ports:?}");
    assert_eq!(again, ports[0], "the first mapping keeps its port");
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn preset_cgnat_in_front_of_a_home_router_is_eim_apdf_random() {
    testkit::require::lab("preset_cgnat_in_front_of_a_home_router_is_eim_apdf_random");
    assert_behaves_as_configured(&[preset(Preset::Cgnat), preset(Preset::PortRestricted)]);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn eim_with_sequential_ports_keeps_one_port_for_every_destination() {
    testkit::require::lab("eim_with_sequential_ports_keeps_one_port_for_every_destination");
    let nat = NatConfig {
        port_allocation: PortAllocation::Sequential,
        ..preset(Preset::FullCone)
    };
    assert_behaves_as_configured(&[nat]);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn address_dependent_mapping_with_reject_is_measured_as_such() {
    testkit::require::lab("address_dependent_mapping_with_reject_is_measured_as_such");
    let nat = NatConfig {
        mapping: Mapping::AddressDependent,
        filtering: Filtering::AddressDependent,
        unsolicited: Unsolicited::Reject,
        hairpin: false,
        ..preset(Preset::PortRestricted)
    };
    assert_behaves_as_configured(&[nat]);
}

/// The UDP flows in router `router`'s conntrack table.
fn udp_flows(lab: &Lab, router: &str) -> usize {
    lab.exec(router, "conntrack", &["-L", "-p", "udp"])
        .expect("conntrack")
        .lines()
        .count()
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn a_full_session_table_that_drops_refuses_new_flows_and_keeps_the_old_ones() {
    testkit::require::lab(
        "a_full_session_table_that_drops_refuses_new_flows_and_keeps_the_old_ones",
    );
    let nat = NatConfig {
        max_sessions: Some(16),
        ..preset(Preset::Symmetric)
    };
    let (lab, reflector) = lab_behind(&[nat]);
    let seen = lab
        .run_in("h", || probe::measure_session_table(&reflector, 24))
        .expect("enter h")
        .expect("probe");
    eprintln!("drop: {seen:?}");
    assert_eq!(seen.answered, 16, "{seen:?}");
    assert!(
        seen.ports[..16].iter().all(Option::is_some)
            && seen.ports[16..].iter().all(Option::is_none),
        "the first 16 flows are answered, the 8 after them dropped: {seen:?}"
    );
    assert_eq!(
        seen.kept, 16,
        "the 16 flows in the table still work: {seen:?}"
    );
    assert_eq!(seen.table, SessionTable::Drop { max_sessions: 16 });
    assert_eq!(
        udp_flows(&lab, "r0"),
        16,
        "dropped flows make no conntrack entry"
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn a_full_session_table_that_evicts_forgets_its_oldest_flows() {
    testkit::require::lab("a_full_session_table_that_evicts_forgets_its_oldest_flows");
    let nat = NatConfig {
        max_sessions: Some(16),
        session_overflow: SessionOverflow::EvictOldest,
        ..preset(Preset::SymmetricSequential)
    };
    let (lab, reflector) = lab_behind(&[nat]);
    let seen = lab
        .run_in("h", || probe::measure_session_table(&reflector, 24))
        .expect("enter h")
        .expect("probe");
    eprintln!("evict-oldest: {seen:?}");
    assert_eq!(seen.answered, 24, "every new flow gets through: {seen:?}");
    assert_eq!(
        seen.kept_each,
        [vec![false; 8], vec![true; 16]].concat(),
        "the 8 oldest flows lost their mappings, the 16 newest kept theirs: {seen:?}"
    );
    assert_eq!(seen.table, SessionTable::EvictOldest { max_sessions: 16 });
    assert_eq!(udp_flows(&lab, "r0"), 16, "evicted flows leave conntrack");

    // An evicted socket that sends again is a new flow with a new mapping (the table forgot
    // the old one, or it would get its old port back), and it evicts the oldest in turn.
    let to = reflector.endpoints().primary;
    let (first, again, evicting) = lab
        .run_in("h", || -> std::io::Result<_> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let first = probe::udp_mapping(&s, to)?;
            let mut newer = Vec::new();
            let started = std::time::Instant::now();
            for _ in 0..16 {
                let n = UdpSocket::bind("0.0.0.0:0")?;
                probe::udp_mapping(&n, to)?;
                newer.push(n);
            }
            eprintln!("16 evicting flows answered in {:?}", started.elapsed());
            let again = probe::udp_mapping(&s, to)?;
            Ok((first, again, newer.len()))
        })
        .expect("enter h")
        .expect("reflector answers");
    assert_eq!(evicting, 16);
    assert_ne!(
        first.port(),
        again.port(),
        "the evicted mapping is gone from the NAT's tables"
    );
    assert_eq!(udp_flows(&lab, "r0"), 16);
}

/// TCP connections are sessions too, until they are closed: a connection in TIME_WAIT no
/// longer holds a place in the table (as the kernel's connlimit counts).
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn open_tcp_connections_fill_the_session_table_and_closed_ones_leave_it() {
    use std::io::Read as _;
    use std::net::{TcpListener, TcpStream};
    testkit::require::lab("open_tcp_connections_fill_the_session_table_and_closed_ones_leave_it");
    let nat = NatConfig {
        max_sessions: Some(4),
        ..preset(Preset::Symmetric)
    };
    let t = Topology::default()
        .host("server", None, 1)
        .router("r", nat, None)
        .host("h", Some("r"), 1);
    let lab = Lab::build(&t, LabOptions::default()).expect("lab");
    let server = lab.node("server").expect("server").addr();
    let listener = lab
        .run_in("server", || TcpListener::bind((server, 5000)))
        .expect("enter server")
        .expect("listen");
    // Each connection is held until the client closes it, then closed from this side too.
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.read_to_end(&mut Vec::new());
            });
        }
    });
    let connect = || {
        lab.run_in("h", || {
            TcpStream::connect_timeout(&(server, 5000).into(), Duration::from_millis(700))
        })
        .expect("enter h")
    };
    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| connect().expect("room in the table"))
        .collect();
    assert!(
        connect().is_err(),
        "a fifth connection finds the table full"
    );
    drop(open.remove(0));
    std::thread::sleep(Duration::from_millis(300));
    let states = lab
        .exec("r", "conntrack", &["-L", "-p", "tcp"])
        .expect("conntrack");
    assert!(states.contains("TIME_WAIT"), "{states}");
    open.push(connect().expect("the closed connection left room"));
    assert!(connect().is_err(), "and the table is full again");
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn an_evicting_router_on_a_delayed_link_runs_both_queues() {
    testkit::require::lab("an_evicting_router_on_a_delayed_link_runs_both_queues");
    let nat = NatConfig {
        max_sessions: Some(4),
        session_overflow: SessionOverflow::EvictOldest,
        ..preset(Preset::Symmetric)
    };
    let t = Topology::default()
        .host("reflector", None, 2)
        .router("r", nat, None)
        .host("h", Some("r"), 1)
        .link(
            "r",
            LinkCondition {
                delay_ms: 5,
                ..Default::default()
            },
        );
    let lab = Lab::build(&t, LabOptions::default()).expect("lab");
    let reflector = Reflector::start(&lab, "reflector", PORTS).expect("reflector");
    let seen = lab
        .run_in("h", || probe::measure_session_table(&reflector, 12))
        .expect("enter h")
        .expect("probe");
    assert_eq!(
        seen.table,
        SessionTable::EvictOldest { max_sessions: 4 },
        "{seen:?}"
    );
    let rtt = lab
        .run_in("h", || probe::udp_rtt(&reflector, 5))
        .expect("enter h")
        .expect("rtt");
    assert!(
        rtt >= Duration::from_millis(9),
        "the link is still delayed: {rtt:?}"
    );
}

/// The self-test's check is what tells a bounded table from a missing one: a lab whose
/// userspace parts run elsewhere (here: nowhere) has no evictor, and the table shows unbounded.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn without_its_evictor_an_evicting_router_is_measured_unbounded() {
    testkit::require::lab("without_its_evictor_an_evicting_router_is_measured_unbounded");
    let nat = NatConfig {
        max_sessions: Some(4),
        session_overflow: SessionOverflow::EvictOldest,
        ..preset(Preset::Symmetric)
    };
    let t = Topology::default()
        .host("reflector", None, 2)
        .router("r", nat, None)
        .host("h", Some("r"), 1);
    let options = LabOptions {
        external_delay_lines: true,
        ..Default::default()
    };
    let lab = Lab::build(&t, options).expect("lab");
    let reflector = Reflector::start(&lab, "reflector", PORTS).expect("reflector");
    let seen = lab
        .run_in("h", || probe::measure_session_table(&reflector, 12))
        .expect("enter h")
        .expect("probe");
    assert_eq!(seen.table, SessionTable::Unbounded, "{seen:?}");
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn a_lab_with_an_evicting_router_leaves_nothing_behind() {
    testkit::require::lab("a_lab_with_an_evicting_router_leaves_nothing_behind");
    let nat = NatConfig {
        max_sessions: Some(4),
        session_overflow: SessionOverflow::EvictOldest,
        ..preset(Preset::Symmetric)
    };
    let t = Topology::default()
        .router("r", nat, None)
        .host("h", Some("r"), 1);
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::build(&t, LabOptions::default()).expect("lab");
        let rules = lab
            .exec("r", "iptables", &["-S", "FORWARD"])
            .expect("iptables");
        assert!(rules.contains("--queue-num 2 --queue-bypass"), "{rules}");
        names
            .lock()
            .expect("lock")
            .extend(lab.plan().namespaces().map(str::to_owned));
        panic!("a failing test");
    });
    assert!(result.is_err());
    let names = names.into_inner().expect("lock");
    assert_eq!(names.len(), 3);
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The self-test with `options` over `presets`: every row must match, with a session check.
fn selftest_passes_with(presets: &[Preset], options: SelftestOptions) {
    let report = selftest::run_with(presets, &options, &|_| {}).expect("self-test runs");
    eprintln!("{report}");
    assert!(report.ok(), "{report}");
    for row in &report.presets {
        let check = row
            .sessions
            .expect("every row has a router and so a session check");
        assert_eq!(check.measured, Some(check.configured), "{report}");
    }
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn selftest_measures_session_tables_that_drop() {
    testkit::require::lab("selftest_measures_session_tables_that_drop");
    selftest_passes_with(
        &[Preset::SymmetricSequential, Preset::PortRestricted],
        SelftestOptions {
            max_sessions: Some(16),
            session_overflow: SessionOverflow::Drop,
        },
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn selftest_measures_session_tables_that_evict_the_oldest() {
    testkit::require::lab("selftest_measures_session_tables_that_evict_the_oldest");
    selftest_passes_with(
        &[Preset::Symmetric, Preset::FullCone],
        SelftestOptions {
            max_sessions: Some(20),
            session_overflow: SessionOverflow::EvictOldest,
        },
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn hairpin_off_on_an_eim_router_keeps_own_mapping_unreachable() {
    testkit::require::lab("hairpin_off_on_an_eim_router_keeps_own_mapping_unreachable");
    let nat = NatConfig {
        hairpin: false,
        ..preset(Preset::FullCone)
    };
    let (lab, reflector) = lab_behind(&[nat]);
    let (udp, _) = measure(&lab, &reflector);
    assert!(!udp.hairpin);
    assert_eq!(
        udp.filtering,
        Filtering::EndpointIndependent,
        "hairpin off does not change filtering"
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn host_behind_home_behind_cgnat_is_seen_with_the_cgnat_address() {
    testkit::require::lab("host_behind_home_behind_cgnat_is_seen_with_the_cgnat_address");
    let (lab, reflector) = lab_behind(&[preset(Preset::Cgnat), preset(Preset::PortRestricted)]);
    let cgnat_ip = lab.node("r0").expect("cgnat").addr();
    let home_wan = lab.node("r1").expect("home").addr();
    assert!(
        home_wan.octets()[..2] == [100, 64],
        "home WAN {home_wan} is inside 100.64/10"
    );
    let seen = lab
        .run_in("h", || {
            probe::udp_mapping(
                &UdpSocket::bind("0.0.0.0:0")?,
                reflector.endpoints().primary,
            )
        })
        .expect("enter h")
        .expect("reflector answers");
    assert_eq!(*seen.ip(), cgnat_ip);
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn two_lan_hosts_on_the_same_internal_port_get_different_external_ports() {
    testkit::require::lab("two_lan_hosts_on_the_same_internal_port_get_different_external_ports");
    let t = Topology::default()
        .host("reflector", None, 2)
        .router("r", preset(Preset::PortRestricted), None)
        .host("a", Some("r"), 1)
        .host("b", Some("r"), 1);
    let lab = Lab::build(&t, LabOptions::default()).expect("lab");
    let reflector = Reflector::start(&lab, "reflector", PORTS).expect("reflector");
    let to = reflector.endpoints().primary;
    let map = |node: &str| {
        lab.run_in(node, || -> std::io::Result<_> {
            let s = UdpSocket::bind("0.0.0.0:40000")?;
            let first = probe::udp_mapping(&s, to)?;
            Ok((s, first))
        })
        .expect("enter")
        .expect("mapping")
    };
    let (sa, ma) = map("a");
    let (sb, mb) = map("b");
    assert_eq!(ma.port(), 40000, "the first host keeps its port");
    assert_ne!(mb.port(), 40000, "the second host gets another port");
    // Both mappings keep working, and stay endpoint-independent.
    assert_eq!(
        probe::udp_mapping(&sa, reflector.endpoints().other_ip).expect("a again"),
        ma
    );
    assert_eq!(
        probe::udp_mapping(&sb, reflector.endpoints().other_ip).expect("b again"),
        mb
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn udp_mapping_expires_after_the_configured_idle_timeout() {
    testkit::require::lab("udp_mapping_expires_after_the_configured_idle_timeout");
    let nat = NatConfig {
        udp_timeout_secs: 4,
        ..preset(Preset::PortRestricted)
    };
    let (lab, reflector) = lab_behind(&[nat]);
    let (before, after) = lab
        .run_in("h", || {
            probe::udp_mapping_lifetime(&reflector, Duration::from_secs(3), Duration::from_secs(6))
        })
        .expect("enter h")
        .expect("lifetime probe");
    assert!(before, "mapping still there after 3 s of a 4 s timeout");
    assert!(!after, "mapping gone after 6 s of a 4 s timeout");
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn link_delay_shows_up_in_the_round_trip_time() {
    testkit::require::lab("link_delay_shows_up_in_the_round_trip_time");
    let t = Topology::default()
        .host("reflector", None, 2)
        .router("r", preset(Preset::PortRestricted), None)
        .host("h", Some("r"), 1)
        .link(
            "r",
            LinkCondition {
                delay_ms: 20,
                ..Default::default()
            },
        )
        .link(
            "h",
            LinkCondition {
                delay_ms: 10,
                ..Default::default()
            },
        );
    let lab = Lab::build(&t, LabOptions::default()).expect("lab");
    let reflector = Reflector::start(&lab, "reflector", PORTS).expect("reflector");
    let rtt = lab
        .run_in("h", || probe::udp_rtt(&reflector, 15))
        .expect("enter")
        .expect("rtt");
    // Two links, each delayed both ways: 2 × (20 + 10) ms.
    let want = Duration::from_millis(60);
    assert!(
        rtt >= want.mul_f64(0.8) && rtt <= want.mul_f64(1.2),
        "rtt {rtt:?}, configured {want:?}"
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn link_loss_drops_about_the_configured_share() {
    testkit::require::lab("link_loss_drops_about_the_configured_share");
    let t = Topology::default()
        .host("reflector", None, 2)
        .host("h", None, 1)
        .link(
            "h",
            LinkCondition {
                delay_ms: 1,
                loss_pct: 30.0,
                ..Default::default()
            },
        );
    let lab = Lab::build(
        &t,
        LabOptions {
            seed: 9,
            ..Default::default()
        },
    )
    .expect("lab");
    let reflector = Reflector::start(&lab, "reflector", PORTS).expect("reflector");
    let to = reflector.endpoints().primary;
    let answered = lab
        .run_in("h", || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let mut buf = [0u8; 256];
            (0..200)
                .filter(|i| {
                    let _ = s.send_to(format!("NATLAB loss{i}").as_bytes(), to);
                    s.recv_from(&mut buf).is_ok()
                })
                .count()
        })
        .expect("enter");
    // A round trip survives both directions: 0.7² = 49% expected.
    assert!(
        (70..=130).contains(&answered),
        "{answered} of 200 round trips answered at 30% loss each way"
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn dropping_a_lab_removes_it_even_when_a_test_panics() {
    testkit::require::lab("dropping_a_lab_removes_it_even_when_a_test_panics");
    let t = Topology::default()
        .router("r", preset(Preset::Cgnat), None)
        .host("h", Some("r"), 1);
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::build(&t, LabOptions::default()).expect("lab");
        names
            .lock()
            .expect("lock")
            .extend(lab.plan().namespaces().map(str::to_owned));
        let _sleeper = lab.spawn("h", "sleep", &["300"]).expect("spawn");
        panic!("a failing test");
    });
    assert!(result.is_err());
    let names = names.into_inner().expect("lock");
    assert_eq!(names.len(), 3);
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn spawned_processes_report_readiness_and_end_with_the_lab() {
    testkit::require::lab("spawned_processes_report_readiness_and_end_with_the_lab");
    let t = Topology::default().host("h", None, 1);
    let lab = Lab::build(&t, LabOptions::default()).expect("lab");
    let p = lab
        .spawn(
            "h",
            "sh",
            &["-c", "ip -brief addr show eth0; echo ready; sleep 300"],
        )
        .expect("spawn");
    let line = p.wait_for("ready", Duration::from_secs(10)).expect("ready");
    assert_eq!(line, "ready");
    assert!(
        p.output().contains("11.99.0.10/16"),
        "runs inside the node: {}",
        p.output()
    );
    let pid = p.pid().expect("pid");
    let id = ProcessId::of(pid).expect("running");
    drop(lab);
    assert!(!id.is_alive(), "process {pid} outlived its lab");
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn sweep_removes_labs_of_dead_owners_and_keeps_live_ones() {
    testkit::require::lab("sweep_removes_labs_of_dead_owners_and_keeps_live_ones");
    let live = Lab::build(
        &Topology::default().host("h", None, 1),
        LabOptions::default(),
    )
    .expect("lab");
    // A lab whose owner died: its state names a process that has exited.
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let dead = ProcessId {
        pid: child.id(),
        start: 1,
    };
    child.wait().expect("wait");
    let plan = Topology::default()
        .host("h", None, 1)
        .plan(&lab::random_name())
        .expect("plan");
    for ns in plan.namespaces() {
        netns::add(ns).expect("add");
    }
    lab::save_state(&LabState {
        plan: plan.clone(),
        owner: dead,
        detached: false,
        holder: None,
        seed: 0,
    })
    .expect("state");
    let removed = lab::sweep();
    assert!(removed.contains(&plan.lab), "removed {removed:?}");
    assert!(plan.namespaces().all(|ns| !netns::exists(ns)));
    assert!(
        live.plan().namespaces().all(netns::exists),
        "a live lab survives the sweep"
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn lab_names_are_unique_and_a_taken_name_is_refused() {
    testkit::require::lab("lab_names_are_unique_and_a_taken_name_is_refused");
    let t = Topology::default().host("h", None, 1);
    let name = lab::random_name();
    let first = Lab::build(
        &t,
        LabOptions {
            name: Some(name.clone()),
            ..Default::default()
        },
    )
    .expect("lab");
    let err = Lab::build(
        &t,
        LabOptions {
            name: Some(name.clone()),
            ..Default::default()
        },
    )
    .expect_err("taken");
    assert!(err.to_string().contains("exists already"), "{err}");
    assert!(
        first.plan().namespaces().all(netns::exists),
        "the refused build removed nothing"
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn flushing_nat_state_forgets_mappings() {
    testkit::require::lab("flushing_nat_state_forgets_mappings");
    let (lab, reflector) = lab_behind(&[preset(Preset::Cgnat)]);
    let to = reflector.endpoints().primary;
    let sock = lab
        .run_in("h", || UdpSocket::bind("0.0.0.0:0"))
        .expect("enter")
        .expect("bind");
    let before = probe::udp_mapping(&sock, to).expect("mapping");
    lab.flush_nat_state().expect("flush");
    let after = probe::udp_mapping(&sock, to).expect("mapping");
    // Random allocation: a forgotten mapping comes back on another port (1 in 64511 it does not).
    assert_ne!(before.port(), after.port());
    assert_eq!(before.ip(), after.ip());
}

/// `renumber_router` moves a router to a new external address: traffic from behind it shows
/// the new address, the lab state says so, and a port-mapping router's miniupnpd keeps running.
/// `reboot_router` wipes mappings: after it, the same socket gets a fresh mapping (the old
/// conntrack entry is gone, so the reflector sees traffic again only through a new mapping),
/// and miniupnpd is a new process.
#[test]
#[ignore = "needs root, the NAT lab and miniupnpd: ./test runs it"]
fn renumber_and_reboot_change_what_the_internet_sees() {
    testkit::require::portmap("renumber_and_reboot_change_what_the_internet_sees");
    let t = Topology::default()
        .host("reflector", None, 2)
        .router("r", preset(Preset::Symmetric), None)
        .portmap("r", natlab::portmap::PortMapConfig::default())
        .host("h", Some("r"), 1);
    let mut lab = Lab::build(&t, LabOptions::default()).expect("lab");
    let reflector = Reflector::start(&lab, "reflector", PORTS).expect("reflector");
    let to = reflector.endpoints().primary;
    let sock = lab
        .run_in("h", || UdpSocket::bind("0.0.0.0:0"))
        .expect("enter h")
        .expect("socket");
    let seen = |lab: &Lab| {
        lab.run_in("h", || probe::udp_mapping(&sock, to))
            .expect("enter h")
            .expect("mapping")
    };
    let record = natlab::portmap::Files::of(lab.name(), "r").process();
    let daemon = || {
        let text = std::fs::read_to_string(&record).expect("process record");
        serde_json::from_str::<ProcessId>(&text).expect("process id")
    };
    let first_daemon = daemon();
    assert!(first_daemon.is_alive());

    let before = seen(&lab);
    assert_eq!(*before.ip(), lab.public_addr("h").expect("public"));
    let new = lab.renumber_router("r", None).expect("renumber");
    assert_ne!(new, *before.ip());
    assert_eq!(lab.public_addr("h").expect("public"), new);
    assert_eq!(
        lab::load_state(lab.name())
            .expect("state")
            .plan
            .node("r")
            .expect("r")
            .addr(),
        new
    );
    let after = seen(&lab);
    assert_eq!(*after.ip(), new, "the internet sees the new address");
    assert!(
        first_daemon.is_alive(),
        "miniupnpd survives an address change"
    );

    // Symmetric + random ports: a fresh mapping after the reboot gets another random port,
    // while without the reboot the socket keeps its mapping.
    assert_eq!(seen(&lab), after, "no reboot: the mapping stays");
    lab.reboot_router("r", Duration::from_millis(300))
        .expect("reboot");
    let rebooted = seen(&lab);
    assert_eq!(*rebooted.ip(), new);
    assert_ne!(
        rebooted.port(),
        after.port(),
        "the reboot forgot the mapping"
    );
    assert!(!first_daemon.is_alive(), "the old miniupnpd is gone");
    assert!(daemon().is_alive(), "a new miniupnpd runs");
    assert_ne!(daemon(), first_daemon);
    assert!(
        matches!(
            lab.renumber_router("reflector", None),
            Err(natlab::LabError::NotARouter(_))
        ),
        "hosts cannot be renumbered"
    );
}
